"""Every family (docs/families.md) over HTTP: diffusers' unmodified remote_encode / remote_decode and the
project's own client against a real server on loopback, equal to in-process diffusers in float32.

One server holds one random-weight model per family (the published config made small); requests
pick it with `?model=` in the endpoint URL, which `requests` keeps beside remote_decode's own
parameters. In-process references are plain diffusers calls plus the pipelines' scaling lines.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch
from diffusers import AutoencoderTiny
from diffusers.utils.remote_utils import remote_decode, remote_encode

from app.client import RemoteAutoencoderKL, VAEClient, VAEClientError
from app.http.app import create_app
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from models.vae import imaging
from models.vae.inference import VAEModel, diffusers_latents
from support import (FAMILIES, family_reference, flux_pipeline_function, gradient_image, live_server,
                     pipeline_scale, pipeline_unscale)

SIZE = (40, 32)  # W, H: latents 5x4


@pytest.fixture(scope="module")
def url(family_dirs):
    registry = ModelRegistry([VAEModel.load(f, family_dirs[f]) for f in FAMILIES])
    with live_server(create_app(Settings(warmup=False), registry)) as base:
        yield base


@pytest.fixture(scope="module")
def refs(family_dirs):
    """In-process diffusers models, one per family (the class its config names), float32."""
    return {family: family_reference(path) for family, path in family_dirs.items()}


@pytest.fixture(scope="module")
def image():
    return gradient_image(*SIZE)




def factors(config) -> dict:
    """scaling_factor / shift_factor as remote_encode / remote_decode take them (shift only when defined)."""
    out = {"scaling_factor": config["scaling_factor"]}
    if config.get("shift_factor") is not None:
        out["shift_factor"] = config["shift_factor"]
    return out


def decode_ref(ref, z):
    with torch.no_grad():
        return ref.decode(z).sample


def encode_ref(ref, x):
    with torch.no_grad():
        return diffusers_latents(ref, x)


def test_v1_models_reports_every_family(url, refs):
    models = {m["name"]: m for m in requests.get(f"{url}/v1/models", timeout=30).json()["models"]}
    assert set(models) == set(FAMILIES)
    for family, ref in refs.items():
        m, config = models[family], ref.config
        assert m["class"] == type(ref).__name__
        assert m["latent_channels"] == config.latent_channels and m["downsample_factor"] == 8
        assert m["scaling_factor"] == config.scaling_factor and m["shift_factor"] == config.get("shift_factor")
        assert m["latents_mean"] == config.get("latents_mean") and m["latents_std"] == config.get("latents_std")
    assert (models["flux"]["latent_channels"], models["flux"]["scaling_factor"], models["flux"]["shift_factor"]) == (16, 0.3611, 0.1159)
    assert (models["sd3"]["latent_channels"], models["sd3"]["scaling_factor"], models["sd3"]["shift_factor"]) == (16, 1.5305, 0.0609)
    assert models["sdxl"]["scaling_factor"] == 0.13025 and models["sdxl"]["config"]["force_upcast"] is True
    assert models["taesd"]["class"] == "AutoencoderTiny" and models["taesd"]["tiling"] is False


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_encode_decode_round_trip_equals_diffusers(family, url, refs, image):
    """remote_encode with the family's factors, then remote_decode with them: every output type
    equal to the same steps in process (encode, the pipeline's scaling, decode)."""
    ref, endpoint = refs[family], f"{url}/encode?model={family}"
    x = imaging.to_tensor(image)
    z = encode_ref(ref, x)
    assert torch.equal(remote_encode(endpoint, image), z)  # raw latents, PNG upload
    assert torch.equal(remote_encode(endpoint, x), z)  # a [-1, 1] tensor upload
    kw = factors(ref.config)
    scaled = remote_encode(endpoint, image, **kw)
    literal = (z - kw["shift_factor"]) * kw["scaling_factor"] if "shift_factor" in kw else z * kw["scaling_factor"]
    assert torch.equal(scaled, literal)

    raw = scaled / kw["scaling_factor"] + kw["shift_factor"] if "shift_factor" in kw else scaled / kw["scaling_factor"]
    x_ref = decode_ref(ref, raw)
    u8_ref = imaging.to_uint8(x_ref)
    decode = f"{url}/decode?model={family}"
    x_remote = remote_decode(decode, scaled, output_type="pt", partial_postprocess=False, return_type="pt", **kw)
    assert torch.equal(x_remote, x_ref)
    u8 = remote_decode(decode, scaled, output_type="pt", partial_postprocess=True, return_type="pt", **kw)
    assert torch.equal(u8, u8_ref)
    img = remote_decode(decode, scaled, output_type="pil", image_format="png", **kw)
    assert img.size == SIZE and np.array_equal(np.asarray(img), u8_ref[0].numpy())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.filterwarnings("ignore::FutureWarning")  # remote_decode's own do_scaling deprecation notice
def test_do_scaling_applies_the_models_own_factors(family, url, refs, image):
    """/encode and /decode with do_scaling: scale and shift (and latents_mean / latents_std where the
    config has them), exactly as the family's pipelines scale; remote_decode's default (do_scaling
    without factors) and the project's client both get it."""
    ref, config = refs[family], dict(refs[family].config)
    z = encode_ref(ref, imaging.to_tensor(image))
    scaled_ref = pipeline_scale(config, z)
    x_ref = decode_ref(ref, pipeline_unscale(config, scaled_ref))
    client = VAEClient(url, model=family)
    scaled = client.encode(image, do_scaling=True)
    assert torch.equal(scaled, scaled_ref)
    assert torch.equal(client.decode_tensor(scaled, do_scaling=True), x_ref)
    u8 = remote_decode(f"{url}/decode?model={family}", scaled, output_type="pt", partial_postprocess=True,
                       return_type="pt")  # do_scaling=True, no factors: the model's own
    assert torch.equal(u8, imaging.to_uint8(x_ref))
    # /encode's metadata says how the latents were scaled; /decode undoes exactly that.
    r = requests.post(f"{url}/encode", params={"model": family, "do_scaling": "true"}, data=imaging.encode_image(image, "png"),
                      headers={"Accept": "application/x-safetensors"}, timeout=60)
    assert r.status_code == 200
    meta = json.loads(r.content[8:8 + int.from_bytes(r.content[:8], "little")])["__metadata__"]
    assert json.loads(meta["scaled"]) is True and json.loads(meta["scaling_factor"]) == config["scaling_factor"]
    assert (json.loads(meta["latents_mean"]) if "latents_mean" in meta else None) == config.get("latents_mean")
    back = requests.post(f"{url}/decode", params={"model": family, "output_type": "pt", "partial_postprocess": "true"},
                         data=r.content, headers={"Content-Type": "application/x-safetensors", "Accept": "tensor/binary"},
                         timeout=60)
    assert back.status_code == 200 and torch.equal(VAEClient._tensor(back), imaging.to_uint8(x_ref))


@pytest.mark.parametrize("family", FAMILIES)
def test_project_client_as_a_diffusers_vae(family, url, refs, image):
    ref, x = refs[family], imaging.to_tensor(image)
    remote = RemoteAutoencoderKL(url, model=family)
    assert remote.config.scaling_factor == ref.config.scaling_factor
    assert remote.config.latent_channels == ref.config.latent_channels
    out = remote.encode(x)
    z = out.latents if isinstance(ref, AutoencoderTiny) else out.latent_dist.mode()
    assert torch.equal(z, encode_ref(ref, x))
    assert torch.equal(remote.decode(z).sample, decode_ref(ref, z))
    assert torch.equal(VAEClient(url, model=family).encode(image), z)


@pytest.mark.parametrize("height, width", [(32, 48), (40, 56)])  # 40 x 56: not multiples of 16, rounded down
def test_packed_flux_latents_as_remote_decode_sends_them(height, width, url, refs):
    """FluxPipeline's packed latents (B, (H/16)*(W/16), 64) with height and width: unpacked with
    diffusers' own _unpack_latents in process; remote_decode and the client get the same pixels."""
    ref, kw = refs["flux"], factors(refs["flux"].config)
    h, w = 2 * (height // 16), 2 * (width // 16)
    z = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(height))
    packed = flux_pipeline_function("_pack_latents")(z, 2, 16, h, w)
    assert packed.shape == (2, (height // 16) * (width // 16), 64)
    unpacked = flux_pipeline_function("_unpack_latents")(packed, height, width, 8)
    x_ref = decode_ref(ref, (unpacked / kw["scaling_factor"]) + kw["shift_factor"])  # FluxPipeline.__call__
    u8_ref = imaging.to_uint8(x_ref)
    endpoint = f"{url}/decode?model=flux"
    u8 = remote_decode(endpoint, packed, height=height, width=width, output_type="pt", partial_postprocess=True,
                       return_type="pt", **kw)
    assert u8.shape == (2, 8 * h, 8 * w, 3) and torch.equal(u8, u8_ref)
    x = remote_decode(endpoint, packed, height=height, width=width, output_type="pt", return_type="pt", **kw)
    assert torch.equal(x, x_ref)
    img = remote_decode(endpoint, packed[:1], height=height, width=width, output_type="pil", image_format="png", **kw)
    assert np.array_equal(np.asarray(img), u8_ref[0].numpy())
    client = VAEClient(url, model="flux")
    assert torch.equal(client.decode_tensor(packed, height=height, width=width, **kw), x_ref)
    assert torch.equal(client.decode_tensor(packed, height=height, width=width, do_scaling=True), x_ref)


def test_packed_latents_that_do_not_fit_are_refused(url):
    with pytest.raises(RuntimeError, match=r"do not fit a 32x32 image.*expected \[N, 4, 64\]"):
        remote_decode(f"{url}/decode?model=flux", torch.zeros(1, 6, 64), height=32, width=32, output_type="pt",
                      return_type="pt", scaling_factor=0.3611)
    with pytest.raises(RuntimeError, match=r"expected \[N, 4, 64\]"):  # a 4-channel model packs 16 values
        remote_decode(f"{url}/decode?model=flux", torch.zeros(1, 4, 16), height=32, width=32, output_type="pt",
                      return_type="pt", scaling_factor=0.3611)
    with pytest.raises(VAEClientError, match="need `height` and `width`"):
        VAEClient(url, model="flux").decode_tensor(torch.zeros(1, 4, 64))


@pytest.mark.parametrize("family", ["flux", "sd3", "playground", "taef1"])
def test_sample_with_the_models_factors(family, url, refs):
    """/sample decodes randn (seed + i per image) in the model's scaled space, 16 channels included."""
    ref, config = refs[family], dict(refs[family].config)
    r = requests.post(f"{url}/sample", params={"model": family, "seed": 7, "n": 2, "width": 32, "height": 24},
                      headers={"Accept": "tensor/binary"}, timeout=60)
    assert r.status_code == 200, r.text
    assert json.loads(r.headers["X-Latent-Shape"]) == [2, config["latent_channels"], 3, 4]
    noise = torch.stack([torch.randn((config["latent_channels"], 3, 4), generator=torch.Generator().manual_seed(7 + i))
                         for i in range(2)])
    expected = torch.cat([imaging.to_uint8(decode_ref(ref, pipeline_unscale(config, noise[i:i + 1]))) for i in range(2)])
    assert torch.equal(VAEClient._tensor(r), expected)


@pytest.mark.parametrize("family", ["flux", "taef1"])
def test_interpolate_and_roundtrip_with_16_channels(family, url, refs, image):
    ref = refs[family]
    other = gradient_image(*SIZE, seed=3)
    files = {"a": ("a.png", imaging.encode_image(image, "png")), "b": ("b.png", imaging.encode_image(other, "png"))}
    r = requests.post(f"{url}/interpolate", params={"model": family, "steps": 3, "output": "tensor"}, files=files,
                      headers={"Accept": "tensor/binary"}, timeout=60)
    assert r.status_code == 200, r.text
    assert json.loads(r.headers["X-Latent-Shape"]) == [1, 16, 4, 5]
    frames = VAEClient._tensor(r)
    za, zb = (encode_ref(ref, imaging.to_tensor(img)) for img in (image, other))
    assert frames.shape == (3, 32, 40, 3)
    assert torch.equal(frames[0], imaging.to_uint8(decode_ref(ref, za))[0])
    assert torch.equal(frames[2], imaging.to_uint8(decode_ref(ref, zb))[0])
    rt = VAEClient(url, model=family).roundtrip(image)
    assert rt.latent_shape == [1, 16, 4, 5]
    assert np.array_equal(np.asarray(rt.image), imaging.to_uint8(decode_ref(ref, za))[0].numpy())


def test_the_page_is_served_and_draws_one_canvas_per_channel(url):
    """The explore page has no channel count of its own: it draws C canvases from the shape header
    (checked in a real browser for 16 channels in test_page_families.py)."""
    assert requests.get(f"{url}/", timeout=30).status_code == 200
    js = requests.get(f"{url}/static/app.js", timeout=30)
    assert js.status_code == 200 and "for (let k = 0; k < c; k++)" in js.text


def test_uint8_latents_and_per_channel_metadata_through_decode(url, refs, image):
    """A uint8-quantised 16-channel tensor (per-channel scale / offset, as `vae encode --quantize uint8`
    stores it) decodes like its dequantised floats; per-channel statistics must fit the channels."""
    import safetensors.torch

    from models.vae.latents import dequantize_uint8, quantize_uint8

    ref = refs["flux"]
    q, scale, offset = quantize_uint8(encode_ref(ref, imaging.to_tensor(image)))
    params = {"model": "flux", "output_type": "pt", "partial_postprocess": "true"}
    headers = {"Content-Type": "application/x-safetensors", "Accept": "tensor/binary"}
    meta = {"scaled": "false", "quant_scale": json.dumps(scale), "quant_offset": json.dumps(offset)}
    r = requests.post(f"{url}/decode", params=params, headers=headers, timeout=60,
                      data=safetensors.torch.save({"latents": q}, metadata=meta))
    assert r.status_code == 200, r.text
    assert torch.equal(VAEClient._tensor(r), imaging.to_uint8(decode_ref(ref, dequantize_uint8(q, scale, offset))))
    meta = {"scaled": "true", "scaling_factor": "0.5", "latents_mean": "[0, 0, 0, 0]", "latents_std": "[1, 1, 1, 1]"}
    r = requests.post(f"{url}/decode", params=params, headers=headers, timeout=60,
                      data=safetensors.torch.save({"latents": torch.zeros(1, 16, 4, 4)}, metadata=meta))
    assert r.status_code == 400 and "`latents_mean` has 4 values for 16 latent channels" in r.text
