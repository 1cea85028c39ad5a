"""The half-precision fast path of models.vae.inference.VAEModel: bf16 close to fp32, layout choice,
NaN retry in float32, force_upcast, and the serve flags. Timings are never asserted here."""

from __future__ import annotations

import pytest
import torch

from support import make_tiny_vae
from models.vae.inference import VAEModel
from models.vae.loading import LoadedWeights, ModelLoadError


def wrap(vae, **options) -> VAEModel:
    return VAEModel("tiny", LoadedWeights(vae, "0" * 64, "memory", "diffusers"), **options)


def smooth(n=1, h=48, w=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([xx, yy, xx * yy])[None].repeat(n, 1, 1, 1)
    return (0.8 * base + 0.1 * torch.randn(n, 3, h, w, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def pair(tiny_vae_dir):
    return VAEModel.load("fp32", tiny_vae_dir), VAEModel.load("bf16", tiny_vae_dir, dtype="bfloat16")


def test_bf16_close_to_fp32(pair):
    m32, mbf = pair
    assert mbf.dtype == torch.bfloat16 and mbf.channels_last and not m32.channels_last
    assert mbf.describe()["channels_last"] is True and mbf.describe()["requested_dtype"] == "bfloat16"
    x = smooth()
    z32, zbf = m32.encode(x), mbf.encode(x)
    assert zbf.dtype == torch.float32 and zbf.shape == z32.shape and zbf.is_contiguous()
    assert (zbf - z32).abs().max() < 0.05 * max(1.0, z32.abs().max().item())
    y32, ybf = m32.decode(z32), mbf.decode(z32)
    assert ybf.dtype == torch.float32 and ybf.is_contiguous()
    assert (ybf - y32).abs().max() < 0.1 and (ybf - y32).abs().mean() < 0.01


def test_fp32_stays_exact(pair, tiny_vae_dir):
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(str(tiny_vae_dir)).eval()
    x = smooth(h=40, w=40)
    with torch.inference_mode():
        z = ref.encode(x).latent_dist.mode()
        y = ref.decode(z).sample
    m32 = pair[0]
    assert torch.equal(m32.encode(x), z)
    assert torch.equal(m32.decode(z), y)


def nan_when_half(module, inputs, output):
    return output * float("nan") if inputs[0].dtype != torch.float32 else output


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_nan_output_is_retried_in_fp32(part, caplog):
    vae = make_tiny_vae()
    m32 = wrap(make_tiny_vae())
    mbf = wrap(vae.to(torch.bfloat16))
    getattr(mbf.vae, part).register_forward_hook(nan_when_half)
    x = smooth()
    z = m32.encode(x)
    with caplog.at_level("WARNING", logger="vae.inference"):
        out = mbf.encode(x) if part == "encoder" else mbf.decode(z)
    assert torch.isfinite(out).all()
    assert "retrying in float32" in caplog.text
    ref = z if part == "encoder" else m32.decode(z)
    # The retry runs float32 kernels on the (bf16-rounded) weights: close to the fp32 model.
    assert (out - ref).abs().max() < 0.1
    assert mbf._fp32_vae is not None and next(mbf._fp32_vae.parameters()).dtype == torch.float32


def test_nan_retry_can_be_switched_off():
    mbf = wrap(make_tiny_vae().to(torch.bfloat16), nan_retry=False)
    mbf.vae.decoder.register_forward_hook(nan_when_half)
    assert not torch.isfinite(mbf.decode(torch.zeros(1, 4, 4, 4))).all()


def test_sampling_retry_reuses_the_generator_state():
    mbf = wrap(make_tiny_vae().to(torch.bfloat16))
    mbf.vae.encoder.register_forward_hook(nan_when_half)
    x = smooth()
    a = mbf.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    b = mbf.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_force_upcast_runs_float16_models_in_float32():
    upcast = wrap(make_tiny_vae(force_upcast=True).half(), requested_dtype=torch.float16)
    assert upcast.upcast and upcast.dtype == torch.float32 and not upcast.channels_last
    half = wrap(make_tiny_vae(force_upcast=False).half(), requested_dtype=torch.float16)
    assert not half.upcast and half.dtype == torch.float16 and half.channels_last


def test_float16_on_cpu_is_refused(tiny_vae_dir):
    with pytest.raises(ModelLoadError, match="float16"):
        VAEModel.load("x", tiny_vae_dir, dtype="float16")


def test_channels_last_can_be_forced(tiny_vae_dir):
    m = VAEModel.load("x", tiny_vae_dir, channels_last=True)
    x = smooth()
    assert m.channels_last and (m.decode(m.encode(x)) - VAEModel.load("y", tiny_vae_dir).decode(m.encode(x))).abs().max() < 1e-3


def test_serve_flags_reach_settings(monkeypatch):
    from app.cli.serve import settings_from_args

    monkeypatch.delenv("VAE_TILE_THRESHOLD_PIXELS", raising=False)
    s = settings_from_args(["--model", "a=/x", "--compile", "--tile-threshold-pixels", "0", "--tile-size", "256",
                            "--no-channels-last"])
    assert s.compile and s.tile_threshold_pixels == 0 and s.tile_size == 256 and s.channels_last is False
    monkeypatch.setenv("VAE_TILE_THRESHOLD_PIXELS", "1000")
    monkeypatch.setenv("VAE_COMPILE", "true")
    s = settings_from_args(["--model", "a=/x"])
    assert s.tile_threshold_pixels == 1000 and s.compile and s.channels_last is None


def test_compile_flag_compiles_encoder_and_decoder_and_warms_up_at_256(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    m = wrap(make_tiny_vae(), compile=True)
    assert compiled == ["Encoder", "Decoder"] and m.compiled and m.describe()["compiled"]
    sizes = []
    real = m.encode
    monkeypatch.setattr(m, "encode", lambda x, **kw: sizes.append(tuple(x.shape[-2:])) or real(x, **kw))
    m.warmup()
    assert sizes == [(256, 256)]
