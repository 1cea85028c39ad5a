"""diffusers' own remote_encode / remote_decode against a real server on loopback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.remote_utils import remote_decode, remote_encode
from PIL import Image

from app.http.app import create_app
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from models.vae import imaging
from models.vae.inference import VAEModel
from support import gradient_image, live_server

SCALE = 0.5  # the tiny model's config.scaling_factor


@pytest.fixture(scope="module")
def model(tiny_vae_dir):
    return VAEModel.load("tiny", tiny_vae_dir)


@pytest.fixture(scope="module")
def url(model):
    with live_server(create_app(Settings(), ModelRegistry([model]))) as base:
        yield base


@pytest.fixture(scope="module")
def image():
    return gradient_image(40, 32)


@pytest.fixture(scope="module")
def expected(model, image):
    """In-process diffusers results: raw latents, float decode, uint8 image."""
    with torch.no_grad():
        z = model.vae.encode(imaging.to_tensor(image)).latent_dist.mode()
        x = model.vae.decode(z).sample
    return {"z": z, "x": x, "u8": imaging.to_uint8(x)}


def test_remote_encode_pil(url, expected, image):
    z = remote_encode(f"{url}/encode", image)
    assert z.dtype == torch.float32 and z.shape == (1, 4, 4, 5)
    assert torch.equal(z, expected["z"])


def test_remote_encode_scaled_and_shifted(url, expected, image):
    z = remote_encode(f"{url}/encode", image, scaling_factor=0.18215, shift_factor=0.1159)
    assert torch.equal(z, (expected["z"] - 0.1159) * 0.18215)


def test_remote_encode_tensor(url, expected, image):
    z = remote_encode(f"{url}/encode", imaging.to_tensor(image), scaling_factor=SCALE)
    assert torch.equal(z, expected["z"] * SCALE)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # remote_decode's own do_scaling deprecation notice
def test_remote_decode_default_do_scaling_uses_model_factor(url, expected):
    img = remote_decode(f"{url}/decode", expected["z"] * SCALE, image_format="png")
    assert np.array_equal(np.asarray(img), expected["u8"][0].numpy())


def test_remote_decode_pil_png(url, expected):
    img = remote_decode(f"{url}/decode", expected["z"] * SCALE, scaling_factor=SCALE, output_type="pil",
                        image_format="png")
    assert isinstance(img, Image.Image) and img.size == (40, 32)
    assert np.array_equal(np.asarray(img), expected["u8"][0].numpy())


def test_remote_decode_pil_jpg(url, expected):
    img = remote_decode(f"{url}/decode", expected["z"] * SCALE, scaling_factor=SCALE, output_type="pil",
                        image_format="jpg")
    assert img.format == "jpeg" and img.size == (40, 32)
    local = imaging.encode_image(imaging.to_pil(expected["u8"])[0], "jpg", quality=95)
    assert np.array_equal(np.asarray(img), np.asarray(imaging.open_image(local)))


def test_remote_decode_pt_partial_postprocess(url, expected):
    kw = dict(scaling_factor=SCALE, output_type="pt", partial_postprocess=True)
    u8 = remote_decode(f"{url}/decode", expected["z"] * SCALE, return_type="pt", **kw)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 32, 40, 3)
    assert torch.equal(u8, expected["u8"])
    img = remote_decode(f"{url}/decode", expected["z"] * SCALE, return_type="pil", **kw)
    assert np.array_equal(np.asarray(img), expected["u8"][0].numpy())


def test_remote_decode_pt_float(url, expected):
    kw = dict(scaling_factor=SCALE, output_type="pt", partial_postprocess=False)
    x = remote_decode(f"{url}/decode", expected["z"] * SCALE, return_type="pt", **kw)
    assert x.shape == (1, 3, 32, 40)
    torch.testing.assert_close(x.float(), expected["x"])
    img = remote_decode(f"{url}/decode", expected["z"] * SCALE, return_type="pil",
                        processor=VaeImageProcessor(vae_scale_factor=8), **kw)
    assert np.array_equal(np.asarray(img), expected["u8"][0].numpy())


def test_remote_decode_pil_with_processor(url, expected):
    images = remote_decode(f"{url}/decode", expected["z"] * SCALE, scaling_factor=SCALE, output_type="pil",
                           processor=VaeImageProcessor(vae_scale_factor=8))
    assert np.array_equal(np.asarray(images[0]), expected["u8"][0].numpy())


def test_remote_decode_batch_and_half_precision(url, model, expected):
    z = torch.cat([expected["z"], expected["z"].flip(-1)]) * SCALE
    u8 = remote_decode(f"{url}/decode", z, scaling_factor=SCALE, output_type="pt", partial_postprocess=True,
                       return_type="pt")
    assert u8.shape == (2, 32, 40, 3) and torch.equal(u8[0], expected["u8"][0])
    # bfloat16 latents on the wire: equal to decoding the same bf16 values in-process.
    zb = (expected["z"] * SCALE).to(torch.bfloat16)
    u8 = remote_decode(f"{url}/decode", zb, scaling_factor=SCALE, output_type="pt", partial_postprocess=True,
                       return_type="pt")
    with torch.no_grad():
        ref = imaging.to_uint8(model.vae.decode(zb.float() / SCALE).sample)
    assert (u8.int() - ref.int()).abs().max() <= 1


def test_remote_errors_are_json(url, expected):
    with pytest.raises(RuntimeError, match="channels"):
        remote_decode(f"{url}/decode", torch.zeros(1, 3, 4, 4), scaling_factor=SCALE, output_type="pt",
                      return_type="pt")
    with pytest.raises(RuntimeError, match="packed"):
        remote_decode(f"{url}/decode", torch.zeros(1, 16, 64), scaling_factor=SCALE, output_type="pt",
                      return_type="pt", height=32, width=32)
