"""Training pipeline: loss goes down, resume is exact, kill -9 loses at most N steps, export round trip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from support import ROOT, TINY_CONFIG, make_tiny_vae
from models.training import train
from models.training.data import RandomCrops, batch_for_side, list_images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A few real-looking images: smooth gradients with shapes, several sizes and modes."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h) + 60 * i], -1) % 256
        im = Image.fromarray(base.astype(np.uint8))
        draw = ImageDraw.Draw(im)
        draw.ellipse([5, 5, w // 2, h // 2], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        if i == 4:
            im = im.convert("L")  # greyscale must be converted to RGB
        (folder / "sub").mkdir(exist_ok=True)
        im.save(folder / ("sub" if i % 2 else ".") / f"img{i}.{'png' if i % 3 else 'jpg'}")
    return folder


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY_CONFIG}))
    return path


def _args(folder, out, config, *extra):
    return [str(folder), "--out", str(out), "--config", str(config), "--crop", "32", "--batch-size", "4",
            "--workers", "0", "--val-images", "2", "--log-every", "2", "--eval-every", "4", "--warmup", "2",
            "--checkpoint-every", "3", "--threads", "1", *extra]


def test_data_stream_is_deterministic_and_covers_folders(image_folder):
    files = list_images([image_folder])
    assert len(files) == 6 and any("sub" in str(f) for f in files)
    a, b = RandomCrops(files, crop=32, seed=3), RandomCrops(files, crop=32, seed=3)
    x, y = a[17], b[17]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, y) and not torch.equal(a[17], a[18])
    # one epoch visits every file once
    assert sorted(a.file_index(k) for k in range(6)) == list(range(6))


def test_crop_sizes_give_each_step_one_side_drawn_from_the_list(image_folder):
    files = list_images([image_folder])
    mixed = RandomCrops(files, crop=32, seed=3, sizes=(32, 48, 64), samples_per_step=4)
    sides = [mixed.step_crop(step) for step in range(60)]
    assert set(sides) == {32, 48, 64}  # all drawn, deterministically
    assert sides == [RandomCrops(files, crop=32, seed=3, sizes=(32, 48, 64), samples_per_step=4).step_crop(s)
                     for s in range(60)]
    for step in (0, 1, 7):
        crops = [mixed[step * 4 + i] for i in range(4)]
        assert {c.shape for c in crops} == {(3, sides[step], sides[step])}
    # Without sizes every step is --crop; a step's pixels stay near batch x crop^2.
    assert {RandomCrops(files, crop=32, seed=3).step_crop(s) for s in range(20)} == {32}
    assert [batch_for_side(4, 32, side) for side in (32, 48, 64, 128)] == [4, 2, 1, 1]
    assert [batch_for_side(2, 256, side) for side in (256, 384, 512)] == [2, 1, 1]


def test_few_steps_reduce_the_loss(image_folder, tiny_config, tmp_path):
    out = tmp_path / "run"
    assert train.main(_args(image_folder, out, tiny_config, "--steps", "40", "--lr", "2e-3")) == 0
    rows = list(__import__("csv").DictReader(open(out / "metrics.csv")))
    first, last = float(rows[0]["rec_loss"]), float(rows[-1]["rec_loss"])
    assert last < 0.7 * first, (first, last)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["block_out_channels"] == TINY_CONFIG["block_out_channels"]
    assert config["scaling_factor"] != TINY_CONFIG["scaling_factor"]  # measured: 1 / latent std
    assert (out / "curves.png").is_file() and list(out.glob("recon-*.png"))


def test_resume_gives_the_same_next_steps(image_folder, tiny_config, tmp_path):
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    assert train.main(_args(image_folder, straight, tiny_config, "--steps", "6")) == 0
    assert train.main(_args(image_folder, paused, tiny_config, "--steps", "6", "--stop-at", "3")) == 0
    assert torch.load(paused / "checkpoint.pt", weights_only=True)["step"] == 3
    assert train.main(_args(image_folder, paused, tiny_config, "--steps", "6", "--resume")) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(paused / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]))


def test_mixed_crop_sizes_train_resume_exactly_and_export(image_folder, tiny_config, tmp_path):
    """--crop-sizes: steps of different sides train, the latent factors are measured over them, and
    a resumed run draws the same sides (the side is a function of the step, not of the process)."""
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    mixed = ["--crop-sizes", "32,48", "--steps", "6"]
    drawn = RandomCrops(["unused"], crop=32, seed=0, sizes=(32, 48), samples_per_step=4)
    assert {drawn.step_crop(step) for step in range(6)} == {32, 48}  # the run below has both sides
    assert train.main(_args(image_folder, straight, tiny_config, *mixed)) == 0
    assert train.main(_args(image_folder, paused, tiny_config, *mixed, "--stop-at", "3")) == 0
    assert train.main(_args(image_folder, paused, tiny_config, *mixed, "--resume")) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(paused / "checkpoint.pt", weights_only=True)
    assert a["args"]["crop_sizes"] == (32, 48) and a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    config = json.loads((straight / "model" / "config.json").read_text())
    assert config["scaling_factor"] != TINY_CONFIG["scaling_factor"]
    # The sides are part of the recipe: a resume may not change them.
    assert train.main(_args(image_folder, paused, tiny_config, "--crop-sizes", "32,64", "--steps", "8",
                            "--resume")) == 2


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(image_folder, tiny_config, tmp_path):
    out = tmp_path / "r"
    assert train.main(_args(image_folder, out, tiny_config, "--steps", "1", "--resume")) == 2
    assert train.main(_args(image_folder, out, tiny_config, "--steps", "3")) == 0
    assert train.main(_args(image_folder, out, tiny_config, "--steps", "3")) == 2


def test_kill_9_loses_at_most_checkpoint_every_steps(image_folder, tiny_config, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "models.training.train", *_args(image_folder, out, tiny_config, "--steps", "100000")]
    cmd[cmd.index("--checkpoint-every") + 1] = "2"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.2)
    assert ckpt.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no checkpoint"
    time.sleep(1.0)  # let it overwrite the checkpoint a few times, then kill it mid-run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    metrics = list(__import__("csv").DictReader(open(out / "metrics.csv")))
    state = torch.load(ckpt, weights_only=True)  # never a torn file: written atomically
    assert state["step"] >= int(metrics[-1]["step"]) - 2
    assert not (out / "checkpoint.pt.tmp").exists() or state["step"] > 0
    assert train.main(_args(image_folder, out, tiny_config, "--steps", str(state["step"] + 2), "--resume")) == 0
    assert torch.load(ckpt, weights_only=True)["step"] == state["step"] + 2
    steps = [int(r["step"]) for r in __import__("csv").DictReader(open(out / "metrics.csv"))]
    assert steps == sorted(set(steps)), "rows after the checkpoint must be replaced, not duplicated"


def test_export_single_file_round_trip(tmp_path):
    from diffusers import AutoencoderKL

    from models.vae.export import main as export_main
    from models.vae.loading import load_weights

    vae = make_tiny_vae(seed=5)
    vae.save_pretrained(tmp_path / "m")
    out = tmp_path / "ldm" / "vae.safetensors"
    assert export_main([str(tmp_path / "m"), "--single-file", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert "encoder.down.0.block.0.conv1.weight" in keys and "decoder.up.0.block.0.conv1.weight" in keys
    reloaded = AutoencoderKL.from_single_file(str(out), config=str(tmp_path / "m"), local_files_only=True)
    ours = load_weights(out, config=tmp_path / "m").vae
    x = torch.rand(2, 3, 40, 24) * 2 - 1
    with torch.no_grad():
        expected = vae.decode(vae.encode(x).latent_dist.mode()).sample
        for other in (reloaded, ours):
            assert torch.equal(other.decode(other.encode(x).latent_dist.mode()).sample, expected)


def test_decoder_only_fine_tune_from_init_keeps_the_encoder(image_folder, tiny_vae_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ft"
    args = _args(image_folder, out, "unused", "--steps", "3", "--ema", "0.5")
    i = args.index("--config")
    args[i:i + 2] = ["--init", str(tiny_vae_dir), "--decoder-only"]
    assert train.main(args) == 0
    before = load_file(str(tiny_vae_dir / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "model" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_export_float16_diffusers_folder(tmp_path):
    from models.vae.export import main as export_main
    from models.vae.loading import load_weights

    vae = make_tiny_vae(seed=7)
    vae.save_pretrained(tmp_path / "m")
    assert export_main([str(tmp_path / "m"), "--diffusers", str(tmp_path / "half"), "--dtype", "float16"]) == 0
    half = load_weights(tmp_path / "half").vae  # loads back as float32
    size = lambda d: (d / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size(tmp_path / "half") < 0.6 * size(tmp_path / "m")
    for key, value in vae.state_dict().items():
        assert torch.equal(half.state_dict()[key], value.half().float()), key


def test_presets_are_kl_f8_and_small_fits_a_quarter_of_sd_decoder_flops():
    from diffusers import AutoencoderKL

    from models.vae.info import count_flops
    from models.training.presets import PRESETS

    flops = {}
    for name, config in PRESETS.items():
        with torch.device("meta"):  # counted without allocating or computing
            vae = AutoencoderKL(**config)
        assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4  # 8x down
        flops[name] = count_flops(vae, 256)["decode"]
    assert flops["small"] <= 0.25 * flops["sd"] and flops["tiny"] < flops["compact"] < flops["small"]


# --- bad data, bad checkpoints, resume with other options --------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming width x height, and nothing after: a bomb header."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


@pytest.fixture()
def messy_folder(image_folder, tmp_path) -> Path:
    """The good images plus what a real photo folder collects: text named .jpg, an empty file, a bomb
    header and a PNG cut short after a good header (only decoding finds that one)."""
    folder = tmp_path / "messy"
    import shutil

    shutil.copytree(image_folder, folder)
    (folder / "notes.jpg").write_text("not a photo")
    (folder / "empty.png").write_bytes(b"")
    (folder / "bomb.png").write_bytes(_png_header(60000, 60000))
    data = (image_folder / "img0.jpg").read_bytes()
    (folder / "a-cut.jpg").write_bytes(data[: len(data) // 3])
    return folder


def test_bad_images_are_named_and_skipped_and_resume_gets_past_them(messy_folder, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(messy_folder, out, tiny_config, "--steps", "2", "--eval-every", "100")
    assert train.main([*args, "--stop-at", "1"]) == 0
    err = capsys.readouterr().err
    for name in ("notes.jpg", "empty.png", "bomb.png", "a-cut.jpg"):
        assert f"skipping {messy_folder / name}" in err, name
    assert "Traceback" not in err
    assert train.main([*args, "--resume"]) == 0  # the same data order: the same bad files, skipped again
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_file_that_fails_to_decode_is_replaced_deterministically(messy_folder, capsys):
    files = [f for f in list_images([messy_folder]) if f.name not in ("notes.jpg", "empty.png", "bomb.png")]
    a, b = RandomCrops(files, crop=32, seed=1), RandomCrops(files, crop=32, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in range(2 * len(files)))
    assert capsys.readouterr().err.count("a-cut.jpg") == 2  # once per dataset object (per worker)


@pytest.mark.parametrize("case", ["missing", "empty", "all-bad", "too-few"])
def test_unusable_data_is_one_line(case, tiny_config, tmp_path, capsys):
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "all-bad":
        (data / "a.jpg").write_text("text")
    if case == "too-few":
        Image.new("RGB", (40, 40)).save(data / "one.png")
    assert train.main(_args(data, tmp_path / "out", tiny_config, "--steps", "2")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("vae train: error:") and str(data) in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"garbage", b"PK\x03\x04 truncated zip", None])
def test_a_corrupt_checkpoint_under_resume_is_one_line(content, image_folder, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    if content is None:
        torch.save({"step": 3}, out / "checkpoint.pt")  # readable, but not a training checkpoint
    else:
        (out / "checkpoint.pt").write_bytes(content)
    assert train.main(_args(image_folder, out, tiny_config, "--steps", "4", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out / "checkpoint.pt") in err and "Traceback" not in err, err


def test_resume_refuses_recipe_options_that_differ_from_the_checkpoint(image_folder, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_args(image_folder, out, tiny_config, "--steps", "1")) == 0
    capsys.readouterr()
    resume = [str(image_folder), "--out", str(out), "--resume", "--workers", "0", "--threads", "1"]
    assert train.main([*resume, "--steps", "2", "--preset", "small", "--crop", "128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--preset small (checkpoint: tiny)" in err and "--crop 128 (checkpoint: 32)" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    # The same recipe values, or none, and a new length: accepted.
    assert train.main([*resume, "--steps", "2", "--crop", "32", "--config", str(tiny_config)]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_norm_groups_regroups_an_init_model_keeping_its_weights(tiny_vae_dir):
    """--norm-groups with --init: the same parameters in a model whose GroupNorms pool more
    channels (a per-channel GroupNorm before conv_out cannot carry an image's overall colour)."""
    import argparse

    from diffusers import AutoencoderKL

    from models.training.model import build_model

    args = argparse.Namespace(init=str(tiny_vae_dir), config=None, preset="tiny", norm_groups=2, layers_per_block=0)
    vae = build_model(args)
    ref = AutoencoderKL.from_pretrained(tiny_vae_dir)
    assert vae.config.norm_num_groups == 2 and ref.config.norm_num_groups == 4
    assert vae.decoder.conv_norm_out.num_groups == 2
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), ref.state_dict().values()))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # another function: statistics pooled over 4 channels instead of 2
        assert not torch.allclose(vae(x).sample, ref(x).sample)
    with pytest.raises(ValueError, match="must divide every block width"):
        build_model(argparse.Namespace(**{**vars(args), "norm_groups": 3}))


