"""The benchmark's models and inputs: model specs, photographs, PNG bytes, tensors."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


ROOT = Path(__file__).resolve().parents[2]  # the checkout
KODAK = ROOT.parent / "shared" / "data" / "kodak"
PHOTOS = ROOT / "tests" / "data" / "photos"
ALL_MODES = ["diffusers-fp32", "inproc-fp32", "inproc-bf16", "http-fp32", "http-bf16", "http-bf16-compile"]
DEFAULT_MODES = ["diffusers-fp32", "inproc-fp32", "inproc-bf16", "http-fp32", "http-bf16"]
OPS = ["encode", "decode", "roundtrip"]


@dataclass
class ModelSpec:
    name: str
    path: Path
    trained: bool  # random weights make quality figures meaningless


def resolve_models(specs: list[str], workdir: Path) -> list[ModelSpec]:
    out = []
    for spec in specs:
        if spec == "sd":
            path = workdir / "sd-random"
            if not (path / "config.json").is_file():
                from diffusers import AutoencoderKL

                from models.training.presets import preset_config

                torch.manual_seed(0)
                AutoencoderKL(**preset_config("sd")).save_pretrained(path)
            out.append(ModelSpec("sd-random", path, False))
        elif spec == "default":
            for cand in (ROOT / "models" / "default", ROOT / "runs" / "default-v1" / "model"):
                if (cand / "config.json").is_file():
                    out.append(ModelSpec("default" if cand.parent.name == "models" else "default-v1-export", cand, True))
                    break
            else:
                raise SystemExit("vae bench: no default model (models/default or runs/default-v1/model)")
        else:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).name, spec
            out.append(ModelSpec(name, Path(path), True))
    return out


def photo_files() -> list[Path]:
    """The benchmark's photographs: Kodak beside the checkout, else the four vendored in
    tests/data/photos (so a fresh clone measures a real photo too, never a synthetic stand-in)."""
    for folder, pattern in ((KODAK, "*.png"), (PHOTOS, "*.*")):
        files = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if files:
            return files
    raise SystemExit(f"vae bench: no photographs found ({KODAK} or {PHOTOS})")


def photo(size: int, seed: int = 0) -> np.ndarray:
    """An (size, size, 3) uint8 photo: one of photo_files(), short side scaled and centre-cropped."""
    from PIL import Image

    from models.vae.imaging import resize_center_crop

    files = photo_files()
    img = Image.open(files[seed % len(files)]).convert("RGB")
    return np.asarray(resize_center_crop(img, size))


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
