"""The HTTP service in-process (FastAPI TestClient): endpoints, formats, every error class."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.protocol import wire
from app.http.app import create_app
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from models.vae import imaging
from models.vae.inference import VAEModel
from models.metrics import psnr
from support import gradient_image


@pytest.fixture(scope="module")
def models(tiny_vae_dir):
    return [VAEModel.load("tiny", tiny_vae_dir), VAEModel.load("other", tiny_vae_dir)]


@pytest.fixture(scope="module")
def client(models):
    settings = Settings(max_pixels=64 * 64, max_body_bytes=200_000)
    app = create_app(settings, ModelRegistry(models))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def model(models):
    return models[0]


def png(img: Image.Image) -> bytes:
    return imaging.encode_image(img, "png")


def raw_params(t: torch.Tensor, **extra) -> dict:
    return {"shape": list(t.shape), "dtype": wire.dtype_name(t.dtype), **extra}


def tensor_of(response) -> torch.Tensor:
    shape = tuple(json.loads(response.headers["shape"]))
    return wire.tensor_from_raw(response.content, shape, wire.parse_dtype(response.headers["dtype"]))


def assert_error(response, status: int, type_: str, words: str):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["type"] == type_ and words in err["message"], err
    assert "Traceback" not in response.text


# --- health and discovery --------------------------------------------------------------------

def test_health_ready_models_docs(client, model):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "models": ["tiny", "other"]}
    doc = client.get("/v1/models").json()
    assert doc["default"] == "tiny"
    first = doc["models"][0]
    for key in ("name", "latent_channels", "downsample_factor", "scaling_factor", "shift_factor",
                "dtype", "device", "parameters", "sha256"):
        assert key in first
    assert first["sha256"] == model.sha256 and first["parameters"] == model.param_counts()["total"]
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/encode", "/decode", "/roundtrip", "/v1/models"} <= set(paths)


def test_readyz_is_503_before_warmup(models):
    app = create_app(Settings(), ModelRegistry(models[:1]))
    assert TestClient(app).get("/readyz").status_code == 503  # lifespan not run: not warmed


# --- /encode ---------------------------------------------------------------------------------

def test_encode_image_equals_posterior_mode(client, model):
    img = gradient_image(24, 16)
    r = client.post("/encode", content=png(img))  # no Content-Type, like remote_encode
    assert r.status_code == 200 and r.headers["dtype"] == "float32"
    expected = model.vae.encode(imaging.to_tensor(img)).latent_dist.mode()
    assert torch.equal(tensor_of(r), expected)
    assert json.loads(r.headers["X-Original-Size"]) == [16, 24]


def test_encode_scaling_sample_seed_dtype(client, model):
    img = png(gradient_image(16, 16))
    x = imaging.to_tensor(gradient_image(16, 16))
    z = model.vae.encode(x).latent_dist.mode()
    scaled = tensor_of(client.post("/encode", content=img, params={"scaling_factor": 0.18215, "shift_factor": 0.1}))
    assert torch.equal(scaled, (z - 0.1) * 0.18215)
    a = tensor_of(client.post("/encode", content=img, params={"sample": "true", "seed": 3}))
    b = tensor_of(client.post("/encode", content=img, params={"sample": "True", "seed": 3}))
    expected = model.vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a, expected) and not torch.equal(a, z)
    half = client.post("/encode", content=img, params={"dtype": "bfloat16"})
    assert half.headers["dtype"] == "bfloat16" and torch.equal(tensor_of(half), z.to(torch.bfloat16))


def test_encode_multipart_and_tensor_bodies(client, model):
    img = gradient_image(16, 16)
    expected = model.vae.encode(imaging.to_tensor(img)).latent_dist.mode()
    r = client.post("/encode", files={"image": ("x.png", png(img), "image/png")})
    assert torch.equal(tensor_of(r), expected)
    x = imaging.to_tensor(img)
    for shape in ([str(d) for d in x.shape], [json.dumps(list(x.shape))], [",".join(map(str, x.shape))]):
        r = client.post("/encode", content=wire.tensor_to_raw(x), params={"shape": shape, "dtype": "float32"},
                        headers={"Content-Type": "tensor/binary"})
        assert torch.equal(tensor_of(r), expected), shape
    r = client.post("/encode", content=wire.tensor_to_safetensors(x, "images"),
                    headers={"Content-Type": wire.SAFETENSORS})
    assert torch.equal(tensor_of(r), expected)


@pytest.mark.parametrize("accept", [wire.SAFETENSORS, wire.NPY, wire.JSON, "application/octet-stream", "tensor/binary"])
def test_encode_response_formats(client, model, accept):
    img = gradient_image(20, 12)  # not multiples of 8: padded for the model
    expected = model.encode(imaging.to_tensor(img))
    r = client.post("/encode", content=png(img), headers={"Accept": accept}, params={"scaling_factor": 0.5})
    assert r.status_code == 200 and r.headers["content-type"].startswith(accept)
    assert json.loads(r.headers["shape"]) == [1, 4, 2, 3]
    if accept == wire.SAFETENSORS:
        z = safetensors.torch.load(r.content)["latents"]
        meta = wire._safetensors_metadata(r.content)
        assert meta["model"] == "tiny" and json.loads(meta["original_size"]) == [12, 20]
        assert json.loads(meta["scaling_factor"]) == 0.5
    elif accept == wire.NPY:
        z = torch.from_numpy(np.load(io.BytesIO(r.content)))
    elif accept == wire.JSON:
        doc = r.json()
        z = torch.tensor(doc["data"])
        assert doc["original_size"] == [12, 20] and doc["model"] == "tiny"
    else:
        z = tensor_of(r)
    assert torch.equal(z, expected * 0.5)


def test_model_selection(client):
    img = png(gradient_image(16, 16))
    assert client.post("/encode", content=img, params={"model": "other"}).headers["X-Model"] == "other"
    assert client.post("/encode", content=img).headers["X-Model"] == "tiny"


# --- /decode ---------------------------------------------------------------------------------

def _latents(model, w=24, h=16):
    return model.encode(imaging.to_tensor(gradient_image(w, h)))


def test_decode_outputs(client, model):
    z = _latents(model)
    body, params = wire.tensor_to_raw(z), raw_params(z)
    headers = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
    x = model.vae.decode(z).sample
    r = client.post("/decode", content=body, params={**params, "output_type": "pt", "partial_postprocess": "False"}, headers=headers)
    assert torch.equal(tensor_of(r), x)
    r = client.post("/decode", content=body, params={**params, "output_type": "pt", "partial_postprocess": "True"}, headers=headers)
    out = tensor_of(r)
    assert out.dtype == torch.uint8 and torch.equal(out, imaging.to_uint8(x))
    r = client.post("/decode", content=body, params={**params, "image_format": "png"})
    assert r.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), imaging.to_uint8(x)[0].numpy())
    for fmt, media in (("jpg", "image/jpeg"), ("webp", "image/webp")):
        r = client.post("/decode", content=body, params={**params, "image_format": fmt})
        assert r.headers["content-type"] == media
        # Same codec and quality in-process: decoded pixels are identical.
        local = imaging.encode_image(imaging.to_pil(x)[0], fmt, quality=95)
        assert np.array_equal(np.asarray(imaging.open_image(r.content)), np.asarray(imaging.open_image(local)))


def test_decode_scaling_semantics(client, model):
    z = _latents(model)
    x = model.vae.decode(z).sample
    def pt(t, **params):
        r = client.post("/decode", content=wire.tensor_to_raw(t),
                        params={**raw_params(t), "output_type": "pt", **params})
        return tensor_of(r)
    assert torch.equal(pt(z), x)  # nothing asked: raw latents
    assert torch.allclose(pt(z * 0.5, do_scaling="True"), x, atol=1e-6)  # the model's own factor (0.5)
    assert torch.allclose(pt((z - 0.2) * 0.3, scaling_factor=0.3, shift_factor=0.2), x, atol=1e-5)


def test_decode_other_body_formats_and_crop(client, model):
    z = model.encode(imaging.to_tensor(gradient_image(21, 13)))
    enc = client.post("/encode", content=png(gradient_image(21, 13)), headers={"Accept": wire.SAFETENSORS})
    r = client.post("/decode", content=enc.content, headers={"Content-Type": wire.SAFETENSORS},
                    params={"output_type": "pt"})
    assert json.loads(r.headers["shape"]) == [1, 3, 13, 21]  # cropped by the original_size metadata
    expected = model.decode(z, (13, 21))
    assert torch.equal(tensor_of(r), expected)
    npy = wire.tensor_to_npy(z)
    r = client.post("/decode", content=npy, headers={"Content-Type": wire.NPY},
                    params={"output_type": "pt", "height": 13, "width": 21})
    assert torch.equal(tensor_of(r), expected)
    r = client.post("/decode", content=wire.tensor_to_json(z), headers={"Content-Type": wire.JSON},
                    params={"output_type": "pt", "partial_postprocess": "true"})
    assert torch.equal(tensor_of(r), imaging.to_uint8(model.decode(z)))


def test_decode_batch(client, model):
    z = torch.cat([_latents(model), _latents(model) * 0.5])
    r = client.post("/decode", content=wire.tensor_to_raw(z),
                    params={**raw_params(z), "output_type": "pt", "partial_postprocess": "True"})
    assert tensor_of(r).shape == (2, 16, 24, 3)
    assert_error(client.post("/decode", content=wire.tensor_to_raw(z), params=raw_params(z)),
                 422, "unprocessable", "batch of 2")


# --- /roundtrip ------------------------------------------------------------------------------

def test_roundtrip(client, model):
    img = gradient_image(21, 13)
    r = client.post("/roundtrip", content=png(img))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(r.content))
    assert out.size == (21, 13)
    x = imaging.to_tensor(img)
    expected = imaging.to_uint8(model.decode(model.encode(x), (13, 21)))[0].numpy()
    assert np.array_equal(np.asarray(out), expected)
    assert float(r.headers["X-PSNR"]) == pytest.approx(psnr(np.asarray(img), expected), abs=1e-3)
    assert -1 <= float(r.headers["X-SSIM"]) <= 1
    assert json.loads(r.headers["X-Latent-Shape"]) == [1, 4, 2, 3]
    assert json.loads(r.headers["X-Original-Size"]) == [13, 21]
    assert client.post("/roundtrip", content=png(img), headers={"Accept": "image/jpeg"}).headers["content-type"] == "image/jpeg"
    assert client.post("/roundtrip", files={"image": ("a.png", png(img))},
                       params={"image_format": "webp"}).headers["content-type"] == "image/webp"


def test_encode_and_roundtrip_colour_lock(client, model):
    """?colour_lock=N runs the model's colour lock (models/vae/colour_lock.py): the same latents as
    in-process, recorded in the file's metadata; the roundtrip decodes them."""
    img = gradient_image(24, 16)
    x = imaging.to_tensor(img)
    expected = model.encode(x, colour_lock=2)
    assert not torch.equal(expected, model.encode(x))  # the lock moves this image's latents
    r = client.post("/encode", content=png(img), params={"colour_lock": 2}, headers={"Accept": wire.SAFETENSORS})
    assert r.status_code == 200, r.text
    loaded = safetensors.torch.load(r.content)
    assert torch.equal(next(iter(loaded.values())), expected)
    header = json.loads(r.content[8 : 8 + int.from_bytes(r.content[:8], "little")])
    assert header["__metadata__"]["colour_lock"] == "2"
    rt = client.post("/roundtrip", content=png(img), params={"colour_lock": 1})
    assert rt.status_code == 200
    want = imaging.to_uint8(model.decode(model.encode(x, colour_lock=1), (16, 24)))[0].numpy()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rt.content))), want)
    for bad in ("4", "-1", "yes"):
        for path in ("/encode", "/roundtrip"):
            assert_error(client.post(path, content=png(img), params={"colour_lock": bad}), 400, "bad_request",
                         "colour_lock")


