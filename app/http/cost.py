"""Admission by cost: what a request will compute, estimated before any model work, against a
budget (`settings.max_cost`, in GFLOP; over it: 413 `cost_too_high`, nothing computed).

FLOPs are those of models.vae.info.count_flops (FlopCounterMode on the meta device: a
multiply-add is 2 FLOPs; convolutions, matmuls and attention). Per model, one encode and one decode
are fitted as `a * p + b * p**2` FLOPs for p pixels (convolutions grow with the area, the mid-block
attention with its square) from two sizes counted once per architecture; for AutoencoderKL the
fit is exact at any size and shape (tests check a third one), so a 1x262144 image is charged as
what it is: 8x262144 pixels after padding, with attention over 32768 latent positions.

What each request computes: images are padded to multiples of the downsample factor; a tiled
encode or decode (over `tile_threshold_pixels`, or `?tiled=true`) costs its overlapping tiles as
diffusers cuts them, times `tile_norm_passes`; times N for a batch. /roundtrip is an encode plus a
decode, /sample n decodes, /interpolate the encodes of its image parts plus `steps` decodes.
"""

from __future__ import annotations

import functools
import json
import logging

from app.protocol.errors import CostTooHigh
from models.vae.colour_lock import probe_size
from models.vae.inference import VAEModel

log = logging.getLogger("vae.server")


_FITS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {}  # architecture -> fits


def _fits(model: VAEModel) -> tuple[tuple[float, float], tuple[float, float]]:
    """((a, b) of encode, (a, b) of decode) for the model's architecture (counted once per config)."""
    from models.vae.info import count_flops

    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _FITS:
        f = model.downsample_factor
        s1, s2 = 8 * f, 16 * f
        c1, c2 = count_flops(model.vae, s1), count_flops(model.vae, s2)
        p1, p2 = s1 * s1, s2 * s2

        def fit(y1: float, y2: float) -> tuple[float, float]:
            b = (y2 - y1 * p2 / p1) / (p2 * p2 - p1 * p2)
            return (y1 - b * p1 * p1) / p1, max(0.0, b)

        _FITS[key] = fit(c1["encode"], c2["encode"]), fit(c1["decode"], c2["decode"])
    return _FITS[key]


class CostModel:
    """FLOPs of the encodes and decodes one model would run for a request."""

    def __init__(self, model: VAEModel):
        self.model = model
        try:
            self.enc, self.dec = _fits(model)
        except Exception as exc:  # noqa: BLE001 - an architecture count_flops cannot build
            per_pixel = 2.0 * model.param_counts()["total"] / model.downsample_factor ** 2
            log.warning("model %s: FLOPs not countable (%s); cost estimated from parameters", model.name, exc)
            self.enc = self.dec = (per_pixel, 0.0)

    def _tiles(self, side: int, tile: int, unit: int) -> tuple[int, int, int]:
        """(sum of tile sides, sum of their squares, count) in pixels along one side, for tiles of
        `tile` (in `unit`s: 1 for pixels, f for latents) starting every (1 - overlap) tile, as
        diffusers cuts them."""
        sides = [min(tile, side - i) * unit for i in range(0, side, max(1, int(tile * (1 - self.model.tile_overlap))))]
        return sum(sides), sum(s * s for s in sides), len(sides)

    def _run(self, fit, height: int, width: int, tiled: bool, tile: int, unit: int) -> tuple[float, str]:
        a, b = fit
        if not tiled:
            p = height * width * unit * unit
            return a * p + b * p * p, ""
        (sh, sh2, nh), (sw, sw2, nw) = self._tiles(height, tile, unit), self._tiles(width, tile, unit)
        passes = self.model.tile_norm_passes
        return passes * (a * sh * sw + b * sh2 * sw2), f", tiled: {nh * nw} tiles x {passes} passes"

    def encode(self, n: int, height: int, width: int, tiled: bool | None = None) -> tuple[float, str]:
        """(FLOPs, description) of encoding n images of height x width (before padding)."""
        f = self.model.downsample_factor
        hp, wp = -(-height // f) * f, -(-width // f) * f
        flops, how = self._run(self.enc, hp, wp, self.model.use_tiling(hp, wp, tiled), self.model.tile_size, 1)
        return n * flops, f"encode of {n} x {height}x{width} ({hp}x{wp} after padding{how})"

    def decode(self, n: int, h: int, w: int, tiled: bool | None = None) -> tuple[float, str]:
        """(FLOPs, description) of decoding n latents of h x w."""
        f = self.model.downsample_factor
        use = self.model.use_tiling(h * f, w * f, tiled)
        flops, how = self._run(self.dec, h, w, use, self.model.tile_size // f, f)
        return n * flops, f"decode of {n} x {h * f}x{w * f}{how}"

    def colour_lock(self, n: int, height: int, width: int, steps: int, tiled: bool | None = None) -> tuple[float, str]:
        """(FLOPs, description) of `steps` colour-lock steps on n images of height x width: steps + 1
        decodes, plus per image one encode and 2 C decodes of its shrunk probe (models/vae/colour_lock.py);
        nothing for 0 steps."""
        if not steps:
            return 0.0, "no colour lock"
        f = self.model.downsample_factor
        ph, pw = probe_size(height, width, f)
        flops, how = self.decode(n, -(-height // f), -(-width // f), tiled)
        probe = (self.encode(n, ph, pw, tiled=False)[0]
                 + 2 * self.model.latent_channels * self.decode(n, ph // f, pw // f, tiled=False)[0])
        return (steps + 1) * flops + probe, f"colour lock: {steps + 1} x ({how}) + {n} x {ph}x{pw} probe"


@functools.lru_cache(maxsize=64)
def _cost_model(model: VAEModel) -> CostModel:
    return CostModel(model)


def cost_model(model: VAEModel) -> CostModel:
    return _cost_model(model)


def admit(max_cost: float, *parts: tuple[float, str]) -> float:
    """The GFLOP of `parts` (from CostModel.encode / decode) if within `max_cost`, else 413."""
    gflop = sum(p[0] for p in parts) / 1e9
    if gflop > max_cost:
        what = "; ".join(p[1] for p in parts if p[0])  # a part that computes nothing is not named
        raise CostTooHigh(f"this request would compute an estimated {gflop:,.0f} GFLOP ({what}), over this "
                          f"server's budget of {max_cost:,.0f} GFLOP per request (max_cost, GET /v1/models)")
    return gflop


def describe(costs: CostModel) -> dict:
    """A model's cost as GET /v1/models shows it: the fit and a few examples, in GFLOP."""
    g = lambda part: round(part[0] / 1e9, 1)  # noqa: E731
    f = costs.model.downsample_factor
    return {
        "unit": "GFLOP", "fit": "a * pixels + b * pixels**2 per encode / decode (padded; tiles as run)",
        "encode": {"a": costs.enc[0] / 1e9, "b": costs.enc[1] / 1e9},
        "decode": {"a": costs.dec[0] / 1e9, "b": costs.dec[1] / 1e9},
        "examples": {f"{verb} {s}x{s}": g(costs.encode(1, s, s) if verb == "encode" else costs.decode(1, s // f, s // f))
                     for verb in ("encode", "decode") for s in (512, 2048)},
    }
