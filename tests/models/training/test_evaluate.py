"""Metrics and `vae eval` on real images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from models.training.evaluate import main as eval_main
from models.training.evaluate import resize_center_crop
from models.metrics import mean_psnr, psnr, ssim


def test_identical_images_give_infinite_psnr_and_ssim_one(photos_dir):
    img = np.asarray(Image.open(photos_dir / "astronaut.png").convert("RGB"))
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0)
    assert mean_psnr([math.inf, 30.0]) == pytest.approx(65.0)  # capped at 100 dB, stays finite


def test_psnr_matches_its_definition_and_ssim_drops_with_noise(photos_dir):
    img = np.asarray(Image.open(photos_dir / "coffee.png").convert("RGB"))[:256, :256]
    shifted = np.clip(img.astype(int) + 4, 0, 255).astype(np.uint8)
    mse = np.mean((shifted.astype(float) - img) ** 2)
    assert psnr(img, shifted) == pytest.approx(10 * math.log10(255**2 / mse))
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    assert 0.2 < ssim(img, noisy) < ssim(img, shifted) < 1.0
    with pytest.raises(ValueError):
        psnr(img, img[:100])


def test_resize_center_crop_is_square_and_centred():
    im = Image.new("RGB", (640, 480))
    out = resize_center_crop(im, 256)
    assert out.size == (256, 256)


def test_vae_eval_cli_writes_json_and_markdown(tiny_vae_dir, photos_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert eval_main([str(tiny_vae_dir), "--data", str(photos_dir), "--size", "64", "--limit", "3",
                      "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["images"] == 3 and 0 < rows[0]["psnr"] < 40 and -1 <= rows[0]["ssim"] <= 1
    assert rows[0]["latent_std"] > 0 and rows[0]["suggested_scaling_factor"] == pytest.approx(
        1 / rows[0]["latent_std"], rel=1e-2)
    assert "| psnr |" in out.with_suffix(".md").read_text()
    assert len(rows[0]["block_chroma_gain"]) == 2 and len(rows[0]["latent_colour_r2"]) == 3  # an f8 model
    assert all(r <= 1 for r in rows[0]["latent_colour_r2"])
    # full-size mode pads 768x512 to a multiple of 8 and crops back (sides already multiples of 8 here)
    assert eval_main([str(tiny_vae_dir), "--data", str(photos_dir), "--limit", "1"]) == 0
    assert "full" in capsys.readouterr().out


def test_vae_eval_reports_a_missing_model(tmp_path, photos_dir, capsys):
    assert eval_main([str(tmp_path / "nope"), "--data", str(photos_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_vae_eval_reports_lpips_with_local_weights(tiny_vae_dir, photos_dir, tmp_path):
    import torch

    from models.training.perceptual import LPIPS

    torch.manual_seed(0)
    net = LPIPS()
    state = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    state.update({f"lin{i}.model.1.weight": m.weight.abs() for i, m in enumerate(net.lins)})
    torch.save(state, tmp_path / "lpips.pth")
    out = tmp_path / "e.json"
    assert eval_main([str(tiny_vae_dir), "--data", str(photos_dir), "--size", "64", "--limit", "2",
                      "--lpips-weights", str(tmp_path / "lpips.pth"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())[0]["lpips"] > 0


def test_vae_eval_skips_and_names_a_bad_image(tiny_vae_dir, photos_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "astronaut.png").write_bytes((photos_dir / "astronaut.png").read_bytes())
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short" * 3)
    out = tmp_path / "eval.json"
    assert eval_main([str(tiny_vae_dir), "--data", str(data), "--size", "64", "--out", str(out)]) == 0
    assert f"skipping {data / 'broken.png'}" in capsys.readouterr().err
    row = json.loads(out.read_text())[0]
    assert row["images"] == 1 and row["skipped"] == 1


@pytest.mark.parametrize("case", ["missing", "only-bad"])
def test_vae_eval_unusable_data_is_one_line(case, tiny_vae_dir, tmp_path, capsys):
    data = tmp_path / "data"
    if case == "only-bad":
        data.mkdir()
        (data / "x.jpg").write_text("text")
    assert eval_main([str(tiny_vae_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("vae eval: error:") and str(data) in err[-1]


class _Posterior:
    def __init__(self, z):
        self.z = z

    def mode(self):
        return self.z


class _Out:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _PassThrough(torch.nn.Module):
    """A 'VAE' whose decode(encode(x)) is x, or x's grey level with `grey=True`."""

    def __init__(self, grey: bool = False):
        super().__init__()
        self.grey = grey
        self.w = torch.nn.Parameter(torch.zeros(()))  # reconstruct() reads the dtype and device here

    def encode(self, x):
        return _Out(latent_dist=_Posterior(x))

    def decode(self, z):
        return _Out(sample=z.mean(1, keepdim=True).expand_as(z) if self.grey else z)


def test_flat_colours_tells_a_faithful_decoder_from_a_greying_one():
    from models.training.evaluate import flat_colours

    faithful, grey = flat_colours(_PassThrough()), flat_colours(_PassThrough(grey=True))
    assert faithful["hue_deg"] == list(range(0, 360, 30))
    assert all(k == pytest.approx(1, abs=0.01) for k in faithful["chroma_kept"])
    assert all(e < 1 for e in faithful["hue_error_deg"])
    assert all(k < 0.1 for k in grey["chroma_kept"])


def test_evaluate_reports_the_block_chroma_gain(photos_dir):
    from models.training.evaluate import evaluate

    files = sorted(photos_dir.iterdir())
    faithful, grey = evaluate(_PassThrough(), files, size=64, progress=False), evaluate(_PassThrough(True), files, size=64, progress=False)
    assert faithful["block_chroma_gain"] == pytest.approx([1, 1], abs=0.02)
    assert all(g < 0.05 for g in grey["block_chroma_gain"])
    assert "latent_colour_r2" not in faithful  # its 'latent' is the image, not one position per 8x8 block


def test_vae_eval_flat_colours_option(tiny_vae_dir, photos_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert eval_main([str(tiny_vae_dir), "--data", str(photos_dir), "--limit", "1", "--flat-colours", "--out", str(out)]) == 0
    flat = json.loads(out.read_text())[0]["flat_colours"]
    assert len(flat["chroma_kept"]) == 12 and all(0 <= k < 5 for k in flat["chroma_kept"])
    assert "chroma kept" in capsys.readouterr().out


def test_vae_eval_colour_lock_measures_the_locked_encode(photos_dir, tmp_path):
    """`vae eval --colour-lock 1` scores what `/encode?colour_lock=1` gives: with the shipped model on
    the vendored photos at 128 x 128 the worst mean colour error falls from about 5 levels to under 1."""
    from models.vae.loading import DEFAULT_MODEL_DIR

    plain, locked = tmp_path / "plain.json", tmp_path / "locked.json"
    args = [str(DEFAULT_MODEL_DIR), "--data", str(photos_dir), "--size", "128"]
    assert eval_main([*args, "--out", str(plain)]) == 0
    assert eval_main([*args, "--colour-lock", "1", "--out", str(locked)]) == 0
    p, q = json.loads(plain.read_text())[0], json.loads(locked.read_text())[0]
    assert q["colour_lock"] == 1 and "colour_lock" not in p
    assert p["colour_offset_max"] > 1.5 and q["colour_offset_max"] < 1.0, (p, q)
    assert q["psnr"] >= p["psnr"]
