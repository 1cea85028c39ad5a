"""The GPU benchmarks of issue 14, sized for one short lease (run by benchmarks/gpu_check.sh).

    python -m benchmarks.gpu_check --out $OUT            # on a CUDA machine (gpu_check.sh sets it up)
    python -m benchmarks.gpu_check --quick --out DIR     # CPU smoke of the same code (CI)

Sections, in this order (each part is skipped, and says so, when the time budget is spent):
  model     SD-size AutoencoderKL (models/configs/sd-kl-f8, random weights) encode and decode at
            512^2 and 1024^2 in process through diffusers: fp32, fp16, bf16, each half precision
            with channels_last, and a captured CUDA graph of the eager model; CUDA-event timing,
            medians; error of each against a strict fp32 (no TF32) reference
  batching  16 x 256^2 decodes as one batch against 16 one-image calls (in process)
  http      `vae serve --device cuda --dtype bfloat16` (a subprocess): /decode at 1024^2 (and
            512^2) answering PNG, JPEG and pt, each request split into model (compute stage),
            codec (deserialize + serialize stages), queue, framework and transport (client
            time minus the server's whole-request time), from /metrics histogram deltas around
            each request; then 16 concurrent 256^2 /decode requests against a server with
            --max-batch-size 16 and one with --max-batch-size 1, rounds interleaved
  compile   with the time left (rows added to `model`): torch.compile of the decoder at each size,
            then with CUDA graphs (mode reduce-overhead), then of the encoder
Writes gpu_check.json and gpu_check.md to --out (default $OUT). Goals (issue 14, on an H100):
decode 512^2 <= 12 ms and 1024^2 <= 45 ms, batching >= 1.5x at 16 x 256^2, non-model share of a
1024^2 /decode <= 10 %.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import Client, Server, decode_path, md_table

GOALS = {"decode_512_ms": 12.0, "decode_1024_ms": 45.0, "batching_x": 1.5, "non_model_share": 0.10}


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def allows(self, needed: float) -> bool:
        return self.left >= needed


# --- timing ---------------------------------------------------------------------------------------

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


# --- section: in-process model ----------------------------------------------------------------------

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


class ModelBench:
    """In-process timings: `eager()` (eager variants, CUDA graphs) first; `compile()` later, with
    whatever time is left after the other sections. Rows go to one shared result dict."""

    def __init__(self, base, args, budget: Budget, log):
        import torch

        self.base, self.args, self.budget, self.log = base, args, budget, log
        self.device, self.cuda = args.device, args.device.startswith("cuda")
        self.ops = ["decode", "encode"]
        q = args.quick
        self.timing = dict(warmup=1 if q else 3, min_runs=2 if q else 10, min_seconds=0.0 if q else 1.0)
        self.refs: dict = {}
        flags = {}
        if self.cuda:
            flags = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn.benchmark": torch.backends.cudnn.benchmark}
        self.result = {"rows": [], "notes": [], "flags": flags, "half_for_fast_paths": None}
        self.on_row = lambda: None  # main() writes the files after every row: a killed run keeps them

    def _references(self):
        """Strict float32 (no TF32) outputs, one per op and size."""
        import torch

        with torch.inference_mode():
            ref_model = _build(self.base, "float32", False, self.device)
            if self.cuda:
                tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            try:
                for op in self.ops:
                    for size in self.args.sizes:
                        x = _inputs(op, size, self.device, torch.float32, False)[0]
                        self.refs[(op, size)] = _op_fn(ref_model, op)(x).float()
            finally:
                if self.cuda:
                    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            del ref_model

    def record(self, variant: str, op: str, size: int, fn, inputs, extra: dict | None = None) -> dict:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        k = [0]

        def call():
            k[0] += 1
            return fn(inputs[k[0] % len(inputs)])

        with torch.inference_mode():
            t = time_fn(call, self.device, **self.timing)
            out = fn(inputs[0]).clone()
            _sync(self.device)
        row = {"variant": variant, "op": op, "size": size, **t, **_error(out, self.refs[(op, size)]), **(extra or {})}
        if self.cuda:
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        self.result["rows"].append(row)
        self.on_row()
        self.log(f"model {variant:>24} {op} {size}: {row['median_ms']:.2f} ms (min {row['min_ms']:.2f}), "
                 f"rel err {row['rel_l2']}")
        return row

    @property
    def half(self) -> tuple[str, str]:
        tag = self.result["half_for_fast_paths"] or "bf16-cl"
        return tag, {"fp16-cl": "float16"}.get(tag, "bfloat16")

    def eager(self) -> dict:
        import torch

        self._references()
        notes = self.result["notes"]
        for v in _variants(self.device, self.args.quick):
            if not self.budget.allows(20):
                notes.append(f"{v['name']}: skipped, time budget")
                continue
            with torch.inference_mode():
                vae = _build(self.base, v["dtype"], v["cl"], self.device)
            for op in self.ops:
                for size in self.args.sizes:
                    self.record(v["name"], op, size, _op_fn(vae, op), _inputs(op, size, self.device, vae.dtype, v["cl"]))
            del vae
            if self.cuda:
                torch.cuda.empty_cache()
        # the faster half-precision channels_last variant at the largest decode carries on
        self.result["half_for_fast_paths"] = _best_half(self.result["rows"])
        tag, hd = self.half
        if self.cuda and not self.args.skip_cudagraph:  # a CUDA graph of the eager model
            with torch.inference_mode():
                vae = _build(self.base, hd, True, self.device)
            for op in self.ops:
                for size in self.args.sizes:
                    if not self.budget.allows(15):
                        notes.append(f"{tag}+cudagraph {op} {size}: skipped, time budget")
                        continue
                    try:
                        fn = _graphed(_op_fn(vae, op), _inputs(op, size, self.device, vae.dtype, True)[0])
                        self.record(f"{tag}+cudagraph", op, size, fn, [None])
                    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                        notes.append(f"{tag}+cudagraph {op} {size}: {type(exc).__name__}: {str(exc)[:200]}")
            del vae
            torch.cuda.empty_cache()
        return self.result

    def compile(self) -> dict:
        """torch.compile (decoder first: the goals), then with CUDA graphs, then the encoder."""
        import torch

        a, notes = self.args, self.result["notes"]
        tag, hd = self.half
        if a.skip_compile or (not self.cuda and not a.compile_on_cpu):
            notes.append("torch.compile: not run" + (" (--skip-compile)" if a.skip_compile else " on a CPU"))
            return self.result
        plan = [("default", "decode"), ("reduce-overhead", "decode")] if self.cuda else [("default", "decode")]
        if not a.compile_decode_only:
            plan += [("default", "encode")]
        for mode, op in plan:
            for size in a.sizes:
                need = a.compile_estimate_s * (0.5 if mode == "reduce-overhead" else 1.0)
                name = f"{tag}+compile" + ("+cudagraphs" if mode == "reduce-overhead" else "")
                if not self.budget.allows(need):
                    notes.append(f"{name} {op} {size}: skipped, time budget ({self.budget.left:.0f} s left, "
                                 f"~{need:.0f} s needed)")
                    continue
                try:
                    _compiled_row(self.base, hd, mode, op, size, self.device, self.record, name)
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"{name} {op} {size}: {type(exc).__name__}: {str(exc)[:300]}")
                if self.cuda:
                    torch.cuda.empty_cache()
        return self.result


def _best_half(rows) -> str | None:
    cands = [r for r in rows if r["variant"] in ("fp16-cl", "bf16-cl") and r["op"] == "decode" and r["finite"]]
    if not cands:
        return None
    size = max(r["size"] for r in cands)
    return min((r for r in cands if r["size"] == size), key=lambda r: r["median_ms"])["variant"]


def _graphed(fn, static_in):
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode():
        with torch.cuda.stream(s):
            for _ in range(2):
                fn(static_in)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = fn(static_in)

    def replay(_ignored=None):
        g.replay()
        return static_out

    return replay


def _compiled_row(base, dtype: str, mode: str, op: str, size: int, device: str, record, name: str):
    import torch

    with torch.inference_mode():
        vae = _build(base, dtype, True, device)
    part = "decoder" if op == "decode" else "encoder"
    setattr(vae, part, torch.compile(getattr(vae, part), mode=mode, dynamic=False))
    fn0 = _op_fn(vae, op)
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)

    def fn(t):
        if mode == "reduce-overhead" and mark is not None:
            mark()
        return fn0(t)

    inputs = _inputs(op, size, device, vae.dtype, True)
    t0 = time.monotonic()
    with torch.inference_mode():
        for t in inputs:  # compile (and record the graphs) before timing
            fn(t)
        _sync(device)
    record(name, op, size, fn, inputs, {"compile_s": time.monotonic() - t0})


# --- section: in-process batching -------------------------------------------------------------------

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


# --- section: HTTP ------------------------------------------------------------------------------------

def _serve(name: str, model_dir: Path, args, out: Path, *extra: str) -> Server:
    port = harness.free_port()
    argv = harness.vae_command("serve", "--model", f"sd={model_dir}", "--device", args.device, "--dtype", args.http_dtype,
                               "--port", str(port), "--log-level", "warning", "--log-format", "text", *extra,
                               *args.serve_args.split())
    return Server(name, argv, port, {"PYTHONUNBUFFERED": "1"}, out / "servers.log")


def bench_http(model_dir: Path, args, budget: Budget, out: Path, log) -> dict:
    res = {"e2e": [], "batching": None, "notes": [], "servers": {}}
    batched = _serve("batched", model_dir, args, out, "--max-batch-size", str(args.batch))
    single = _serve("unbatched", model_dir, args, out, "--max-batch-size", "1")
    servers = [batched, single]
    for s in servers:
        s.start()
    try:
        for s in servers:
            s.wait_ready(timeout=max(60.0, min(300.0, budget.left)))
            res["servers"][s.name] = {"argv": "vae " + " ".join(s.argv[3:]), "ready_s": s.ready_s}
        log(f"http: servers ready in {batched.ready_s:.1f} / {single.ready_s:.1f} s")
        for size in args.http_sizes:
            body, shape = harness.encode_latents(batched.url, harness.photo(size))
            for fmt in ("png", "jpg", "pt"):
                if not budget.allows(10):
                    res["notes"].append(f"/decode {size} {fmt}: skipped, time budget")
                    continue
                res["e2e"].append(_e2e(batched, body, shape, size, fmt, args, log))
        if budget.allows(10):
            res["batching"] = _http_batching(batched, single, args, log)
        else:
            res["notes"].append("HTTP batching: skipped, time budget")
    finally:
        for s in servers:
            s.stop()
    return res


def _e2e(server: Server, body: bytes, shape, size: int, fmt: str, args, log) -> dict:
    path = decode_path(shape, None if fmt == "pt" else fmt, "pt" if fmt == "pt" else None)
    c = Client(server.url)
    m = Client(server.url)
    per = []
    try:
        for _ in range(2):  # warm-up
            status, _, data = c.post(path, body)
            if status != 200:
                raise RuntimeError(f"/decode {fmt} answered {status}: {data[:200]!r}")
        for _ in range(args.http_runs):
            before = harness.scrape(server.url, m)
            t0 = time.perf_counter()
            status, headers, data = c.post(path, body)
            t1 = time.perf_counter()
            after = harness.scrape(server.url, m)
            split = harness.stage_split(before, after)
            if status != 200 or split.get("requests") != 1:
                raise RuntimeError(f"/decode {fmt}: status {status}, {split.get('requests')} requests seen by /metrics")
            client = t1 - t0
            stages = sum(split[k] for k in ("deserialize", "queue", "compute", "serialize"))
            per.append({"client": client, "model": split["compute"], "queue": split["queue"],
                        "codec": split["deserialize"] + split["serialize"], "deserialize": split["deserialize"],
                        "serialize": split["serialize"], "framework": split["server_total"] - stages,
                        "transport": client - split["server_total"], "bytes_out": len(data)})
    finally:
        c.close()
        m.close()
    med = {k: statistics.median(p[k] for p in per) for k in per[0]}
    shares = [1 - p["model"] / p["client"] for p in per]
    row = {"size": size, "format": fmt, "runs": len(per), **{f"{k}_ms": v * 1000 for k, v in med.items() if k != "bytes_out"},
           "bytes_out": int(med["bytes_out"]), "non_model_share": statistics.median(shares),
           "non_model_share_min": min(shares), "non_model_share_max": max(shares)}
    log(f"http /decode {size} {fmt}: client {row['client_ms']:.1f} ms = model {row['model_ms']:.1f} + codec "
        f"{row['codec_ms']:.1f} + queue {row['queue_ms']:.1f} + framework {row['framework_ms']:.1f} + transport "
        f"{row['transport_ms']:.1f}; non-model {row['non_model_share'] * 100:.1f} %")
    return row


def _burst(server: Server, path: str, body: bytes, n: int) -> float:
    """`n` requests at once (one thread and connection each); seconds until the last answer."""
    clients = [Client(server.url) for _ in range(n)]
    barrier = threading.Barrier(n + 1)
    done, errors = [0.0] * n, []

    def one(i):
        barrier.wait()
        try:
            status, _, data = clients[i].post(path, body)
            if status != 200:
                errors.append(f"{status}: {data[:100]!r}")
        except OSError as exc:
            errors.append(repr(exc))
        done[i] = time.perf_counter()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError(f"burst: {len(errors)} failed, e.g. {errors[0]}")
    return max(done) - t0


def _http_batching(batched: Server, single: Server, args, log) -> dict:
    n, side = args.batch, args.batch_side
    shape = [1, 4, side // 8, side // 8]
    body = harness.random_latents(shape, seed=1)
    out = {"n": n, "side": side, "rounds": args.http_batch_rounds}
    for fmt in ("pt", "png"):
        path = decode_path(shape, None if fmt == "pt" else fmt, "pt" if fmt == "pt" else None)
        for s in (batched, single):  # warm-up: every batch size the server may meet, once
            _burst(s, path, body, n)
        before = harness.scrape(batched.url)
        times = {"batched": [], "unbatched": []}
        for _ in range(args.http_batch_rounds):  # interleaved
            times["batched"].append(_burst(batched, path, body, n))
            times["unbatched"].append(_burst(single, path, body, n))
        after = harness.scrape(batched.url)
        cnt = harness.metric(after, "vae_batch_size_count") - harness.metric(before, "vae_batch_size_count")
        tot = harness.metric(after, "vae_batch_size_sum") - harness.metric(before, "vae_batch_size_sum")
        b, u = statistics.median(times["batched"]), statistics.median(times["unbatched"])
        out[fmt] = {"batched_ms": b * 1000, "unbatched_ms": u * 1000, "speedup": u / b,
                    "batched_spread_ms": [min(times["batched"]) * 1000, max(times["batched"]) * 1000],
                    "unbatched_spread_ms": [min(times["unbatched"]) * 1000, max(times["unbatched"]) * 1000],
                    "mean_batch_size": tot / cnt if cnt else None}
        log(f"http batching {n} x {side}^2 {fmt}: batched {b * 1000:.1f} ms, unbatched {u * 1000:.1f} ms: "
            f"{u / b:.2f}x (mean batch {out[fmt]['mean_batch_size']})")
    return out


# --- goals, report ------------------------------------------------------------------------------------

def goals(result: dict) -> list[dict]:
    rows = (result.get("model") or {}).get("rows", [])
    out = []
    for size, key in ((512, "decode_512_ms"), (1024, "decode_1024_ms")):
        cands = [r for r in rows if r["op"] == "decode" and r["size"] == size and r["variant"] != "fp32" and r["finite"]]
        best = min(cands, key=lambda r: r["median_ms"]) if cands else None
        out.append({"goal": f"SD decode {size}^2, fastest half-precision path", "target": f"<= {GOALS[key]:g} ms",
                    "measured": f"{best['median_ms']:.2f} ms ({best['variant']})" if best else "not measured",
                    "met": (best["median_ms"] <= GOALS[key]) if best else None})
    b = result.get("batching")
    out.append({"goal": f"batching in process, {b['n']} x {b['side']}^2" if b else "batching in process",
                "target": f">= {GOALS['batching_x']:g}x", "measured": f"{b['speedup']:.2f}x" if b else "not measured",
                "met": (b["speedup"] >= GOALS["batching_x"]) if b else None})
    hb = (result.get("http") or {}).get("batching")
    for fmt in ("pt", "png"):
        x = hb.get(fmt) if hb else None
        out.append({"goal": f"dynamic batching over HTTP, {hb['n']} x {hb['side']}^2 /decode {fmt}" if hb else
                    f"dynamic batching over HTTP ({fmt})", "target": f">= {GOALS['batching_x']:g}x",
                    "measured": f"{x['speedup']:.2f}x (mean batch {x['mean_batch_size']:.1f})" if x and x.get("mean_batch_size")
                    else (f"{x['speedup']:.2f}x" if x else "not measured"),
                    "met": (x["speedup"] >= GOALS["batching_x"]) if x else None})
    e2e = [r for r in (result.get("http") or {}).get("e2e", []) if r["size"] == max(
        [e["size"] for e in (result.get("http") or {}).get("e2e", [])] or [0])]
    for r in e2e:
        out.append({"goal": f"non-model share of a {r['size']}^2 /decode, {r['format']}",
                    "target": f"<= {GOALS['non_model_share'] * 100:g} %",
                    "measured": f"{r['non_model_share'] * 100:.1f} % (model {r['model_ms']:.1f} of {r['client_ms']:.1f} ms)",
                    "met": r["non_model_share"] <= GOALS["non_model_share"]})
    return out


def render_markdown(result: dict) -> str:
    m = result["meta"]
    dev = m.get("gpu") or f"{m['host_cpu']} (CPU)"
    lines = [
        "### GPU check (issue 14)" + (" - **quick CPU smoke run: not a measurement**" if m.get("quick") else ""),
        "",
        f"Command: `{m['command']}`. {m['time_utc']}, git {m.get('git')}; device **{dev}**; torch {m.get('torch')} "
        f"(CUDA {m.get('cuda')}), diffusers {m.get('diffusers')}; host {m['host_cpu']}, {m['cores']} cores, load average "
        f"{m['loadavg'][0]:.2f}; model: {m['model']}. Goals are stated for an H100"
        + ("" if "H100" in str(m.get("gpu")) else " (this device is not one: the comparison is indicative)") + ".",
        "",
    ]
    if result.get("tests"):
        lines += [f"CUDA tests (`pytest -m gpu tests/benchmarks/test_cuda.py`): {result['tests']}", ""]
    g = result.get("goals", [])
    if g:
        lines += [md_table(["goal", "target", "measured", "met"],
                           [[x["goal"], x["target"], x["measured"], {True: "yes", False: "**no**", None: "-"}[x["met"]]]
                            for x in g]), ""]
    mod = result.get("model")
    if mod:
        lines += ["In process (diffusers AutoencoderKL, batch 1): median of CUDA-event-timed runs; error against a "
                  "strict fp32 reference (TF32 off); timing runs use torch's defaults "
                  f"({', '.join(f'{k}={v}' for k, v in mod['flags'].items()) or 'CPU'}).", ""]
        rows = [[r["variant"], r["op"], r["size"], r["median_ms"], f"{r['p10_ms']:.3g}-{r['p90_ms']:.3g}", r["runs"],
                 r.get("compile_s"), f"{r['rel_l2']:.1e}" if r["rel_l2"] is not None else "non-finite",
                 r.get("peak_mem_mib")] for r in mod["rows"]]
        lines += [md_table(["variant", "op", "size", "median ms", "p10-p90 ms", "runs", "compile s", "rel. L2 error",
                            "peak MiB"], rows), ""]
        lines += [f"- {n}" for n in mod.get("notes", [])] + ([""] if mod.get("notes") else [])
        tag = mod.get("half_for_fast_paths")
        paths = [tag, f"{tag}+cudagraph", f"{tag}+compile", f"{tag}+compile+cudagraphs"]
        by = {(r["variant"], r["op"], r["size"]): r["median_ms"] for r in mod["rows"]}
        keys = sorted({(r["op"], r["size"]) for r in mod["rows"]})
        if tag and any((p, op, size) in by for p in paths[1:] for op, size in keys):
            rows = []
            for op, size in keys:
                vals = [by.get((p, op, size)) for p in paths]
                gain = lambda a, b: f"{a / b:.2f}x" if a and b else ""  # noqa: E731
                rows.append([op, size, *vals, gain(vals[0], vals[1]), gain(vals[2], vals[3])])
            lines += [f"Do CUDA graphs and torch.compile pay? ({tag}, median ms)", "",
                      md_table(["op", "size", "eager", "eager + CUDA graph", "compile", "compile + CUDA graphs",
                                "graph gain, eager", "graph gain, compiled"], rows), ""]
    b = result.get("batching")
    if b:
        lines += [f"Batching in process ({b['dtype']}, channels_last): {b['n']} x {b['side']}^2 decodes one by one "
                  f"{b['unbatched_ms']:.1f} ms, as one batch {b['batched_ms']:.1f} ms: **{b['speedup']:.2f}x**; "
                  f"largest difference batched vs unbatched {b['max_abs_batched_vs_unbatched']:.2e}.", ""]
    h = result.get("http")
    if h:
        if h.get("e2e"):
            argv = (h.get("servers", {}).get("batched") or {}).get("argv", "")
            lines += [f"HTTP `/decode` end to end (`{argv}`; sequential requests, latents of a photo from its "
                      "/encode): medians per request in ms (each column its own median: they need not add up). "
                      "model = compute stage (forward pass and copy to the host); codec = deserialize (read + "
                      "parse the body) + serialize (image or tensor encoding); queue includes the batch wait "
                      "(--batch-wait-ms, 2 ms) a lone request spends; framework = server time outside the "
                      "stages; transport = client time minus the server's whole-request time (loopback, "
                      "client parsing).", ""]
            rows = [[r["size"], r["format"], r["client_ms"], r["model_ms"], r["codec_ms"], r["queue_ms"],
                     r["framework_ms"], r["transport_ms"], f"{r['non_model_share'] * 100:.1f} %", r["bytes_out"], r["runs"]]
                    for r in h["e2e"]]
            lines += [md_table(["size", "answer", "total", "model", "codec", "queue", "framework", "transport",
                                "non-model", "bytes", "runs"], rows), ""]
        hb = h.get("batching")
        if hb:
            rows = [[fmt, hb[fmt]["unbatched_ms"], hb[fmt]["batched_ms"], f"{hb[fmt]['speedup']:.2f}x",
                     hb[fmt]["mean_batch_size"]] for fmt in ("pt", "png") if fmt in hb]
            lines += [f"HTTP dynamic batching: {hb['n']} concurrent {hb['side']}^2 /decode requests, median of "
                      f"{hb['rounds']} interleaved rounds, `--max-batch-size {hb['n']}` against `--max-batch-size 1`:", "",
                      md_table(["answer", "unbatched ms", "batched ms", "speedup", "mean batch"], rows), ""]
        lines += [f"- {n}" for n in h.get("notes", [])] + ([""] if h.get("notes") else [])
    for name, sec in result.get("sections", {}).items():
        if sec.get("status") != "ok":
            lines.append(f"- section {name}: {sec.get('status')}" + (f": {sec['error']}" if sec.get("error") else ""))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "out/gpu_check"))
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, small sizes, few runs, no compile")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--budget-s", type=float, default=None, help="time for all sections (default 330, quick 150)")
    p.add_argument("--model", default=None, help="sd (default), tiny (quick), default (shipped) or a diffusers folder")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="in-process sizes (default 512 1024; quick 64)")
    p.add_argument("--http-sizes", type=int, nargs="+", default=None, help="/decode sizes (default 1024 512; quick 64)")
    p.add_argument("--http-runs", type=int, default=None, help="timed requests per size and format (default 10, quick 2)")
    p.add_argument("--http-dtype", default="bfloat16")
    p.add_argument("--serve-args", default="", help="extra `vae serve` arguments for the HTTP servers (e.g. --compile)")
    p.add_argument("--batch", type=int, default=None, help="default 16, quick 4")
    p.add_argument("--device-threads", type=int, default=None,
                   help="torch threads here and in the servers (default: torch's own; quick 1)")
    p.add_argument("--batch-side", type=int, default=None, help="default 256, quick 64")
    p.add_argument("--http-batch-rounds", type=int, default=None, help="default 5, quick 1")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--compile-on-cpu", action="store_true", help="also torch.compile on a CPU (slow)")
    p.add_argument("--compile-decode-only", action="store_true", help="compile only the decoder (saves time)")
    p.add_argument("--compile-estimate-s", type=float, default=70.0, help="seconds one compile is assumed to take")
    p.add_argument("--skip-cudagraph", action="store_true")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--tests-log", type=Path, default=None, help="pytest output to summarise in the report")
    args = p.parse_args(argv)

    import torch

    harness.exit_on_sigterm()
    q = args.quick
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or ("tiny" if q else "sd")
    args.sizes = args.sizes or ([64] if q else [512, 1024])
    args.http_sizes = args.http_sizes or ([64] if q else [1024, 512])
    args.http_runs = args.http_runs or (2 if q else 10)
    args.batch = args.batch or (4 if q else 16)
    args.batch_side = args.batch_side or (64 if q else 256)
    args.http_batch_rounds = args.http_batch_rounds or (1 if q else 5)
    if q and not args.device_threads:
        args.device_threads = 1  # a smoke run on a shared CI machine: no OpenMP barrier storms
    if args.device_threads:
        torch.set_num_threads(args.device_threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["VAE_TORCH_THREADS"] = str(args.device_threads)
    budget = Budget(args.budget_s or (150.0 if q else 330.0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str):
        print(f"[{time.monotonic() - budget.t0:6.1f}s] {msg}", flush=True)

    meta = harness.machine_info()
    meta.update(command="python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
                quick=q, device=args.device, model=args.model, budget_s=budget.seconds)
    result: dict = {"meta": meta, "sections": {}}
    if args.tests_log and args.tests_log.is_file():
        result["tests"] = _pytest_summary(args.tests_log.read_text(errors="replace"))

    import diffusers
    from diffusers import AutoencoderKL

    diffusers.utils.logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model_dir = harness.make_model(args.model, tmp / "model")
    base = AutoencoderKL.from_pretrained(model_dir).eval().requires_grad_(False)
    meta["model_parameters"] = sum(t.numel() for t in base.parameters())
    meta["model_dir"] = str(model_dir)

    def section(name, fn):
        t0 = time.monotonic()
        try:
            result[name] = fn()
            result["sections"][name] = {"status": "ok", "seconds": time.monotonic() - t0}
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            import traceback

            traceback.print_exc()
            result["sections"][name] = {"status": "error", "seconds": time.monotonic() - t0,
                                        "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        _write(out, result)

    mb = ModelBench(base, args, budget, log)
    mb.on_row = lambda: _write(out, result) if "model" in result else None
    section("model", mb.eager)
    section("batching", lambda: bench_batching(base, args, mb.half[0], log))
    if args.skip_http:
        result["sections"]["http"] = {"status": "skipped (--skip-http)"}
    elif budget.allows(30):
        section("http", lambda: bench_http(model_dir, args, budget, out, log))
    else:
        result["sections"]["http"] = {"status": "skipped: time budget"}
    section("compile", lambda: mb.compile() and None)  # its rows go to result["model"]
    result.pop("compile", None)
    result["goals"] = goals(result)
    meta["seconds"] = time.monotonic() - budget.t0
    md = _write(out, result)
    print(md)
    return 0 if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in result["sections"].values()) else 1


def _write(out: Path, result: dict) -> str:
    md = render_markdown(result)
    harness.write_outputs(out, "gpu_check", result, md)
    return md


def _pytest_summary(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        s = line.strip("= ").strip()
        if any(w in s for w in (" passed", " failed", " skipped", " error", "no tests ran")):
            return s
    return "no pytest summary line"


if __name__ == "__main__":
    sys.exit(main())
