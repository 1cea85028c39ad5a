"""The in-process model variants (dtype, channels_last), building one from the base model, its
inputs, the call for an op, and the error of an output against the fp32 reference."""

from __future__ import annotations

import copy

from benchmarks import harness


def _variants(device: str, quick: bool) -> list[dict]:
    cuda = device.startswith("cuda")
    v = [dict(name="fp32", dtype="float32", cl=False)]
    if cuda:
        v += [dict(name="fp16", dtype="float16", cl=False)]
    if not quick:
        v += [dict(name="bf16", dtype="bfloat16", cl=False)]
    if cuda:
        v += [dict(name="fp16-cl", dtype="float16", cl=True)]
    v += [dict(name="bf16-cl", dtype="bfloat16", cl=True)]
    return v


def _build(base, dtype: str, cl: bool, device: str):
    import torch

    vae = copy.deepcopy(base).to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
    if cl:
        vae = vae.to(memory_format=torch.channels_last)
    return vae


def _inputs(op: str, size: int, device: str, dtype, cl: bool, n: int = 1, seed: int = 0):
    """Two input sets (rotated between runs): decode latents N(0,1); encode a photo in [-1, 1]."""
    import numpy as np
    import torch

    sets = []
    for k in range(2):
        if op == "decode":
            g = torch.Generator().manual_seed(seed + k)
            t = torch.randn(n, 4, size // 8, size // 8, generator=g)
        else:
            img = np.asarray(harness.photo(size, index=k), dtype=np.float32)
            t = torch.from_numpy(img).permute(2, 0, 1)[None].repeat(n, 1, 1, 1) / 127.5 - 1
        t = t.to(device=device, dtype=dtype)
        sets.append(t.contiguous(memory_format=torch.channels_last) if cl else t.contiguous())
    return sets


def _op_fn(vae, op: str):
    if op == "decode":
        return lambda t: vae.decode(t).sample
    return lambda t: vae.encode(t).latent_dist.mode()


def _error(out, ref) -> dict:
    import torch

    out = out.float()
    finite = bool(torch.isfinite(out).all())
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-12)) if finite else None
    mx = float((out - ref).abs().max()) if finite else None
    return {"finite": finite, "rel_l2": rel, "max_abs": mx}
