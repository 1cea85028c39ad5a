"""Colour lock (models/vae/colour_lock.py): latents shifted per channel, in a checked closed loop, so
they decode to the image's own mean colour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.vae import colour_lock, imaging
from models.vae.inference import VAEModel
from models.vae.loading import DEFAULT_MODEL_DIR
from support import PHOTOS


class LinearVAE:
    """A VAE whose decoded colour is exactly linear in its latents: encode = 8x8 average pool, then a
    fixed C x 3 map; decode = the 3 x C map `A`, plus a bias, upsampled 8x. Its colour Jacobian is `A`."""

    def __init__(self, channels: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(3, channels, generator=g) * 0.3
        self.e = torch.randn(channels, 3, generator=g) * 0.5
        self.bias = torch.tensor([0.05, -0.1, 0.08])

    def encode(self, x):
        return torch.einsum("cr,nrhw->nchw", self.e, F.avg_pool2d(x, 8))

    def decode(self, z):
        y = torch.einsum("rc,nchw->nrhw", self.a, z) + self.bias[:, None, None]
        return F.interpolate(y, scale_factor=8, mode="nearest")


@pytest.mark.parametrize("channels", [4, 16])
def test_one_step_is_exact_for_a_linear_decoder(channels):
    vae = LinearVAE(channels)
    x = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(1)) * 0.5 - 0.25
    jacobian = colour_lock.jacobians(vae.encode, vae.decode, x, 8, scaling_factor=0.5)
    assert jacobian.shape == (2, 3, channels)
    # the colour per unit of scaled latent (raw = scaled / 0.5), for each image
    torch.testing.assert_close(jacobian.float(), (vae.a / 0.5).expand(2, 3, channels), atol=1e-4, rtol=0)
    z = vae.encode(x)
    z_before = z.clone()
    plain = colour_lock.mean_colour(vae.decode(z)) - colour_lock.mean_colour(x)
    assert plain.abs().max() > 0.05  # the bias and the lossy map leave a visible colour error
    locked, image = colour_lock.correct(z, colour_lock.mean_colour(x), vae.decode, jacobian, steps=1,
                                        scaling_factor=0.5)
    torch.testing.assert_close(colour_lock.mean_colour(vae.decode(locked)), colour_lock.mean_colour(x),
                               atol=1e-5, rtol=0)
    assert torch.equal(image, vae.decode(locked))  # the checked decode comes back with the latents
    assert torch.equal(z, z_before) and not torch.equal(locked, z)  # new latents; the input is left alone


def test_second_step_learns_the_response_the_first_step_saw():
    """With a Jacobian that is wrong by a factor of 2 (the decoder moves colour twice as much as
    assumed), one step overshoots to the opposite error; the second step, through Broyden's update
    of the Jacobian along the first step, lands on the target of a linear decoder."""
    vae = LinearVAE(3)
    vae.a = 0.5 * torch.eye(3) + 0.1 * vae.a  # well conditioned: no direction dropped, no shift clamped
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.4 - 0.2
    z, target = vae.encode(x), colour_lock.mean_colour(x)
    half = colour_lock.jacobians(vae.encode, vae.decode, x, 8, scaling_factor=1.0) / 2
    error = lambda t: float((colour_lock.mean_colour(vae.decode(t)) - target).abs().max())  # noqa: E731
    one, _ = colour_lock.correct(z, target, vae.decode, half, steps=1, scaling_factor=1.0)
    two, _ = colour_lock.correct(z, target, vae.decode, half, steps=2, scaling_factor=1.0)
    assert error(one) > 0.5 * error(z)  # overshot to about the opposite error
    assert error(two) < 1e-4 < error(z)


@pytest.fixture(scope="module")
def tiny(tiny_vae_dir):
    return VAEModel.load("tiny", tiny_vae_dir)


def colour_error(model, x, **kwargs) -> torch.Tensor:
    """Largest per-channel mean colour error of each image's roundtrip, in 8-bit levels."""
    y = model.decode(model.encode(x, **kwargs), tuple(x.shape[-2:]), tiled=kwargs.get("tiled"))
    return ((colour_lock.mean_colour(y) - colour_lock.mean_colour(x)) * 127.5).abs().amax(dim=1)


