"""Section `batching`: N decodes as one batch against N one-image calls, in process."""

from __future__ import annotations

from benchmarks.gpu_check.timing import time_fn
from benchmarks.gpu_check.variants import _build, _inputs


def bench_batching(base, args, half: str, log) -> dict:
    import torch

    dtype = {"fp16-cl": "float16"}.get(half, "bfloat16")
    n, side = args.batch, args.batch_side
    with torch.inference_mode():
        vae = _build(base, dtype, True, args.device)
        one = _inputs("decode", side, args.device, vae.dtype, True, n=1)
        many = _inputs("decode", side, args.device, vae.dtype, True, n=n)
        timing = dict(warmup=1 if args.quick else 2, min_runs=2 if args.quick else 5, min_seconds=0.0 if args.quick else 1.0)
        seq = time_fn(lambda: [vae.decode(one[i % 2]).sample for i in range(n)], args.device, **timing)
        bat = time_fn(lambda: vae.decode(many[0]).sample, args.device, **timing)
        # batched equals unbatched (same kernels' numerics aside)
        a = vae.decode(many[0]).sample.float()
        b = torch.cat([vae.decode(many[0][i:i + 1]).sample.float() for i in range(n)])
        diff = float((a - b).abs().max())
    res = {"n": n, "side": side, "dtype": dtype, "unbatched_ms": seq["median_ms"], "batched_ms": bat["median_ms"],
           "speedup": seq["median_ms"] / bat["median_ms"], "max_abs_batched_vs_unbatched": diff,
           "unbatched": seq, "batched": bat}
    log(f"batching in process {n} x {side}^2 {dtype}: {seq['median_ms']:.1f} ms one by one, "
        f"{bat['median_ms']:.1f} ms batched: {res['speedup']:.2f}x")
    return res
