"""API keys, CORS, request ids, JSON logs, /metrics, readiness while draining (in-process)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.protocol import wire
from app.http.observability import JsonFormatter, REQUEST_ID
from app.http.lifecycle import begin_drain
from app.http.app import create_app
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from models.vae import imaging
from models.vae.inference import VAEModel
from support import gradient_image

PNG = imaging.encode_image(gradient_image(16, 16), "png")
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def model(tiny_vae_dir):
    return VAEModel.load("tiny", tiny_vae_dir)


def client_for(model, **settings) -> TestClient:
    app = create_app(Settings(warmup=False, **settings), ModelRegistry([model]))
    return TestClient(app, raise_server_exceptions=False)


def samples(c: TestClient) -> dict:
    out = {}
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_api_keys(model):
    with client_for(model, api_keys=[KEY, "other"]) as c:
        for path in ("/healthz", "/readyz", "/metrics", "/", "/static/app.js"):
            assert c.get(path).status_code == 200, path
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": "Bearer "}, {"Authorization": f"Bearer {KEY}x"}):
            r = c.post("/roundtrip", content=PNG, headers={"Content-Type": "image/png", **headers})
            assert r.status_code == 401, headers
            assert r.json()["error"]["type"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
        assert c.get("/v1/models").status_code == 401
        assert c.get("/openapi.json").status_code == 401
        for key in (KEY, "other"):
            r = c.post("/roundtrip", content=PNG, headers={"Content-Type": "image/png", "Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        m = samples(c)
        assert m[("vae_requests_total", (("method", "POST"), ("route", "/roundtrip"), ("status", "401")))] == 5


def test_no_keys_means_open_and_no_cors_by_default(model):
    with client_for(model) as c:
        r = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = c.options("/encode", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers


def test_cors_when_configured(model):
    with client_for(model, cors_origins=["https://ok.example"], api_keys=[KEY]) as c:
        pre = c.options("/encode", headers={"Origin": "https://ok.example", "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://ok.example"
        r = c.get("/v1/models", headers={"Origin": "https://ok.example", "Authorization": f"Bearer {KEY}"})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"
        r = c.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
        assert "access-control-allow-origin" not in r.headers


def test_request_id_echoed_or_generated(model):
    with client_for(model) as c:
        assert c.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
        generated = c.get("/healthz").headers["X-Request-ID"]
        assert len(generated) == 32 and generated != c.get("/healthz").headers["X-Request-ID"]
        # Not a safe token (log injection): replaced.
        assert c.get("/healthz", headers={"X-Request-ID": "a\tb"}).headers["X-Request-ID"] != "a\tb"
        assert c.get("/nope").headers["X-Request-ID"]  # errors carry it too


def test_json_access_log_has_the_request_id(model, caplog):
    with client_for(model) as c, caplog.at_level(logging.INFO, logger="vae.access"):
        c.post("/roundtrip", content=PNG, headers={"Content-Type": "image/png", "X-Request-ID": "rid-42"})
    record = next(r for r in caplog.records if r.name == "vae.access")
    token = REQUEST_ID.set("rid-42")  # the formatter reads the id of the request being logged
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    assert line["request_id"] == "rid-42" and line["route"] == "/roundtrip" and line["status"] == 200
    assert line["bytes_in"] == len(PNG) and line["bytes_out"] > 0 and line["duration_ms"] > 0


def test_metrics_cover_routes_stages_bytes_and_model(model):
    with client_for(model) as c:
        assert c.post("/roundtrip", content=PNG, headers={"Content-Type": "image/png"}).status_code == 200
        assert c.post("/roundtrip", content=b"nope", headers={"Content-Type": "image/png"}).status_code == 415
        c.get("/no/such/path")
        text = c.get("/metrics").text
        m = samples(c)
    assert m[("vae_requests_total", (("method", "POST"), ("route", "/roundtrip"), ("status", "200")))] == 1
    assert m[("vae_requests_total", (("method", "POST"), ("route", "/roundtrip"), ("status", "415")))] == 1
    assert m[("vae_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    for stage in ("deserialize", "queue", "compute", "serialize"):
        assert m[("vae_stage_duration_seconds_count", (("route", "/roundtrip"), ("stage", stage)))] >= 1, stage
    assert m[("vae_request_bytes_total", (("route", "/roundtrip"),))] == len(PNG) + 4
    assert m[("vae_response_bytes_total", (("route", "/roundtrip"),))] > 0
    assert m[("vae_batch_size_count", ())] == 1
    for name in ("vae_queue_depth", "vae_requests_in_flight", "vae_model_in_flight", "process_resident_memory_bytes"):
        assert (name, ()) in m, name
    assert 'vae_model_info{' in text and f'sha256="{model.sha256}"' in text and 'name="tiny"' in text


def test_draining_turns_readyz_off_and_refuses_new_work(model):
    with client_for(model) as c:
        assert c.get("/readyz").status_code == 200
        begin_drain(c.app)
        assert c.get("/readyz").status_code == 503 and c.get("/readyz").json()["status"] == "draining"
        r = c.post("/roundtrip", content=PNG, headers={"Content-Type": "image/png"})
        assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["type"] == "unavailable"
        assert c.get("/healthz").status_code == 200  # alive, just not taking work


def test_image_format_allow_list_and_latent_elements(model):
    jpeg = imaging.encode_image(gradient_image(16, 16), "jpg")
    with client_for(model, image_formats=["png"], max_latent_elements=4 * 4 * 4) as c:
        r = c.post("/encode", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 415 and "JPEG is not accepted" in r.json()["error"]["message"]
        assert c.post("/encode", content=PNG, headers={"Content-Type": "image/png"}).status_code == 200
        for n, status in ((4, 200), (5, 413)):  # 16x16 images -> 4x2x2 = 16 latent numbers each
            x = torch.zeros(n, 3, 16, 16)
            r = c.post("/encode", content=wire.tensor_to_raw(x), headers={"Content-Type": "tensor/binary"},
                       params={"shape": json.dumps(list(x.shape)), "dtype": "float32"})
            assert r.status_code == status, r.text
        z = torch.zeros(1, 4, 4, 5)
        r = c.post("/decode", content=wire.tensor_to_raw(z), headers={"Content-Type": "tensor/binary"},
                   params={"shape": json.dumps(list(z.shape)), "dtype": "float32", "output_type": "pt"})
        assert r.status_code == 413 and "80 elements" in r.json()["error"]["message"]


def test_head_probes_and_unknown_model_names_are_short(model):
    with client_for(model) as c:
        for path in ("/healthz", "/readyz"):
            r = c.head(path)
            assert r.status_code == 200 and r.content == b"", path
        name = "m" * 199
        r = c.post("/roundtrip", content=PNG, headers={"Content-Type": "image/png"}, params={"model": name})
        assert r.status_code == 404 and len(r.json()["error"]["message"]) < 150 and name not in r.text


def overflowing_model(tiny_vae_dir, tmp_path) -> VAEModel:
    """Finite weights whose output overflows to Inf: only the warm-up decode can catch this."""
    model = VAEModel.load("hot", tiny_vae_dir)
    with torch.no_grad():
        model.vae.decoder.conv_out.weight.fill_(3e38)
        model.vae.decoder.conv_out.bias.fill_(3e38)
    return model


def test_warmup_that_decodes_to_inf_never_turns_ready(tiny_vae_dir, tmp_path):
    app = create_app(Settings(warmup=True), ModelRegistry([overflowing_model(tiny_vae_dir, tmp_path)]))
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "NaN or Inf" in r.json()["error"]


def test_vae_serve_exits_2_when_warmup_fails(tiny_vae_dir, tmp_path, capsys):
    from app.http.lifecycle import serve

    settings = Settings(warmup=True, port=0, log_level="warning")
    app = create_app(settings, ModelRegistry([overflowing_model(tiny_vae_dir, tmp_path)]))
    assert serve(app, settings) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vae serve: error: model 'hot': a fixed latent decodes to NaN or Inf")
