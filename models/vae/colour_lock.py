"""Colour lock: encode so that the latents decode to the image's own mean colour.

Why: a small VAE's encoder gets an image's overall colour slightly wrong, most of all on images
unlike its training set (the roundtrip of Kodak, scanned film, by the shipped model's v6 came back
with green +1.6 levels on average and 5.3 on one image; models/default/README.md). The decoder is not
the limit: adding one constant per latent channel moves the decoded mean colour almost linearly,
and the right constants bring every Kodak image within 1.5 levels (v6). So the correction is a closed
loop at encode time: decode, measure the mean colour error `e` (3 numbers per image), shift each
latent channel by the least-norm solution of `J s = e`, repeat `steps` times, and keep the latents
that decoded closest (`steps` costs `steps + 1` decodes). The latents keep the model's format, so
any decoder (a diffusion pipeline's, `/decode`) benefits and nothing else changes.

`J` (3 x C) is the change of the decoded mean colour per unit shift of each scaled latent channel,
and it depends on the image. Measured once on a mid-grey probe it served Kodak (worst image 1.3
levels after one step) but overshot on strongly coloured COCO images (000000014439: green +7.0
became -5.1; that image's own `J`, from 8 full-size decodes, gives 0.1). A flat probe of the
image's mean colour fixed that one (1.3) but not a blue-green one (000000012120: -4.5 in blue
became +8.2); the image itself shrunk to 64 x 64 gave 2.6, shrunk to 96 x 96 1.7 (and 0.2 on
000000014439). So each image's `J` is measured by central differences on its copy shrunk to
96 x 96 (area average; a side under 96 keeps its length): one encode and 2 C decodes of 96 x 96,
about a quarter of one 512 x 512 decode. After each step `J` takes the colour change the step
really made (Broyden's rank-one update), so a second step corrects what the first over- or
undershot. With 16-channel models (SD3, FLUX) the least-norm shift spreads over all channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

MAX_STEPS = 3  # a bound on one request's work: 2 steps already bring every Kodak and COCO image within 0.25 levels
PROBE_SIDE = 96  # side of the shrunk copy of the image the Jacobian is measured on (see the docstring)
PROBE_STEP = 0.1  # finite-difference step, in units of the model's scaled (roughly unit-variance) latents
# A latent direction that moves the mean colour by less than this ([-1, 1] units, 6 levels of 255) per
# unit of scaled latent is not used: the shipped v6's weakest moved 0.32, while a random-weight
# model's near-flat directions would ask for shifts of hundreds.
MIN_GAIN = 0.05
MAX_SHIFT = 0.5  # largest shift of one channel in one step, in scaled latent units (5 levels ask ~0.12)


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] -> (N, 3) mean of each channel after clamping (what a saved image shows)."""
    return x.float().clamp(-1, 1).mean(dim=(-2, -1))


def probe_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The probe's (height, width) for an image of this size: PROBE_SIDE square, a shorter side kept
    (rounded up to `multiple`, as encode pads it)."""
    return (min(PROBE_SIDE, -(-height // multiple) * multiple), min(PROBE_SIDE, -(-width // multiple) * multiple))


def jacobians(encode: Callable, decode: Callable, x: torch.Tensor, multiple: int,
              scaling_factor: float) -> torch.Tensor:
    """`J` (N, 3, C): for each image of `x` (N, 3, H, W in [-1, 1]), the change of its decoded mean
    colour per unit shift of each scaled latent channel, measured by central differences on the
    image shrunk to `probe_size` (area average; one encode and 2 C decodes of N probes), for the
    model behind `encode` / `decode` (which take raw latents). See the module docstring."""
    size = probe_size(*x.shape[-2:], multiple)
    probes = F.interpolate(x.float(), size=size, mode="area") if tuple(x.shape[-2:]) != size else x.float()
    z = encode(probes.contiguous())
    step = PROBE_STEP / scaling_factor  # raw units
    columns = []
    for c in range(z.shape[1]):
        dz = torch.zeros_like(z)
        dz[:, c] = step
        columns.append((mean_colour(decode(z + dz)) - mean_colour(decode(z - dz))).cpu() / (2 * PROBE_STEP))
    return torch.stack(columns, dim=2).double()


def _shifts(jacobian: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """(N, C) scaled-latent shifts that move the mean colours by `error` (N, 3) under `jacobian`:
    the least-norm solution, ignoring directions that move the colour by under MIN_GAIN."""
    solve = torch.linalg.pinv(jacobian, atol=MIN_GAIN, rtol=0.0)  # (N, C, 3)
    return torch.einsum("nck,nk->nc", solve, error.double()).clamp(-MAX_SHIFT, MAX_SHIFT)


def correct(z: torch.Tensor, target: torch.Tensor, decode: Callable, jacobian: torch.Tensor, steps: int,
            scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shift each image's latent channels so that `decode(z)` has the mean colour `target` (N, 3).

    `jacobian` (N, 3, C) from `jacobians`. `steps` closed-loop steps; after each, the Jacobian takes
    the colour change the step really made (Broyden's update), so a later step corrects an overshoot.
    Every result is decoded and checked (steps + 1 decodes in all), and each image keeps the latents
    whose decode came closest (largest channel error): never worse than `z`, even for a model where
    the linear step misleads. Returns new raw latents and their decode (None for 0 steps), so a
    roundtrip need not decode them again.
    """
    if not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"colour lock steps must be from 0 to {MAX_STEPS}, got {steps}")
    if not steps:
        return z, None
    target, jacobian = target.double().cpu(), jacobian.double().cpu()
    best = best_image = best_error = shift = colour = None
    for step in range(steps + 1):
        image = decode(z)
        new_colour = mean_colour(image).double().cpu()
        error = target - new_colour  # (N, 3)
        worst = error.abs().amax(dim=1)
        if best is None:
            best, best_image, best_error = z, image, worst
        else:
            better = worst < best_error
            best = torch.where(better.to(z.device)[:, None, None, None], z, best)
            best_image = torch.where(better.to(image.device)[:, None, None, None], image, best_image)
            best_error = torch.minimum(worst, best_error)
            # Broyden: J + (observed - predicted) s^T / |s|^2, per image (no update where nothing moved)
            moved = (shift ** 2).sum(dim=1, keepdim=True)
            miss = (new_colour - colour) - torch.einsum("nkc,nc->nk", jacobian, shift)
            gain = torch.where(moved > 0, miss / moved.clamp_min(1e-12), 0.0)
            jacobian = jacobian + gain[:, :, None] * shift[:, None, :]
        if step < steps:
            shift, colour = _shifts(jacobian, error), new_colour
            z = z + (shift / scaling_factor).to(z.device, z.dtype)[:, :, None, None]
    return best, best_image
