"""The latent contract (models/vae/latents.py) across its readers: a latent file written by
`vae encode` (raw or --scaled, float or uint8) sent to /decode and /interpolate decodes to exactly
what the in-process model gives for the same raw latents; /encode's own answers say whether they
are scaled; metadata that breaks the contract is a 400 naming the key."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from app.http.app import create_app
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from app.protocol import wire
from models.vae import imaging, latent_files
from models.vae.inference import VAEModel
from models.vae.latents import LatentInfo, LatentMetadataError
from support import gradient_image, run

SAFETENSORS = {"Content-Type": wire.SAFETENSORS}


@pytest.fixture(scope="module")
def model(tiny_vae_dir):
    return VAEModel.load("tiny", tiny_vae_dir)


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(Settings(warmup=False), ModelRegistry([model]))) as c:
        yield c


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tiny_vae_dir):
    """`vae encode` of one 40x32 image, as raw float32, --scaled float32 and uint8 latent files."""
    root = tmp_path_factory.mktemp("contract")
    gradient_image(40, 32, seed=3).save(root / "a.png")
    files = {}
    for name, extra in {"raw": [], "scaled": ["--scaled"], "uint8": ["--quantize", "uint8", "--scaled"]}.items():
        out = root / name
        rc, _ = run("encode", root / "a.png", "--out", out, "--model", f"tiny={tiny_vae_dir}",
                    "--latent-dtype", "float32", *extra)
        assert rc == 0
        files[name] = (out / "a.png.safetensors").read_bytes()
    return files


def expected_pixels(model: VAEModel, data: bytes) -> np.ndarray:
    z, meta = latent_files.decode_record(data)  # raw latents, by the same contract
    return imaging.to_uint8(model.decode(z, tuple(meta["original_size"])))[0].numpy()


@pytest.mark.parametrize("kind", ["raw", "scaled", "uint8"])
def test_vae_encode_file_decodes_over_http_as_in_process(client, model, encoded, kind):
    data = encoded[kind]
    meta = latent_files.header_metadata(data)
    assert json.loads(meta["scaled"]) == (kind != "raw") and json.loads(meta["scaling_factor"]) == 0.5
    r = client.post("/decode", content=data, headers=SAFETENSORS, params={"output_type": "pt", "partial_postprocess": True})
    assert r.status_code == 200, r.text
    got = np.frombuffer(r.content, np.uint8).reshape(json.loads(r.headers["shape"]))[0]
    assert got.shape == (32, 40, 3)  # cropped to original_size
    np.testing.assert_array_equal(got, expected_pixels(model, data))


@pytest.mark.parametrize("kind", ["raw", "scaled"])
def test_vae_encode_file_interpolates_from_raw_latents(client, model, encoded, kind):
    """The endpoints of an interpolation are the files' raw latents: a raw file is not unscaled
    (it carries scaling_factor but says scaled=false), a scaled one is unscaled once."""
    data = encoded[kind]
    files = {"a": ("a.safetensors", data, wire.SAFETENSORS), "b": ("b.safetensors", data, wire.SAFETENSORS)}
    r = client.post("/interpolate", files=files, params={"steps": 2, "output": "tensor"},
                    headers={"Accept": wire.NPY})
    assert r.status_code == 200, r.text
    frames = np.load(io.BytesIO(r.content))
    assert frames.shape == (2, 32, 40, 3)
    np.testing.assert_array_equal(frames[0], expected_pixels(model, data))


def test_encode_answer_says_whether_it_is_scaled(client):
    png = imaging.encode_image(gradient_image(16, 16), "png")
    for params, scaled in (({}, False), ({"scaling_factor": 0.5}, True), ({"shift_factor": 0.1}, True)):
        r = client.post("/encode", content=png, params=params, headers={"Accept": wire.SAFETENSORS})
        assert r.status_code == 200
        assert json.loads(wire._safetensors_metadata(r.content)["scaled"]) is scaled


def test_encode_then_decode_with_no_parameters_undoes_the_scaling(client, model):
    """A scaled /encode answer sent back to /decode as it is: the metadata says how to unscale."""
    img = gradient_image(24, 16, seed=5)
    png = imaging.encode_image(img, "png")
    r = client.post("/encode", content=png, params={"scaling_factor": 0.5, "shift_factor": 0.25},
                    headers={"Accept": wire.SAFETENSORS})
    back = client.post("/decode", content=r.content, headers=SAFETENSORS,
                       params={"output_type": "pt", "partial_postprocess": True})
    assert back.status_code == 200, back.text
    got = np.frombuffer(back.content, np.uint8).reshape(json.loads(back.headers["shape"]))[0]
    x = imaging.to_tensor(img)
    want = imaging.to_uint8(model.decode(model.encode(x), (16, 24)))[0].numpy()
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float32 scale/unscale round trip


@pytest.mark.parametrize("meta, key", [
    ({"original_size": "[\"a\", 8]"}, "original_size"),
    ({"original_size": "[0, 0]"}, "original_size"),
    ({"original_size": "[8, 8, 8]"}, "original_size"),
    ({"scaling_factor": "\"abc\""}, "scaling_factor"),
    ({"scaling_factor": "0"}, "scaling_factor"),
    ({"scaling_factor": "1e308"}, "scaling_factor"),
    ({"scaled": "\"yes\"", "scaling_factor": "0.5"}, "scaled"),
    ({"shift_factor": "{"}, "shift_factor"),
])
def test_broken_metadata_is_a_400_naming_the_key(client, meta, key):
    import safetensors.torch

    body = safetensors.torch.save({"latents": torch.zeros(1, 4, 2, 2)}, metadata=meta)
    r = client.post("/decode", content=body, headers=SAFETENSORS)
    assert r.status_code == 400 and key in r.json()["error"]["message"], r.text
    part = ("z.safetensors", body, wire.SAFETENSORS)
    r = client.post("/interpolate", files={"a": part, "b": part}, params={"steps": 2})
    assert r.status_code == 400 and key in r.json()["error"]["message"], r.text


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                       lambda inner: st.lists(inner, max_size=4), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(["scaling_factor", "shift_factor", "scaled", "original_size",
                                        "quant_scale", "quant_offset", "model"]),
                       JSONISH | JSONISH.map(json.dumps) | st.text(max_size=8), max_size=5))
def test_metadata_parsing_only_accepts_the_contract(meta):
    """Any metadata either parses into a LatentInfo that obeys the contract, or is refused with
    LatentMetadataError (a ValueError the HTTP layer turns into a 400): nothing else escapes."""
    try:
        info = LatentInfo.from_metadata(meta)
    except LatentMetadataError:
        return
    for f in (info.scaling_factor, info.shift_factor):
        assert f is None or (np.isfinite(f) and abs(f) <= 1e4)
    assert info.scaling_factor is None or abs(info.scaling_factor) >= 1e-4
    assert info.original_size is None or all(0 < s <= 1 << 20 for s in info.original_size)
    assert isinstance(info.scaled, bool)
    assert LatentInfo.from_metadata(info.to_metadata()) == info
