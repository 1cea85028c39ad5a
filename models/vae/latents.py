"""The latent contract: how latents are scaled, and the metadata that travels with them.

Like taesd.py's `scale_latents` / `unscale_latents`, the convention lives beside the model and
has one home. Every reader and writer of latents uses it: the HTTP wire formats (`/encode`'s
metadata, `/decode` and `/interpolate` reading it back), and latent files (`vae encode/decode`).

Spaces. *Raw* latents are what the encoder's posterior gives and the decoder takes. *Scaled*
latents are `(z - shift) * scale`, the space a diffusion model works in (roughly N(0, I)). A
config with per-channel `latents_mean` / `latents_std` (Playground v2.5's SDXL-shaped VAE) scales
as diffusers' SDXL pipelines do: `(z - mean) * scale / std`, and back `z * std / scale + mean`.
AutoencoderTiny (TAESD) encodes straight into the scaled space: its config says scale 1, shift 0.

Metadata (string values, JSON-encoded, as safetensors stores them; a JSON body may carry native
JSON values instead):
  scaling_factor, shift_factor   numbers or null: the factors the producer knew of
  latents_mean, latents_std      per-channel lists (only when the model's config defines them)
  scaled                         true: the tensor is stored scaled with those factors; false: raw.
                                 Absent (files from before this key): scaled iff scaling_factor
                                 is not null, which is what `/encode?scaling_factor=` always meant
  original_size                  [H, W] before padding to the downsample factor: decode crops to it
  quant_scale, quant_offset      uint8 storage only: per-channel lists, z = q * scale + offset
Anything else (model, source, format, ...) is carried along untouched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

# Factors outside these bounds turn finite latents into inf/NaN or underflow (a scaling factor of
# 1e308 or 1e-310): real VAEs use 0.13 to 1.5 for the scale and |shift| < 1.
MAX_ABS_FACTOR = 1e4
MIN_ABS_SCALE = 1e-4
MAX_SIDE = 1 << 20  # an original_size side beyond this is not an image this service produced


class LatentMetadataError(ValueError):
    """Metadata that does not follow the contract; the message names the key and the value."""


def _channels(values, z: torch.Tensor) -> torch.Tensor:
    """Per-channel values as diffusers' SDXL pipelines build them: float32, (1, C, 1, 1), z's dtype."""
    if len(values) != z.shape[1]:
        raise LatentMetadataError(f"{len(values)} per-channel statistics for latents of {z.shape[1]} channels")
    return torch.tensor(list(values)).view(1, -1, 1, 1).to(z.device, z.dtype)


def scale(z: torch.Tensor, scaling_factor: float | None, shift_factor: float | None,
          mean=None, std=None) -> torch.Tensor:
    """Raw latents -> scaled latents: `(z - shift) * scale`; absent factors are skipped. With
    per-channel `mean` and `std` (lists): `(z - shift - mean) * scale / std`, in diffusers' order."""
    if shift_factor is not None:
        z = z - shift_factor
    if mean is not None and std is not None:
        z = z - _channels(mean, z)
        if scaling_factor is not None:
            z = z * scaling_factor
        return z / _channels(std, z)
    if scaling_factor is not None:
        z = z * scaling_factor
    return z


def unscale(z: torch.Tensor, scaling_factor: float | None, shift_factor: float | None,
            mean=None, std=None) -> torch.Tensor:
    """Scaled latents -> raw latents: `z / scale + shift`; absent factors are skipped. With
    per-channel `mean` and `std`: `z * std / scale + mean + shift`, in diffusers' order."""
    if mean is not None and std is not None:
        z = z * _channels(std, z)
        if scaling_factor is not None:
            z = z / scaling_factor
        z = z + _channels(mean, z)
    elif scaling_factor is not None:
        z = z / scaling_factor
    if shift_factor is not None:
        z = z + shift_factor
    return z


