"""`vae encode` / `vae decode` with 16-channel families (FLUX's AutoencoderKL, TAEF1's AutoencoderTiny):
the latent files hold what in-process diffusers encodes, and decode back to its pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.vae import imaging
from models.vae import latent_files as latent_store
from support import family_reference, gradient_image, pipeline_scale, run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-inputs")
    gradient_image(40, 32, seed=1).save(root / "a.png")
    gradient_image(37, 29, seed=2).save(root / "odd.png")  # sides not multiples of 8: padded, then cropped back
    return root


@pytest.mark.parametrize("family", ["flux", "taef1"])
def test_encode_decode_with_16_channels(family, family_dirs, inputs, tmp_path):
    ref = family_reference(family_dirs[family])
    lat, out = tmp_path / "lat", tmp_path / "out"
    rc, rep = run("encode", inputs, "--out", lat, "--model", f"{family}={family_dirs[family]}", "--latent-dtype",
                  "float32", "--batch-size", "1", report=tmp_path / "enc.json")
    assert rc == 0 and rep["done"] == 2
    for name, (w, h) in (("a.png", (40, 32)), ("odd.png", (37, 29))):
        z, meta = latent_store.decode_record((lat / f"{name}.safetensors").read_bytes())
        x, _ = imaging.pad_to_multiple(imaging.to_tensor(Image.open(inputs / name)), 8)
        with torch.no_grad():
            enc = ref.encode(x)
            expected = enc.latents if hasattr(enc, "latents") else enc.latent_dist.mode()
        assert z.shape == (1, 16, -(-h // 8), -(-w // 8)) and torch.equal(z, expected)
        assert meta["scaling_factor"] == ref.config.scaling_factor and meta["original_size"] == [h, w]

    rc, rep = run("decode", lat, "--out", out, "--model", family_dirs[family], "--batch-size", "1",
                  report=tmp_path / "dec.json")
    assert rc == 0 and rep["done"] == 2
    for name in ("a.png", "odd.png"):
        z, meta = latent_store.decode_record((lat / f"{name}.safetensors").read_bytes())
        with torch.no_grad():
            expected = imaging.to_uint8(imaging.crop_to(ref.decode(z).sample, tuple(meta["original_size"])))
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), expected[0].numpy())


@pytest.mark.parametrize("family", ["flux", "playground"])
def test_scaled_files_hold_what_the_pipeline_scales(family, family_dirs, inputs, tmp_path):
    """--scaled stores the latents as the family's pipeline scales them: FLUX's (z - 0.1159) * 0.3611,
    Playground v2.5's per-channel (z - mean) * 0.5 / std; reading the file gives the raw latents back."""
    import safetensors.torch

    ref = family_reference(family_dirs[family])
    rc, _ = run("encode", inputs, "--out", tmp_path / "scaled", "--model", f"{family}={family_dirs[family]}",
                "--latent-dtype", "float32", "--scaled", "--batch-size", "1")
    assert rc == 0
    data = (tmp_path / "scaled" / "a.png.safetensors").read_bytes()
    with torch.no_grad():
        z = ref.encode(imaging.to_tensor(Image.open(inputs / "a.png"))).latent_dist.mode()
    torch.testing.assert_close(safetensors.torch.load(data)["latents"], pipeline_scale(dict(ref.config), z),
                               rtol=1e-6, atol=1e-6)
    raw, _ = latent_store.decode_record(data)
    torch.testing.assert_close(raw, z, rtol=1e-5, atol=1e-5)


def test_quantized_flux_files(family_dirs, inputs, tmp_path):
    """--quantize uint8 keeps one scale/offset per channel (16)."""
    ref = family_reference(family_dirs["flux"])
    model = f"flux={family_dirs['flux']}"
    with torch.no_grad():
        z = ref.encode(imaging.to_tensor(Image.open(inputs / "a.png"))).latent_dist.mode()
    rc, _ = run("encode", inputs, "--out", tmp_path / "q", "--model", model, "--quantize", "uint8", "--batch-size", "1")
    assert rc == 0
    meta = latent_store.read_metadata(tmp_path / "q" / "a.png.safetensors")
    assert len(json.loads(meta["quant_scale"])) == 16
    restored, _ = latent_store.decode_record((tmp_path / "q" / "a.png.safetensors").read_bytes())
    assert restored.shape == z.shape and (restored - z).abs().max() <= max(json.loads(meta["quant_scale"])) / 2 + 1e-5
