"""`vae encode` / `vae decode` (app.bulk.cli): real images, resume after interruption, --server, shards."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from app.bulk import encoders
from app.bulk import jobs as core
from app.bulk.cli import main
from models.vae import imaging
from models.vae import latent_files as latent_store
from models.vae.inference import VAEModel
from models.metrics import psnr
from support import ROOT, gradient_image, live_server, reference_roundtrip, run


GOOD = ["photo01.png", "photo02.png", "photo03.png", "photo04.png", "odd/alpha.png", "odd/gradient.png", "odd/rotated.jpg"]


@pytest.fixture(scope="module")
def model(tiny_vae_dir) -> VAEModel:
    return VAEModel.load("tiny", tiny_vae_dir)


def test_encode_decode_round_trip_equals_roundtrip(bulk_inputs, model, tiny_vae_dir, tmp_path):
    lat, out = tmp_path / "lat", tmp_path / "out"
    rc, rep = run("encode", bulk_inputs, "--out", lat, "--model", f"tiny={tiny_vae_dir}", "--latent-dtype", "float32",
                  "--batch-size", "1", report=tmp_path / "enc.json")
    assert rc == 1  # one bad input: reported, not fatal
    assert (rep["done"], rep["failed"], rep["skipped"], rep["total"]) == (7, 1, 0, 8)
    assert rep["failures"][0]["input"].endswith("broken.png") and "header" in rep["failures"][0]["reason"]
    assert sorted(p.relative_to(lat).as_posix() for p in lat.rglob("*.safetensors")) == sorted(
        f"{g}.safetensors" for g in GOOD)
    assert rep["bytes_in"] == sum((bulk_inputs / g).stat().st_size for g in GOOD)
    assert rep["bytes_out"] == sum(p.stat().st_size for p in lat.rglob("*.safetensors"))
    meta = latent_store.read_metadata(lat / "odd" / "gradient.png.safetensors")
    assert json.loads(meta["original_size"]) == [29, 37] and meta["model"] == "tiny" and meta["dtype"] == "float32"
    assert meta["model_sha256"] == model.sha256 and float(meta["scaling_factor"]) == model.scaling_factor

    # Batch size 1 both ways: the same computation as /roundtrip, so equal pixels (batching moves a few by 1).
    rc, rep = run("decode", lat, "--out", out, "--model", tiny_vae_dir, "--batch-size", "1", report=tmp_path / "dec.json")
    assert rc == 0 and rep["done"] == 7
    for name in GOOD:
        restored = np.asarray(Image.open(out / Path(name).with_suffix(".png")))
        expected = reference_roundtrip(model, bulk_inputs / name)
        assert restored.shape == expected.shape  # original size (after EXIF rotation) restored
        np.testing.assert_array_equal(restored, expected)
        ref = np.asarray(imaging.open_image(bulk_inputs / name))
        assert psnr(ref, restored) == psnr(ref, expected)
    assert np.asarray(Image.open(out / "odd" / "rotated.png")).shape == (40, 24, 3)


def test_batched_fp16_and_uint8_stay_close(bulk_inputs, model, tiny_vae_dir, tmp_path):
    """Default batching (buckets of several images) and compact dtypes change almost nothing."""
    results = {}
    for label, extra in {"fp16": [], "uint8": ["--quantize", "uint8"]}.items():
        lat, out = tmp_path / f"lat-{label}", tmp_path / f"out-{label}"
        assert run("encode", bulk_inputs, "--out", lat, "--model", tiny_vae_dir, *extra)[0] == 1  # broken.png
        assert run("decode", lat, "--out", out, "--model", tiny_vae_dir)[0] == 0
        results[label] = out
    def tensor_bytes(path: Path) -> int:  # the file minus its header (which holds scale/offset for uint8)
        data = path.read_bytes()
        return len(data) - 8 - int.from_bytes(data[:8], "little")

    sizes = {label: sum(tensor_bytes(p) for p in (tmp_path / f"lat-{label}").rglob("*.safetensors")) for label in results}
    assert sizes["uint8"] * 2 == sizes["fp16"]  # one byte per latent value instead of two
    for name in ["photo01.png", "photo02.png", "odd/alpha.png", "odd/gradient.png"]:
        expected = reference_roundtrip(model, bulk_inputs / name)
        for label, out in results.items():
            got = np.asarray(Image.open(out / Path(name).with_suffix(".png")))
            # vs the exact fp32 round trip: fp16 is indistinguishable, uint8 close.
            assert psnr(expected, got) > (55 if label == "fp16" else 45), (label, name)


def test_rerun_skips_finished_files_and_redoes_changed_settings(bulk_inputs, tiny_vae_dir, tmp_path):
    lat = tmp_path / "lat"
    args = [bulk_inputs, "--out", lat, "--model", tiny_vae_dir]
    run("encode", *args)
    stamps = {p: p.stat().st_mtime_ns for p in lat.rglob("*.safetensors")}
    rc, rep = run("encode", *args, report=tmp_path / "again.json")
    assert (rep["done"], rep["skipped"], rep["failed"]) == (0, 7, 1)
    assert {p: p.stat().st_mtime_ns for p in lat.rglob("*.safetensors")} == stamps
    rc, rep = run("encode", *args, "--latent-dtype", "bfloat16", report=tmp_path / "bf16.json")
    assert (rep["done"], rep["skipped"]) == (7, 0)  # other storage settings: not "done"
    assert latent_store.read_metadata(lat / "photo01.png.safetensors")["dtype"] == "bfloat16"
    rc, rep = run("encode", *args, "--latent-dtype", "bfloat16", "--colour-lock", "1", report=tmp_path / "lock.json")
    assert (rep["done"], rep["skipped"]) == (7, 0)  # latents of another encode: redone
    assert latent_store.read_metadata(lat / "photo01.png.safetensors")["colour_lock"] == "1"
    rc, rep = run("encode", *args, "--latent-dtype", "bfloat16", "--colour-lock", "1", report=tmp_path / "lock2.json")
    assert (rep["done"], rep["skipped"]) == (0, 7)


SLOW_ENCODE = """
import sys, time
from models.vae.inference import VAEModel
encode = VAEModel.encode
def slow(self, *args, **kwargs):
    time.sleep(0.4)
    return encode(self, *args, **kwargs)
