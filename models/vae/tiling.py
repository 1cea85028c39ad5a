"""Tiled encode / decode with GroupNorm statistics shared across tiles.

diffusers' tiled VAE (`AutoencoderKL._tiled_encode` / `tiled_decode`) runs every tile through the
whole encoder / decoder on its own, so each GroupNorm normalises a tile with that tile's mean and
variance: a dark tile is brightened, a flat one gets its noise amplified, and tiles shift in tone
(measured in benchmarks/RESULTS.md: up to 2 dB PSNR lost at 1024x1024 on a trained model).

Here the same diffusers tiling loop runs twice (`passes=2`):

1. a collecting pass: every GroupNorm normalises as usual (per tile) and adds the tile's per-group
   sum, sum of squares and element count to a running total;
2. an applying pass: every GroupNorm normalises with the totals of pass 1, i.e. with (estimates of)
   the statistics of the whole image, as an untiled forward would.

The statistics of deeper layers in pass 1 are computed after per-tile normalisation upstream, so
they are estimates (good ones: see benchmarks/RESULTS.md; a third pass re-collecting them under
shared statistics measured worse, so there is none). Memory stays that of diffusers' tiling (a few
numbers per group are kept); time is about twice a tiled forward.

The GroupNorm modules get a small wrapper (installed once, `install`) that does nothing unless
this thread is inside `shared_group_norm`, so untiled calls in other threads are unaffected.

Stopping: inside `stop_when(should_stop)`, every encoder / decoder call (one per tile, one per
frame of a caller's loop) first asks `should_stop()` and raises `Stopped` when it says so: work
whose client left or whose deadline passed ends at the next tile or frame, not at the end
(`install_stop_checks`, once per model; nothing happens outside `stop_when`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

_state = threading.local()  # .stats: the _Stats of the tiled call in this thread; .should_stop: see stop_when


class Stopped(Exception):
    """A model call stopped at a tile or frame boundary because its caller asked (`stop_when`)."""


@contextlib.contextmanager
def stop_when(should_stop: Callable[[], bool] | None):
    """Inside (this thread): encoder / decoder calls of models with `install_stop_checks` raise
    Stopped before running when `should_stop()` is true."""
    previous = getattr(_state, "should_stop", None)
    _state.should_stop = should_stop
    try:
        yield
    finally:
        _state.should_stop = previous


@torch.compiler.disable
def _check_stop(module, args) -> None:
    should_stop = getattr(_state, "should_stop", None)
    if should_stop is not None and should_stop():
        raise Stopped("stopped at a tile or frame boundary: the request was abandoned")


def install_stop_checks(vae: nn.Module) -> nn.Module:
    """A `stop_when` check before every call of the model's encoder and decoder (idempotent)."""
    for part in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)):
        if part is not None and not getattr(part, "_stop_check", False):
            part.register_forward_pre_hook(_check_stop)
            part._stop_check = True
    return vae


class _Stats:
    """Per-GroupNorm running totals (float64) and the mode: 'collect' or 'apply'."""

    def __init__(self):
        self.mode = "collect"
        self.totals: dict[int, list[torch.Tensor]] = {}  # id(module) -> [sum, sum_sq, count] per (N, G)
        self.frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(module) -> (mean, var) per (N, G)

    def freeze(self) -> None:
        """Totals -> (mean, var); the next pass applies them."""
        self.frozen = {}
        for key, (s, sq, n) in self.totals.items():
            mean = s / n
            self.frozen[key] = (mean, (sq / n - mean * mean).clamp_min(0))
        self.totals = {}
        self.mode = "apply"


def _group_norm_forward(module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    stats: _Stats | None = getattr(_state, "stats", None)
    if stats is None:
        return F.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)
    n, c, g = x.shape[0], x.shape[1], module.num_groups
    key = id(module)
    if stats.mode == "collect":
        # The usual per-tile GroupNorm; its kernel also returns the tile's per-group mean and 1/std.
        # The kernel wants dense NCHW or channels_last strides, also on size-1 dims (the attention
        # passes a transpose and a channels_last view with N=1 and an odd batch stride).
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            _, c_, h_, w_ = x.shape
            x = x.as_strided(x.shape, (c_ * h_ * w_, 1, w_ * c_, c_))
        else:
            x = x.contiguous()
        out, mean_t, rstd_t = torch.native_group_norm(x, module.weight, module.bias, n, c, x[0, 0].numel(), g,
                                                      module.eps)
        count = x[0, 0].numel() * (c // g)
        mean_t = mean_t.double()
        var_t = (rstd_t.double().pow(-2) - module.eps).clamp_min(0)
        tot = stats.totals.setdefault(key, [0.0, 0.0, 0])
        tot[0] = tot[0] + mean_t * count
        tot[1] = tot[1] + (var_t + mean_t * mean_t) * count
        tot[2] = tot[2] + count
        return out
    if key not in stats.frozen:  # a GroupNorm the first pass did not run: per-tile statistics
        return F.group_norm(x, g, module.weight, module.bias, module.eps)
    mean, var = stats.frozen[key]
    # Per-channel scale and shift from the whole-image (mean, var) of each group, then the affine.
    scale = torch.rsqrt(var + module.eps).repeat_interleave(c // g, dim=1)  # (N, C)
    shift = -mean.repeat_interleave(c // g, dim=1) * scale
    if module.affine:
        w, b = module.weight.double(), module.bias.double()
        scale, shift = scale * w, shift * w + b
    shape = (n, c) + (1,) * (x.dim() - 2)
    return x * scale.to(x.dtype).reshape(shape) + shift.to(x.dtype).reshape(shape)


def install(module: nn.Module) -> nn.Module:
    """Give every nn.GroupNorm inside `module` the shared-statistics forward (idempotent).

    Outside `shared_group_norm` it computes exactly what nn.GroupNorm does."""
    for m in module.modules():
        if isinstance(m, nn.GroupNorm) and "forward" not in m.__dict__:
            m.forward = _group_norm_forward.__get__(m)
    return module


@contextlib.contextmanager
def shared_group_norm():
    """Inside: GroupNorms installed with `install` collect / apply statistics (this thread only)."""
    if getattr(_state, "stats", None) is not None:
        raise RuntimeError("shared_group_norm is not re-entrant")
    _state.stats = _Stats()
    try:
        yield _state.stats
    finally:
        _state.stats = None


def run_tiled(tiled_forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """`tiled_forward(x)` (e.g. `vae._tiled_encode`) with `passes=2`: run once to gather every
    GroupNorm's whole-image statistics, then again normalising with them (the result).
    `passes=1` is plain diffusers tiling. The modules must have gone through `install`."""
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 or 2, got {passes}")
    if passes == 1:
        return tiled_forward(x)
    with shared_group_norm() as stats:
        tiled_forward(x)
        stats.freeze()
        return tiled_forward(x)
