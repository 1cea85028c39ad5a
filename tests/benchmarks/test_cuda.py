"""CUDA tests of the service (marker `gpu`): `vae serve --device cuda` subprocesses over HTTP,
diffusers in process for preconditions. Skipped without `torch.cuda.is_available()`; run by
`bash benchmarks/gpu_check.sh` on a lent GPU machine.

Tolerances (stated; PSNR of images in [-1, 1], peak-to-peak 2):
  * half precision against float32, the shipped model, a 256x256 photo's latents:
    bfloat16 >= 40 dB, float16 >= 50 dB (fp16 has 3 more mantissa bits); encoder latents:
    relative L2 error <= 1e-2 (bf16) / 2e-3 (fp16). On this project's CPU: bfloat16 54.6 dB and
    2.6e-3 (served), float16 74.8 dB and 3.0e-4 (diffusers in process).
  * force_upcast (float16 asked, the config says it overflows): runs in float32, equal to the
    float32 server within 1e-3 (max abs)
  * NaN retry: a model that overflows in float16 answers finite images, >= 60 dB against the
    float32 server's (the retry's float32 copy has float16-rounded weights: 81 dB on a CPU)
  * torch.compile: no worse than 3 dB below eager bfloat16 against float32, and >= 30 dB
  * tiling (`?tiled=true`, 384-pixel tiles) against untiled, a 512x512 photo: >= 28 dB and not
    identical (CPU: 31.9 dB float32, 32.2 dB bfloat16), and its PSNR against the photo at most
    0.3 dB below the untiled one's (CPU: tiled 0.3 dB better)
  * batched against unbatched answers (8 concurrent requests, batches observed in /metrics):
    float32 >= 50 dB, bfloat16 >= 35 dB

`VAE_GPU_TESTS_ON_CPU=1` runs what a CPU can (bfloat16, tiling, batching; no float16; compile
only with `VAE_GPU_TESTS_COMPILE=1`) to check the tests themselves without a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import harness
from benchmarks.harness import Client, Server

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("VAE_GPU_TESTS_ON_CPU") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device (torch.cuda.is_available() is false)")]

HALF = ["bfloat16"] + (["float16"] if DEVICE == "cuda" else [])
COMPILE = DEVICE == "cuda" or os.environ.get("VAE_GPU_TESTS_COMPILE") == "1"
SERVER_FLAGS = ["--tile-size", "384", "--max-batch-size", "8", "--batch-wait-ms", "50", "--log-format", "text"]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def _overflow_vae():
    """Tiny VAE whose decoder input is scaled by 1e5: inf in float16, finite in float32 (the
    GroupNorms bring the activations back)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**harness.TINY_CONFIG, force_upcast=False).eval()
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(1e5)
        vae.post_quant_conv.bias.zero_()
    return vae


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("cuda-models")
    shipped = root / "shipped"
    shutil.copytree(harness.SHIPPED_MODEL, shipped, ignore=shutil.ignore_patterns("eval", "README.md"))
    cfg = json.loads((shipped / "config.json").read_text())
    cfg["force_upcast"] = False  # so that float16 really runs in float16
    (shipped / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    AutoencoderKL(**harness.TINY_CONFIG, force_upcast=True).eval().save_pretrained(root / "upcast")
    _overflow_vae().save_pretrained(root / "overflow")
    return {"shipped": shipped, "upcast": root / "upcast", "overflow": root / "overflow"}


@pytest.fixture(scope="module")
def servers(model_dirs, tmp_path_factory):
    """float32, each half precision and (on CUDA) a compiled bfloat16 server, started together."""
    logs = tmp_path_factory.mktemp("cuda-logs")
    models = [a for name, path in model_dirs.items() for a in ("--model", f"{name}={path}")]
    specs = {"float32": ["--dtype", "float32"], **{h: ["--dtype", h] for h in HALF}}
    out = {}
    for key, extra in specs.items():
        port = harness.free_port()
        argv = harness.vae_command("serve", *models, "--device", DEVICE, "--port", str(port), *SERVER_FLAGS, *extra)
        out[key] = Server(key, argv, port, {"PYTHONUNBUFFERED": "1"}, logs / f"{key}.log").start()
    if COMPILE:
        port = harness.free_port()
        argv = harness.vae_command("serve", "--model", f"shipped={model_dirs['shipped']}", "--device", DEVICE,
                                   "--port", str(port), *SERVER_FLAGS, "--dtype", "bfloat16", "--compile")
        out["compiled"] = Server("compiled", argv, port, {"PYTHONUNBUFFERED": "1"}, logs / "compiled.log").start()
    try:
        for s in out.values():
            if s.name != "compiled":
                s.wait_ready(timeout=600)
        yield out
    finally:
        for s in out.values():
            s.stop()


def _encode(server: Server, model: str, size: int = 256, index: int = 0) -> tuple[np.ndarray, bytes, list[int]]:
    c = Client(server.url)
    try:
        status, headers, body = c.post(f"/encode?model={model}", harness.png_bytes(harness.photo(size, index)), "image/png")
    finally:
        c.close()
    assert status == 200, body[:300]
    shape = json.loads(headers["shape"])
    return np.frombuffer(body, "<f4").reshape(shape), body, shape


def _decode(server: Server, model: str, body: bytes, shape, **params) -> np.ndarray:
    path = harness.decode_path(shape, None, "pt", {"model": model, **{k: str(v).lower() for k, v in params.items()}})
    c = Client(server.url)
    try:
        status, headers, data = c.post(path, body)
    finally:
        c.close()
    assert status == 200, data[:300]
    return np.frombuffer(data, "<f4").reshape(json.loads(headers["shape"]))


def _describe(server: Server, model: str) -> dict:
    c = Client(server.url)
    try:
        status, _, data = c.get("/v1/models")
    finally:
        c.close()
    assert status == 200
    return next(m for m in json.loads(data)["models"] if m["name"] == model)


@pytest.mark.parametrize("half", HALF)
def test_half_precision_matches_float32(servers, half):
    z32, body, shape = _encode(servers["float32"], "shipped")
    zh, _, _ = _encode(servers[half], "shipped")
    rel = float(np.linalg.norm(zh - z32) / np.linalg.norm(z32))
    x32 = _decode(servers["float32"], "shipped", body, shape)
    xh = _decode(servers[half], "shipped", body, shape)
    psnr = _psnr(xh, x32)
    print(f"{half}: decode {psnr:.2f} dB against float32, encode rel. L2 {rel:.2e}")
    assert _describe(servers[half], "shipped")["dtype"] == half
    assert np.isfinite(xh).all()
    assert "model shipped: non-finite" not in Path(servers[half].log_path).read_text()  # no float32 retry hid it
    assert psnr >= {"bfloat16": 40.0, "float16": 50.0}[half]
    assert rel <= {"bfloat16": 1e-2, "float16": 2e-3}[half]


@pytest.mark.skipif(DEVICE != "cuda", reason="float16 is served on CUDA only")
def test_force_upcast_runs_in_float32(servers):
    assert _describe(servers["float16"], "upcast")["dtype"] == "float32"
    assert _describe(servers["float16"], "shipped")["dtype"] == "float16"  # the control: no upcast flag
    body = harness.random_latents([1, 4, 16, 16], seed=3)
    a = _decode(servers["float16"], "upcast", body, [1, 4, 16, 16])
    b = _decode(servers["float32"], "upcast", body, [1, 4, 16, 16])
    assert float(np.abs(a - b).max()) <= 1e-3


@pytest.mark.skipif(DEVICE != "cuda", reason="float16 is served on CUDA only")
def test_nan_in_float16_is_retried_in_float32(servers):
    shape = [1, 4, 16, 16]
    body = harness.random_latents(shape, seed=4)
    z = torch.from_numpy(np.frombuffer(body, "<f4").reshape(shape).copy())
    with torch.inference_mode():  # the precondition: this model really overflows in float16
        vae = _overflow_vae().to(DEVICE)
        assert torch.isfinite(vae.decode(z.to(DEVICE)).sample).all()
        assert not torch.isfinite(vae.half().decode(z.to(DEVICE, torch.float16)).sample).all()
    a = _decode(servers["float16"], "overflow", body, shape)
    b = _decode(servers["float32"], "overflow", body, shape)
    assert np.isfinite(a).all()
    assert _psnr(a, b) >= 60.0
    assert "retrying in float32" in Path(servers["float16"].log_path).read_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiled_decode_matches_untiled(servers, dtype):
    _, body, shape = _encode(servers["float32"], "shipped", size=512, index=2)
    untiled = _decode(servers[dtype], "shipped", body, shape, tiled=False)
    tiled = _decode(servers[dtype], "shipped", body, shape, tiled=True)
    photo = (np.asarray(harness.photo(512, 2), dtype=np.float32) / 127.5 - 1).transpose(2, 0, 1)[None]
    psnr = _psnr(tiled, untiled)
    loss = _psnr(np.clip(untiled, -1, 1), photo) - _psnr(np.clip(tiled, -1, 1), photo)
    print(f"{dtype}: tiled against untiled {psnr:.2f} dB; against the photo tiled loses {loss:.3f} dB")
    assert tiled.shape == untiled.shape == (1, 3, 512, 512)
    assert not np.array_equal(tiled, untiled)  # tiling really ran
    assert psnr >= 28.0
    assert loss <= 0.3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_equals_unbatched(servers, dtype):
    server = servers[dtype]
    shape = [1, 4, 16, 16]
    bodies = [harness.random_latents(shape, seed=10 + i) for i in range(8)]
    alone = [_decode(server, "shipped", b, shape) for b in bodies]
    before = harness.scrape(server.url)
    together: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def one(i):
        barrier.wait()
        together[i] = _decode(server, "shipped", bodies[i], shape)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = harness.scrape(server.url)
    batches = harness.metric(after, "vae_batch_size_count") - harness.metric(before, "vae_batch_size_count")
    rows = harness.metric(after, "vae_batch_size_sum") - harness.metric(before, "vae_batch_size_sum")
    assert rows == len(bodies) and batches < len(bodies), f"no batch formed: {rows} rows in {batches} passes"
    worst = min(_psnr(a, b) for a, b in zip(together, alone))
    print(f"{dtype}: {rows:.0f} requests in {batches:.0f} passes; worst batched vs alone {worst:.2f} dB")
    assert worst >= {"float32": 50.0, "bfloat16": 35.0}[dtype]


@pytest.mark.skipif(not COMPILE, reason="torch.compile is checked on CUDA (or with VAE_GPU_TESTS_COMPILE=1)")
def test_compiled_matches_eager(servers):
    servers["compiled"].wait_ready(timeout=600)  # its warm-up compiles: waited for last
    assert _describe(servers["compiled"], "shipped")["compiled"] is True
    _, body, shape = _encode(servers["float32"], "shipped", index=1)
    ref = _decode(servers["float32"], "shipped", body, shape)
    eager = _psnr(_decode(servers["bfloat16"], "shipped", body, shape), ref)
    compiled = _psnr(_decode(servers["compiled"], "shipped", body, shape), ref)
    print(f"against float32: eager bfloat16 {eager:.2f} dB, compiled {compiled:.2f} dB")
    assert compiled >= eager - 3.0 and compiled >= 30.0
