"""app.client against a real server: VAEClient and the RemoteAutoencoderKL drop-in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from app.client import RemoteAutoencoderKL, VAEClient, VAEClientError
from app.http.app import create_app
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from models.vae import imaging
from models.vae.inference import VAEModel
from models.metrics import psnr
from support import gradient_image, live_server


@pytest.fixture(scope="module")
def models(tiny_vae_dir):
    from support import make_tiny_vae

    other_dir = tiny_vae_dir.parent / "tiny-vae-other"
    make_tiny_vae(seed=1, scaling_factor=0.25).save_pretrained(other_dir)
    return VAEModel.load("tiny", tiny_vae_dir), VAEModel.load("other", other_dir)


@pytest.fixture(scope="module")
def url(models):
    with live_server(create_app(Settings(), ModelRegistry(list(models)))) as base:
        yield base


def test_encode_decode_roundtrip(url, models):
    model = models[0]
    client = VAEClient(url)
    img = gradient_image(24, 16)
    x = imaging.to_tensor(img)
    z = client.encode(img)
    assert torch.equal(z, model.encode(x))
    assert torch.equal(client.encode(x, scaling_factor=0.5), model.encode(x) * 0.5)
    assert torch.equal(client.encode([img, img]), torch.cat([z, z]))
    a, b = client.encode(img, sample=True, seed=5), client.encode(img, sample=True, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, z)
    images = client.decode(torch.cat([z, z]))
    assert len(images) == 2 and images[0].size == (24, 16)
    assert np.array_equal(np.asarray(images[1]), imaging.to_uint8(model.decode(z))[0].numpy())
    assert torch.equal(client.decode_tensor(z), model.decode(z))
    result = client.roundtrip(img)
    assert result.image.size == (24, 16) and result.latent_shape == [1, 4, 2, 3]
    assert result.psnr == pytest.approx(psnr(np.asarray(img), np.asarray(result.image)), abs=1e-3)
    locked = client.encode(img, colour_lock=1)
    assert torch.equal(locked, model.encode(x, colour_lock=1)) and not torch.equal(locked, z)
    assert torch.equal(client.encode([img, img], colour_lock=1), torch.cat([locked, locked]))
    want = imaging.to_uint8(model.decode(locked, (16, 24)))[0].numpy()
    assert np.array_equal(np.asarray(client.roundtrip(img, colour_lock=1).image), want)


def test_model_choice_and_errors(url, models):
    other = VAEClient(url, model="other")
    assert other.model_info()["scaling_factor"] == 0.25
    img = gradient_image(16, 16)
    assert torch.equal(other.encode(img), models[1].encode(imaging.to_tensor(img)))
    with pytest.raises(VAEClientError) as err:
        VAEClient(url, model="missing").encode(img)
    assert err.value.status == 404 and err.value.type == "model_not_found"
    with pytest.raises(VAEClientError) as err:
        VAEClient(url).decode(torch.zeros(1, 3, 2, 2))
    assert err.value.status == 422 and "channels" in err.value.message


def test_remote_autoencoder_in_a_pipeline_loop(url, models):
    """Use it the way diffusers pipelines use `self.vae` (img2img encode, final decode)."""
    model = models[0]
    vae = RemoteAutoencoderKL(url)
    assert vae.config.scaling_factor == 0.5 and vae.config["latent_channels"] == 4
    assert vae.dtype == torch.float32 and vae.device == torch.device("cpu") and vae.to("cpu") is vae
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    img = gradient_image(32, 24)
    x = processor.preprocess(img)
    dist = vae.encode(x).latent_dist
    assert torch.equal(dist.mode(), model.encode(x)) and torch.equal(dist.mean, dist.mode())
    g = torch.Generator().manual_seed(0)
    sampled = dist.sample(generator=g)
    assert sampled.shape == dist.mode().shape and not torch.equal(sampled, dist.mode())
    assert torch.equal(vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0)), sampled)
    latents = dist.mode() * vae.config.scaling_factor
    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    torch.testing.assert_close(image, model.decode(dist.mode()))
    assert torch.equal(vae.decode(dist.mode()).sample, image)
    out = processor.postprocess(image, output_type="pil")[0]
    assert np.array_equal(np.asarray(out), imaging.to_uint8(model.decode(dist.mode()))[0].numpy())
    assert RemoteAutoencoderKL(url, model="other").config.scaling_factor == 0.25


def test_client_sends_channels_last_latents_correctly(url, models):
    """diffusers' remote_decode sends a channels_last tensor's memory as if it were contiguous
    (README: call it with z.contiguous()); the bundled client makes its inputs contiguous."""
    model, client = models[0], VAEClient(url)
    z = model.encode(imaging.to_tensor(gradient_image(48, 32)))
    cl = z.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    assert torch.equal(client.decode_tensor(cl), model.decode(z))
    assert np.array_equal(np.asarray(client.decode(cl)[0]), imaging.to_uint8(model.decode(z))[0].numpy())
