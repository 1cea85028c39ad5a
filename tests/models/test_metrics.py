"""models/metrics.py: PSNR by its definition, SSIM equal to scikit-image's reference implementation
(which serving no longer installs)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from models.metrics import ssim


def reference(a, b) -> float:
    return structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)


@pytest.mark.parametrize("photo", ["astronaut.png", "coffee.png", "rocket.jpg"])
def test_ssim_equals_scikit_image_on_photos(photos_dir, photo):
    a = np.asarray(Image.open(photos_dir / photo).convert("RGB"))
    rng = np.random.default_rng(0)
    b = np.clip(a.astype(int) + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, b) == pytest.approx(reference(a, b), abs=1e-12)
    assert ssim(a, a) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(11, 11, 3), (13, 40, 3), (64, 17, 3)])
def test_ssim_equals_scikit_image_at_the_smallest_sizes(shape):
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, shape).astype(np.uint8) for _ in range(2))
    assert ssim(a, b) == pytest.approx(reference(a, b), abs=1e-12)


def test_ssim_refuses_images_smaller_than_its_window():
    a = np.zeros((10, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(a, a)


def test_chroma_fidelity_measures_saturation_kept_and_hue_turned():
    from models.metrics import chroma_fidelity

    rng = np.random.default_rng(0)
    green = np.clip(np.full((32, 32, 3), (40, 180, 40)) + rng.integers(-5, 5, (32, 32, 3)), 0, 255).astype(np.uint8)
    kept, hue = chroma_fidelity(green, green)
    assert kept == pytest.approx(1.0) and hue == pytest.approx(0.0, abs=1e-6)
    grey = green.mean(2, keepdims=True)
    half = (grey + (green - grey) * 0.5).round().astype(np.uint8)  # half the chroma, same hue
    kept, hue = chroma_fidelity(green, half)
    assert kept == pytest.approx(0.5, abs=0.02) and hue < 2
    turned = green[..., [2, 0, 1]]  # a third of a turn about the grey axis: 120 degrees of hue
    kept, hue = chroma_fidelity(green, turned)
    assert kept == pytest.approx(1.0, abs=0.1) and hue == pytest.approx(120, abs=10)  # BT.601 axes: not exact
    assert chroma_fidelity(np.full((8, 8, 3), 128, np.uint8), green[:8, :8]) is None  # nothing saturated


def test_block_colour_gain_and_latent_r2_find_a_lost_chroma_axis(photos_dir):
    """On real photos: an identity keeps both chroma axes (gain 1); removing the second axis from
    every pixel's chroma leaves the first at 1 and the second near 0; a 'latent' that holds the
    block's Y and first axis but not the second has R^2 near 1, 1, 0."""
    from models.metrics import _CBCR, block_colour_gain, block_ycbcr, chroma_axes, linear_r2

    photos = [np.asarray(Image.open(p).convert("RGB").resize((128, 96))) for p in sorted(photos_dir.iterdir())]
    ref = np.concatenate([block_ycbcr(p) for p in photos])
    assert ref.shape == (4 * 16 * 12, 3)
    assert block_colour_gain(ref, ref) == pytest.approx([1, 1], abs=1e-9)
    second = chroma_axes(ref)[1]
    # take the second axis out of every pixel's chroma (RGB moves along the pseudo-inverse of Cb/Cr)
    flattened = []
    for p in photos:
        x = p.reshape(-1, 3).astype(np.float64)
        along = (x @ _CBCR.T) @ second
        flattened.append(np.clip(x - np.outer(along, second) @ np.linalg.pinv(_CBCR).T, 0, 255).round().astype(np.uint8).reshape(p.shape))
    test = np.concatenate([block_ycbcr(p) for p in flattened])
    first_gain, second_gain = block_colour_gain(ref, test)
    assert first_gain == pytest.approx(1, abs=0.05) and second_gain < 0.1
    rng = np.random.default_rng(0)
    holds = np.column_stack([ref[:, 0], (ref[:, 1:] - ref[:, 1:].mean(0)) @ chroma_axes(ref)[0], rng.normal(size=(len(ref), 2))])
    y_r2, first_r2, second_r2 = linear_r2(holds, ref)
    assert [y_r2, first_r2] == pytest.approx([1, 1]) and second_r2 < 0.3  # what Y happens to predict of it
    holds[:, 2] = (ref[:, 1:] - ref[:, 1:].mean(0)) @ second * 0.5 + 3
    assert linear_r2(holds, ref) == pytest.approx([1, 1, 1])
