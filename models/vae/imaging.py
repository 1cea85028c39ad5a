"""The one home of image pre/post-processing for the service, the client and the tools.

Conventions (identical numerics to diffusers' `VaeImageProcessor`):
  * model images are float32 NCHW tensors in [-1, 1]: `x = 2 * (uint8 / 255) - 1`;
  * output images are `round(clamp(x / 2 + 0.5, 0, 1) * 255)` as uint8 NHWC (round half to even,
    computed in float32 like `numpy_to_pil(pt_to_numpy(denormalize(x)))`).
Decoded files are always 8-bit RGB: EXIF orientation is applied, alpha is composited on white.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

# 4096 x 4096: far beyond what a VAE on one device should take, far below a decompression bomb.
DEFAULT_MAX_PIXELS = 4096 * 4096
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}
# Output format names accepted by `encode_image` (and the HTTP `image_format` parameter).
FORMAT_ALIASES = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class ImageError(ValueError):
    """A rejected image. `kind` is 'unsupported' (-> 415), 'too_large' (-> 413) or 'corrupt' (-> 400)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def sniff_format(data: bytes) -> str | None:
    """Format name from the magic bytes ('PNG', 'JPEG', 'WEBP'), or None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white; 16/32-bit greys are scaled down."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth greyscale: PIL's convert('L') clips instead of scaling, so scale explicitly.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def open_image(data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               check_size: Callable[[int, int], None] | None = None) -> Image.Image:
    """Decode PNG / JPEG / WebP bytes (or a file) into an 8-bit RGB image with EXIF orientation applied.

    Raises ImageError: 'unsupported' for other formats, 'too_large' above `max_pixels`,
    'corrupt' for undecodable or truncated data. `check_size(width, height)` runs on the header's
    size before any pixel is decoded (e.g. a cost check that raises).
    """
    if isinstance(data, (str, Path)):
        data = Path(data).read_bytes()
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError("unsupported", "unsupported image format: expected PNG, JPEG or WebP bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = img.size  # from the header only: nothing decoded yet
        if width * height > max_pixels:
            raise ImageError(
                "too_large", f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}"
            )
        if check_size is not None:
            check_size(width, height)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb8(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError("corrupt", f"cannot decode {fmt} image: {exc}") from None


def to_tensor(images: Image.Image | list[Image.Image]) -> torch.Tensor:
    """RGB PIL image(s) of one size -> float32 (N, 3, H, W) in [-1, 1] (VaeImageProcessor.preprocess numerics)."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = [np.asarray(img.convert("RGB")).astype(np.float32) / 255.0 for img in images]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images of different sizes cannot share a batch: {[a.shape for a in arrays]}")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return 2.0 * x - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounded exactly as diffusers' numpy_to_pil."""
    if x.ndim == 3:
        x = x[None]
    x = (x * 0.5 + 0.5).clamp(0, 1)
    x = x.detach().cpu().permute(0, 2, 3, 1).float()
    return (x * 255).round().to(torch.uint8)


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """float (N, 3, H, W) in [-1, 1] or uint8 (N, H, W, 3) -> list of N RGB PIL images."""
    if x.dtype != torch.uint8:
        x = to_uint8(x)
    elif x.ndim == 3:
        x = x[None]
    return [Image.fromarray(a.numpy(), mode="RGB") for a in x]


# zlib level of PNG answers. Measured (photo resized, PIL 12, this CPU): level 1 encodes 3-4x faster
# than PIL's default 6 (256^2: 4.8 vs 15.5 ms; 1024^2: 70 vs 298 ms) for files 6-13 % larger; at
# 1024^2 level 6 costs more than a bf16 decode of the shipped model. Level 0 (no compression) is
# faster again but 1.7-2.6x larger.
PNG_COMPRESS_LEVEL = 1


def encode_image(img: Image.Image, fmt: str = "png", quality: int = 95,
                 png_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """PIL image -> file bytes. `fmt` is png | jpg | jpeg | webp; `quality` applies to JPEG and WebP,
    `png_level` (zlib 0-9) to PNG."""
    name = FORMAT_ALIASES.get(fmt.lower())
    if name is None:
        raise ImageError("unsupported", f"unsupported output format {fmt!r}: use png, jpg or webp")
    buf = io.BytesIO()
    if name == "PNG":
        img.save(buf, format=name, compress_level=int(png_level))
    else:
        img.save(buf, format=name, quality=int(quality))
    return buf.getvalue()


def pad_to_multiple(x: torch.Tensor, multiple: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) at the bottom/right up to multiples of `multiple`; returns (padded, (H, W)).

    Replicate padding: it works for any size (reflect needs the pad to be smaller than the side) and
    extends edges smoothly, so the convolutions see no artificial border next to the real pixels.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (..., H', W') to the top-left (..., H, W) given by `size` = (H, W)."""
    h, w = size
    return x[..., :h, :w]


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short side is `size` pixels (aspect ratio kept)."""
    scale = size / min(img.size)
    return img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Short side resized to `size`, then the centre `size` x `size` square (the published SD VAE
    COCO protocol)."""
    img = resize_short_side(img, size)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))