def test_layers_per_block_grows_an_init_model_keeping_its_function(tiny_vae_dir):
    """--layers-per-block with --init: more ResNet blocks per stage, the same outputs until trained,
    and the added blocks do learn (their zero conv2 gets a gradient)."""
    import argparse

    from diffusers import AutoencoderKL

    from models.training.model import build_model

    args = argparse.Namespace(init=str(tiny_vae_dir), config=None, preset="tiny", norm_groups=0, layers_per_block=2)
    grown, ref = build_model(args), AutoencoderKL.from_pretrained(tiny_vae_dir)
    assert ref.config.layers_per_block == 1 and grown.config.layers_per_block == 2
    assert [len(b.resnets) for b in grown.encoder.down_blocks] == [2] * len(ref.encoder.down_blocks)
    assert [len(b.resnets) for b in grown.decoder.up_blocks] == [3] * len(ref.decoder.up_blocks)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in ref.parameters())
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z_ref, z = ref.encode(x).latent_dist.mean, grown.encode(x).latent_dist.mean
        torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(grown.decode(z).sample, ref.decode(z_ref).sample, rtol=0, atol=1e-5)
    grown.decode(grown.encode(x).latent_dist.mean).sample.square().mean().backward()
    added = grown.decoder.up_blocks[0].resnets[2].conv2.weight
    assert added.abs().max() == 0 and added.grad.abs().max() > 0
    with pytest.raises(ValueError, match="can only grow"):
        build_model(argparse.Namespace(**{**vars(args), "init": None, "config": None, "preset": "small",
                                          "layers_per_block": 1}))