# --- errors ----------------------------------------------------------------------------------

def test_error_400_malformed(client, model):
    z = _latents(model)
    assert_error(client.post("/decode", content=b"abc", params=raw_params(z)), 400, "bad_request", "needs")
    assert_error(client.post("/decode", content=wire.tensor_to_raw(z), params={"shape": ["1", "x"]}),
                 400, "bad_request", "shape")
    assert_error(client.post("/decode", content=wire.tensor_to_raw(z)), 400, "bad_request", "shape")
    assert_error(client.post("/decode", content=b"{not json", headers={"Content-Type": wire.JSON}),
                 400, "bad_request", "JSON")
    assert_error(client.post("/decode", content=b"junk", headers={"Content-Type": wire.SAFETENSORS}),
                 400, "bad_request", "safetensors")
    data = png(gradient_image(32, 32))
    assert_error(client.post("/encode", content=data[:60]), 400, "bad_request", "cannot decode")
    assert_error(client.post("/encode", content=b""), 400, "bad_request", "empty")
    assert_error(client.post("/encode", content=data, params={"seed": "abc"}), 400, "bad_request", "seed")
    assert_error(client.post("/decode", content=wire.tensor_to_raw(z), params={**raw_params(z), "scaling_factor": 0}),
                 400, "bad_request", "scaling_factor")
    assert_error(client.post("/decode", content=wire.tensor_to_raw(z), params={**raw_params(z), "output_type": "mp4"}),
                 400, "bad_request", "output_type")
    assert_error(client.post("/encode", files={"file": ("a.png", data)}), 400, "bad_request", "image")


