"""Service settings: every option is also a `VAE_*` environment variable (pydantic-settings).

`VAE_MODELS` lists `NAME=PATH` entries, comma-separated or as a JSON list; the first is the
default model. Command-line options of `vae serve` override the environment.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VAE_", extra="ignore")

    models: Annotated[list[str], NoDecode] = []  # "NAME=PATH" (a bare PATH is named after its folder)
    config: str | None = None  # diffusers config folder for single-file checkpoints (default: SD kl-f8)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16 (float16 needs cuda)
    # fast path and tiling (models/vae/inference.py; figures in benchmarks/RESULTS.md)
    compile: bool = False  # torch.compile encoder/decoder, warmed up at 256x256 before /readyz is ready
    channels_last: bool | None = None  # None: on for bfloat16/float16 (the fast path), off for float32 (exact)
    tile_threshold_pixels: int = 1536 * 1536  # larger images are tiled automatically; 0: only with ?tiled=true
    tile_size: int = 768  # tile side in image pixels (a multiple of the downsample factor; 768: benchmarks/RESULTS.md)
    tile_overlap: float = 0.25  # fraction of a tile blended with its neighbour
    max_pixels: int = 2048 * 2048  # per image, input and output: decompression-bomb and memory guard
    max_body_bytes: int = 64 * 1024 * 1024
    model_threads: int = 1  # concurrent model calls; CPU inference already uses every core
    torch_threads: int | None = None  # torch.set_num_threads when set
    warmup: bool = True  # one tiny encode+decode per model before /readyz says ready
    jpeg_quality: int = 95  # JPEG / WebP responses
    log_level: str = "info"
    # --- hardening (docs/operations.md) ---
    max_latent_elements: int = 4 * 4 * 256 * 256  # N*C*h*w of a latent tensor in or out: four 2048x2048 images
    image_formats: Annotated[list[str], NoDecode] = ["png", "jpeg", "webp"]  # accepted uploads (allow-list)
    request_timeout: float = 300.0  # seconds from arrival to the end of model work, else 504
    max_queue: int = 64  # model work waiting for a worker; beyond it 503 + Retry-After at once
    max_batch_size: int | None = None  # dynamic batching; None: 1 on CPU (no gain there), 8 on CUDA
    batch_wait_ms: float = 2.0  # how long a lone request waits for companions before running
    grace_seconds: float = 30.0  # on SIGTERM: time for in-flight work before the process exits
    api_keys: Annotated[list[str], NoDecode] = []  # Bearer keys; empty = no authentication
    cors_origins: Annotated[list[str], NoDecode] = []  # empty = no CORS headers at all
    log_format: str = "json"  # json | text

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value):
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


    @field_validator("image_formats", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value):
        # Comma-separated in the environment (VAE_API_KEYS=k1,k2); blanks dropped.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


def parse_model_spec(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare PATH is named after its last path component."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, path
    path = spec
    stem = path.rstrip("/").split("/")[-1]
    return (stem.rsplit(".", 1)[0] if "." in stem else stem) or "default", path
