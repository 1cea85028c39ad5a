"""Section `http`: `vae serve` subprocesses; each /decode split into model, codec, queue,
framework and transport from /metrics deltas; dynamic batching against --max-batch-size 1."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.gpu_check.timing import Budget
from benchmarks.harness import Client, Server, decode_path


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
