"""Image quality metrics with the conventions of ../shared/data/README.md.

Images are uint8 RGB arrays (H, W, 3) in [0, 255]; PSNR is per image over all RGB values,
SSIM is scikit-image's implementation with a gaussian window (sigma 1.5, as Wang et al. 2004:
`gaussian_weights=True, use_sample_covariance=False`), averaged over the three channels.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity


def _as_uint8_hwc(image) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {array.shape}")
    return array


def psnr(reference, test) -> float:
    """PSNR in dB between two uint8 RGB images; `math.inf` when they are identical."""
    a, b = _as_uint8_hwc(reference), _as_uint8_hwc(test)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(reference, test) -> float:
    """SSIM (gaussian window 11, sigma 1.5) between two uint8 RGB images, in [-1, 1]."""
    a, b = _as_uint8_hwc(reference), _as_uint8_hwc(test)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return float(
        structural_similarity(
            a, b, channel_axis=2, data_range=255,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
    )


def mean_psnr(values) -> float:
    """Average PSNR over images; identical pairs (inf) are capped at 100 dB so a mean stays finite."""
    values = [min(v, 100.0) for v in values]
    return float(np.mean(values)) if values else float("nan")
