"""Admission by cost (app/http/cost.py; issue 12, finding 4): a request's compute is estimated from
what it will run (padded size, tiles and passes, frames, samples) and refused with 413 over the
budget before any model work; the estimate is the model's own FLOP count, exactly."""

from __future__ import annotations

import io
import math

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.http import cost
from app.http.app import create_app
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from app.protocol import wire
from models.vae.inference import VAEModel
from models.vae.info import count_flops
from models.vae.loading import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def model(tiny_vae_dir):
    return VAEModel.load("tiny", tiny_vae_dir)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(8, 2048), (40, 24), (96, 96), (1, 300)])
def test_untiled_estimate_is_the_flop_count(model, size):
    costs = cost.cost_model(model)
    h, w = size
    hp, wp = math.ceil(h / 8) * 8, math.ceil(w / 8) * 8  # the padding encode adds
    exact = count_flops(model.vae, (hp, wp))
    assert costs.encode(1, h, w, tiled=False)[0] == pytest.approx(exact["encode"], rel=1e-6)
    assert costs.decode(3, hp // 8, wp // 8, tiled=False)[0] == pytest.approx(3 * exact["decode"], rel=1e-6)


def test_tiled_estimate_counts_the_tiles_and_passes_that_run(tiny_vae_dir):
    """The tiles a tiled encode / decode really runs (shapes seen by the encoder / decoder, both
    passes), each counted like an untiled image, add up to the estimate."""
    model = VAEModel.load("tiled", tiny_vae_dir, tile_size=64, tile_overlap=0.25)
    costs = cost.cost_model(model)
    seen = []
    hooks = [part.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[-2:])))
             for part in (model.vae.encoder, model.vae.decoder)]
    try:
        z = model.encode(torch.zeros(1, 3, 72, 200), tiled=True)
        tiles, seen[:] = list(seen), []
        model.decode(z, tiled=True)
        latent_tiles = list(seen)
    finally:
        for h in hooks:
            h.remove()
    estimate, how = costs.encode(1, 72, 200, tiled=True)
    assert len(tiles) == 2 * 10 and "tiled: 10 tiles x 2 passes" in how  # rows at 0, 48; columns every 48
    assert estimate == pytest.approx(sum(count_flops(model.vae, t)["encode"] for t in tiles), rel=1e-9)
    decode_estimate = costs.decode(1, *z.shape[-2:], tiled=True)[0]
    exact = sum(count_flops(model.vae, (h * 8, w * 8))["decode"] for h, w in latent_tiles)
    assert decode_estimate == pytest.approx(exact, rel=1e-9)


