"""The HTTP side of a peers run: one round of closed-loop clients against a server (with its RSS
watched), the warm-up, the latents every system decodes, and the cross-system agreement check."""

from __future__ import annotations

import os
import threading
import time

from benchmarks import harness
from benchmarks.harness import Client, Server
from benchmarks.peers.systems import System

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_round(server: Server, path: str, body: bytes, concurrency: int, n: int, max_seconds: float,
              cap_mib: float) -> dict:
    """`concurrency` closed-loop clients send `n` requests in all (none started after
    `max_seconds`). Watches the server's RSS; over `cap_mib` it is stopped (the round fails)."""
    lock = threading.Lock()
    issued = [0]
    lat, errors = [], []
    barrier = threading.Barrier(concurrency + 1)
    t_start = [0.0]
    t_end = [0.0]

    def worker():
        c = Client(server.url, timeout=max(60.0, 4 * max_seconds))
        barrier.wait()
        try:
            while True:
                with lock:
                    if issued[0] >= n or time.monotonic() - t_start[0] > max_seconds:
                        return
                    issued[0] += 1
                t0 = time.monotonic()
                try:
                    status, headers, data = c.post(path, body)
                except OSError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                t1 = time.monotonic()
                dt = t1 - t0
                with lock:
                    t_end[0] = max(t_end[0], t1)
                if status == 200 and data.startswith(PNG_MAGIC):
                    lat.append(dt)
                else:
                    errors.append(f"HTTP {status}: {data[:120]!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    peak, killed = server.rss_mib(), None
    t_start[0] = time.monotonic()
    barrier.wait()
    while any(t.is_alive() for t in threads):
        time.sleep(0.25)
        rss = server.rss_mib()
        peak = max(peak, rss)
        low_mem = harness.mem_available_gib() < 1.0
        if (rss > cap_mib or low_mem) and killed is None:
            killed = f"stopped: RSS {rss:.0f} MiB over the cap {cap_mib:.0f} MiB" if rss > cap_mib else \
                f"stopped: machine below 1 GiB available (server RSS {rss:.0f} MiB)"
            server.stop(timeout=5)
    for t in threads:
        t.join()
    wall = (t_end[0] or time.monotonic()) - t_start[0]
    return {"n_ok": len(lat), "errors": len(errors), "error_examples": errors[:3], "wall_s": wall,
            "throughput_rps": len(lat) / wall if wall > 0 else 0.0, "latencies_s": lat,
            "rss_peak_mib": peak, "loadavg": list(os.getloadavg()), "killed": killed}


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def agreement(systems: list[System], path: str, body: bytes) -> list[dict]:
    """Every system decodes the same latents once: PSNR of its PNG against the first system's
    (the same model must come out of every server)."""
    import io

    import numpy as np
    from PIL import Image

    images, out = {}, []
    for s in systems:
        if not s.server or not s.server.alive():
            continue
        c = Client(s.server.url)
        try:
            status, _, data = c.post(path, body)
        finally:
            c.close()
        if status == 200 and data.startswith(PNG_MAGIC):
            images[s.name] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    ref_name = next(iter(images), None)
    for name, img in images.items():
        out.append({"system": name, "reference": ref_name, "shape": list(img.shape),
                    "psnr_db": _psnr(img, images[ref_name]) if img.shape == images[ref_name].shape else None})
    return out


def _latents(systems: list[System], size: int) -> tuple[bytes, list[int]]:
    """Latents of a vendored photo from our /encode (the first ours-* server), else random ones."""
    for s in systems:
        if s.kind == "ours" and s.server and s.server.alive():
            try:
                return harness.encode_latents(s.server.url, harness.photo(size))
            except (RuntimeError, OSError):
                pass
    shape = [1, 4, size // 8, size // 8]
    return harness.random_latents(shape), shape


def _warm(s: System, path: str, body: bytes) -> None:
    if not s.server or not s.server.alive():
        return
    c = Client(s.server.url)
    try:
        for _ in range(2):
            c.post(path, body)
    except OSError:
        pass
    finally:
        c.close()
