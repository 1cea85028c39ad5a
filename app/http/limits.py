"""Input limits beyond the body size (app.http.request_io.read_body): image formats, latent sizes,
and Pillow's own decompression-bomb knobs.

Pixel counts are checked from the image header before any pixel is decoded
(models.vae.imaging.open_image); here, Pillow's secondary buffers are bounded too.
"""

from __future__ import annotations

import math

from PIL import Image, PngImagePlugin

from app.protocol.errors import PayloadTooLarge, UnsupportedMediaType
from models.vae import imaging

# A PNG's compressed text chunks (zTXt/iTXt) inflate outside the pixel check: cap them.
PngImagePlugin.MAX_TEXT_CHUNK = 256 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 1024 * 1024
Image.MAX_IMAGE_PIXELS = imaging.DEFAULT_MAX_PIXELS  # Pillow errors at 2x this, whatever the caller

_NAMES = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def check_image_format(data: bytes, allowed: list[str]) -> None:
    """415 unless the bytes are one of the allowed formats (by magic bytes, not Content-Type)."""
    names = {_NAMES.get(a.lower(), a.upper()) for a in allowed}
    fmt = imaging.sniff_format(data)  # None: not an image at all, imaging.open_image says so (415)
    if fmt is not None and fmt not in names:
        listed = ", ".join(sorted(names)) or "none"
        raise UnsupportedMediaType(f"image format {fmt} is not accepted here: this server accepts {listed}")


def check_latent_elements(shape, limit: int, what: str = "latents") -> None:
    """413 when a latent tensor (sent, or to be produced) holds more than `limit` numbers."""
    n = math.prod(int(s) for s in shape)
    if n > limit:
        raise PayloadTooLarge(f"{what} {list(shape)} hold {n} elements, the limit is {limit}")


def encode_latent_shape(x_shape, model) -> tuple[int, ...]:
    f = model.downsample_factor
    return (x_shape[0], model.latent_channels, -(-x_shape[-2] // f), -(-x_shape[-1] // f))
