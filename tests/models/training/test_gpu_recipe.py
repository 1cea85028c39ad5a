"""The prepared GPU recipe (models/training/gpu_recipe.py) cannot rot: `prepare` then a 3-step
`run --dry-run` on this CPU, from the shipped model, writing what the GPU run returns."""

from __future__ import annotations

import json

from models.training import gpu_recipe
from models.vae.loading import load_weights


def test_prepare_and_dry_run(photos_dir, tmp_path, monkeypatch):
    from support import ROOT

    monkeypatch.chdir(ROOT)  # --init models/default, as on the GPU machine (run from the checkout)
    data, out = tmp_path / "gpu-data", tmp_path / "out"
    assert gpu_recipe.main(["prepare", "--data", str(photos_dir), "--out", str(data), "--short-side", "96"]) == 0
    names = sorted(p.name for p in data.iterdir())
    assert len(names) == 4 and names[0].startswith("0000-")
    assert gpu_recipe.main(["run", "--data", str(data), "--out", str(out), "--dry-run"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["dry_run"] and result["held_out_256"]["images"] == 4
    assert 5 < result["held_out_256"]["psnr"] < 60
    weights = out / "model" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 16 * 2**20  # the device returns files of at most 16 MiB
    vae = load_weights(str(out / "model")).vae
    assert vae.config.latent_channels == 4 and vae.config.shift_factor is not None
    assert not (out / "run").exists()  # no multi-hundred-MiB checkpoint left to return
