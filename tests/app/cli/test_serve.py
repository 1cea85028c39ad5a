"""`vae serve`: settings from options and VAE_* variables, clear failures, a real process answering."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests
import torch

from app.cli import serve
from app.http.settings import Settings
from models.vae import loading

from support import ROOT, wait_ready


def test_no_model_exits_with_how_to(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("VAE_MODELS", raising=False)
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "default")
    assert serve.main([]) == 2
    err = capsys.readouterr().err
    assert "--model NAME=PATH" in err and "VAE_MODELS" in err and len(err.strip().splitlines()) == 1


def test_default_model_dir_is_used_when_present(monkeypatch, tiny_vae_dir, tmp_path):
    monkeypatch.delenv("VAE_MODELS", raising=False)
    default = tmp_path / "default"
    shutil.copytree(tiny_vae_dir, default)
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", default)
    assert serve.settings_from_args([]).models == [f"default={default}"]


def test_every_setting_has_a_flag_with_its_default_and_env_name():
    """One definition per option: `vae serve` flags are generated from the Settings fields."""
    parser = serve.build_parser(Settings())
    flags = {opt: action for action in parser._actions for opt in action.option_strings}
    for name, field in Settings.model_fields.items():
        if name in serve.ENV_ONLY:
            assert serve.flag_name(name) not in flags  # secrets stay off the command line
            continue
        action = flags[serve.flag_name(name)]
        assert f"VAE_{name.upper()}" in action.help and field.description in action.help
    s = serve.settings_from_args(["--torch-threads", "3", "--no-warmup", "--jpeg-quality", "80",
                                  "--image-formats", "png,webp", "--max-batch-size", "4", "--model", "a=/x"])
    assert (s.torch_threads, s.warmup, s.jpeg_quality, s.image_formats, s.max_batch_size) == (3, False, 80, ["png", "webp"], 4)


def test_bad_option_value_is_one_line_exit_2(capsys):
    assert serve.main(["--model", "a=/x", "--jpeg-quality", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--jpeg-quality" in err and "Traceback" not in err


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


@pytest.mark.parametrize("case", ["corrupt", "missing", "fp16", "truncated", "pickle-only", "bad-config"])
def test_bad_model_exits_with_one_line(tiny_vae_dir, tmp_path, capsys, case):
    args = []
    bad = tmp_path / "bad"
    weights = bad / "diffusion_pytorch_model.safetensors"
    if case not in ("missing", "fp16"):
        shutil.copytree(tiny_vae_dir, bad)
        args = ["--model", f"m={bad}"]
    if case == "corrupt":
        weights.write_bytes(b"garbage")
    elif case == "truncated":  # a copy cut short, e.g. a full disk
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "pickle-only":  # weights load only from safetensors, never from pickles
        weights.rename(bad / "diffusion_pytorch_model.bin")
    elif case == "bad-config":
        (bad / "config.json").write_text("{not json")
    elif case == "missing":
        args = ["--model", f"m={tmp_path / 'absent'}"]
    else:
        args = ["--model", f"m={tiny_vae_dir}", "--dtype", "float16"]
    assert serve.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vae serve: error:") and len(err.splitlines()) == 1
    expected = {"corrupt": "corrupt weights", "missing": "does not exist", "fp16": "float16",
                "truncated": "corrupt weights", "pickle-only": "only .safetensors", "bad-config": "config"}
    assert expected[case] in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vae_serve_process_answers(tiny_vae_dir):
    port = _free_port()
    env = {**os.environ, "VAE_PORT": str(port), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "app.cli.main", "serve", "--model", f"tiny={tiny_vae_dir}", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert models["default"] == "tiny"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _start(tiny_vae_dir, *extra: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "VAE_PORT": str(port), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "app.cli.main", "serve", "--model", f"tiny={tiny_vae_dir}", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base)
    return proc, base


def test_sigterm_during_a_request_drains_and_exits_0(tiny_vae_dir):
    """SIGTERM while a slow request runs: /readyz turns 503, new work gets 503, the accepted
    request still completes with 200, and the process exits 0 (not by the signal)."""
    import io
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from support import gradient_image

    buf = io.BytesIO()
    gradient_image(1024, 1024).save(buf, format="PNG")  # a roundtrip of a few seconds on one thread
    proc, base = _start(tiny_vae_dir, "--grace-seconds", "60")
    try:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(requests.post, base + "/roundtrip", data=buf.getvalue(),
                               headers={"Content-Type": "image/png"}, timeout=120)
            deadline = time.monotonic() + 30
            while "vae_model_in_flight 1.0" not in requests.get(base + "/metrics", timeout=5).text:
                assert time.monotonic() < deadline and not slow.done(), "the request never reached the model"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (ready := requests.get(base + "/readyz", timeout=5)).status_code != 503:
                assert time.monotonic() < deadline, "/readyz never turned 503"
                time.sleep(0.05)
            assert ready.json()["status"] == "draining"
            refused = requests.post(base + "/encode", data=buf.getvalue()[:100], headers={"Content-Type": "image/png"}, timeout=10)
            assert refused.status_code in (400, 503)  # parsed first: garbage is 400, anything valid 503
            tiny = io.BytesIO()
            gradient_image(16, 16).save(tiny, format="PNG")
            refused = requests.post(base + "/encode", data=tiny.getvalue(), headers={"Content-Type": "image/png"}, timeout=10)
            assert refused.status_code == 503 and "Retry-After" in refused.headers
            assert not slow.done(), "the slow request finished before the drain could be observed"
            response = slow.result()
        assert response.status_code == 200 and response.headers["X-PSNR"]
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read().decode()
        assert '"msg": "draining' in log  # JSON log lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exit_process_runs_atexit_handlers_flushes_and_skips_the_interpreter_teardown():
    """`vae serve` ends through app.http.lifecycle.exit_process once the server has closed: the
    atexit handlers run and buffered output is written, the exit status is kept, and CPython's
    teardown (a full GC over torch & co., seconds to minutes: the container check's "hang" after
    SIGTERM, issue 10) is skipped, so an object's __del__ that it would run never runs."""
    code = (
        "import atexit, sys\n"
        "from app.http.lifecycle import exit_process\n"
        "class Witness:\n"
        "    def __del__(self): print('teardown ran', flush=True)\n"
        "keep = Witness()\n"
        "atexit.register(print, 'atexit ran')\n"
        "sys.stdout.write('buffered')\n"
        "exit_process(3)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr
    assert "buffered" in out.stdout and "atexit ran" in out.stdout, out.stdout
    assert "teardown ran" not in out.stdout, out.stdout


def test_weights_holding_nan_exit_2_with_one_line(tiny_vae_dir, tmp_path, capsys):
    import safetensors.torch

    bad = tmp_path / "nan"
    shutil.copytree(tiny_vae_dir, bad)
    weights = bad / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    state["decoder.conv_out.weight"] = torch.full_like(state["decoder.conv_out.weight"], float("nan"))
    safetensors.torch.save_file(state, weights)
    assert serve.main(["--model", f"m={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vae serve: error:")
    assert "NaN or Inf" in err and "decoder.conv_out.weight" in err


def test_sigterm_past_the_grace_period_answers_503_and_exits_by_the_deadline(tmp_path):
    """issue 12, finding 7: a model call longer than --grace-seconds (one untiled forward pass,
    which cannot stop at a tile boundary) gets a JSON 503 with Retry-After, not uvicorn's
    plain-text 500, and the process exits 0 by the deadline instead of waiting for the call."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from app.protocol import wire
    from support import make_tiny_vae

    slow = tmp_path / "slow"  # no attention: an untiled 2048x2048 decode is long but light on memory
    make_tiny_vae(block_out_channels=[8, 16, 64, 128], mid_block_add_attention=False).save_pretrained(slow)
    grace = 2.0
    proc, base = _start(slow, "--grace-seconds", str(grace))
    try:
        z = torch.zeros(1, 4, 256, 256)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(requests.post, base + "/decode", data=wire.tensor_to_raw(z), timeout=120,
                                  params={"shape": "1,4,256,256", "output_type": "pt", "tiled": "false"},
                                  headers={"Content-Type": "tensor/binary"})
            deadline = time.monotonic() + 60
            while "vae_model_in_flight 1.0" not in requests.get(base + "/metrics", timeout=5).text:
                assert time.monotonic() < deadline and not running.done(), "the request never reached the model"
                time.sleep(0.05)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            r = running.result()
            answered = time.monotonic() - t0
        assert proc.wait(timeout=30) == 0
        exited = time.monotonic() - t0
        print(f"\nSIGTERM with --grace-seconds {grace}: 503 after {answered:.2f} s, process gone after {exited:.2f} s")
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text[:200]
        assert r.json()["error"]["type"] == "unavailable" and r.headers["Retry-After"] == "1"
        assert answered <= grace and exited <= grace + 0.5  # abort_margin: answers go out before the deadline
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