def test_never_worse_than_the_plain_encode_and_shifts_bounded(tiny):
    """A random-weight model's decoder barely moves its colour with its latents (two of its three
    directions move it by under 0.05 per unit), so the linear step can mislead: each image keeps the
    best latents it saw, and no step shifts a channel by more than MAX_SHIFT scaled units."""
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 0.6 + torch.tensor(
        [-0.5, 0.1, 0.4]).view(1, 3, 1, 1)
    plain, z = colour_error(tiny, x), tiny.encode(x)
    for steps in (1, 2, 3):
        assert (colour_error(tiny, x, colour_lock=steps) <= plain).all()
        shift = (tiny.encode(x, colour_lock=steps) - z) * tiny.scaling_factor
        assert shift.abs().max() <= steps * colour_lock.MAX_SHIFT + 1e-5
    torch.testing.assert_close(tiny.encode(x, colour_lock=0), z, atol=0, rtol=0)


@pytest.mark.parametrize("steps", [-1, colour_lock.MAX_STEPS + 1])
def test_steps_out_of_range_are_refused(tiny, steps):
    with pytest.raises(ValueError, match="colour_lock must be from 0 to 3"):
        tiny.encode(torch.zeros(1, 3, 16, 16), colour_lock=steps)


@pytest.fixture(scope="module")
def shipped():
    return VAEModel.load("default", DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """The four vendored photographs, centre crops of 128 x 128 (the shipped model's colour is off by
    up to 5 levels on three of them)."""
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
    return imaging.to_tensor([imaging.resize_center_crop(imaging.open_image(PHOTOS / n), 128) for n in names])


def test_shipped_model_decodes_the_locked_latents_in_the_photos_own_colour(shipped, photos):
    plain = colour_error(shipped, photos)
    one = colour_error(shipped, photos, colour_lock=1)
    two = colour_error(shipped, photos, colour_lock=2)
    assert (plain > 1.5).sum() >= 3, plain  # a visible cast to correct
    assert (one <= 1.0).all() and (one < 0.3 * plain).all(), (plain, one)
    assert (two <= 0.3).all() and (two <= one).all(), (one, two)


def test_shipped_model_lock_applies_to_samples_and_tiles(shipped, photos):
    """A posterior sample is shifted like the mean (the same seed draws the same noise), and a tiled
    encode is checked with a tiled decode."""
    x = photos[:1]
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = shipped.encode(x, sample=True, generator=g())
    locked = shipped.encode(x, sample=True, generator=g(), colour_lock=1)
    shift = (locked - plain).flatten(2)
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift))  # one constant per channel
    assert colour_error(shipped, x, sample=True, generator=g(), colour_lock=1) < 1.0
    small_tiles = VAEModel.load("tiles", DEFAULT_MODEL_DIR, tile_size=64)
    plain_tiled = colour_error(small_tiles, x, tiled=True)
    locked_tiled = colour_error(small_tiles, x, tiled=True, colour_lock=1)
    assert locked_tiled < 0.3 * plain_tiled, (plain_tiled, locked_tiled)


def test_roundtrip_reuses_the_checked_decode(shipped, photos):
    """`VAEModel.roundtrip` with a colour lock returns the decode the lock checked: equal to decoding
    the locked latents again, one decode fewer; without a lock it is encode then decode."""
    x = photos[1:3, :, :120, :100]  # sides not multiples of 8: padded, then cropped back
    z, image = shipped.roundtrip(x, colour_lock=1)
    torch.testing.assert_close(z, shipped.encode(x, colour_lock=1), atol=0, rtol=0)
    torch.testing.assert_close(image, shipped.decode(z, (120, 100)), atol=0, rtol=0)
    z0, image0 = shipped.roundtrip(x)
    torch.testing.assert_close(image0, shipped.decode(shipped.encode(x), (120, 100)), atol=0, rtol=0)
    assert image.shape == image0.shape == (2, 3, 120, 100)



@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux", "taesd"])
def test_every_family_takes_the_lock(family, family_dirs):
    """4- and 16-channel AutoencoderKLs (with their shift factors and latents_mean / latents_std) and
    AutoencoderTiny: the locked latents have the plain ones' shape and never decode further from the
    image's mean colour (random weights: whether they get closer is the weights' business)."""
    model = VAEModel.load(family, family_dirs[family])
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(4)) * 0.8 - 0.4
    plain = model.encode(x)
    locked = model.encode(x, colour_lock=2)
    assert locked.shape == plain.shape and torch.isfinite(locked).all()
    assert (colour_error(model, x, colour_lock=2) <= colour_error(model, x)).all()
