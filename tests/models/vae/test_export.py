"""`vae export` never destroys what it did not write: an existing target is refused unless
--replace says so, the replacement is atomic, and a failed export leaves no temporary behind."""

from __future__ import annotations

import errno

import pytest
import torch

from models.vae import export
from models.vae.export import main as export_main
from models.vae.loading import load_weights


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and all(w in err for w in words), err


def _weights_equal(path, reference, **kwargs) -> bool:
    vae = load_weights(path, **kwargs).vae
    return all(torch.equal(vae.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_diffusers_export_refuses_a_non_empty_folder_unless_replace(tiny_vae_dir, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    assert export_main([str(tiny_vae_dir), "--diffusers", str(target)]) == 2
    _one_line_error(capsys, str(target), "not empty", "--replace")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    assert export_main([str(tiny_vae_dir), "--diffusers", str(target), "--dtype", "float32", "--replace"]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert _weights_equal(target, load_weights(tiny_vae_dir).vae)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary or old folder left

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_main([str(tiny_vae_dir), "--diffusers", str(empty)]) == 0  # an empty folder is filled
    (tmp_path / "file").write_text("x")
    assert export_main([str(tiny_vae_dir), "--diffusers", str(tmp_path / "file"), "--replace"]) == 2
    _one_line_error(capsys, "not a folder")


def test_single_file_export_refuses_an_existing_file_unless_replace(tiny_vae_dir, tmp_path, capsys):
    target = tmp_path / "vae.safetensors"
    target.write_bytes(b"someone else's file")
    assert export_main([str(tiny_vae_dir), "--single-file", str(target)]) == 2
    _one_line_error(capsys, str(target), "exists", "--replace")
    assert target.read_bytes() == b"someone else's file"
    assert export_main([str(tiny_vae_dir), "--single-file", str(target), "--replace"]) == 0
    assert _weights_equal(target, load_weights(tiny_vae_dir).vae, config=tiny_vae_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["vae.safetensors"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def _disk_full(path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_export_leaves_the_target_and_no_temporaries(tiny_vae_dir, tmp_path, capsys, monkeypatch):
    from diffusers import AutoencoderKL

    target = tmp_path / "vae.safetensors"
    target.write_bytes(b"old")
    monkeypatch.setattr(export, "save_file", lambda state, path, metadata=None: _disk_full(path))
    assert export_main([str(tiny_vae_dir), "--single-file", str(target), "--replace"]) == 1
    _one_line_error(capsys, f"cannot write {target}", "No space left")
    assert [p.name for p in tmp_path.iterdir()] == ["vae.safetensors"] and target.read_bytes() == b"old"

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(AutoencoderKL, "save_pretrained", lambda self, path, **k: _disk_full(path / "config.json"))
    assert export_main([str(tiny_vae_dir), "--diffusers", str(folder), "--replace"]) == 1
    _one_line_error(capsys, f"cannot write {folder}", "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "vae.safetensors"]
    assert [p.name for p in folder.iterdir()] == ["config.json"] and (folder / "config.json").read_text() == "{}"


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    (b / "y").write_text("b")
    if not export._exchange(a, b):
        pytest.skip("no renameat2 RENAME_EXCHANGE here (the two-rename fallback is used)")
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]
