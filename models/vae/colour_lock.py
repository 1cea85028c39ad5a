"""Colour lock: encode so that the latents decode to the image's own mean colour.

Why: a small VAE's encoder gets an image's overall colour slightly wrong, most of all on images
unlike its training set (the shipped model's roundtrip of Kodak, scanned film, came back with
green +1.6 levels on average and 5.3 on one image; models/default/README.md). The decoder is not the
limit: adding one constant per latent channel moves the decoded mean colour almost linearly, and the
right constants bring every Kodak image within 1.5 levels. So the correction is a closed loop at
encode time: decode, measure the mean colour error `e` (3 numbers per image), shift each latent
channel by `P @ e`, repeat `steps` times, and keep the latents that decoded closest (so `steps`
costs `steps + 1` decodes). The latents keep the model's format, so any decoder (a diffusion
pipeline's, `/decode`) benefits and nothing else changes.

`P` is the pseudo-inverse of the Jacobian `J` (3 x C) of the decoded mean colour with respect to a
constant shift of each (scaled) latent channel. `J` barely depends on the image (its entries varied by about
+-15 % over four Kodak images), so it is measured once per model on a mid-grey probe image by
central differences (2 C decodes of a 64 x 64 image) and reused for every image. With 16-channel
models (SD3, FLUX) the pseudo-inverse picks the smallest shift that corrects the colour.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MAX_STEPS = 3  # beyond 2 the error no longer shrinks measurably (Kodak, shipped model); each step is a decode
PROBE_SIDE = 64  # pixels of the grey probe image the Jacobian is measured on
PROBE_STEP = 0.1  # finite-difference step, in units of the model's scaled (roughly unit-variance) latents
# A latent direction that moves the mean colour by less than this ([-1, 1] units, 6 levels of 255) per
# unit of scaled latent is not used: the shipped model's weakest moves 0.32, while a random-weight
# model's near-flat directions would ask for shifts of hundreds.
MIN_GAIN = 0.05
MAX_SHIFT = 0.5  # largest shift of one channel in one step, in scaled latent units (5 levels ask ~0.12)


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> (N, 3) mean of each channel after clamping (what a saved image shows)."""
    return x.float().clamp(-1, 1).mean(dim=(-2, -1))


def shift_matrix(encode: Callable, decode: Callable, in_channels: int, scaling_factor: float) -> torch.Tensor:
    """`P` (C, 3): shifts of the scaled latent channels per unit of mean colour error, for the model
    behind `encode` / `decode` (which take raw latents). Measured on a mid-grey probe image by central
    differences; see the module docstring."""
    probe = torch.zeros(1, in_channels, PROBE_SIDE, PROBE_SIDE)
    z = encode(probe)
    step = PROBE_STEP / scaling_factor  # raw units
    columns = []
    for c in range(z.shape[1]):
        dz = torch.zeros_like(z)
        dz[:, c] = step
        columns.append((mean_colour(decode(z + dz)) - mean_colour(decode(z - dz)))[0] / (2 * PROBE_STEP))
    jacobian = torch.stack(columns, dim=1).double()  # (3, C): colour per scaled latent unit
    return torch.linalg.pinv(jacobian, atol=MIN_GAIN, rtol=0.0).float()


def correct(z: torch.Tensor, target: torch.Tensor, decode: Callable, matrix: torch.Tensor, steps: int,
            scaling_factor: float) -> torch.Tensor:
    """Shift each image's latent channels so that `decode(z)` has the mean colour `target` (N, 3).

    `matrix` from `shift_matrix`. `steps` closed-loop steps; every result is decoded and checked
    (steps + 1 decodes in all), and each image keeps the latents whose decode came closest (largest
    channel error): never worse than `z`, even for a model where the linear step misleads. Returns
    new raw latents.
    """
    if not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"colour lock steps must be from 0 to {MAX_STEPS}, got {steps}")
    if not steps:
        return z
    matrix, target = matrix.to(z.device), target.to(z.device)
    best, best_error = z, None
    for step in range(steps + 1):
        error = target - mean_colour(decode(z)).to(z.device)  # (N, 3)
        worst = error.abs().amax(dim=1)
        if best_error is None:
            best_error = worst
        else:
            better = worst < best_error
            best = torch.where(better[:, None, None, None], z, best)
            best_error = torch.minimum(worst, best_error)
        if step < steps:
            shift = (error @ matrix.T).clamp(-MAX_SHIFT, MAX_SHIFT) / scaling_factor  # (N, C), raw units
            z = z + shift[:, :, None, None].to(z.dtype)
    return best