def test_error_404(client):
    assert_error(client.post("/encode", content=png(gradient_image(8, 8)), params={"model": "nope"}),
                 404, "model_not_found", "nope")
    assert_error(client.get("/nowhere"), 404, "not_found", "Not Found")


def test_error_413(client):
    assert_error(client.post("/encode", content=png(gradient_image(80, 80))), 413, "payload_too_large", "pixels")
    assert_error(client.post("/encode", content=b"\x89PNG\r\n\x1a\n" + bytes(300_000)), 413, "payload_too_large", "bytes")
    z = torch.zeros(1, 4, 9, 9)  # decodes to 72x72 > 64x64
    assert_error(client.post("/decode", content=wire.tensor_to_raw(z), params=raw_params(z)),
                 413, "payload_too_large", "pixels")


def test_error_415(client):
    gif = io.BytesIO()
    gradient_image(8, 8).save(gif, format="GIF")
    assert_error(client.post("/encode", content=gif.getvalue()), 415, "unsupported_media_type", "PNG, JPEG or WebP")
    assert_error(client.post("/encode", content=b"plain text", headers={"Content-Type": "text/plain"}),
                 415, "unsupported_media_type", "unsupported image format")
    z = torch.zeros(1, 4, 2, 2)
    assert_error(client.post("/decode", content=wire.tensor_to_raw(z), headers={"Content-Type": "text/csv"}),
                 415, "unsupported_media_type", "Content-Type")


