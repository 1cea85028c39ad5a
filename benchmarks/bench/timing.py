"""Timing: latency percentiles, images/s at each concurrency, one table row per model, op, size and mode."""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import time

import numpy as np
import torch

from benchmarks.bench.inputs import ModelSpec, png_bytes, photo, to_tensor
from benchmarks.bench.machine import _timed, loadavg, reset_peak, rss_peak_mib
from benchmarks.bench.systems import Server, load_reference, make_system
from models.vae.inference import diffusers_latents




def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_one(system, op: str, size: int, inputs: dict, runs: int, concurrency: list[int]) -> dict:
    http = isinstance(system, Server)
    arg = inputs["png"] if http else inputs["x"]
    pid = system.pid()
    system.call(op, arg, inputs["z"])  # warm-up (not timed)
    reset_peak(pid)
    times = [_timed(lambda: system.call(op, arg, inputs["z"])) for _ in range(runs)]
    row = {
        "median_s": statistics.median(times),
        "p90_s": percentile(times, 90),
        "runs": runs,
        "times_s": [round(t, 4) for t in times],
        "images_per_s": {"1": 1 / statistics.median(times)},
    }
    if http:
        for c in concurrency:
            if c <= 1:
                continue
            n = 2 * c
            with cf.ThreadPoolExecutor(c) as pool:
                t = time.perf_counter()
                list(pool.map(lambda _: system.call(op, arg, inputs["z"]), range(n)))
                row["images_per_s"][str(c)] = n / (time.perf_counter() - t)
    row["peak_rss_mib"] = round(rss_peak_mib(pid), 1)
    return row


def run_benchmarks(args, models: list[ModelSpec], peak: dict, log) -> list[dict]:
    from models.vae.info import count_flops

    rows = []
    for model in models:
        ref = load_reference(model.path)
        inputs = {}
        for size in args.sizes:
            array = photo(size)
            x = to_tensor(array)
            with torch.inference_mode():
                z = diffusers_latents(ref, x).contiguous()
            flops = count_flops(ref, size)
            flops["roundtrip"] = flops["encode"] + flops["decode"]
            inputs[size] = {"png": png_bytes(array), "x": x, "z": z, "flops": flops}
        del ref
        for mode in args.modes:
            log(f"[{model.name}] {mode}: starting")
            try:
                system = make_system(mode, model)
            except Exception as exc:  # a mode that cannot run here (e.g. compile without a compiler)
                log(f"[{model.name}] {mode}: skipped: {exc}")
                rows.append({"model": model.name, "mode": mode, "error": str(exc)[:300]})
                continue
            try:
                for op in args.ops:
                    for size in args.sizes:
                        inp = inputs[size]
                        conc = args.concurrency if size in args.concurrency_sizes else [1]
                        load = loadavg()
                        row = bench_one(system, op, size, inp, args.runs, conc)
                        precision = "bfloat16" if "bf16" in mode else "float32"
                        gflops = inp["flops"][op] / row["median_s"] / 1e9
                        row.update({
                            "model": model.name, "mode": mode, "op": op, "size": size,
                            "gflop": round(inp["flops"][op] / 1e9, 2), "gflop_per_s": round(gflops, 3),
                            "peak_gflop_per_s": peak[precision], "pct_of_peak": round(100 * gflops / peak[precision], 1),
                            "loadavg": load,
                        })
                        rows.append(row)
                        ips = ", ".join(f"c{c}={v:.2f}" for c, v in row["images_per_s"].items())
                        log(f"[{model.name}] {mode:18s} {op:9s} {size:5d}: median {row['median_s']:.3f}s "
                            f"p90 {row['p90_s']:.3f}s img/s {ips} rss {row['peak_rss_mib']:.0f}MiB "
                            f"{row['gflop_per_s']:.0f} GFLOP/s ({row['pct_of_peak']:.0f}% of {precision} peak)")
            finally:
                system.close()
                del system
    base = {(r["model"], r["op"], r["size"]): r["median_s"] for r in rows if r.get("mode") == "diffusers-fp32"}
    same = {(r["model"], r["op"], r["size"], r["mode"]): r["median_s"] for r in rows if "median_s" in r}
    for r in rows:
        if "median_s" not in r:
            continue
        key = (r["model"], r["op"], r["size"])
        if key in base:
            r["speedup_vs_diffusers_fp32"] = round(base[key] / r["median_s"], 3)
        if r["mode"].startswith("http-"):
            inproc = same.get((*key, "inproc-" + r["mode"].removeprefix("http-").removesuffix("-compile")))
            if inproc:
                r["overhead_vs_inproc_pct"] = round(100 * (r["median_s"] / inproc - 1), 2)
    return rows
