"""Latent-space math (pure torch): sampling z ~ N(0, I), lerp / slerp, resizing, FLUX packing.

Latents here are *raw* (what `VAEModel.encode` returns and `decode` takes). Interpolation runs in
the model's normalised space `(z - shift) * scale`, where a VAE's latents are roughly N(0, I): that is
the space where slerp's "stay on the shell of typical samples" argument holds, and it keeps the
shift of models such as FLUX's out of the angle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.vae.latents import scale as scale_latents, unscale as unscale_latents

METHODS = ("slerp", "lerp")


def sample_latents(
    n: int,
    channels: int,
    size: tuple[int, int],
    seed: int,
    scaling_factor: float,
    shift_factor: float | None = None,
    mean=None,
    std=None,
) -> torch.Tensor:
    """Raw latents (n, channels, h, w) whose normalised form is N(0, I): `randn / scale + shift`
    (`randn * std / scale + mean` with a config's per-channel `mean` / `std`).

    Sample i is drawn on the CPU from its own generator seeded with `seed + i`: the same latents
    on any device, and sample i of a batch can be reproduced alone with `seed + i`, n=1.
    """
    z = torch.stack([
        torch.randn((channels, *size), generator=torch.Generator("cpu").manual_seed(seed + i))
        for i in range(n)
    ])
    return unscale_latents(z, scaling_factor, shift_factor, mean, std)


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of each sample (dim 0) taken as one flat vector.

    Follows the great circle from a to b, with the norm of a at t=0 and of b at t=1 (the standard
    formula). Nearly parallel vectors fall back to lerp, where the formula divides by sin(~0).
    t = 0 and t = 1 give a and b exactly.
    """
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (F.normalize(fa, dim=1) * F.normalize(fb, dim=1)).sum(1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    parallel = sin.abs() < eps
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    out = wa[:, None] * fa + wb[:, None] * fb
    return out.reshape(a.shape).to(a.dtype)


def interpolate(
    a: torch.Tensor,
    b: torch.Tensor,
    steps: int,
    method: str = "slerp",
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    mean=None,
    std=None,
) -> torch.Tensor:
    """Raw latents a, b of one shape (1, C, h, w) -> `steps` raw latents (steps, C, h, w), a first, b last."""
    if method not in METHODS:
        raise ValueError(f"unknown interpolation method {method!r}: use {' or '.join(METHODS)}")
    if a.shape != b.shape:
        raise ValueError(f"latents differ in shape: {list(a.shape)} vs {list(b.shape)} (resize them first)")
    if steps < 2:
        raise ValueError("steps must be at least 2 (the two endpoints)")
    fn = slerp if method == "slerp" else lerp
    factors = (scaling_factor, shift_factor, mean, std)
    na, nb = scale_latents(a, *factors), scale_latents(b, *factors)
    middle = [fn(na, nb, i / (steps - 1)) for i in range(1, steps - 1)]
    middle = [unscale_latents(m, *factors) for m in middle]
    # The endpoints are the inputs themselves: scale/unscale round trips are not exact in float.
    return torch.cat([a, *middle, b])


def resize_latents(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, *size), bilinear; antialiased when shrinking so no channel aliases.

    Resizing latents (rather than re-encoding a resized image) keeps one encode per image; the
    decoder copes well with smoothly resampled latents, though the resized side decodes softer.
    """
    if tuple(z.shape[-2:]) == tuple(size):
        return z
    return F.interpolate(z.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)



# --- FLUX packing: what FluxPipeline's transformer works on, and what remote_decode sends --------

def packed_latent_size(height: int, width: int, downsample_factor: int) -> tuple[int, int]:
    """The unpacked latent (h, w) of a packed FLUX tensor for an image of height x width, as
    FluxPipeline._unpack_latents computes it (2x2 patches: both sides even, rounded down)."""
    return 2 * (int(height) // (downsample_factor * 2)), 2 * (int(width) // (downsample_factor * 2))


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) with even h, w -> (B, (h/2)*(w/2), C*4): FluxPipeline._pack_latents."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(z: torch.Tensor, height: int, width: int, downsample_factor: int) -> torch.Tensor:
    """(B, (H/2f)*(W/2f), C*4) + the image's height and width -> (B, C, 2*(H//2f), 2*(W//2f)):
    FluxPipeline._unpack_latents, step for step (the caller checks the sizes agree)."""
    b, _, channels = z.shape
    h, w = packed_latent_size(height, width, downsample_factor)
    z = z.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, channels // 4, h, w)
