"""CPU cores shared between model calls that run at the same time.

Why: on a CPU one forward pass of a small VAE scales poorly over cores, while two passes side by
side scale almost perfectly, and a call on every core stalls at each barrier when anything else
runs on one of them. Measured on 2 cores (`python -m benchmarks.parallel_calls`: shipped model,
256x256 decode, bfloat16; benchmarks/RESULTS.md, "CPU: calls in parallel"): one call takes 65 ms
with 2 threads and 91 ms with 1 on a quiet machine; two calls side by side with 1 thread each gave
18-23 images/s against 14-19 one after the other with 2 threads, and 5.6 against 1.7 while another
job ran on one core. So a server runs several calls at once, and each call uses an equal share of the cores: alone it gets all of them (best latency at concurrency 1),
beside another it gets half (best throughput under load).

How: `ThreadShare.call()` brackets one model call in the thread that runs it; `install(vae)` puts
a forward pre-hook on every convolution and attention block of the model, which re-reads the share
(`torch.set_num_threads` is per thread for OpenMP, so each worker sets its own). A call that began
alone thus gives cores back within one layer when a second call starts, instead of the two
oversubscribing the cores until the first one ends. Outside `call()` the hooks do nothing, so
in-process use (tests, bulk jobs, training) keeps torch's own thread setting.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn

_local = threading.local()  # .share: the ThreadShare whose call() this thread is inside


class ThreadShare:
    """`total` intra-op threads divided equally between the calls inside `call()` right now."""

    def __init__(self, total: int):
        self.total = max(1, int(total))
        self.active = 0
        self._lock = threading.Lock()

    def threads_per_call(self) -> int:
        return max(1, self.total // max(1, self.active))

    @contextmanager
    def call(self):
        with self._lock:
            self.active += 1
        _local.share = self
        try:
            rebalance()
            yield
        finally:
            _local.share = None
            with self._lock:
                self.active -= 1


def rebalance() -> None:
    """Set this thread's intra-op threads to its share (no-op outside `ThreadShare.call()`)."""
    share = getattr(_local, "share", None)
    if share is None:
        return
    n = share.threads_per_call()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _pre_hook(module, args):
    rebalance()


def install(vae: nn.Module) -> nn.Module:
    """Re-read the share before every convolution and attention layer of `vae` (idempotent).

    Not for a torch.compile'd model: a Python side effect in a hook breaks the compiled graph."""
    for module in vae.modules():
        if isinstance(module, nn.Conv2d) or type(module).__name__ == "Attention":
            if not getattr(module, "_thread_share_hook", False):
                module.register_forward_pre_hook(_pre_hook)
                module._thread_share_hook = True
    return vae