def test_colour_augmentation_turns_hue_keeps_brightness_and_is_deterministic(image_folder):
    """--colour-aug: a turn of a third about the grey axis is a channel rotation; brightness is kept
    (before the clip); the recoloured stream is still a pure function of (seed, k)."""
    import math

    from models.training.data import recolour

    x = torch.rand(3, 16, 16) * 2 - 1
    assert torch.allclose(recolour(x, 0.0, 1.0), x, atol=1e-6)
    assert torch.allclose(recolour(x, 2 * math.pi / 3, 1.0), x[[2, 0, 1]], atol=1e-5)  # R -> G -> B -> R
    grey = torch.zeros(3, 4, 4) + 0.3
    assert torch.allclose(recolour(grey, 1.0, 1.7), grey)  # no chroma, nothing to turn
    pale = (torch.rand(3, 16, 16) - 0.5) * 0.2  # far from the clip: brightness exactly kept, chroma scaled
    more = recolour(pale, 0.7, 1.5)
    assert torch.allclose(more.mean(0), pale.mean(0), atol=1e-6)
    assert torch.allclose((more - more.mean(0)).norm(dim=0), 1.5 * (pale - pale.mean(0)).norm(dim=0), atol=1e-5)

    files = list_images([image_folder])
    plain, always = RandomCrops(files, crop=32, seed=3), RandomCrops(files, crop=32, seed=3, colour_aug=1.0)
    again = RandomCrops(files, crop=32, seed=3, colour_aug=1.0)
    grey = [torch.equal(plain[k][0], plain[k][1]) and torch.equal(plain[k][1], plain[k][2]) for k in range(8)]
    changed = [not torch.allclose(plain[k], always[k]) for k in range(8)]
    assert changed == [not g for g in grey] and sum(changed) >= 5  # a greyscale file has no hue to turn
    assert all(torch.equal(always[k], again[k]) for k in range(8))
    # brightness kept up to the clip (these test images are very saturated: 1 in 8 levels moves)
    assert all(float((plain[k].mean(0) - always[k].mean(0)).abs().mean()) < 0.125 for k in range(8))
    half = RandomCrops(files, crop=32, seed=3, colour_aug=0.5)
    share = np.mean([not torch.equal(plain[k], half[k]) for k in range(300)])
    assert 0.25 < share < 0.6  # half of the 5 colour files' crops


