"""Test helpers shared by the service tests: a loaded tiny model and a real uvicorn server on loopback."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
from PIL import Image


def gradient_image(width: int = 40, height: int = 32, seed: int = 0) -> Image.Image:
    """A smooth RGB test image with some noise (deterministic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    noisy = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, mode="RGB")


@contextmanager
def live_server(app):
    """Run `app` with uvicorn on 127.0.0.1 (a free port chosen by the OS); yields the base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
