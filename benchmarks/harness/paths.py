"""Where the benchmark tools find the project's files (the repository root, the vendored photos,
the SD kl-f8 config, the shipped model)."""

from __future__ import annotations

from pathlib import Path

# benchmarks/harness/paths.py -> the repository root, two packages up
ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "tests" / "data" / "photos"
SD_CONFIG = ROOT / "models" / "vae" / "configs" / "sd-kl-f8" / "config.json"
SHIPPED_MODEL = ROOT / "models" / "default"
