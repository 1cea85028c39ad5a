"""models.vae.imaging: decoding rules, VaeImageProcessor-identical numerics, padding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from models.vae import imaging
from models.vae.imaging import ImageError
from support import gradient_image


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_lossless_formats_decode_exactly(fmt):
    img = gradient_image(24, 16)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = imaging.open_image(_save(img, fmt, **kw))
    assert out.mode == "RGB" and out.size == (24, 16)
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_jpeg_decodes_to_rgb():
    out = imaging.open_image(_save(gradient_image(24, 16), "JPEG", quality=90))
    assert out.mode == "RGB" and out.size == (24, 16)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 5, 10))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = imaging.open_image(_save(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (10, 30)
    top = np.asarray(out)[1, 5]
    assert top[2] > 200 and top[0] < 60  # the left stripe is now at the top


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 128))
    arr = np.asarray(imaging.open_image(_save(img, "PNG")))
    assert tuple(arr[0, 0]) == (255, 0, 0)
    assert tuple(arr[5, 5]) == (255, 255, 255)
    assert 120 <= arr[0, 1, 0] <= 135  # half-transparent black over white is mid grey


@pytest.mark.parametrize("mode", ["L", "P", "LA"])
def test_grey_palette_modes_become_rgb(mode):
    src = gradient_image(16, 8)
    img = src.convert(mode)
    out = imaging.open_image(_save(img, "PNG"))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(img.convert("RGBA" if mode == "LA" else "RGB").convert("RGB")))


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in CMYK
    arr = np.asarray(imaging.open_image(_save(img, "JPEG", quality=100)))
    assert arr.shape == (8, 8, 3) and arr[4, 4, 0] > 200 and arr[4, 4, 1] < 60


def test_16bit_grey_png_is_scaled_not_clipped():
    values = np.array([[0, 256 * 128, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    arr = np.asarray(imaging.open_image(_save(img, "PNG")))
    assert arr.shape == (1, 3, 3)
    assert list(arr[0, :, 0]) == [0, 128, 255]


def test_pixel_limit_is_checked_before_decoding():
    data = _save(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageError) as err:
        imaging.open_image(data, max_pixels=300 * 200 - 1)
    assert err.value.kind == "too_large"
    assert imaging.open_image(data, max_pixels=300 * 200).size == (300, 200)


@pytest.mark.parametrize("data", [b"", b"hello world", _save(Image.new("RGB", (4, 4)), "GIF"), _save(Image.new("RGB", (4, 4)), "BMP")])
def test_unsupported_formats(data):
    with pytest.raises(ImageError) as err:
        imaging.open_image(data)
    assert err.value.kind == "unsupported"


def test_truncated_image_is_corrupt():
    data = _save(gradient_image(64, 64), "PNG")
    with pytest.raises(ImageError) as err:
        imaging.open_image(data[: len(data) // 2])
    assert err.value.kind == "corrupt"


def test_to_tensor_matches_vae_image_processor():
    img = gradient_image(24, 16)
    ref = VaeImageProcessor(do_resize=False).preprocess(img)
    x = imaging.to_tensor(img)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 16, 24)
    assert torch.equal(x, ref)
    assert imaging.to_tensor([img, img]).shape == (2, 3, 16, 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_uint8_matches_vae_image_processor(dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 8, 12) * 0.7).to(dtype)
    # Values that sit exactly on rounding ties and the clamp edges.
    x[0, 0, 0, :4] = torch.tensor([-1.5, 1.5, 1 / 255 - 1, 0.0], dtype=dtype)
    ref = VaeImageProcessor().postprocess(x, output_type="np")
    ref = (ref * 255).round().astype("uint8")
    out = imaging.to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (2, 8, 12, 3)
    assert np.array_equal(out.numpy(), ref)
    pil = VaeImageProcessor().postprocess(x, output_type="pil")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imaging.to_pil(x), pil))


def test_roundtrip_uint8_is_exact():
    img = gradient_image(10, 6)
    assert np.array_equal(imaging.to_uint8(imaging.to_tensor(img))[0].numpy(), np.asarray(img))


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpg", b"\xff\xd8"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_encode_image_formats(fmt, magic):
    data = imaging.encode_image(gradient_image(16, 16), fmt)
    assert data.startswith(magic)
    assert imaging.open_image(data).size == (16, 16)
    with pytest.raises(ImageError):
        imaging.encode_image(gradient_image(4, 4), "gif")


def test_pad_and_crop():
    x = torch.arange(2 * 3 * 5 * 9, dtype=torch.float32).reshape(2, 3, 5, 9)
    padded, size = imaging.pad_to_multiple(x, 8)
    assert padded.shape == (2, 3, 8, 16) and size == (5, 9)
    assert torch.equal(imaging.crop_to(padded, size), x)
    assert torch.equal(padded[..., 7, :9], x[..., 4, :])  # replicate: the last row repeats
    assert torch.equal(padded[..., :5, 15], x[..., :, 8])
    same, _ = imaging.pad_to_multiple(torch.zeros(1, 3, 8, 16))
    assert same.shape == (1, 3, 8, 16)
