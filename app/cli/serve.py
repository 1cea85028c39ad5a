"""`vae serve`: load the models, then run the HTTP service with uvicorn.

Every option has a `VAE_*` environment variable (see app.http.settings); options given here win.
With no model named anywhere, the shipped default model (models/default) is served when present.
"""

from __future__ import annotations

import argparse
import sys

from app.http.ray_serve import add_ray_arguments
from app.http.settings import Settings
from models.vae.loading import DEFAULT_MODEL_DIR, ModelLoadError

NO_MODEL = (
    "vae serve: error: no model to serve. Name one with --model NAME=PATH (a diffusers folder, "
    "a single-file .safetensors checkpoint or a hub id; repeat for several, the first is the default) "
    "or VAE_MODELS=NAME=PATH; the shipped default model ({path}) is not installed."
)


def build_parser(defaults: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae serve", description="Serve VAE models over HTTP (/encode, /decode, /roundtrip).")
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="model to serve (repeatable; the first is the default). Env: VAE_MODELS")
    p.add_argument("--config", default=defaults.config, help="config folder for single-file checkpoints. Env: VAE_CONFIG")
    p.add_argument("--host", default=defaults.host, help=f"bind address (default {defaults.host}). Env: VAE_HOST")
    p.add_argument("--port", type=int, default=defaults.port, help=f"port (default {defaults.port}). Env: VAE_PORT")
    p.add_argument("--device", default=defaults.device, help="cpu | cuda | cuda:N. Env: VAE_DEVICE")
    p.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (float16 needs cuda). Env: VAE_DTYPE")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=defaults.compile,
                   help="torch.compile encoder and decoder (warmed up before /readyz is ready). Env: VAE_COMPILE")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=defaults.channels_last,
                   help="channels_last layout (default: on for bfloat16/float16, off for exact float32). Env: VAE_CHANNELS_LAST")
    p.add_argument("--tile-threshold-pixels", type=int, default=defaults.tile_threshold_pixels,
                   help=f"tile images over this many pixels (default {defaults.tile_threshold_pixels}; 0: only ?tiled=true). "
                        "Env: VAE_TILE_THRESHOLD_PIXELS")
    p.add_argument("--tile-size", type=int, default=defaults.tile_size,
                   help=f"tile side in pixels (default {defaults.tile_size}). Env: VAE_TILE_SIZE")
    p.add_argument("--tile-overlap", type=float, default=defaults.tile_overlap,
                   help=f"blended fraction of a tile (default {defaults.tile_overlap}). Env: VAE_TILE_OVERLAP")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="per-image pixel limit. Env: VAE_MAX_PIXELS")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="request size limit. Env: VAE_MAX_BODY_BYTES")
    p.add_argument("--model-threads", type=int, default=defaults.model_threads, help="concurrent model calls. Env: VAE_MODEL_THREADS")
    p.add_argument("--log-level", default=defaults.log_level, help="uvicorn log level. Env: VAE_LOG_LEVEL")
    add_hardening_arguments(p, defaults)
    add_ray_arguments(p)
    return p


def add_hardening_arguments(p: argparse.ArgumentParser, d: Settings) -> None:
    """Limits, queue, batching, shutdown, logging (docs/operations.md). API keys: env only (not in `ps`)."""
    g = p.add_argument_group("limits, queue and shutdown (docs/operations.md)")
    g.add_argument("--max-latent-elements", type=int, default=d.max_latent_elements,
                   help="N*C*h*w limit of latents in or out. Env: VAE_MAX_LATENT_ELEMENTS")
    g.add_argument("--image-formats", default=",".join(d.image_formats),
                   help="accepted upload formats, comma-separated (png,jpeg,webp). Env: VAE_IMAGE_FORMATS")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds until a request's model work must be done, else 504. Env: VAE_REQUEST_TIMEOUT")
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="waiting model work before 503 + Retry-After. Env: VAE_MAX_QUEUE")
    g.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="dynamic batching limit (default: 1 on CPU, 8 on CUDA). Env: VAE_MAX_BATCH_SIZE")
    g.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long a partial batch waits for companions. Env: VAE_BATCH_WAIT_MS")
    g.add_argument("--grace-seconds", type=float, default=d.grace_seconds,
                   help="on SIGTERM, time for accepted requests to finish. Env: VAE_GRACE_SECONDS")
    g.add_argument("--cors-origins", default=",".join(d.cors_origins),
                   help="allowed CORS origins, comma-separated (default: CORS off). Env: VAE_CORS_ORIGINS")
    g.add_argument("--log-format", default=d.log_format, choices=["json", "text"], help="Env: VAE_LOG_FORMAT")


def settings_from_args(argv: list[str] | None) -> Settings:
    """Environment (VAE_*) first, command line on top."""
    env = Settings()
    args = build_parser(env).parse_args(argv)
    values = env.model_dump()
    values.update({k: v for k, v in vars(args).items() if k != "model"})
    if args.model:
        values["models"] = args.model
    if not values["models"] and (DEFAULT_MODEL_DIR / "config.json").is_file():
        values["models"] = [f"default={DEFAULT_MODEL_DIR}"]
    return Settings(**values)


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_args(argv)
    if not settings.models:
        print(NO_MODEL.format(path=DEFAULT_MODEL_DIR), file=sys.stderr)
        return 2
    ray_args = build_parser(settings).parse_args(argv)
    if ray_args.ray:  # Ray Serve: each replica loads the models itself
        from app.http.ray_serve import run as run_ray

        return run_ray(settings, ray_args)
    from app.http.observability import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from app.http.app import ModelRegistry, create_app

    try:
        registry = ModelRegistry.from_settings(settings)
    except ModelLoadError as exc:
        print(f"vae serve: error: {exc}", file=sys.stderr)
        return 2
    from app.http.lifecycle import serve

    app = create_app(settings, registry)
    for name, model in registry.models.items():
        print(f"vae serve: model {name!r} from {model.source} ({model.dtype}, {model.device})", file=sys.stderr)
    return serve(app, settings)  # drains on SIGTERM, then 0


if __name__ == "__main__":
    sys.exit(main())
