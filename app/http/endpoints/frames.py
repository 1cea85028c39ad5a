"""Frames: what /sample and /interpolate answer (uint8 images decoded one latent at a time)."""

from __future__ import annotations

import json

import torch

from app.http import validation
from app.protocol.errors import PayloadTooLarge, Unprocessable
from models.vae import imaging
from models.vae.inference import VAEModel

# Frames are decoded one at a time, but all of them are held as uint8 for the answer.
OUTPUT_PIXELS_PER_MAX = 8


def check_size(model: VAEModel, height: int, width: int) -> None:
    f = model.downsample_factor
    for name, side in (("width", width), ("height", height)):
        if side <= 0 or side % f:
            raise Unprocessable(f"{name} {side} must be a positive multiple of {f} (model {model.name!r})")


def check_pixels(height: int, width: int, count: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise PayloadTooLarge(f"{width}x{height} exceeds the limit of {max_pixels} pixels per image")
    if count * height * width > OUTPUT_PIXELS_PER_MAX * max_pixels:
        raise PayloadTooLarge(f"{count} images of {width}x{height} exceed {OUTPUT_PIXELS_PER_MAX * max_pixels} pixels")


def strip(frames: torch.Tensor):
    """uint8 (N, H, W, 3) -> one PIL image with the frames side by side, left to right."""
    n, h, w, c = frames.shape
    return imaging.to_pil(frames.permute(1, 0, 2, 3).reshape(1, h, n * w, c))[0]


def decode_frames(model: VAEModel, z: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """One latent at a time: peak memory of one decode, whatever the number of frames (and each
    frame a boundary where abandoned work stops, models.vae.tiling.stop_when); each checked finite
    before it becomes uint8 pixels."""
    out = []
    for i in range(z.shape[0]):
        x = model.decode(z[i : i + 1], size)
        validation.finite_result(x)
        out.append(imaging.to_uint8(x))
    return torch.cat(out)


def frame_headers(model: VAEModel, frames: torch.Tensor, latent_shape) -> dict[str, str]:
    return {
        "X-Model": model.name,
        "X-Frames": str(frames.shape[0]),
        "X-Frame-Size": json.dumps(list(frames.shape[1:3])),  # [H, W]
        "X-Latent-Shape": json.dumps(list(latent_shape)),
    }
