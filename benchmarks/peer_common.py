"""What the peer apps share: loading the model, thread settings, the raw latent body, PNG answers."""

from __future__ import annotations

import io
import os

PRESETS = {
    "default": dict(dtype="float32", channels_last=False, inference_mode=False, max_batch_size=1, batch_timeout=0.0),
    "best": dict(dtype="bfloat16", channels_last=True, inference_mode=True, max_batch_size=4, batch_timeout=0.005),
}


def load_vae(path: str, device: str, dtype: str, channels_last: bool):
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, torch_dtype=_dtype(dtype)).to(device).eval()
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    return vae


def latents_from(body: bytes, shape: list[int]):
    import torch

    return torch.frombuffer(bytearray(body), dtype=torch.float32).reshape(shape)


def png_of(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _set_threads():
    import torch

    n = os.environ.get("PEER_TORCH_THREADS")
    if n:
        torch.set_num_threads(int(n))


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