def check_factor(name: str, value: Any) -> float | None:
    """A scaling or shift factor from a query or metadata: None, or a finite number in bounds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LatentMetadataError(f"`{name}` must be a number, got {_short(value)}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > MAX_ABS_FACTOR:
        raise LatentMetadataError(f"`{name}` must be a finite number of magnitude at most {MAX_ABS_FACTOR:g}, got {_short(value)}")
    if name == "scaling_factor" and abs(value) < MIN_ABS_SCALE:
        raise LatentMetadataError(f"`scaling_factor` must be at least {MIN_ABS_SCALE:g} in magnitude, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _value(meta: Mapping[str, Any], key: str) -> Any:
    """A metadata value: JSON text (safetensors metadata) or a native JSON value (a JSON body)."""
    value = meta.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            raise LatentMetadataError(f"metadata `{key}` is not valid JSON: {_short(value)}") from None
    return value


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_SIDE for v in value)):
        raise LatentMetadataError(f"metadata `original_size` must be [height, width] of positive integers, got {_short(value)}")
    return int(value[0]), int(value[1])


def _floats(key: str, value: Any) -> list[float]:
    if (not isinstance(value, list) or not value
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)):
        raise LatentMetadataError(f"metadata `{key}` must be a list of finite numbers, got {_short(value)}")
    return [float(v) for v in value]


@dataclass(frozen=True)
class LatentInfo:
    """What a latent tensor's metadata says about it (parsed and validated)."""

    scaling_factor: float | None = None
    shift_factor: float | None = None
    scaled: bool = False
    original_size: tuple[int, int] | None = None
    quant_scale: list[float] | None = None
    quant_offset: list[float] | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "LatentInfo":
        scale_ = check_factor("scaling_factor", _value(meta, "scaling_factor"))
        shift = check_factor("shift_factor", _value(meta, "shift_factor"))
        scaled = _value(meta, "scaled") if "scaled" in meta else scale_ is not None
        if not isinstance(scaled, bool):
            raise LatentMetadataError(f"metadata `scaled` must be true or false, got {_short(meta.get('scaled'))}")
        stats = [_floats(k, v) if (v := _value(meta, k)) is not None else None for k in ("latents_mean", "latents_std")]
        if (stats[0] is None) != (stats[1] is None) or (stats[0] and len(stats[0]) != len(stats[1])):
            raise LatentMetadataError("metadata `latents_mean` and `latents_std` must come together, one value per channel")
        if stats[1] is not None and any(v == 0 for v in stats[1]):
            raise LatentMetadataError("metadata `latents_std` must not hold zeros")
        if scaled and scale_ is None and shift is None and stats[0] is None:
            raise LatentMetadataError("metadata says `scaled` but gives no `scaling_factor` or `shift_factor`")
        quant = [_floats(k, _value(meta, k)) if k in meta else None for k in ("quant_scale", "quant_offset")]
        if (quant[0] is None) != (quant[1] is None) or (quant[0] and len(quant[0]) != len(quant[1])):
            raise LatentMetadataError("metadata `quant_scale` and `quant_offset` must come together, one value per channel")
        return cls(scale_, shift, scaled, _size(_value(meta, "original_size")), *quant,
                   *(tuple(v) if v is not None else None for v in stats))

    def to_metadata(self) -> dict[str, Any]:
        """JSON values (a JSON answer carries them as they are; safetensors writers JSON-encode them)."""
        meta: dict[str, Any] = {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                                "scaled": self.scaled}
        if self.original_size is not None:
            meta["original_size"] = list(self.original_size)
        if self.quant_scale is not None:
            meta.update(quant_scale=self.quant_scale, quant_offset=self.quant_offset)
        if self.latents_mean is not None:
            meta.update(latents_mean=list(self.latents_mean), latents_std=list(self.latents_std))
        return meta

    def to_raw(self, stored: torch.Tensor) -> torch.Tensor:
        """The stored tensor -> raw float32 latents: dequantised (uint8) and unscaled (when scaled)."""
        if stored.dtype == torch.uint8:
            if self.quant_scale is None:
                raise LatentMetadataError("uint8 latents need `quant_scale` and `quant_offset` metadata")
            if len(self.quant_scale) != stored.shape[1]:
                raise LatentMetadataError(f"`quant_scale` has {len(self.quant_scale)} values for {stored.shape[1]} channels")
            z = dequantize_uint8(stored, self.quant_scale, self.quant_offset)
        else:
            z = stored.float()
        if not self.scaled:
            return z
        return unscale(z, self.scaling_factor, self.shift_factor, self.latents_mean, self.latents_std)


def quantize_uint8(z: torch.Tensor) -> tuple[torch.Tensor, list[float], list[float]]:
    """float (1, C, h, w) -> (uint8 (1, C, h, w), per-channel scale, per-channel offset).

    Per channel: offset = min, scale = (max - min) / 255, q = round((z - offset) / scale), so
    |z - dequantize(q)| <= scale / 2. Scale and offset are float32 values whose JSON form is exact.
    """
    zc = z.float().transpose(0, 1).reshape(z.shape[1], -1)  # (C, N*h*w)
    lo, hi = zc.min(dim=1).values, zc.max(dim=1).values
    step = ((hi - lo) / 255.0).clamp_min(torch.finfo(torch.float32).tiny)
    view = (1, -1, 1, 1)
    q = torch.round((z.float() - lo.view(view)) / step.view(view)).clamp_(0, 255).to(torch.uint8)
    return q, _short_floats(step), _short_floats(lo)


def _short_floats(t: torch.Tensor) -> list[float]:
    """float32 values -> the shortest decimals that read back as the same float32 (compact JSON)."""
    import numpy as np

    return [float(str(v)) for v in t.numpy().astype(np.float32)]  # numpy prints float32 shortest-unique


def dequantize_uint8(q: torch.Tensor, scale_: list[float], offset: list[float]) -> torch.Tensor:
    """uint8 (N, C, h, w) -> float32 latents: q * scale + offset, per channel."""
    view = (1, -1, 1, 1)
    s = torch.tensor(scale_, dtype=torch.float32).view(view)
    o = torch.tensor(offset, dtype=torch.float32).view(view)
    return q.float() * s + o
