"""Input images: a vendored photograph at a given size, PNG bytes of a PIL image."""

from __future__ import annotations

import io

from benchmarks.harness.paths import PHOTOS


def photo(size: int, index: int = 0):
    """A vendored photograph (tests/data/photos), short side resized to `size`, centre-cropped
    square, as a PIL RGB image; a smooth synthetic image when the photos are absent."""
    from PIL import Image

    files = sorted(PHOTOS.glob("*.png")) + sorted(PHOTOS.glob("*.jpg"))
    if not files:
        import numpy as np

        yy, xx = np.mgrid[0:size, 0:size]
        arr = np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1), (xx + yy) % 256], -1)
        return Image.fromarray(arr.astype("uint8"), "RGB")
    with Image.open(files[index % len(files)]) as img:
        img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
