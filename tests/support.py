"""Helpers shared by the tests (plain functions; the fixtures built on them are in conftest.py):
tiny random models, synthetic images, a real uvicorn server on loopback, `vae encode/decode` runs."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the checkout
SHARED_DATA = ROOT.parent / "shared" / "data"
PHOTOS = ROOT / "tests" / "data" / "photos"

# Smallest config that keeps the SD structure: 8x downsampling (4 blocks), 4 latent channels.
TINY_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.5,
)


def make_tiny_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**TINY_CONFIG, **overrides})
    return vae.eval()


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


def run(command: str, *args, report: Path | None = None) -> tuple[int, dict | None]:
    argv = [str(a) for a in args] + ["--quiet"] + (["--report", str(report)] if report else [])
    from app.bulk.cli import main

    rc = main(command, argv)
    return rc, json.loads(report.read_text()) if report else None


def reference_roundtrip(model, path: Path) -> np.ndarray:
    """What /roundtrip computes for one image, in-process: encode (mode) -> decode -> crop -> uint8."""
    from models.vae import imaging

    img = imaging.open_image(path)
    z = model.encode(imaging.to_tensor(img))
    return imaging.to_uint8(model.decode(z, (img.height, img.width)))[0].numpy()