def test_colour_options_are_part_of_the_recipe(image_folder, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_args(image_folder, out, tiny_config, "--steps", "2", "--colour-aug", "0.5", "--colour", "2")) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["args"]
    assert saved["colour_aug"] == 0.5 and saved["colour"] == 2
    capsys.readouterr()
    resume = [str(image_folder), "--out", str(out), "--resume", "--workers", "0", "--threads", "1"]
    assert train.main([*resume, "--steps", "3", "--colour-aug", "0.2"]) == 2
    assert "--colour-aug 0.2 (checkpoint: 0.5)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(_args(image_folder, tmp_path / "bad", tiny_config, "--colour-aug", "1.5"))


def test_colour_loss_weighs_low_frequency_colour_only():
    """--colour: an 8x8-block mean error (a tint) costs; a pattern that averages out in every block does not."""
    from models.training.losses import reconstruction_loss

    x = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    checker = (torch.arange(32).view(1, -1) + torch.arange(32).view(-1, 1)) % 2 * 0.2 - 0.1  # zero mean per 8x8
    tint = torch.tensor([0.0, -0.1, 0.0]).view(1, 3, 1, 1)  # a green loss of 12.75 levels
    assert reconstruction_loss(x, x + checker, l1=0, mse=0, colour=1) == pytest.approx(0, abs=1e-12)
    assert reconstruction_loss(x, x + tint, l1=0, mse=0, colour=1) == pytest.approx(0.01 / 3, rel=1e-4)
    both = reconstruction_loss(x, x + tint, l1=0, mse=1, colour=4)
    assert both == pytest.approx(5 * 0.01 / 3, rel=1e-4)  # a tint is as large per block as per pixel


