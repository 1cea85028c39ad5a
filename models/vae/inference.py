"""`VAEModel`: one loaded VAE (diffusers AutoencoderKL or AutoencoderTiny) plus what the service needs to know.

Families (docs/families.md): AutoencoderKL with 4 latent channels (SD 1.x, SDXL) or 16 (SD3, FLUX),
scaling / shift factors and optional per-channel `latents_mean` / `latents_std` from its config;
AutoencoderTiny (TAESD): a deterministic encoder (no posterior: `sample` changes nothing) whose
latents are already in the diffusion model's scaled space (config scale 1, shift 0). Tiling is
AutoencoderKL's (GroupNorm statistics); an AutoencoderTiny always runs untiled.

Tensors: images are float (N, 3, H, W) in [-1, 1] of any size (padded to the downsample factor for
the model, see `encode`); latents are raw (unscaled) float (N, C, H/f, W/f). HF scaling semantics
live in models.vae.latents (the latent contract). Later work (batching) hooks into `_encode_tensor` /
`_decode_tensor`.

Fast path (measured in benchmarks/RESULTS.md): float32 stays exact (contiguous NCHW, the same
kernels as an in-process diffusers model). In bfloat16 / float16 the weights are cast to that
dtype and both weights and inputs use the channels_last layout (on this CPU with AVX-512 bf16,
bf16 weights + channels_last ran a SD-size VAE ~4-6x faster than fp32; fp32 weights +
torch.autocast was slower, and channels_last without bf16 weights gained little). A half-precision
result containing NaN/Inf is recomputed in float32 (`nan_retry`). float16 with the config's
`force_upcast` (diffusers' flag for VAEs that overflow in fp16) runs in float32, as diffusers'
pipelines do. `compile=True` wraps encoder and decoder in torch.compile (warmed up by `warmup`).

Tiling: images above `tile_threshold_pixels` (or with `tiled=True`) go through diffusers'
tiled encode / decode (overlapping tiles of `tile_size` pixels, linear blending over
`tile_overlap` of a tile), so memory is bounded by one tile's activations plus the output.
With `tile_norm_passes=2` (default) the tiling loop runs twice and the second pass normalises every
GroupNorm with whole-image statistics gathered by the first (models/vae/tiling.py): tiles no longer
shift in tone; 1 is plain diffusers tiling (half the time).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from models.vae import colour_lock as colour_lock_ops, threads, tiling
from models.vae.imaging import crop_to, pad_to_multiple
from models.vae.loading import LoadedWeights, ModelLoadError, load_weights, resolve_dtype

log = logging.getLogger("vae.inference")

DEFAULT_TILE_THRESHOLD_PIXELS = 1536 * 1536  # above this many pixels an image is tiled automatically
DEFAULT_TILE_SIZE = 768  # tile side in image pixels (latent tile = tile_size / 8); 768: see RESULTS.md
DEFAULT_TILE_OVERLAP = 0.25  # fraction of a tile shared with its neighbour and blended linearly
DEFAULT_TILE_NORM_PASSES = 2  # 2: GroupNorm statistics shared across tiles (models/vae/tiling.py); 1: per tile


def diffusers_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """What in-process diffusers gives for images x: the posterior mode of an AutoencoderKL, the
    (deterministic) latents of an AutoencoderTiny. The reference the benchmark and tests compare with."""
    out = vae.encode(x)
    return out.latents if hasattr(out, "latents") else out.latent_dist.mode()


class VAEModel:
    """A named AutoencoderKL or AutoencoderTiny on one device and dtype. Thread-safe for concurrent inference calls."""

    def __init__(
        self,
        name: str,
        loaded: LoadedWeights,
        *,
        channels_last: bool | None = None,
        compile: bool = False,
        tile_threshold_pixels: int | None = DEFAULT_TILE_THRESHOLD_PIXELS,
        tile_size: int = DEFAULT_TILE_SIZE,
        tile_overlap: float = DEFAULT_TILE_OVERLAP,
        tile_norm_passes: int = DEFAULT_TILE_NORM_PASSES,
        nan_retry: bool = True,
        requested_dtype: torch.dtype | None = None,
    ):
        """`channels_last=None`: on for half precision, off for float32 (which stays exact).
        `tile_threshold_pixels=None` or 0: never tile automatically (only with `tiled=True`)."""
        self.name = name
        self.vae = loaded.vae
        self.sha256 = loaded.sha256
        self.source = loaded.path
        self.layout = loaded.layout
        self.kind = type(self.vae).__name__  # "AutoencoderKL" | "AutoencoderTiny"
        param = next(self.vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.requested_dtype = requested_dtype or self.dtype
        self.upcast = self.requested_dtype == torch.float16 and bool(getattr(self.config, "force_upcast", False))
        if self.upcast:  # diffusers' force_upcast: this VAE overflows in float16, run it in float32
            log.warning("model %s: force_upcast is set in its config, running in float32 instead of float16", name)
            self.vae = self.vae.float()
            self.dtype = torch.float32
        self.channels_last = (self.dtype != torch.float32) if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.vae = self.vae.to(memory_format=torch.channels_last)
        self.nan_retry = nan_retry
        self._fp32_vae = None
        self._fp32_lock = threading.Lock()
        self.tile_threshold_pixels = tile_threshold_pixels or None
        self.tile_size = int(tile_size)
        self.tile_overlap = float(tile_overlap)
        f = self.downsample_factor
        if self.tile_size < 2 * f or self.tile_size % f:
            raise ValueError(f"tile_size must be a multiple of {f} and at least {2 * f}, got {tile_size}")
        if not 0 <= self.tile_overlap < 1:
            raise ValueError(f"tile_overlap must be in [0, 1), got {tile_overlap}")
        self.tile_norm_passes = int(tile_norm_passes)
        if self.tile_norm_passes not in (1, 2):
            raise ValueError(f"tile_norm_passes must be 1 or 2, got {tile_norm_passes}")
        if self.tiling_supported:
            if self.tile_norm_passes > 1:
                tiling.install(self.vae)  # no-op for untiled calls (see models/vae/tiling.py)
            self.vae.tile_sample_min_size = self.tile_size
            self.vae.tile_latent_min_size = self.tile_size // f
            self.vae.tile_overlap_factor = self.tile_overlap
        tiling.install_stop_checks(self.vae)  # tiling.stop_when: stop at the next tile or frame
        self.compiled = bool(compile)
        if self.compiled:
            self.vae.encoder.compile()
            self.vae.decoder.compile()
        else:  # cores shared with concurrent calls, re-read every layer (models/vae/threads.py)
            threads.install(self.vae)

    @classmethod
    def load(
        cls,
        name: str,
        source: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        config: str | Path | None = None,
        **options,
    ) -> "VAEModel":
        """Load weights (see models.vae.loading.load_weights; raises ModelLoadError) and wrap them.

        `options` go to the constructor (channels_last, compile, tile_threshold_pixels, ...).
        float16 weights are read in float32 first, so a `force_upcast` model keeps exact weights.
        """
        wanted = resolve_dtype(dtype, device)
        loaded = load_weights(source, device=device, dtype=torch.float32 if wanted == torch.float16 else wanted,
                              config=config)
        if wanted == torch.float16 and not getattr(loaded.vae.config, "force_upcast", False):
            loaded.vae = loaded.vae.to(torch.float16)
        return cls(name, loaded, requested_dtype=wanted, **options)

    # --- facts -----------------------------------------------------------------------------
    @property
    def config(self):
        return self.vae.config

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    @property
    def is_tiny(self) -> bool:
        return self.kind == "AutoencoderTiny"

    @property
    def tiling_supported(self) -> bool:
        """AutoencoderKL only: diffusers' AutoencoderTiny tiling assumes 4 latent channels."""
        return not self.is_tiny

    @property
    def downsample_factor(self) -> int:
        if self.is_tiny:  # one upsampling between consecutive decoder stages
            return int(self.config.upsampling_scaling_factor) ** (len(self.config.num_decoder_blocks) - 1)
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    @property
    def shift_factor(self) -> float | None:
        shift = getattr(self.config, "shift_factor", None)
        return None if shift is None else float(shift)

    @property
    def latents_mean(self) -> tuple[float, ...] | None:
        """Per-channel statistics of the config (diffusers' SDXL convention), when it defines both."""
        mean, std = getattr(self.config, "latents_mean", None), getattr(self.config, "latents_std", None)
        return None if mean is None or std is None else tuple(float(v) for v in mean)

    @property
    def latents_std(self) -> tuple[float, ...] | None:
        mean, std = getattr(self.config, "latents_mean", None), getattr(self.config, "latents_std", None)
        return None if mean is None or std is None else tuple(float(v) for v in std)

    def param_counts(self) -> dict[str, int]:
        enc = sum(p.numel() for n, p in self.vae.named_parameters() if n.startswith(("encoder.", "quant_conv.")))
        total = sum(p.numel() for p in self.vae.parameters())
        return {"encoder": enc, "decoder": total - enc, "total": total}

    def describe(self) -> dict:
        """JSON-able summary, as served by GET /v1/models."""
        return {
            "name": self.name,
            "class": self.kind,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": self.latents_mean,
            "latents_std": self.latents_std,
            "dtype": str(self.dtype).removeprefix("torch."),
            "requested_dtype": str(self.requested_dtype).removeprefix("torch."),
            "device": str(self.device),
            "channels_last": self.channels_last,
            "compiled": self.compiled,
            "tiling": self.tiling_supported,
            "tile_threshold_pixels": self.tile_threshold_pixels,
            "tile_size": self.tile_size,
            "tile_overlap": self.tile_overlap,
            "tile_norm_passes": self.tile_norm_passes,
            "parameters": self.param_counts()["total"],
            "sha256": self.sha256,
            "layout": self.layout,
            "config": {k: v for k, v in dict(self.config).items() if not k.startswith("_")},
        }

    # --- inference --------------------------------------------------------------------------
    def use_tiling(self, height: int, width: int, tiled: bool | None = None) -> bool:
        """`tiled` True/False forces it; None tiles images over `tile_threshold_pixels`."""
        if tiled is not None:
            return bool(tiled)
        return self.tile_threshold_pixels is not None and height * width > self.tile_threshold_pixels

    def _fp32(self):
        """A float32 copy of the model for NaN retries (made once, on first need)."""
        if self.dtype == torch.float32:
            return self.vae
        with self._fp32_lock:
            if self._fp32_vae is None:  # a fresh eager module (no compile, no hooks) with these weights
                vae = type(self.vae).from_config(self.vae.config)
                vae.load_state_dict({k: v.float() for k, v in self.vae.state_dict().items()})
                vae = vae.to(self.device, torch.float32).eval().requires_grad_(False)
                if self.tiling_supported:
                    vae.tile_sample_min_size = self.vae.tile_sample_min_size
                    vae.tile_latent_min_size = self.vae.tile_latent_min_size
                    vae.tile_overlap_factor = self.vae.tile_overlap_factor
                    if self.tile_norm_passes > 1:
                        tiling.install(vae)
                self._fp32_vae = threads.install(tiling.install_stop_checks(vae))
        return self._fp32_vae

    def _prepare(self, t: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
        t = t.to(self.device, dtype)
        # Contiguous NCHW in float32: the memory layout picks the conv kernel, and exact results must
        # not depend on it. The half-precision fast path uses channels_last.
        return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def _encode_tensor(
        self, x: torch.Tensor, sample: bool, generator: torch.Generator | None,
        *, tiled: bool = False, vae=None,
    ) -> torch.Tensor:
        vae = vae if vae is not None else self.vae
        if self.is_tiny:  # deterministic: no posterior to sample
            return vae.encode(x).latents
        if tiled:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            dist = DiagonalGaussianDistribution(tiling.run_tiled(vae._tiled_encode, x, self.tile_norm_passes))
        else:
            dist = vae.encode(x).latent_dist
        return dist.sample(generator=generator) if sample else dist.mode()

    def _decode_tensor(self, z: torch.Tensor, *, tiled: bool = False, vae=None) -> torch.Tensor:
        vae = vae if vae is not None else self.vae
        if tiled:
            return tiling.run_tiled(lambda t: vae.tiled_decode(t).sample, z, self.tile_norm_passes)
        return vae.decode(z).sample

    def _needs_retry(self, out: torch.Tensor) -> bool:
        return self.nan_retry and self.dtype != torch.float32 and not bool(torch.isfinite(out).all())

    def encode(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
        tiled: bool | None = None, colour_lock: int = 0,
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> raw latents (N, C, ceil(H/f), ceil(W/f)), float32.

        Sides that are not multiples of f are replicate-padded at the bottom/right first.
        `sample=False` gives the posterior mode (= mean); `sample=True` draws mean + std * noise
        with `generator` (reproducible with a seeded generator). `tiled`: see `use_tiling`.
        `colour_lock` > 0: that many closed-loop steps (that many + 1 decodes) that shift each latent channel
        so the latents decode to the image's own mean colour (models/vae/colour_lock.py).
        """
        return self._encode_locked(x, sample, generator, tiled, colour_lock)[0]

    def roundtrip(self, x: torch.Tensor, tiled: bool | None = None, colour_lock: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode` (posterior mean) then `decode` at the input's size: (raw latents, images in about
        [-1, 1]). With a colour lock the decode the lock checked and kept is the answer, not decoded again."""
        z, image = self._encode_locked(x, False, None, tiled, colour_lock)
        return z, image if image is not None else self.decode(z, tuple(x.shape[-2:]), tiled=tiled)

    def _encode_locked(self, x: torch.Tensor, sample: bool, generator: torch.Generator | None,
                       tiled: bool | None, colour_lock: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents, and with a colour lock their decode at the input's size (None without)."""
        if not 0 <= colour_lock <= colour_lock_ops.MAX_STEPS:
            raise ValueError(f"colour_lock must be from 0 to {colour_lock_ops.MAX_STEPS}, got {colour_lock}")
        z = self._encode_padded(x, sample, generator, tiled)
        if not colour_lock:
            return z, None
        size, target, scale = tuple(x.shape[-2:]), colour_lock_ops.mean_colour(x), self.scaling_factor or 1.0
        jacobian = colour_lock_ops.jacobians(lambda p: self.encode(p, tiled=False),
                                             lambda t: self.decode(t, tiled=False), x, self.downsample_factor, scale)
        # decode tiles exactly when this encode did: both decide on the padded size
        return colour_lock_ops.correct(z, target, lambda t: self.decode(t, size, tiled=tiled), jacobian,
                                       colour_lock, scale)

    def _encode_padded(self, x: torch.Tensor, sample: bool, generator: torch.Generator | None,
                       tiled: bool | None) -> torch.Tensor:
        x, _ = pad_to_multiple(x.float(), self.downsample_factor)
        tile = self.use_tiling(x.shape[-2], x.shape[-1], tiled)
        rng_state = generator.get_state() if (sample and generator is not None) else None
        with torch.inference_mode():
            z = self._encode_tensor(self._prepare(x, self.dtype, self.channels_last), sample, generator, tiled=tile)
            if self._needs_retry(z):
                log.warning("model %s: non-finite %s encode output, retrying in float32", self.name, self.dtype)
                if rng_state is not None:
                    generator.set_state(rng_state)
                z = self._encode_tensor(self._prepare(x, torch.float32, False), sample, generator,
                                        tiled=tile, vae=self._fp32())
        return z.float().contiguous()

    def decode(self, z: torch.Tensor, size: tuple[int, int] | None = None, tiled: bool | None = None) -> torch.Tensor:
        """Raw latents (N, C, h, w) -> images float32 (N, 3, h*f, w*f) in about [-1, 1], unclamped.

        `size` = (H, W) crops the result back to an original image size. `tiled`: see `use_tiling`.
        """
        f = self.downsample_factor
        tile = self.use_tiling(z.shape[-2] * f, z.shape[-1] * f, tiled)
        with torch.inference_mode():
            x = self._decode_tensor(self._prepare(z, self.dtype, self.channels_last), tiled=tile)
            if self._needs_retry(x):
                log.warning("model %s: non-finite %s decode output, retrying in float32", self.name, self.dtype)
                x = self._decode_tensor(self._prepare(z, torch.float32, False), tiled=tile, vae=self._fp32())
        x = x.float()
        x = crop_to(x, size) if size is not None else x
        return x.contiguous()

    def warmup(self, size: int | None = None) -> None:
        """Encode + decode once so first requests do not pay for lazy initialisation, then check
        that a fixed latent decodes to finite pixels (ModelLoadError otherwise).

        A compiled model is warmed at `size` (default 256) so the compiled graphs exist before
        /readyz turns ready; otherwise a tiny image is enough.
        """
        f = self.downsample_factor
        side = size or (256 if self.compiled else 2 * f)
        self.decode(self.encode(torch.zeros(1, self.in_channels, side, side)))
        # A fixed latent must decode to finite pixels: finite weights can still overflow (fp16).
        z = torch.randn(1, self.latent_channels, side // f, side // f, generator=torch.Generator().manual_seed(0))
        if not torch.isfinite(self.decode(z)).all():
            raise ModelLoadError(f"model {self.name!r}: a fixed latent decodes to NaN or Inf pixels in warm-up")
