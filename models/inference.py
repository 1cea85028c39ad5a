"""`VAEModel`: one loaded AutoencoderKL plus what the service needs to know about it.

Tensors: images are float (N, 3, H, W) in [-1, 1] of any size (padded to the downsample factor for
the model, see `encode`); latents are raw (unscaled) float (N, C, H/f, W/f). HF scaling semantics
live in `scale_latents` / `unscale_latents`. Later work (tiling, batching, channels_last, compile)
hooks into `_encode_tensor` / `_decode_tensor`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.imaging import crop_to, pad_to_multiple
from models.loading import LoadedWeights, load_weights


def scale_latents(z: torch.Tensor, scaling_factor: float | None, shift_factor: float | None) -> torch.Tensor:
    """Raw latents -> model-space latents: `(z - shift) * scale`; absent factors are skipped."""
    if shift_factor is not None:
        z = z - shift_factor
    if scaling_factor is not None:
        z = z * scaling_factor
    return z


def unscale_latents(z: torch.Tensor, scaling_factor: float | None, shift_factor: float | None) -> torch.Tensor:
    """Model-space latents -> raw latents: `z / scale + shift`; absent factors are skipped."""
    if scaling_factor is not None:
        z = z / scaling_factor
    if shift_factor is not None:
        z = z + shift_factor
    return z


class VAEModel:
    """A named AutoencoderKL on one device and dtype. Thread-safe for concurrent inference calls."""

    def __init__(self, name: str, loaded: LoadedWeights):
        self.name = name
        self.vae = loaded.vae
        self.sha256 = loaded.sha256
        self.source = loaded.path
        self.layout = loaded.layout
        param = next(self.vae.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def load(
        cls,
        name: str,
        source: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        config: str | Path | None = None,
    ) -> "VAEModel":
        """Load weights (see models.loading.load_weights; raises ModelLoadError) and wrap them."""
        return cls(name, load_weights(source, device=device, dtype=dtype, config=config))

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
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    @property
    def shift_factor(self) -> float | None:
        shift = getattr(self.config, "shift_factor", None)
        return None if shift is None else float(shift)

    def param_counts(self) -> dict[str, int]:
        enc = sum(p.numel() for n, p in self.vae.named_parameters() if n.startswith(("encoder.", "quant_conv.")))
        total = sum(p.numel() for p in self.vae.parameters())
        return {"encoder": enc, "decoder": total - enc, "total": total}

    def describe(self) -> dict:
        """JSON-able summary, as served by GET /v1/models."""
        return {
            "name": self.name,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "parameters": self.param_counts()["total"],
            "sha256": self.sha256,
            "layout": self.layout,
            "config": {k: v for k, v in dict(self.config).items() if not k.startswith("_")},
        }

    # --- inference --------------------------------------------------------------------------
    def _encode_tensor(self, x: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        dist = self.vae.encode(x).latent_dist
        return dist.sample(generator=generator) if sample else dist.mode()

    def _decode_tensor(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def encode(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> raw latents (N, C, ceil(H/f), ceil(W/f)), float32.

        Sides that are not multiples of f are replicate-padded at the bottom/right first.
        `sample=False` gives the posterior mode (= mean); `sample=True` draws mean + std * noise
        with `generator` (reproducible with a seeded generator).
        """
        x, _ = pad_to_multiple(x.float(), self.downsample_factor)
        # Contiguous NCHW: the memory layout picks the conv kernel, and results must not depend on it.
        x = x.to(self.device, self.dtype).contiguous()
        with torch.inference_mode():
            z = self._encode_tensor(x, sample, generator)
        return z.float()

    def decode(self, z: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Raw latents (N, C, h, w) -> images float32 (N, 3, h*f, w*f) in about [-1, 1], unclamped.

        `size` = (H, W) crops the result back to an original image size.
        """
        with torch.inference_mode():
            x = self._decode_tensor(z.to(self.device, self.dtype).contiguous())
        x = x.float()
        return crop_to(x, size) if size is not None else x

    def warmup(self) -> None:
        """One tiny encode + decode so first requests do not pay for lazy initialisation."""
        f = self.downsample_factor
        self.decode(self.encode(torch.zeros(1, self.in_channels, 2 * f, 2 * f)))
