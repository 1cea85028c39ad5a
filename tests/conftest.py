"""Shared fixtures: tiny random AutoencoderKL models saved with save_pretrained, real images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

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


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A diffusers folder (config.json + diffusion_pytorch_model.safetensors) of a tiny VAE."""
    path = tmp_path_factory.mktemp("tiny-vae")
    make_tiny_vae().save_pretrained(path)
    return path


PHOTOS = ROOT / "tests" / "data" / "photos"


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """Four real photographs vendored in the repository (tests/data/README.md): the same test
    data on a fresh clone as beside ../shared."""
    return PHOTOS
