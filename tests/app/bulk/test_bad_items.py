"""`vae encode` / `vae decode` never stop a whole job for one bad item, and never lose one silently:
colliding shard keys, unwritable outputs, damaged latent metadata, non-UTF-8 names, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from app.bulk import encoders
from app.bulk.cli import main
from models.vae import latent_files as latent_store
from support import gradient_image, run


def _one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


def test_shard_keys_of_similar_names_never_collide(tiny_vae_dir, tmp_path):
    src, lat, out = tmp_path / "src", tmp_path / "lat", tmp_path / "out"
    src.mkdir()
    gradient_image(24, 16, seed=1).save(src / "a.b.png")
    args = [src, "--out", lat, "--model", tiny_vae_dir, "--shard-size", "8"]
    assert run("encode", *args)[0] == 0
    # Added later: before, its key `a_b_png` equalled a.b.png's, so it was "already done" and never encoded.
    gradient_image(40, 16, seed=2).save(src / "a_b.png")
    gradient_image(16, 16, seed=3).save(src / "a~b.png")
    rc, rep = run("encode", *args, report=tmp_path / "r.json")
    assert (rc, rep["done"], rep["skipped"]) == (0, 2, 1)
    members = [m for p in sorted(lat.glob("*.tar")) for m in latent_store.shard_members(p)]
    assert len(members) == len(set(members)) == 3 and all(m.count(".") == 1 for m in members)
    rc, rep = run("encode", *args, report=tmp_path / "again.json")
    assert (rep["done"], rep["skipped"]) == (0, 3)
    rc, rep = run("decode", lat, "--out", out, "--model", tiny_vae_dir, report=tmp_path / "d.json")
    assert (rc, rep["done"]) == (0, 3)
    assert {p.name: Image.open(p).size for p in out.iterdir()} == {"a.b.png": (24, 16), "a_b.png": (40, 16),
                                                                   "a~b.png": (16, 16)}


def test_sample_keys_are_injective_and_keep_the_old_keys():
    names = ["a.b", "a_b", "a~b", "a._b", "a_.b", "a~_b", "a~.b", "a__b", "a..b", "a~~b", "a_~b", "a.~b"]
    keys = [latent_store.sample_key(n) for n in names]
    assert len(set(keys)) == len(names) and not any("." in k for k in keys)
    assert latent_store.sample_key("dir.x/img.0.png") == "dir_x/img_0_png"  # no `_` or `~`: as before


def test_unwritable_out_is_one_line_before_the_model_loads(bulk_inputs, tmp_path, capsys, monkeypatch):
    from models.vae.inference import VAEModel

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(VAEModel, "load", no_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    for command in ("encode", "decode"):
        rc, _ = run(command, bulk_inputs, "--out", blocker / "out", "--model", "unused")
        assert rc == 2
        _one_line_error(capsys, f"vae {command}: error: cannot write in {blocker / 'out'}")
    assert main("encode", [str(bulk_inputs), "--out", str(blocker), "--report", str(blocker / "r.json")]) == 2
    _one_line_error(capsys, f"cannot write in {blocker}: it is a file")
    assert main("encode", [str(bulk_inputs), "--out", str(tmp_path / "ok"), "--report", str(blocker / "r.json")]) == 2
    _one_line_error(capsys, "cannot write in", str(blocker))


def test_read_only_out_is_one_line(bulk_inputs, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").touch()
    except PermissionError:
        pass
    else:
        pytest.skip("permissions are not enforced for this user (root)")
    rc, _ = run("encode", bulk_inputs, "--out", ro, "--model", "unused")
    assert rc == 2
    _one_line_error(capsys, "cannot write in", "Permission denied")


def test_an_unwritable_output_file_fails_that_image_only(bulk_inputs, tiny_vae_dir, tmp_path):
    lat = tmp_path / "lat"
    lat.mkdir()
    (lat / "odd").write_text("a file where the folder odd/ should be")
    rc, rep = run("encode", bulk_inputs, "--out", lat, "--model", tiny_vae_dir, report=tmp_path / "r.json")
    assert (rc, rep["done"], rep["failed"]) == (1, 4, 4)  # 3 under odd/ + broken.png
    odd = [f for f in rep["failures"] if "/odd/" in f["input"]]
    assert len(odd) == 3 and all("cannot write" in f["reason"] for f in odd)


def _with_metadata(good: bytes, **changes) -> bytes:
    n = int.from_bytes(good[:8], "little")
    meta = {**json.loads(good[8 : 8 + n])["__metadata__"], **changes}
    import safetensors.torch

    return latent_store.save_safetensors("latents", safetensors.torch.load(good)["latents"], meta)


def test_bad_latent_files_are_named_and_the_good_ones_decoded(bulk_inputs, tiny_vae_dir, tmp_path, capsys):
    lat, out = tmp_path / "lat", tmp_path / "out"
    run("encode", bulk_inputs / "photo01.png", "--out", lat, "--model", tiny_vae_dir)
    good = (lat / "photo01.png.safetensors").read_bytes()
    bad = {
        "zero": _with_metadata(good, original_size="[0,0]", source="zero.png"),
        "huge": _with_metadata(good, original_size="[1e400,3.5]", source="huge.png"),
        "negative": _with_metadata(good, original_size="[-5,-5]", source="negative.png"),
        "too-big": _with_metadata(good, original_size="[4000,4000]", source="too-big.png"),
        "nul": _with_metadata(good, source="a\x00b.png"),
    }
    for name, data in bad.items():
        (lat / f"{name}.safetensors").write_bytes(data)
    for attempt in ("first", "rerun"):
        rc, rep = run("decode", lat, "--out", out, "--model", tiny_vae_dir, report=tmp_path / f"{attempt}.json")
        assert rc == 1 and rep["failed"] == len(bad) and rep["done"] + rep["skipped"] == 1
        reasons = {Path(f["input"]).stem: f["reason"] for f in rep["failures"]}
        assert set(reasons) == set(bad)
        assert "original_size" in reasons["zero"] and "original_size" in reasons["huge"]
        assert "original_size" in reasons["negative"] and "does not fit" in reasons["too-big"]
        assert "NUL" in reasons["nul"]
        assert "Traceback" not in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["photo01.png"]
    assert Image.open(out / "photo01.png").size == (64, 48)


def test_a_non_utf8_file_name_is_reported_not_written(tiny_vae_dir, tmp_path):
    src, lat = tmp_path / "src", tmp_path / "lat"
    src.mkdir()
    odd = src / os.fsdecode(b"caf\xe9.png")
    try:
        gradient_image(16, 16).save(odd, format="PNG")
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take non-UTF-8 names")
    gradient_image(24, 16, seed=1).save(src / "plain.png")
    rc, rep = run("encode", src, "--out", lat, "--model", tiny_vae_dir, report=tmp_path / "r.json")
    assert (rc, rep["done"], rep["failed"]) == (1, 1, 1)
    assert "UTF-8" in rep["failures"][0]["reason"] and "caf\\xe9.png" in rep["failures"][0]["input"]
    assert [p.name for p in lat.iterdir()] == ["plain.png.safetensors"]
    rc, rep = run("decode", lat, "--out", tmp_path / "out", "--model", tiny_vae_dir, report=tmp_path / "d.json")
    assert (rc, rep["done"]) == (0, 1)


def test_ctrl_c_is_one_line_and_keeps_finished_work(bulk_inputs, tiny_vae_dir, tmp_path, capsys, monkeypatch):
    lat = tmp_path / "lat"
    args = [bulk_inputs, "--out", lat, "--model", tiny_vae_dir, "--batch-size", "1", "--shard-size", "2"]
    real, calls = encoders.encode_loaded, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(encoders, "encode_loaded", interrupted)
    assert run("encode", *args)[0] == 130
    _one_line_error(capsys, "vae encode: interrupted", "resume")
    assert sorted(p.name for p in lat.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    monkeypatch.setattr(encoders, "encode_loaded", real)
    rc, rep = run("encode", *args, report=tmp_path / "r.json")
    assert (rep["skipped"], rep["done"]) == (3, 4)
