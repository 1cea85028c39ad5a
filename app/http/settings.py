"""Service settings: one definition per option.

Each field is an environment variable `VAE_<NAME>` (pydantic-settings) and a `vae serve` flag
`--<name>` generated from the field (app.cli.serve): name, default and help come from here.
`VAE_MODELS` lists `NAME=PATH` entries, comma-separated or as a JSON list; the first is the
default model. Command-line options of `vae serve` override the environment.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]  # comma-separated in the environment and on the command line


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VAE_", extra="ignore")

    models: CommaList = Field([], description="models to serve, NAME=PATH (a bare PATH is named after its folder); "
                                              "the first is the default")
    config: str | None = Field(None, description="diffusers config folder for single-file checkpoints (default: SD kl-f8)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port")
    device: str = Field("cpu", description="cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype of the models (float16 needs cuda; bfloat16 is the CPU fast path)")
    # fast path and tiling (models/vae/inference.py; figures in benchmarks/RESULTS.md)
    compile: bool = Field(False, description="torch.compile encoder and decoder, warmed up before /readyz is ready")
    channels_last: bool | None = Field(
        None, description="channels_last layout (default: on for bfloat16/float16, off for exact float32)")
    tile_threshold_pixels: int = Field(1536 * 1536, ge=0,
                                       description="tile images over this many pixels (0: only with ?tiled=true)")
    tile_size: int = Field(768, ge=64, description="tile side in image pixels (a multiple of the downsample factor)")
    tile_overlap: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of a tile blended with its neighbour")
    max_pixels: int = Field(2048 * 2048, ge=64, description="pixels per image, in and out (decompression bombs, memory)")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request body size limit in bytes")
    model_threads: int | None = Field(None, ge=1, le=64, description=(
        "concurrent model calls (default: on CPU one per core, at most 4; 1 on CUDA). Calls running "
        "together share the torch threads equally (models/vae/threads.py)"))
    torch_threads: int | None = Field(None, ge=1, le=1024, description=(
        "intra-op threads of all model calls together (default: torch's, one per core)"))
    warmup: bool = Field(True, description="one small encode + decode per model before /readyz says ready")
    jpeg_quality: int = Field(95, ge=1, le=100, description="quality of JPEG / WebP answers")
    log_level: str = Field("info", description="log level (uvicorn and the service)")
    # --- limits, queue and shutdown (docs/operations.md) ---
    max_latent_elements: int = Field(4 * 4 * 256 * 256, ge=1, description="N*C*h*w limit of latents in or out")
    max_cost: float = Field(11_000.0, gt=0, description=(
        "estimated compute per request in GFLOP, counted from what it will run (padded size, tiles and "
        "tiling passes, frames, samples, colour-lock decodes; GET /v1/models); above it 413. The default "
        "admits a 2048x2048 /roundtrip of the shipped model (10,189 GFLOP)"))
    max_json_bytes: int = Field(8 * 1024 * 1024, ge=1024,
                                description="JSON tensor bodies, which cost ~15 bytes of memory per byte once parsed")
    image_formats: CommaList = Field(["png", "jpeg", "webp"], description="accepted upload formats (allow-list)")
    request_timeout: float = Field(300.0, gt=0, description="seconds from arrival to the end of model work, else 504")
    body_timeout: float = Field(60.0, gt=0, description="seconds from arrival for the whole request body, else 408")
    max_queue: int = Field(64, ge=1, description="model work waiting for a worker; beyond it 503 + Retry-After")
    max_batch_size: int | None = Field(None, ge=1, le=256, description="dynamic batching limit (default: 1 on CPU, 8 on CUDA)")
    batch_wait_ms: float = Field(2.0, ge=0, le=10_000, description="how long a partial batch waits for companions")
    grace_seconds: float = Field(30.0, ge=0, description="on SIGTERM, time for accepted requests to finish")
    api_keys: CommaList = Field([], description="Bearer API keys (environment only: not visible in `ps`); empty: no auth")
    cors_origins: CommaList = Field([], description="allowed CORS origins (default: CORS off)")
    log_format: Literal["json", "text"] = Field("json", description="log line format")

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
