"""The families (docs/families.md) in process: loading, encode / decode equal to in-process diffusers,
their latent conventions (factors, latents_mean / latents_std, TAESD), FLUX packing against
FluxPipeline's own functions, force_upcast, and the refusal of classes the service cannot serve."""

from __future__ import annotations

import json

import pytest
import torch

from models.vae import imaging, latent_ops, latents
from models.vae.inference import VAEModel, diffusers_latents
from models.vae.info import count_flops
from models.vae.loading import ModelLoadError, load_weights
from support import (FAMILIES, family_config, family_reference, flux_pipeline_function, gradient_image,
                     pipeline_scale, pipeline_unscale)

EXPECTED = {  # family -> (class, latent channels, scaling_factor, shift_factor)
    "sd1": ("AutoencoderKL", 4, 0.18215, None),
    "sdxl": ("AutoencoderKL", 4, 0.13025, None),
    "playground": ("AutoencoderKL", 4, 0.5, None),
    "sd3": ("AutoencoderKL", 16, 1.5305, 0.0609),
    "flux": ("AutoencoderKL", 16, 0.3611, 0.1159),
    "taesd": ("AutoencoderTiny", 4, 1.0, 0.0),
    "taef1": ("AutoencoderTiny", 16, 1.0, 0.0),
}






