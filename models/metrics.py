"""Image quality metrics with the conventions of ../shared/data/README.md.

Images are uint8 RGB arrays (H, W, 3) in [0, 255]; PSNR is per image over all RGB values,
SSIM is scikit-image's implementation with a gaussian window (sigma 1.5, as Wang et al. 2004:
`gaussian_weights=True, use_sample_covariance=False`), averaged over the three channels.
"""

from __future__ import annotations

import math

import numpy as np


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


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel (radius int(truncate * sigma + 0.5) = 5: 11 taps)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(image: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 2-D filter of (H, W, C) over the positions where the window fits ('valid')."""
    k = len(w)
    rows = sum(w[i] * image[i : image.shape[0] - k + 1 + i] for i in range(k))
    return sum(w[i] * rows[:, i : rows.shape[1] - k + 1 + i] for i in range(k))


def ssim(reference, test) -> float:
    """SSIM (gaussian window 11, sigma 1.5) between two uint8 RGB images, in [-1, 1].

    Equal to scikit-image's `structural_similarity(channel_axis=2, data_range=255,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` (tested): scikit-image filters
    the whole image and then drops a 5-pixel border before averaging, and the values it keeps are
    exactly those where the 11-tap window fits inside the image, which is what is computed here.
    numpy only, so serving (/roundtrip) does not need scikit-image and scipy.
    """
    a, b = _as_uint8_hwc(reference), _as_uint8_hwc(test)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    w = gaussian_window()
    if min(a.shape[:2]) < len(w):
        raise ValueError(f"images of {a.shape[1]}x{a.shape[0]} are smaller than the SSIM window ({len(w)})")
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _filter_valid(x, w), _filter_valid(y, w)
    vx = _filter_valid(x * x, w) - mx * mx
    vy = _filter_valid(y * y, w) - my * my
    cxy = _filter_valid(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean(axis=(0, 1)).mean())


def mean_psnr(values) -> float:
    """Average PSNR over images; identical pairs (inf) are capped at 100 dB so a mean stays finite."""
    values = [min(v, 100.0) for v in values]
    return float(np.mean(values)) if values else float("nan")


# BT.601 colour-difference axes (Cb, Cr) of 8-bit RGB: the plane orthogonal to brightness.
_CBCR = np.array([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
SATURATED_CHROMA = 30.0  # levels; flat foliage green is about 25, kodim23's parrot green about 75
MIN_SATURATED_SHARE = 0.01


def chroma_fidelity(reference, test, threshold: float = SATURATED_CHROMA) -> tuple[float, float] | None:
    """How a reconstruction keeps the reference's saturated colours: over the reference pixels whose
    chroma (length of (Cb, Cr), 8-bit levels) is at least `threshold`, the test's mean chroma over
    the reference's (1: kept; below 1: greyer) and the mean hue error in degrees (angle between
    the two (Cb, Cr) vectors). None when under 1 % of the pixels are that saturated."""
    a, b = _as_uint8_hwc(reference), _as_uint8_hwc(test)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    ca = a.reshape(-1, 3).astype(np.float64) @ _CBCR.T
    cb = b.reshape(-1, 3).astype(np.float64) @ _CBCR.T
    length_a = np.hypot(ca[:, 0], ca[:, 1])
    keep = length_a >= threshold
    if keep.mean() < MIN_SATURATED_SHARE:
        return None
    ca, cb, length_a = ca[keep], cb[keep], length_a[keep]
    length_b = np.hypot(cb[:, 0], cb[:, 1])
    cos = (ca * cb).sum(1) / np.maximum(length_a * length_b, 1e-9)
    hue_error = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    return float(length_b.mean() / length_a.mean()), float(hue_error.mean())


# --------------------------------------------------------------------------- low-frequency colour
# Per 8x8 block (one latent position of an f8 VAE): how the reconstruction carries the block's mean
# colour, along the two chroma axes of the evaluated images themselves (their principal components
# in BT.601 Cb/Cr; in daylight photographs the first is orange-blue, the second green-magenta).

def block_ycbcr(image, block: int = 8) -> np.ndarray:
    """(blocks, 3) mean Y, Cb, Cr (8-bit levels) of each whole `block` x `block` block of a uint8 image."""
    a = _as_uint8_hwc(image).astype(np.float64)
    h, w = a.shape[0] // block * block, a.shape[1] // block * block
    means = a[:h, :w].reshape(h // block, block, w // block, block, 3).mean((1, 3)).reshape(-1, 3)
    y = means @ np.array([0.299, 0.587, 0.114])
    return np.column_stack([y, means @ _CBCR.T])


def chroma_axes(reference_blocks: np.ndarray) -> np.ndarray:
    """(2, 2) unit vectors in (Cb, Cr): the first and second principal axes of the blocks' chroma."""
    _, vectors = np.linalg.eigh(np.cov(reference_blocks[:, 1:].T))  # ascending eigenvalues
    return vectors[:, ::-1].T


def block_colour_gain(reference_blocks: np.ndarray, test_blocks: np.ndarray) -> list[float]:
    """Gain of the test's block chroma along each chroma axis of the reference (1: kept, 0: lost):
    the length of the least-squares chroma transfer (test on reference, both centred) applied to
    the axis."""
    ref = reference_blocks[:, 1:] - reference_blocks[:, 1:].mean(0)
    test = test_blocks[:, 1:] - test_blocks[:, 1:].mean(0)
    transfer = np.linalg.lstsq(ref, test, rcond=None)[0].T
    return [float(np.linalg.norm(transfer @ axis)) for axis in chroma_axes(reference_blocks)]


def linear_r2(features: np.ndarray, reference_blocks: np.ndarray) -> list[float]:
    """R^2 of the best linear read-out (with a constant) of the blocks' Y and their chroma along the
    two axes from `features` (e.g. each block's latent vector): how much of each a latent holds."""
    axes = chroma_axes(reference_blocks)
    targets = np.column_stack([reference_blocks[:, 0], (reference_blocks[:, 1:] - reference_blocks[:, 1:].mean(0)) @ axes.T])
    design = np.column_stack([features, np.ones(len(features))])
    fit = design @ np.linalg.lstsq(design, targets, rcond=None)[0]
    return [float(v) for v in 1 - ((fit - targets) ** 2).mean(0) / np.maximum(targets.var(0), 1e-12)]
