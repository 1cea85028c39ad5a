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


# The families (docs/families.md): each one's published config (models/vae/configs/), made small
# where the architecture allows: narrower and shallower blocks, everything else as published
# (class, 4 stages = 8x, latent channels, GroupNorm groups, quant convs, factors, force_upcast,
# latents_mean / latents_std).
CONFIGS = ROOT / "models" / "vae" / "configs"
FAMILIES = {  # test name -> config folder
    "sd1": "sd-kl-f8", "sdxl": "sdxl", "playground": "playground-v2.5", "sd3": "sd3", "flux": "flux",
    "taesd": "taesd", "taef1": "taef1",
}
SMALL = {
    "AutoencoderKL": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1),
    "AutoencoderTiny": dict(encoder_block_out_channels=[16] * 4, decoder_block_out_channels=[16] * 4),
}


def family_config(family: str) -> dict:
    """A family's published config (without `_class_name`), made small; the class name beside it."""
    config = json.loads((CONFIGS / FAMILIES[family] / "config.json").read_text())
    cls = config.pop("_class_name")
    return {**config, **SMALL[cls]}, cls


def make_family_vae(family: str, seed: int = 0):
    """A random-weight diffusers model of `family` (AutoencoderKL or AutoencoderTiny), eval mode."""
    import diffusers

    config, cls = family_config(family)
    torch.manual_seed(seed)
    return getattr(diffusers, cls)(**config).eval()


def family_reference(path: Path):
    """In-process diffusers for a family folder: the class its config names, float32, eager."""
    import diffusers

    cls = json.loads((Path(path) / "config.json").read_text())["_class_name"]
    return getattr(diffusers, cls).from_pretrained(str(path), local_files_only=True).eval()


def _stats(config, z):
    mean = torch.tensor(config["latents_mean"]).view(1, -1, 1, 1).to(z.device, z.dtype)
    std = torch.tensor(config["latents_std"]).view(1, -1, 1, 1).to(z.device, z.dtype)
    return mean, std


def pipeline_scale(config, z):
    """diffusers' pipelines on encoder latents (the img2img paths), line for line: SDXL with
    latents_mean / latents_std `(z - mean) * scale / std`; SD3 / FLUX `(z - shift) * scale`; SD `z * scale`."""
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean, std = _stats(config, z)
        return (z - mean) * config["scaling_factor"] / std
    if config.get("shift_factor") is not None:
        return (z - config["shift_factor"]) * config["scaling_factor"]
    return z * config["scaling_factor"]


def pipeline_unscale(config, z):
    """diffusers' pipelines before vae.decode, line for line (StableDiffusionXLPipeline,
    StableDiffusion3Pipeline / FluxPipeline, StableDiffusionPipeline)."""
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean, std = _stats(config, z)
        return z * std / config["scaling_factor"] + mean
    if config.get("shift_factor") is not None:
        return (z / config["scaling_factor"]) + config["shift_factor"]
    return z / config["scaling_factor"]


def flux_pipeline_function(name: str):
    """diffusers' own `FluxPipeline.<name>` (`_pack_latents`, `_unpack_latents`: static methods).
    Importing the pipeline needs `transformers`; without it the function is compiled from the
    pipeline's source file in the installed diffusers, unchanged."""
    import ast

    import diffusers

    try:
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        return getattr(FluxPipeline, name)
    except ImportError:
        pass
    path = Path(diffusers.__file__).parent / "pipelines" / "flux" / "pipeline_flux.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FluxPipeline")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.decorator_list = []  # @staticmethod
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


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


def wait_ready(proc, base: str, timeout: float = 60) -> None:
    """Poll `base`/readyz until 200; fails with the process's output if it exits, or on timeout.
    `proc`: a `vae serve` subprocess.Popen with stdout piped."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(base + "/readyz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)


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