@pytest.fixture(scope="module")
def image_tensor():
    return imaging.to_tensor(gradient_image(40, 32))


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_the_config_factors(family, family_dirs):
    cls, channels, scale, shift = EXPECTED[family]
    model = VAEModel.load(family, family_dirs[family])
    assert (model.kind, model.latent_channels, model.scaling_factor, model.shift_factor) == (cls, channels, scale, shift)
    assert model.downsample_factor == 8 and type(model.vae).__name__ == cls
    info = model.describe()
    assert info["class"] == cls and info["latent_channels"] == channels and info["tiling"] == (cls == "AutoencoderKL")
    if family == "playground":
        assert info["latents_mean"] == (-1.6574, 1.886, -1.383, 2.5155)
        assert info["latents_std"] == (8.4927, 5.9022, 6.5498, 5.2299)
    else:
        assert info["latents_mean"] is None and info["latents_std"] is None
    flops = count_flops(model.vae, 64)
    assert flops["encode"] > 0 and flops["decode"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_equal_in_process_diffusers(family, family_dirs, image_tensor):
    model, ref = VAEModel.load(family, family_dirs[family]), family_reference(family_dirs[family])
    with torch.no_grad():
        z_ref = diffusers_latents(ref, image_tensor)
        x_ref = ref.decode(z_ref).sample
    z = model.encode(image_tensor)
    assert z.shape == (1, EXPECTED[family][1], 4, 5)
    assert torch.equal(z, z_ref)
    assert torch.equal(model.decode(z), x_ref)
    # Sampling: a posterior draw for AutoencoderKL; TAESD has no posterior, its encoder is deterministic.
    drawn = model.encode(image_tensor, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, z) == (model.kind == "AutoencoderTiny")


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_contract_scales_as_the_pipelines_do(family, family_dirs, image_tensor):
    model = VAEModel.load(family, family_dirs[family])
    config = dict(model.config)
    z = model.encode(image_tensor)
    factors = (model.scaling_factor, model.shift_factor, model.latents_mean, model.latents_std)
    scaled = latents.scale(z, *factors)
    assert torch.equal(scaled, pipeline_scale(config, z))
    assert torch.equal(latents.unscale(scaled, *factors), pipeline_unscale(config, scaled))
    if model.kind == "AutoencoderTiny":  # TAESD's latents are already the scaled ones: scale 1, shift 0
        assert torch.equal(scaled, z)
    # The metadata carries the per-channel statistics, and reading it back undoes them.
    info = latents.LatentInfo(model.scaling_factor, model.shift_factor, True, None,
                              latents_mean=model.latents_mean, latents_std=model.latents_std)
    back = latents.LatentInfo.from_metadata({k: json.dumps(v) for k, v in info.to_metadata().items()})
    assert back == info and torch.equal(back.to_raw(scaled), pipeline_unscale(config, scaled))


def test_latents_mean_std_metadata_is_validated():
    with pytest.raises(latents.LatentMetadataError, match="must come together"):
        latents.LatentInfo.from_metadata({"scaled": "true", "scaling_factor": "0.5", "latents_mean": "[1, 2]"})
    with pytest.raises(latents.LatentMetadataError, match="zeros"):
        latents.LatentInfo.from_metadata({"scaled": "true", "latents_mean": "[1]", "latents_std": "[0]"})
    info = latents.LatentInfo.from_metadata({"scaled": "true", "latents_mean": "[1, 2]", "latents_std": "[2, 4]"})
    with pytest.raises(latents.LatentMetadataError, match="2 per-channel statistics for latents of 4 channels"):
        info.to_raw(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize("height, width", [(64, 64), (48, 80), (40, 56), (1024, 768)])
def test_flux_packing_is_the_pipelines(height, width):
    h, w = latent_ops.packed_latent_size(height, width, 8)
    assert (h, w) == (2 * (height // 16), 2 * (width // 16))
    z = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(height))
    packed = flux_pipeline_function("_pack_latents")(z, 2, 16, h, w)
    assert torch.equal(latent_ops.pack_latents(z), packed)
    assert packed.shape == (2, (height // 16) * (width // 16), 64)
    unpacked = flux_pipeline_function("_unpack_latents")(packed, height, width, 8)
    assert torch.equal(latent_ops.unpack_latents(packed, height, width, 8), unpacked)
    assert torch.equal(unpacked, z)


def test_force_upcast_runs_half_precision_requests_in_float32(family_dirs, image_tensor):
    """SDXL's config sets force_upcast: a float16 request runs in float32, as diffusers' pipelines do
    (VAEModel.load reads float16 requests in float32 first; here its constructor, on the CPU)."""
    loaded = load_weights(family_dirs["sdxl"])
    model = VAEModel("sdxl", loaded, requested_dtype=torch.float16)
    assert model.upcast and model.dtype == torch.float32 and model.describe()["requested_dtype"] == "float16"
    ref = family_reference(family_dirs["sdxl"])
    with torch.no_grad():
        assert torch.equal(model.encode(image_tensor), diffusers_latents(ref, image_tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 needs CUDA")
def test_force_upcast_on_cuda(family_dirs, image_tensor):
    sdxl = VAEModel.load("sdxl", family_dirs["sdxl"], device="cuda", dtype="float16")
    assert sdxl.upcast and sdxl.dtype == torch.float32 and sdxl.describe()["dtype"] == "float32"
    ref = family_reference(family_dirs["sdxl"]).to("cuda")
    with torch.no_grad():
        z_ref = diffusers_latents(ref, image_tensor.cuda()).cpu()
    torch.testing.assert_close(sdxl.encode(image_tensor), z_ref)
    taesd = VAEModel.load("taesd", family_dirs["taesd"], device="cuda", dtype="float16")  # force_upcast false
    assert not taesd.upcast and taesd.dtype == torch.float16


def _folder(path, config: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(1)}, str(path / "diffusion_pytorch_model.safetensors"))
    return path


@pytest.mark.parametrize("cls", ["AutoencoderKLWan", "AutoencoderDC", "VQModel", "ConsistencyDecoderVAE"])
def test_unservable_class_is_refused_in_one_line(cls, tmp_path):
    folder = _folder(tmp_path / "other", {"_class_name": cls, "latent_channels": 16})
    with pytest.raises(ModelLoadError) as err:
        load_weights(folder)
    message = str(err.value)
    assert "\n" not in message and f"holds a {cls}" in message
    assert "supported are AutoencoderKL and AutoencoderTiny" in message


def test_config_the_class_cannot_build_is_a_load_error(tmp_path):
    """AutoencoderKL with widths that GroupNorm's 32 groups do not divide: one line, not a ValueError."""
    config, _ = family_config("flux")
    folder = _folder(tmp_path / "bad", {"_class_name": "AutoencoderKL", **config, "block_out_channels": [16] * 4})
    with pytest.raises(ModelLoadError, match="does not describe a valid AutoencoderKL: .*divisible"):
        load_weights(folder)


def test_single_file_checkpoints_are_autoencoderkl_only(family_dirs, tmp_path):
    weights = tmp_path / "taesd.safetensors"
    weights.write_bytes((family_dirs["taesd"] / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="single-file checkpoints are AutoencoderKL only"):
        load_weights(weights, config=family_dirs["taesd"])


def test_flux_single_file_loads_with_its_config(family_dirs, tmp_path, image_tensor):
    """FLUX's `ae.safetensors` layout (LDM keys, no quant convs, 16 channels) with the folder's config."""
    from models.vae.export import export_single_file

    ref = family_reference(family_dirs["flux"])
    path = export_single_file(ref, tmp_path / "ae.safetensors")
    model = VAEModel.load("flux", path, config=family_dirs["flux"])
    assert model.layout == "single_file" and model.latent_channels == 16 and model.shift_factor == 0.1159
    with torch.no_grad():
        assert torch.equal(model.encode(image_tensor), diffusers_latents(ref, image_tensor))