VAEModel.encode = slow
from app.bulk.cli import main
sys.exit(main("encode", sys.argv[1:]))
"""


def test_kill_9_loses_nothing_written_and_resumes(bulk_inputs, tiny_vae_dir, tmp_path):
    lat = tmp_path / "lat"
    args = [str(bulk_inputs), "--out", str(lat), "--model", str(tiny_vae_dir), "--batch-size", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ENCODE, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(lat.rglob("*.safetensors"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = list(lat.rglob("*.safetensors"))
    assert 2 <= len(written) < 7, "the job should have been killed mid-way"
    for path in written:  # every visible file is complete
        latent_store.decode_record(path.read_bytes())
    rc, rep = run("encode", bulk_inputs, "--out", lat, "--model", tiny_vae_dir, "--batch-size", "1",
                  report=tmp_path / "resume.json")
    assert (rep["skipped"], rep["done"]) == (len(written), 7 - len(written))
    assert len(list(lat.rglob("*.safetensors"))) == 7
    assert not list(lat.rglob(f"*{latent_store.PARTIAL}"))


class Injected(BaseException):
    """Not an Exception: passes the per-batch error handling, like a crash or Ctrl-C would."""


def test_interrupted_sharded_run_resumes(bulk_inputs, tiny_vae_dir, tmp_path, monkeypatch):
    lat, out = tmp_path / "shards", tmp_path / "out"
    args = [bulk_inputs, "--out", lat, "--model", tiny_vae_dir, "--batch-size", "1", "--shard-size", "2"]
    calls = {"n": 0}
    real = encoders.encode_loaded

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Injected
        return real(*a, **k)

    monkeypatch.setattr(encoders, "encode_loaded", failing)
    with pytest.raises(Injected):
        run("encode", *args)
    monkeypatch.setattr(encoders, "encode_loaded", real)
    shards = sorted(p.name for p in lat.iterdir())
    assert shards == ["shard-000000.tar", "shard-000001.tar"]  # 2 + the 1 in progress, closed on the way out
    rc, rep = run("encode", *args, report=tmp_path / "r.json")
    assert (rep["skipped"], rep["done"]) == (3, 4)
    keys = [name for p in sorted(lat.glob("*.tar")) for name in latent_store.shard_members(p)]
    assert len(keys) == len(set(keys)) == 7
    assert sorted(p.name for p in lat.iterdir())[-1] == "shard-000003.tar"
    rc, rep = run("decode", lat, "--out", out, "--model", tiny_vae_dir, "--format", "webp", report=tmp_path / "d.json")
    assert rc == 0 and rep["done"] == 7
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.webp")) == sorted(
        Path(g).with_suffix(".webp").as_posix() for g in GOOD)


@pytest.fixture()
def flaky_server(tiny_vae_dir):
    """A real server on loopback whose first two /encode and first /decode requests get 503."""
    from fastapi.responses import JSONResponse

    from app.http.app import create_app
    from app.http.settings import Settings

    app = create_app(Settings(models=[f"tiny={tiny_vae_dir}"], model_threads=2))
    busy = {"/encode": 2, "/decode": 1, "served": 0}

    @app.middleware("http")
    async def overloaded(request, call_next):
        if busy.get(request.url.path, 0) > 0:
            busy[request.url.path] -= 1
            busy["served"] += 1
            return JSONResponse({"error": {"type": "overloaded", "message": "try later"}}, status_code=503)
        return await call_next(request)

    with live_server(app) as url:
        yield url, busy


def test_server_mode_retries_and_matches_in_process(bulk_inputs, model, tiny_vae_dir, tmp_path, flaky_server):
    url, busy = flaky_server
    local, remote = tmp_path / "local", tmp_path / "remote"
    run("encode", bulk_inputs, "--out", local, "--model", f"tiny={tiny_vae_dir}", "--latent-dtype", "float32", "--batch-size", "1")
    rc, rep = run("encode", bulk_inputs, "--out", remote, "--server", url, "--concurrency", "3", "--dtype", "float32",
                  report=tmp_path / "r.json")
    assert (rc, rep["done"], rep["failed"]) == (1, 7, 1) and busy["served"] == 2  # retried, not failed
    for name in GOOD:
        a = (local / f"{name}.safetensors").read_bytes()
        b = (remote / f"{name}.safetensors").read_bytes()
        assert latent_store.header_metadata(a) == latent_store.header_metadata(b)
        za, zb = latent_store.decode_record(a)[0], latent_store.decode_record(b)[0]
        torch.testing.assert_close(za, zb, rtol=0, atol=1e-5)

    out_local, out_remote = tmp_path / "img-local", tmp_path / "img-remote"
    run("decode", local, "--out", out_local, "--model", tiny_vae_dir)
    rc, rep = run("decode", local, "--out", out_remote, "--server", url, report=tmp_path / "d.json")
    assert (rc, rep["done"]) == (0, 7) and busy["served"] == 3
    for name in GOOD:
        a = np.asarray(Image.open(out_local / Path(name).with_suffix(".png")), dtype=int)
        b = np.asarray(Image.open(out_remote / Path(name).with_suffix(".png")), dtype=int)
        assert np.abs(a - b).max() <= 1

    # The server's /decode takes a latent file as is (safetensors body; crops to original_size).
    body = (local / "odd" / "gradient.png.safetensors").read_bytes()
    response = requests.post(f"{url}/decode", data=body, headers={"Content-Type": "application/x-safetensors"})
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (37, 29)


def test_colour_lock_local_equals_server(bulk_inputs, model, tiny_vae_dir, tmp_path):
    """`vae encode --colour-lock 1` in-process and against a server give the same latents (each image's
    own pixels are its target, also where its sides are not multiples of 8), recorded as locked."""
    from app.http.app import create_app
    from app.http.settings import Settings

    local, remote = tmp_path / "local", tmp_path / "remote"
    args = ["--colour-lock", "1", "--latent-dtype", "float32"]
    run("encode", bulk_inputs, "--out", local, "--model", f"tiny={tiny_vae_dir}", "--batch-size", "1", *args)
    with live_server(create_app(Settings(models=[f"tiny={tiny_vae_dir}"]))) as url:
        rc, rep = run("encode", bulk_inputs, "--out", remote, "--server", url, *args, report=tmp_path / "r.json")
    assert (rc, rep["done"]) == (1, 7)  # the broken input fails both ways
    for name in GOOD:
        a = latent_store.decode_record((local / f"{name}.safetensors").read_bytes())
        b = latent_store.decode_record((remote / f"{name}.safetensors").read_bytes())
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
        assert a[1]["colour_lock"] == b[1]["colour_lock"] == "1"
    gradient = imaging.to_tensor(imaging.open_image(bulk_inputs / "odd" / "gradient.png"))  # 37 x 29
    assert not torch.equal(model.encode(gradient, colour_lock=1), model.encode(gradient))


def test_decode_reports_bad_latent_files(bulk_inputs, tiny_vae_dir, tmp_path):
    lat, out = tmp_path / "lat", tmp_path / "out"
    run("encode", bulk_inputs / "photo01.png", "--out", lat, "--model", tiny_vae_dir)
    good = (lat / "photo01.png.safetensors").read_bytes()
    z, meta = latent_store.decode_record(good)
    options = latent_store.StoreOptions(meta["model"], meta["model_sha256"], meta["scaling_factor"], None)
    latent_store.write_atomic(lat / "evil.safetensors", latent_store.encode_record(z, options, "../evil.png", (48, 64)))
    (lat / "garbage.safetensors").write_bytes(b"garbage")
    rc, rep = run("decode", lat, "--out", out, "--model", tiny_vae_dir, "--format", "jpg", report=tmp_path / "r.json")
    assert (rc, rep["done"], rep["failed"]) == (1, 1, 2)
    reasons = " ".join(f["reason"] for f in rep["failures"])
    assert "unsafe" in reasons and "safetensors" in reasons
    assert [p.name for p in out.iterdir()] == ["photo01.jpg"] and not (tmp_path / "evil.jpg").exists()
    assert Image.open(out / "photo01.jpg").size == (64, 48)
    rc, rep = run("decode", lat / "photo01.png.safetensors", "--out", out, "--model", tiny_vae_dir,
                  "--format", "jpg", report=tmp_path / "again.json")
    assert (rep["skipped"], rep["done"]) == (1, 0)


def test_collect_inputs_files_folders_globs(bulk_inputs):
    items, problems = core.collect_inputs([str(bulk_inputs / "odd"), str(bulk_inputs / "*.png"), str(bulk_inputs / "nope")])
    assert [i.rel for i in items] == ["alpha.png", "gradient.png", "rotated.jpg", "broken.png",
                                      "photo01.png", "photo02.png", "photo03.png", "photo04.png"]
    assert problems == [(str(bulk_inputs / "nope"), "no such file or folder")]
    items, problems = core.collect_inputs([str(bulk_inputs / "**" / "*.png"), str(bulk_inputs / "odd" / "alpha.png")])
    assert "odd/alpha.png" in [i.rel for i in items] and "alpha.png" in [i.rel for i in items]
    items, problems = core.collect_inputs([str(bulk_inputs / "odd"), str(bulk_inputs / "odd" / "alpha.png")])
    assert len(problems) == 1 and "same relative path" in problems[0][1]


def test_plan_batches_groups_size_buckets(bulk_inputs):
    items, _ = core.collect_inputs([str(bulk_inputs)])
    batches, failures = core.plan_batches(items, batch_size=2, multiple=8)
    assert [f.item.rel for f in failures] == ["broken.png"]
    assert [[i.rel for i in b] for b in batches] == [
        ["odd/gradient.png"],  # 29x37 -> 32x40
        ["odd/alpha.png", "odd/rotated.jpg"],  # 40x24 (rotated.jpg after EXIF rotation)
        ["photo01.png", "photo02.png"], ["photo03.png"],  # 48x64
        ["photo04.png"],  # 56x72
    ]


def test_retry_helper_backs_off_then_gives_up():
    from app.client import VAEClientError

    sleeps, calls = [], {"n": 0}

    def busy():
        calls["n"] += 1
        raise VAEClientError(503, "overloaded", "busy")

    with pytest.raises(VAEClientError):
        encoders.call_with_retries(busy, retries=3, backoff=1.0, sleep=sleeps.append)
    assert calls["n"] == 4 and len(sleeps) == 3 and sleeps[0] <= 1.0 < sleeps[2] <= 4.0

    def bad_request():
        calls["n"] += 1
        raise VAEClientError(415, "unsupported", "nope")

    calls["n"] = 0
    with pytest.raises(VAEClientError):
        encoders.call_with_retries(bad_request, retries=3, sleep=sleeps.append)
    assert calls["n"] == 1  # a client error is never retried


def test_no_model_is_a_clear_error(bulk_inputs, tmp_path, capsys, monkeypatch):
    import models.vae.loading

    # As on an install without the shipped default model.
    monkeypatch.setattr(models.vae.loading, "DEFAULT_MODEL_DIR", tmp_path / "no-default")
    assert main("encode", [str(bulk_inputs), "--out", str(tmp_path / "x")]) == 2
    assert "--model" in capsys.readouterr().err


def test_codec_table_script(bulk_inputs, tiny_vae_dir, tmp_path, capsys):
    from benchmarks.codec_table import main as codec_table

    data = tmp_path / "images"
    data.mkdir()
    for name in ["photo01.png", "photo04.png"]:
        (data / name).write_bytes((bulk_inputs / name).read_bytes())
    assert codec_table(["--model", str(tiny_vae_dir), "--data", str(data), "--json", str(tmp_path / "t.json")]) == 0
    table = capsys.readouterr().out
    assert table.count("\n| ") == 10 and "| PNG (lossless) |" in table and "| VAE latents uint8 |" in table
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert rows["VAE latents uint8"]["bytes_per_image"] < rows["VAE latents float16"]["bytes_per_image"] \
        < rows["VAE latents float32"]["bytes_per_image"]
    assert rows["PNG (lossless)"]["psnr"] == 100.0 and rows["JPEG q90"]["psnr"] > 30
