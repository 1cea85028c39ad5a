"""Load test: a real `vae serve` process on loopback, driven past saturation for a bounded time.

    python -m benchmarks.loadtest --seconds 180 --concurrency 16 --max-queue 8

Starts the server (a small random-weight VAE unless --model is given), runs `concurrency` closed-
loop clients (each sends its next request when the previous answer arrives) with a mix of
/roundtrip, /encode and /decode, probes /healthz every 0.25 s, and stops by itself after
`--seconds` or `--max-requests`. Reports status counts, p50/p99 latency per status, /healthz
latency, throughput and the server's RSS growth (first quarter -> end). Loopback only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]


def small_model(path: Path) -> None:
    from diffusers import AutoencoderKL

    import torch

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4).save_pretrained(path)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--model", help="NAME=PATH to serve (default: a small random-weight VAE)")
    p.add_argument("--extra", default="", help="more `vae serve` options, e.g. '--max-batch-size 4'")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp())
    model = args.model
    if not model:
        small_model(tmp / "small")
        model = f"small={tmp / 'small'}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "app.cli.main", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-queue", str(args.max_queue), "--log-level", "warning", *args.extra.split()]
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        return run(args, base, server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"server exit code after SIGTERM: {code}")


def run(args, base: str, pid: int) -> int:
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)).save(buf, format="PNG")
    image = buf.getvalue()
    h = args.size // 8
    latents = rng.standard_normal((1, 4, h, h)).astype(np.float32).tobytes()
    calls = [
        ("/roundtrip", image, {"Content-Type": "image/png"}, {}),
        ("/encode", image, {"Content-Type": "image/png"}, {}),
        ("/decode", latents, {"Content-Type": "tensor/binary"}, {"shape": f"1,4,{h},{h}", "dtype": "float32"}),
    ]
    results: list[tuple[int, float]] = []
    health: list[float] = []
    lock, stop = threading.Lock(), threading.Event()
    end = time.monotonic() + args.seconds

    def client(i: int) -> None:
        session, n = requests.Session(), i
        while not stop.is_set() and time.monotonic() < end:
            path, body, headers, params = calls[n % len(calls)]
            n += 1
            t0 = time.monotonic()
            try:
                status = session.post(base + path, data=body, headers=headers, params=params, timeout=120).status_code
            except requests.RequestException:
                status = 0
            with lock:
                results.append((status, time.monotonic() - t0))
                if len(results) >= args.max_requests:
                    stop.set()
            if status == 503:
                time.sleep(0.05)  # a polite client backs off a little (Retry-After is >= 1 s)

    def prober() -> None:
        while not stop.is_set() and time.monotonic() < end:
            t0 = time.monotonic()
            requests.get(base + "/healthz", timeout=10)
            health.append(time.monotonic() - t0)
            time.sleep(0.25)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
    threads.append(threading.Thread(target=prober))
    t_start = time.monotonic()
    rss: list[tuple[float, float]] = []
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append((time.monotonic() - t_start, rss_mb(pid)))
        time.sleep(1)
    elapsed = time.monotonic() - t_start
    counts = Counter(s for s, _ in results)
    ok = [d for s, d in results if s == 200]
    busy = [d for s, d in results if s == 503]
    warm = [m for t, m in rss if t >= elapsed / 4] or [rss[-1][1]]
    figures = {
        "seconds": round(elapsed, 1), "concurrency": args.concurrency, "max_queue": args.max_queue,
        "size": args.size, "requests": len(results), "status_counts": {str(k): v for k, v in sorted(counts.items())},
        "ok_per_s": round(len(ok) / elapsed, 2),
        "ok_p50_ms": round(pct(ok, 50), 1), "ok_p99_ms": round(pct(ok, 99), 1),
        "503_p50_ms": round(pct(busy, 50), 1), "503_p99_ms": round(pct(busy, 99), 1),
        "healthz_p50_ms": round(pct(health, 50), 1), "healthz_p99_ms": round(pct(health, 99), 1),
        "healthz_max_ms": round(max(health) * 1000, 1) if health else None,
        "rss_start_mb": round(rss[0][1], 1), "rss_after_warmup_mb": round(warm[0], 1),
        "rss_end_mb": round(rss[-1][1], 1), "rss_growth_after_warmup_mb": round(rss[-1][1] - warm[0], 1),
        "rss_max_mb": round(max(m for _, m in rss), 1),
        "server_errors": sum(v for k, v in counts.items() if k >= 500 and k != 503) + counts.get(0, 0),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if figures["server_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
