"""Shared fixtures: tiny random AutoencoderKL models saved with save_pretrained, real photographs.
Helpers (plain functions) are in support.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.bulk.jobs import EXIF_ORIENTATION
from support import FAMILIES, PHOTOS, gradient_image, make_family_vae, make_tiny_vae


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A diffusers folder (config.json + diffusion_pytorch_model.safetensors) of a tiny VAE."""
    path = tmp_path_factory.mktemp("tiny-vae")
    make_tiny_vae().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """One diffusers folder per family (support.FAMILIES): random weights, the published config made small."""
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        make_family_vae(family).save_pretrained(root / family)
    return {family: root / family for family in FAMILIES}


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """Four real photographs vendored in the repository (tests/data/README.md): the same test
    data on a fresh clone as beside ../shared."""
    return PHOTOS


@pytest.fixture(scope="session")
def bulk_inputs(tmp_path_factory, photos_dir) -> Path:
    """`vae encode` inputs: a folder of 7 good images of 4 size buckets (the vendored photographs, scaled) and 1 corrupt file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "odd").mkdir()
    for i, size in enumerate([(64, 48), (64, 48), (64, 48), (72, 56)], start=1):
        img = Image.open(photos_dir / sorted(p.name for p in photos_dir.iterdir())[i - 1]).convert("RGB").resize(size, Image.BICUBIC)
        img.save(root / f"photo{i:02d}.png")
    gradient_image(37, 29, seed=7).save(root / "odd" / "gradient.png")  # sides not multiples of 8
    rgba = np.dstack([np.asarray(gradient_image(24, 40, seed=8)), np.full((40, 24), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "odd" / "alpha.png")  # alpha: composited on white
    rotated = gradient_image(40, 24, seed=9)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored 40x24, shown 24x40
    rotated.save(root / "odd" / "rotated.jpg", quality=92, exif=exif)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    (root / "notes.txt").write_text("not an image: ignored by folder inputs")
    return root