def test_error_422(client):
    def decode(t, **params):
        return client.post("/decode", content=wire.tensor_to_raw(t), params={**raw_params(t), **params})
    assert_error(decode(torch.zeros(1, 3, 2, 2)), 422, "unprocessable", "channels")
    assert_error(decode(torch.zeros(4, 2, 2)), 422, "unprocessable", "packed")
    assert_error(decode(torch.zeros(1, 1, 4, 2, 2)), 422, "unprocessable", "shape")
    nan = torch.zeros(1, 4, 2, 2)
    nan[0, 0, 0, 0] = float("nan")
    assert_error(decode(nan), 422, "unprocessable", "NaN")
    inf = torch.zeros(1, 4, 2, 2)
    inf[0, 1, 1, 1] = float("inf")
    assert_error(decode(inf), 422, "unprocessable", "Inf")
    assert_error(decode(torch.zeros(1, 4, 2, 2, dtype=torch.uint8)), 422, "unprocessable", "float")
    assert_error(client.post("/decode", content=bytes(64), params={"shape": [1, 4, 2, 2], "dtype": "int64"}),
                 422, "unprocessable", "dtype")
    x = torch.zeros(1, 3, 8, 8)
    def encode(t, **params):
        return client.post("/encode", content=wire.tensor_to_raw(t), params={**raw_params(t), **params},
                           headers={"Content-Type": "tensor/binary"})
    assert_error(encode(torch.zeros(1, 4, 8, 8)), 422, "unprocessable", "channels")
    assert_error(encode(x + 200), 422, "unprocessable", "[-1, 1]")
    assert_error(encode(x, output_dtype="uint8"), 422, "unprocessable", "latents cannot")
    assert_error(decode(torch.zeros(1, 4, 2, 2), height=100), 422, "unprocessable", "crop")


def test_error_500_hides_traceback(models, monkeypatch):
    app = create_app(Settings(), ModelRegistry(models[:1]))
    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail")
    with TestClient(app, raise_server_exceptions=False) as c:
        monkeypatch.setattr(models[0], "encode", boom)
        r = c.post("/encode", content=png(gradient_image(8, 8)))
        assert_error(r, 500, "internal_error", "internal server error")
        assert "secret" not in r.text
        assert c.get("/healthz").status_code == 200  # still serving


def test_decode_raw_body_with_curls_default_content_type(client, model):
    """`curl --data-binary @z.bin "$URL/decode?shape=...&dtype=float32"` sends
    application/x-www-form-urlencoded: with `shape` given, the body is read as raw bytes."""
    z = _latents(model)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    r = client.post("/decode", content=wire.tensor_to_raw(z), params=raw_params(z), headers=form)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    want = imaging.to_uint8(model.vae.decode(z).sample)[0].numpy()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), want)
    # Without `shape` it is still refused as a form, naming the type.
    r = client.post("/decode", content=wire.tensor_to_raw(z), headers=form)
    assert r.status_code == 415 and "x-www-form-urlencoded" in r.json()["error"]["message"]


def test_non_finite_results_are_never_a_200(client):
    """Finite latents far outside what the model decodes overflow to NaN / Inf (issue 12, finding 5):
    a 422 naming it, for images, tensors and frames."""
    huge = torch.full((1, 4, 2, 2), 3e38)
    for params in ({"output_type": "pt"}, {"output_type": "pil"}, {"output_type": "pt", "partial_postprocess": True}):
        r = client.post("/decode", content=wire.tensor_to_raw(huge), headers={"Content-Type": "tensor/binary"},
                        params={**raw_params(huge), **params})
        assert_error(r, 422, "unprocessable", "NaN or Inf")
    part = ("z.safetensors", safetensors.torch.save({"latents": huge}), wire.SAFETENSORS)
    r = client.post("/interpolate", files={"a": part, "b": part}, params={"steps": 2, "output": "tensor"})
    assert_error(r, 422, "unprocessable", "NaN or Inf")