def test_default_budget_admits_a_2048_roundtrip_and_refuses_the_issue_examples():
    """With the shipped model and default settings: figures of issue 12, finding 4."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the shipped default model is not installed")
    settings = Settings()
    costs = cost.cost_model(VAEModel.load("default", DEFAULT_MODEL_DIR))
    g = lambda *parts: sum(p[0] for p in parts) / 1e9  # noqa: E731
    assert g(costs.encode(1, 2048, 2048), costs.decode(1, 256, 256)) < settings.max_cost  # a 2048x2048 /roundtrip
    assert g(costs.encode(1, 1, 4194304)) > settings.max_cost  # the 16 KB 1x4194304 PNG
    interpolate = g(costs.decode(64, 32, 256), costs.encode(1, 256, 2048), costs.encode(1, 256, 2048))
    assert interpolate > settings.max_cost  # /interpolate?steps=64&width=2048&height=256
    # A 1x262144 PNG is charged what it computes: 8x262144 padded pixels, 18.6x a 512x512 one.
    assert g(costs.encode(1, 1, 262144)) / g(costs.encode(1, 512, 512)) == pytest.approx(18.6, abs=0.1)


def test_over_budget_requests_get_413_before_any_model_work(model):
    costs = cost.cost_model(model)
    budget = sum(p[0] for p in (costs.encode(1, 256, 256), costs.decode(1, 32, 32))) / 1e9  # a 256x256 roundtrip
    calls = []
    model_encode, model_decode, model_roundtrip = model.encode, model.decode, model.roundtrip
    app = create_app(Settings(warmup=False, max_cost=budget * 1.01), ModelRegistry([model]))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/v1/models").json()["limits"]["max_cost_gflop"] == pytest.approx(budget * 1.01)
        assert c.get("/v1/models").json()["models"][0]["cost"]["unit"] == "GFLOP"
        try:
            model.encode = lambda *a, **k: calls.append("encode") or model_encode(*a, **k)
            model.decode = lambda *a, **k: calls.append("decode") or model_decode(*a, **k)
            model.roundtrip = lambda *a, **k: calls.append("roundtrip") or model_roundtrip(*a, **k)
            over = [
                c.post("/encode", content=png(65536, 1), headers={"Content-Type": "image/png"}),  # 8x65536 padded
                c.post("/roundtrip", content=png(300, 256), headers={"Content-Type": "image/png"}),
                c.post("/sample", params={"n": 2, "width": 256, "height": 256}),
                c.post("/decode", content=wire.tensor_to_raw(torch.zeros(2, 4, 32, 32)),
                       params={"shape": "2,4,32,32", "output_type": "pt"}, headers={"Content-Type": "tensor/binary"}),
                c.post("/interpolate", params={"steps": 3, "width": 256, "height": 256},
                       files={"a": ("a.png", png(16, 16), "image/png"), "b": ("b.png", png(16, 16), "image/png")}),
            ]
            for r in over:
                assert r.status_code == 413, r.text
                err = r.json()["error"]
                assert err["type"] == "cost_too_high" and "GFLOP" in err["message"] and "budget" in err["message"]
            assert "8x65536 after padding" in over[0].json()["error"]["message"]
            assert calls == []  # refused before the model ran
            ok = c.post("/roundtrip", content=png(256, 256), headers={"Content-Type": "image/png"})
            assert ok.status_code == 200 and calls == ["roundtrip", "decode"]  # VAEModel.roundtrip decodes
        finally:
            del model.encode, model.decode, model.roundtrip


def test_colour_lock_is_charged_its_decodes(model):
    """?colour_lock=N costs N + 1 decodes more and a probe per image (models/vae/colour_lock.py): a
    budget that admits a plain 64x64 encode refuses the locked one, naming the lock, before the model runs."""
    costs = cost.cost_model(model)
    encode, decode = costs.encode(1, 64, 64)[0], costs.decode(1, 8, 8)[0]
    probe = encode + 2 * 4 * decode  # a 64x64 image is its own probe: one encode, 2 C decodes
    assert costs.colour_lock(1, 64, 64, 2)[0] == pytest.approx(3 * decode + probe)
    probe = costs.encode(1, 96, 64)[0] + 2 * 4 * costs.decode(1, 12, 8)[0]  # 200x64 shrinks to 96x64
    assert costs.colour_lock(2, 200, 64, 1)[0] == pytest.approx(2 * 2 * costs.decode(1, 25, 8)[0] + 2 * probe)
    assert costs.colour_lock(1, 64, 64, 0)[0] == 0
    app = create_app(Settings(warmup=False, max_cost=(encode + decode) / 1e9), ModelRegistry([model]))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post("/encode", content=png(64, 64), params={"colour_lock": 0}).status_code == 200
        r = c.post("/encode", content=png(64, 64), params={"colour_lock": 1})
        assert r.status_code == 413
        assert "colour lock: 2 x (decode of 1 x 64x64) + 1 x 64x64 probe" in r.json()["error"]["message"]
        x = torch.zeros(1, 3, 64, 64)
        r = c.post("/encode", content=wire.tensor_to_raw(x), params={"shape": "1,3,64,64", "colour_lock": 1},
                   headers={"Content-Type": "tensor/binary"})
        assert r.status_code == 413, r.text
        assert c.post("/roundtrip", content=png(64, 64)).status_code == 200  # encode + decode: the budget
        r = c.post("/roundtrip", content=png(64, 64), params={"colour_lock": 1})
        assert r.status_code == 413  # encode + the lock's 2 decodes and probe (its last decode is the answer)
        assert "64x64 probe), over" in r.json()["error"]["message"]  # no decode after the lock