def test_image_colour_loss_weighs_the_image_mean_only():
    """--image-colour: a tint over the whole crop costs its square; a pattern that averages out over
    the image costs nothing, even where it is a block-level colour error that --colour weighs."""
    from models.training.losses import reconstruction_loss

    x = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    halves = torch.cat([torch.full((32, 16), 0.1), torch.full((32, 16), -0.1)], dim=1)  # zero image mean
    tint = torch.tensor([0.0, -0.1, 0.0]).view(1, 3, 1, 1)
    assert reconstruction_loss(x, x + halves, l1=0, mse=0, image_colour=1) == pytest.approx(0, abs=1e-12)
    assert reconstruction_loss(x, x + halves, l1=0, mse=0, colour=1) == pytest.approx(0.01, rel=1e-4)
    assert reconstruction_loss(x, x + tint, l1=0, mse=0, image_colour=1) == pytest.approx(0.01 / 3, rel=1e-4)
    per_image = torch.tensor([0.1, -0.2]).view(2, 1, 1, 1)  # each image its own grey shift
    assert reconstruction_loss(x, x + per_image, l1=0, mse=0, image_colour=2) == pytest.approx(2 * 0.05 / 2, rel=1e-4)


def test_ssim_loss_is_the_evaluation_ssim_and_differentiable(photos_dir):
    """--ssim: `ssim_index` on [-1, 1] tensors equals models.metrics.ssim on the uint8 images (the
    figure `vae eval` reports), so the loss trains exactly what is measured; 1 for identical images."""
    from PIL import Image

    from models.metrics import ssim
    from models.training.losses import reconstruction_loss, ssim_index

    photo = next(iter(sorted(photos_dir.iterdir())))
    a = np.asarray(Image.open(photo).convert("RGB").resize((96, 64)))
    noise = np.random.default_rng(0).integers(-40, 41, a.shape)
    b = np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)
    as_tensor = lambda img: torch.from_numpy(img).permute(2, 0, 1)[None].double() / 127.5 - 1
    x, y = as_tensor(a), as_tensor(b).requires_grad_(True)
    index = ssim_index(x, y)
    assert float(index) == pytest.approx(ssim(a, b), abs=1e-9)
    assert float(index) < 0.9
    assert float(ssim_index(x, x)) == pytest.approx(1.0, abs=1e-12)
    loss = reconstruction_loss(x, y, l1=0, mse=0, ssim=1)
    assert float(loss) == pytest.approx(1 - ssim(a, b), abs=1e-6)
    loss.backward()
    assert y.grad is not None and float(y.grad.abs().sum()) > 0


