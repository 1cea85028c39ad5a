"""models.vae.loading / models.vae.inference / models.vae.ldm_keys / models.vae.info on tiny random VAEs."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import safetensors.torch
import torch

from support import make_tiny_vae
from models.vae import imaging
from models.vae import info
from models.vae.inference import VAEModel
from models.vae.latents import scale as scale_latents, unscale as unscale_latents
from models.vae.ldm_keys import diffusers_to_ldm
from models.vae.loading import SD_KL_F8_CONFIG_DIR, WEIGHTS_NAME, ModelLoadError, load_weights
from support import gradient_image


@pytest.fixture(scope="module")
def model(tiny_vae_dir) -> VAEModel:
    return VAEModel.load("tiny", tiny_vae_dir)


@pytest.fixture(scope="module")
def reference():
    return make_tiny_vae()  # same seed as tiny_vae_dir


def _ldm_file(tmp_path, prefix=""):
    state = diffusers_to_ldm(make_tiny_vae().state_dict(), prefix=prefix)
    path = tmp_path / "vae.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def _same_outputs(a, b) -> bool:
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        return torch.equal(a(x).sample, b(x).sample)


def test_diffusers_folder(tiny_vae_dir, reference):
    loaded = load_weights(tiny_vae_dir)
    weights = tiny_vae_dir / WEIGHTS_NAME
    assert loaded.layout == "diffusers" and loaded.path == str(weights)
    assert loaded.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not loaded.vae.training
    assert _same_outputs(loaded.vae, reference)


def test_pipeline_folder_vae_subfolder(tiny_vae_dir, tmp_path, reference):
    shutil.copytree(tiny_vae_dir, tmp_path / "vae")
    (tmp_path / "model_index.json").write_text("{}")
    assert _same_outputs(load_weights(tmp_path).vae, reference)


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_single_file_ldm_layout(tiny_vae_dir, tmp_path, reference, prefix):
    path = _ldm_file(tmp_path, prefix)
    keys = safetensors.safe_open(str(path), "pt").keys()
    assert f"{prefix}decoder.mid.attn_1.q.weight" in keys and f"{prefix}encoder.down.0.block.0.conv1.weight" in keys
    loaded = load_weights(path, config=tiny_vae_dir)
    assert loaded.layout == "single_file"
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.vae.config.scaling_factor == 0.5
    assert _same_outputs(loaded.vae, reference)


def test_single_file_uses_config_beside_it(tiny_vae_dir, tmp_path, reference):
    path = _ldm_file(tmp_path)
    shutil.copy(tiny_vae_dir / "config.json", tmp_path / "config.json")
    assert _same_outputs(load_weights(path).vae, reference)


def test_single_file_without_config_uses_bundled_sd_config(tmp_path):
    config = json.loads((SD_KL_F8_CONFIG_DIR / "config.json").read_text())
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["scaling_factor"] == 0.18215
    # The tiny file does not fit SD kl-f8: the error names the mismatch instead of reaching the hub.
    with pytest.raises(ModelLoadError, match="sd-kl-f8"):
        load_weights(_ldm_file(tmp_path))


def test_single_file_ckpt_via_weights_only(tiny_vae_dir, tmp_path, reference):
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": diffusers_to_ldm(make_tiny_vae().state_dict(), "first_stage_model.")}, path)
    assert _same_outputs(load_weights(path, config=tiny_vae_dir).vae, reference)


def test_errors_are_one_line(tiny_vae_dir, tmp_path):
    cases = {}
    cases["missing path"] = tmp_path / "nope"
    (tmp_path / "empty").mkdir()
    cases["no config"] = tmp_path / "empty"
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_vae_dir / "config.json", no_weights)
    cases["missing weights"] = no_weights
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_vae_dir, truncated)
    data = (truncated / WEIGHTS_NAME).read_bytes()
    (truncated / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    cases["corrupt"] = truncated
    partial = tmp_path / "partial"
    shutil.copytree(tiny_vae_dir, partial)
    state = safetensors.torch.load_file(partial / WEIGHTS_NAME)
    state.pop("decoder.conv_out.bias")
    safetensors.torch.save_file(state, partial / WEIGHTS_NAME)
    cases["missing tensor"] = partial
    (tmp_path / "weights.bin").write_bytes(b"x")
    cases["wrong suffix"] = tmp_path / "weights.bin"
    expected = {
        "missing path": "does not exist", "no config": "no config.json", "missing weights": "missing weights",
        "corrupt": "corrupt weights", "missing tensor": "decoder.conv_out.bias", "wrong suffix": "unsupported",
    }
    for name, path in cases.items():
        with pytest.raises(ModelLoadError) as err:
            load_weights(path)
        assert expected[name] in str(err.value) and "\n" not in str(err.value), name


def test_single_file_missing_tensor(tiny_vae_dir, tmp_path):
    state = diffusers_to_ldm(make_tiny_vae().state_dict())
    state.pop("decoder.mid.attn_1.q.weight")
    path = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(ModelLoadError, match="missing tensors"):
        load_weights(path, config=tiny_vae_dir)


def test_hub_id_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub is not reachable"):
        load_weights("someone/some-vae")


def test_dtype_and_device_checks(tiny_vae_dir):
    with pytest.raises(ModelLoadError, match="float16 is not supported on CPU"):
        VAEModel.load("x", tiny_vae_dir, dtype="float16")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_weights(tiny_vae_dir, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA"):
            load_weights(tiny_vae_dir, device="cuda")
    bf16 = VAEModel.load("bf16", tiny_vae_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    z = bf16.encode(torch.zeros(1, 3, 16, 16))
    assert z.dtype == torch.float32 and z.shape == (1, 4, 2, 2)


def test_encode_decode_equal_diffusers(model, reference):
    x = imaging.to_tensor(gradient_image(24, 16))
    with torch.no_grad():
        dist = reference.encode(x).latent_dist
        ref_decoded = reference.decode(dist.mode()).sample
    assert torch.equal(model.encode(x), dist.mode())
    assert torch.equal(model.decode(dist.mode()), ref_decoded)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.sample(generator=g2)
    assert torch.equal(model.encode(x, sample=True, generator=g1), expected)


def test_pads_to_multiple_of_8_and_crops_back(model):
    x = imaging.to_tensor(gradient_image(21, 13))
    z = model.encode(x)
    assert z.shape == (1, 4, 2, 3)
    padded, _ = imaging.pad_to_multiple(x, 8)
    assert torch.equal(z, model.encode(padded))
    assert model.decode(z, (13, 21)).shape == (1, 3, 13, 21)
    assert model.decode(z).shape == (1, 3, 16, 24)


def test_model_facts(model):
    d = model.describe()
    assert d["latent_channels"] == 4 and d["downsample_factor"] == 8 and d["scaling_factor"] == 0.5
    assert d["shift_factor"] is None and d["dtype"] == "float32" and d["device"] == "cpu"
    counts = model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.vae.parameters()) == d["parameters"]
    assert counts["encoder"] + counts["decoder"] == counts["total"] and counts["encoder"] > 0
    assert len(d["sha256"]) == 64 and json.dumps(d)


def test_scaling_helpers():
    z = torch.randn(1, 4, 2, 2)
    assert torch.allclose(unscale_latents(scale_latents(z, 0.18215, 0.1), 0.18215, 0.1), z, atol=1e-6)
    assert torch.equal(scale_latents(z, None, None), z)
    assert torch.equal(scale_latents(z, 2.0, None), z * 2)


def test_count_flops_scales_with_area(model):
    small, big = info.count_flops(model.vae, 64), info.count_flops(model.vae, 128)
    assert small["encode"] > 0 and small["decode"] > 0
    assert big["encode"] == pytest.approx(4 * small["encode"], rel=0.05)
    # Conv FLOPs by hand for the first encoder conv alone: 2 * Cin * Cout * 9 * H * W.
    assert small["encode"] > 2 * 3 * 8 * 9 * 64 * 64


def test_vae_info_cli(tiny_vae_dir, capsys):
    assert info.main([str(tiny_vae_dir), "--size", "64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["parameters"]["total"] > 0 and doc["flops"]["encode"] > 0 and doc["config"]["latent_channels"] == 4
    assert info.main([str(tiny_vae_dir)]) == 0
    out = capsys.readouterr().out
    assert "FLOPs @ 512x512" in out and "encoder" in out
    assert info.main(["/nonexistent/vae"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ckpt_with_python_objects_is_refused_without_torch_advice(tmp_path):
    import argparse

    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "extra": argparse.Namespace(a=1)}, path)
    with pytest.raises(ModelLoadError) as err:
        load_weights(path)
    message = str(err.value)
    assert "Python objects" in message and ".safetensors" in message and "\n" not in message
    assert "weights_only" not in message and "False" not in message  # never torch's "load it unsafely" advice
