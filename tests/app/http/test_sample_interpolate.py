"""POST /sample and POST /interpolate (app/http/endpoints/sample.py, interpolate.py) and their math (models/vae/latent_ops.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from models.vae import imaging
from models.vae import latent_ops
from support import gradient_image

NPY = {"Accept": "application/x-npy"}


@pytest.fixture(scope="module")
def model(tiny_vae_dir):
    from models.vae.inference import VAEModel

    return VAEModel.load("tiny", tiny_vae_dir)


@pytest.fixture(scope="module")
def client(model):
    from fastapi.testclient import TestClient

    from app.http.app import create_app
    from app.http.registry import ModelRegistry
    from app.http.settings import Settings

    app = create_app(Settings(warmup=False, max_pixels=256 * 256), ModelRegistry([model]))
    with TestClient(app) as c:
        yield c


def png(img: Image.Image) -> bytes:
    return imaging.encode_image(img, "png")


def npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def roundtrip_pixels(client, data: bytes) -> np.ndarray:
    r = client.post("/roundtrip", content=data)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def assert_error(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message"} and words in error["message"], error


A = png(gradient_image(40, 32, seed=0))
B = png(ImageOps.mirror(gradient_image(40, 32, seed=1)).rotate(180))


# --- latent_ops ---------------------------------------------------------------------------------

def test_slerp_endpoints_norm_and_parallel_fallback():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g)
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1))[:, None, None, None]  # same norms
    assert torch.equal(latent_ops.slerp(a, b, 0.0), a) and torch.equal(latent_ops.slerp(a, b, 1.0), b)
    mid_s, mid_l = latent_ops.slerp(a, b, 0.5), latent_ops.lerp(a, b, 0.5)
    # slerp stays on the sphere of a and b; lerp cuts the chord and loses norm.
    torch.testing.assert_close(mid_s.flatten(1).norm(dim=1), a.flatten(1).norm(dim=1))
    assert (mid_l.flatten(1).norm(dim=1) < 0.9 * a.flatten(1).norm(dim=1)).all()
    torch.testing.assert_close(latent_ops.slerp(a, a.clone(), 0.3), a)  # sin(0) would divide by zero


def test_interpolate_and_resize_contracts():
    a, b = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    frames = latent_ops.interpolate(a, b, 4, "slerp", scaling_factor=0.18215, shift_factor=0.1)
    assert frames.shape == (4, 4, 3, 3) and torch.equal(frames[0], a[0]) and torch.equal(frames[-1], b[0])
    with pytest.raises(ValueError, match="shape"):
        latent_ops.interpolate(a, torch.randn(1, 4, 3, 4), 3)
    with pytest.raises(ValueError, match="method"):
        latent_ops.interpolate(a, b, 3, "cubic")
    assert latent_ops.resize_latents(torch.randn(1, 4, 6, 8), (3, 5)).shape == (1, 4, 3, 5)


# --- /sample ------------------------------------------------------------------------------------

def test_sample_is_z_over_scaling_factor_decoded(client, model):
    r = client.post("/sample", params={"seed": 7, "width": 48, "height": 32, "n": 2}, headers=NPY)
    frames = npy(r)
    assert frames.shape == (2, 32, 48, 3) and frames.dtype == np.uint8
    assert r.headers["X-Seed"] == "7" and r.headers["X-Latent-Shape"] == "[2, 4, 4, 6]"
    # Independently: sample i is randn from a generator seeded seed + i, divided by the scaling factor.
    for i in range(2):
        z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(7 + i)) / model.scaling_factor
        expected = imaging.to_uint8(model.decode(z)).numpy()[0]
        assert np.array_equal(frames[i], expected)


def test_sample_determinism_and_formats(client):
    params = {"seed": 3, "width": 32, "height": 24, "n": 3}
    first, again = client.post("/sample", params=params), client.post("/sample", params=params)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.content == again.content
    assert client.post("/sample", params={**params, "seed": 4}).content != first.content
    assert Image.open(io.BytesIO(first.content)).size == (3 * 32, 24)  # n images side by side
    # Sample i of a batch is sample 0 of seed + i: a batch member can be reproduced alone.
    batch = npy(client.post("/sample", params=params, headers=NPY))
    alone = npy(client.post("/sample", params={**params, "seed": 5, "n": 1}, headers=NPY))
    assert np.array_equal(batch[2], alone[0])
    # Without a seed one is drawn, and reported so the result can be reproduced.
    drawn = client.post("/sample", params={"width": 16, "height": 16})
    replay = client.post("/sample", params={"width": 16, "height": 16, "seed": drawn.headers["X-Seed"]})
    assert replay.content == drawn.content
    webp = client.post("/sample", params={"width": 16, "height": 16, "seed": 0}, headers={"Accept": "image/webp"})
    assert webp.headers["content-type"] == "image/webp"


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"width": 60, "height": 32}, 422, "width 60 must be a positive multiple of 8"),
        ({"width": 32, "height": 0}, 422, "height 0"),
        ({"width": 512, "height": 512}, 413, "exceeds"),
        ({"n": 0}, 400, "n:"),
        ({"n": 17}, 400, "n:"),
        ({"seed": -1}, 400, "seed:"),
        ({"width": "wide"}, 400, "width:"),
        ({"model": "nope"}, 404, "unknown model 'nope'"),
    ],
)
def test_sample_errors(client, params, status, words):
    assert_error(client.post("/sample", params=params), status, words)


# --- /interpolate -------------------------------------------------------------------------------

def test_slerp_endpoints_are_the_reconstructions(client):
    frames = npy(client.post("/interpolate", params={"steps": 5}, files={"a": A, "b": B}, headers=NPY))
    assert frames.shape == (5, 32, 40, 3)
    assert np.array_equal(frames[0], roundtrip_pixels(client, A))
    assert np.array_equal(frames[-1], roundtrip_pixels(client, B))
    lerp = npy(client.post("/interpolate", params={"steps": 5, "method": "lerp"}, files={"a": A, "b": B}, headers=NPY))
    assert np.array_equal(lerp[0], frames[0]) and np.array_equal(lerp[-1], frames[-1])
    assert np.abs(lerp[2].astype(int) - frames[2].astype(int)).max() > 0, "lerp and slerp agree in the middle"
    assert np.abs(frames[2].astype(int) - frames[0].astype(int)).mean() > 1, "middle frame is an endpoint"


def test_different_sizes_follow_image_a_or_the_requested_size(client):
    a, b = png(gradient_image(44, 30, seed=2)), png(gradient_image(64, 48, seed=3))
    r = client.post("/interpolate", params={"steps": 3}, files={"a": a, "b": b})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (3 * 44, 30)  # strip of a-sized frames, crop undone
    assert r.headers["X-Frame-Size"] == "[30, 44]" and r.headers["X-Latent-Shape"] == "[1, 4, 4, 6]"
    frames = npy(client.post("/interpolate", params={"steps": 3}, files={"a": a, "b": b}, headers=NPY))
    assert np.array_equal(frames[0], roundtrip_pixels(client, a))
    sized = client.post("/interpolate", params={"steps": 3, "width": 64, "height": 48, "output": "tensor"},
                        files={"a": a, "b": b})
    assert sized.headers["shape"] == "[3, 48, 64, 3]" and sized.headers["dtype"] == "uint8"
    assert np.array_equal(npy(client.post("/interpolate", params={"steps": 3, "width": 64, "height": 48},
                                          files={"a": a, "b": b}, headers=NPY))[-1], roundtrip_pixels(client, b))


def test_latent_files_and_animated_webp(client):
    # Latents saved by /encode (scaled, with metadata) interpolate like the image they came from.
    saved = client.post("/encode", params={"scaling_factor": 0.5}, content=A,
                        headers={"Accept": "application/x-safetensors"})
    frames = npy(client.post("/interpolate", params={"steps": 3},
                             files={"a": ("a.safetensors", saved.content), "b": B}, headers=NPY))
    assert np.array_equal(frames[0], roundtrip_pixels(client, A))
    webp = client.post("/interpolate", params={"steps": 4, "output": "webp"}, files={"a": A, "b": B})
    assert webp.headers["content-type"] == "image/webp"
    anim = Image.open(io.BytesIO(webp.content))
    assert anim.n_frames == 4 and anim.size == (40, 32)


@pytest.mark.parametrize(
    ("params", "files", "status", "words"),
    [
        ({"steps": 1}, {"a": A, "b": B}, 400, "steps:"),
        ({"steps": 65}, {"a": A, "b": B}, 400, "steps:"),
        ({"steps": "many"}, {"a": A, "b": B}, 400, "steps:"),
        ({"method": "cubic"}, {"a": A, "b": B}, 400, "unknown method 'cubic'"),
        ({"output": "gif"}, {"a": A, "b": B}, 400, "unsupported output 'gif'"),
        ({}, {"a": A}, 400, "`b`"),
        ({}, {"b": B}, 400, "`a`"),
        ({}, {"a": A, "b": b"GIF89a not an image"}, 415, "part `b`"),
        ({}, {"a": A, "b": b""}, 400, "part `b` is empty"),
        ({"width": 64}, {"a": A, "b": B}, 400, "both `width` and `height`"),
        ({"width": 60, "height": 32}, {"a": A, "b": B}, 422, "width 60"),
        ({"width": 256, "height": 256, "steps": 64}, {"a": A, "b": B}, 413, "exceed"),
        ({"model": "nope"}, {"a": A, "b": B}, 404, "unknown model"),
    ],
)
def test_interpolate_errors(client, params, files, status, words):
    assert_error(client.post("/interpolate", params=params, files=files), status, words)


def test_interpolate_needs_a_form_and_right_latents(client):
    assert_error(client.post("/interpolate", content=A, headers={"Content-Type": "image/png"}), 400, "multipart form")
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 3, 4, 5), np.float32))  # 3 channels, the model has 4
    assert_error(client.post("/interpolate", files={"a": ("z.npy", buf.getvalue()), "b": B}), 422, "channels")