def test_latent_colour_loss_asks_for_linearly_readable_block_colour(image_folder, tiny_config, tmp_path):
    """--latent-colour: ~0 for a latent that holds each 8x8 block's colour under any linear mixing
    and offset; about the lost channel's block variance for one that lacks it; a recipe option."""
    from models.training.losses import latent_colour_loss

    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(4, 3, 8, 8, generator=gen) * 1.6 - 0.8  # block colours vary as in photos
    x = torch.nn.functional.interpolate(coarse, scale_factor=8) + 0.2 * torch.rand(4, 3, 64, 64, generator=gen) - 0.1
    blocks = torch.nn.functional.avg_pool2d(x, 8)
    holds = torch.cat([blocks, torch.randn(4, 1, 8, 8, generator=gen)], 1)
    mix = torch.randn(4, 4, generator=gen) + 3 * torch.eye(4)
    mixed = torch.einsum("ij,njhw->nihw", mix, holds) + 1.5  # any linear code of the colour, shifted
    green_var = float(blocks[:, 1].var())
    assert float(latent_colour_loss(mixed, x)) < 1e-3 * green_var / 3
    no_green = holds.clone()
    no_green[:, 1] = torch.randn(4, 8, 8, generator=gen)  # green replaced by something unrelated
    assert float(latent_colour_loss(no_green, x)) == pytest.approx(green_var / 3, rel=0.1)
    # latents that hardly vary (a flat crop) get a small gradient, not one scaled by a huge read-out
    flat = (torch.ones(4, 4, 8, 8) + 1e-4 * torch.randn(4, 4, 8, 8, generator=gen)).requires_grad_(True)
    latent_colour_loss(flat, x).backward()
    assert float(flat.grad.abs().max()) < 1e-3

    out = tmp_path / "run"
    assert train.main(_args(image_folder, out, tiny_config, "--steps", "2", "--latent-colour", "2")) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["latent_colour"] == 2
