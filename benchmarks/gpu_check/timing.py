"""Time for the GPU check: the run's time budget, and timing a call (CUDA events on a GPU, a
synchronised host clock otherwise)."""

from __future__ import annotations

import statistics
import time


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def allows(self, needed: float) -> bool:
        return self.left >= needed


def time_fn(fn, device: str, *, warmup: int, min_runs: int, min_seconds: float, max_runs: int = 200) -> dict:
    """Median and spread of `fn()` in seconds: CUDA events on a GPU, a synchronised host clock otherwise."""
    import torch

    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    while len(times) < min_runs or (sum(times) < min_seconds and len(times) < max_runs):
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_ms": statistics.median(times) * 1000, "min_ms": times[0] * 1000,
            "p10_ms": times[len(times) // 10] * 1000, "p90_ms": times[(len(times) * 9) // 10] * 1000, "runs": len(times)}


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
