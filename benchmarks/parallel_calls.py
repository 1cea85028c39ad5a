"""Model calls one after the other with every thread, or side by side with a share each.

    python -m benchmarks.parallel_calls                      # shipped model, 256x256 decode, bf16
    python -m benchmarks.parallel_calls --size 512 --dtype float32 --rounds 5

Why: the choice behind `vae serve`'s CPU default (app.http.app.default_model_threads and
models/vae/threads.py). Each round runs, interleaved so load drift hits all alike: `sequential`
(one call at a time, all torch threads), `sequential-1t` (one at a time, one thread), `parallel`
(one call per thread at once, inside a models.vae.threads.ThreadShare, as the server runs them) and
`batched` (the same images as one batch, all threads). Prints images/s per round and the median.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from benchmarks.harness.paths import SHIPPED_MODEL
from models.vae import threads
from models.vae.inference import VAEModel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parallel_calls", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SHIPPED_MODEL), help="diffusers VAE folder (default: the shipped model)")
    p.add_argument("--size", type=int, default=256, help="image side; latents are size/8")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in all")
    p.add_argument("--images", type=int, default=8, help="decodes per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    model = VAEModel.load("bench", args.model, dtype=args.dtype)
    f, c = model.downsample_factor, model.latent_channels
    z = torch.randn(1, c, args.size // f, args.size // f, generator=torch.Generator().manual_seed(0))
    share = threads.ThreadShare(args.threads)
    workers = args.threads

    def sequential(n_threads: int) -> None:
        torch.set_num_threads(n_threads)
        for _ in range(args.images):
            model.decode(z)

    def parallel() -> None:
        def worker(n: int) -> None:
            with share.call():
                for _ in range(n):
                    model.decode(z)
        counts = [args.images // workers + (i < args.images % workers) for i in range(workers)]
        pool = [threading.Thread(target=worker, args=(n,)) for n in counts]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    def batched() -> None:
        torch.set_num_threads(args.threads)
        model.decode(z.expand(args.images, -1, -1, -1).contiguous())

    variants = {"sequential": lambda: sequential(args.threads), "sequential-1t": lambda: sequential(1),
                "parallel": parallel, "batched": batched}
    for run in variants.values():  # warm-up: oneDNN primitives for each thread count and batch
        run()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            rates[name].append(args.images / (time.perf_counter() - t0))
    torch.set_num_threads(args.threads)
    print(f"{args.model}, {args.size}x{args.size} decode, {args.dtype}, {args.threads} threads, "
          f"{args.images} images per variant and round")
    print("| variant | images/s per round | median |\n|---|---|---|")
    for name, v in rates.items():
        print(f"| {name} | {' '.join(f'{x:.1f}' for x in v)} | {statistics.median(v):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
