"""Model folders for the benchmarks: the tests' tiny VAE, the SD kl-f8 architecture with random
weights, the shipped model or any diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.harness.paths import SD_CONFIG, SHIPPED_MODEL

# The tiny model the tests use (an SD-shaped VAE: 8x downsampling, 4 latent channels).
TINY_CONFIG = dict(
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64,
)


def make_model(kind: str, folder: Path, seed: int = 0) -> Path:
    """A diffusers folder for `kind`: 'tiny' (random, the tests' config), 'sd' (the SD kl-f8
    architecture of models/configs/sd-kl-f8 with random weights), 'default' (the shipped model,
    returned as is) or a path to a diffusers folder (returned as is)."""
    if kind == "default":
        return SHIPPED_MODEL
    if kind not in ("tiny", "sd"):
        path = Path(kind)
        if not (path / "config.json").is_file():
            raise SystemExit(f"model {kind!r}: not tiny, sd, default or a diffusers folder")
        return path
    import torch
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    if kind == "tiny":
        vae = AutoencoderKL(**TINY_CONFIG)
    else:
        vae = AutoencoderKL.from_config(json.loads(SD_CONFIG.read_text()))
    vae.eval().save_pretrained(folder)
    return folder
