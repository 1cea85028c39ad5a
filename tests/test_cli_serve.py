"""`vae serve`: settings from options and VAE_* variables, clear failures, a real process answering."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from app import serve
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_no_model_exits_with_how_to(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("VAE_MODELS", raising=False)
    monkeypatch.setattr(serve, "DEFAULT_MODEL_DIR", tmp_path / "default")
    assert serve.main([]) == 2
    err = capsys.readouterr().err
    assert "--model NAME=PATH" in err and "VAE_MODELS" in err and len(err.strip().splitlines()) == 1


def test_default_model_dir_is_used_when_present(monkeypatch, tiny_vae_dir, tmp_path):
    monkeypatch.delenv("VAE_MODELS", raising=False)
    default = tmp_path / "default"
    shutil.copytree(tiny_vae_dir, default)
    monkeypatch.setattr(serve, "DEFAULT_MODEL_DIR", default)
    assert serve.settings_from_args([]).models == [f"default={default}"]


def test_options_and_environment(monkeypatch):
    monkeypatch.setenv("VAE_MODELS", "a=/x,b=/y")
    monkeypatch.setenv("VAE_PORT", "9123")
    monkeypatch.setenv("VAE_DTYPE", "bfloat16")
    s = serve.settings_from_args([])
    assert s.models == ["a=/x", "b=/y"] and s.port == 9123 and s.dtype == "bfloat16"
    s = serve.settings_from_args(["--model", "c=/z", "--model", "d=/w", "--port", "1", "--device", "cuda"])
    assert s.models == ["c=/z", "d=/w"] and s.port == 1 and s.device == "cuda"
    monkeypatch.setenv("VAE_MODELS", '["e=/v"]')
    assert Settings().models == ["e=/v"]


@pytest.mark.parametrize("case", ["corrupt", "missing", "fp16"])
def test_bad_model_exits_with_one_line(tiny_vae_dir, tmp_path, capsys, case):
    args = []
    if case == "corrupt":
        bad = tmp_path / "bad"
        shutil.copytree(tiny_vae_dir, bad)
        (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
        args = ["--model", f"m={bad}"]
    elif case == "missing":
        args = ["--model", f"m={tmp_path / 'absent'}"]
    else:
        args = ["--model", f"m={tiny_vae_dir}", "--dtype", "float16"]
    assert serve.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vae serve: error:") and len(err.splitlines()) == 1
    assert {"corrupt": "corrupt weights", "missing": "does not exist", "fp16": "float16"}[case] in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vae_serve_process_answers(tiny_vae_dir):
    port = _free_port()
    env = {**os.environ, "VAE_PORT": str(port), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "app.cli", "serve", "--model", f"tiny={tiny_vae_dir}", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert models["default"] == "tiny"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
