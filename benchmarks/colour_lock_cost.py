"""What the colour lock costs: seconds of an in-process encode and roundtrip with `colour_lock` 0, 1, 2.

    python -m benchmarks.colour_lock_cost                              # shipped model, 512, fp32 and bf16
    python -m benchmarks.colour_lock_cost --model NAME=PATH --sizes 256 512 --runs 5

Why: the lock adds decodes and a probe (models/vae/colour_lock.py); the cost admission counts
their FLOPs, and this measures the seconds they take on this machine. Each timed run goes through
every setting in turn (interleaved), so a machine whose speed drifts (shared cores, turbo) charges
them alike; medians of `--runs`. One vendored photograph per size (benchmarks/harness/images.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.harness.images import photo
from models.vae import imaging
from models.vae.inference import VAEModel
from models.vae.loading import DEFAULT_MODEL_DIR, parse_model_spec

LOCKS = (0, 1, 2)


def measure(model: VAEModel, size: int, runs: int) -> dict[tuple[str, int], float]:
    """Median seconds of ("encode" | "roundtrip", lock) for one photograph of size x size."""
    x = imaging.to_tensor(photo(size))
    ops = {"encode": lambda k: model.encode(x, colour_lock=k), "roundtrip": lambda k: model.roundtrip(x, colour_lock=k)}
    for op in ops.values():  # warm-up: first calls pay for allocation and kernel selection
        op(0)
    times: dict[tuple[str, int], list[float]] = {(name, k): [] for name in ops for k in LOCKS}
    for _ in range(runs):
        for (name, k), samples in times.items():
            start = time.perf_counter()
            ops[name](k)
            samples.append(time.perf_counter() - start)
    return {key: statistics.median(samples) for key, samples in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.colour_lock_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=f"default={DEFAULT_MODEL_DIR}", help="NAME=PATH (default: the shipped model)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--sizes", type=int, nargs="+", default=[512])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    name, path = parse_model_spec(args.model)
    print(f"model {name} ({path}), torch threads {torch.get_num_threads()}, medians of {args.runs} runs")
    print("| dtype | size | op | lock 0 s | lock 1 s | lock 2 s | lock 1 / lock 0 | lock 2 / lock 0 |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        model = VAEModel.load(name, path, dtype=dtype)
        for size in args.sizes:
            t = measure(model, size, args.runs)
            for op in ("encode", "roundtrip"):
                base = t[(op, 0)]
                print(f"| {dtype} | {size} | {op} | {base:.3f} | {t[(op, 1)]:.3f} | {t[(op, 2)]:.3f} "
                      f"| {t[(op, 1)] / base:.2f} | {t[(op, 2)] / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
