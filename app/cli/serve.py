"""`vae serve`: load the models, then run the HTTP service with uvicorn (or Ray Serve).

The flags are generated from the fields of app.http.settings.Settings (name, default, help and
the `VAE_*` variable all come from the field), so an option is defined once. Options given here
win over the environment. With no model named anywhere, the shipped default model is served.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing

from app.http.ray_serve import add_ray_arguments
from app.http.settings import Settings
from models.vae.loading import DEFAULT_MODEL_DIR, ModelLoadError, default_model_spec

NO_MODEL = (
    "vae serve: error: no model to serve. Name one with --model NAME=PATH (a diffusers folder, "
    "a single-file .safetensors checkpoint or a hub id; repeat for several, the first is the default) "
    "or VAE_MODELS=NAME=PATH; the shipped default model ({path}) is not installed."
)
ENV_ONLY = {"api_keys"}  # secrets: never on a command line, where `ps` shows them


def flag_name(field: str) -> str:
    return "--model" if field == "models" else "--" + field.replace("_", "-")


def _flag_type(annotation):
    """(argparse type, choices, is_bool, is_list) of a Settings field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1 else annotation
    if typing.get_origin(base) is typing.Annotated:
        base = typing.get_args(base)[0]
    if typing.get_origin(base) is typing.Literal:
        return str, list(typing.get_args(base)), False, False
    if typing.get_origin(base) is list:
        return str, None, False, True
    return base, None, base is bool, False


def build_parser(defaults: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae serve", description="Serve VAE models over HTTP (/encode, /decode, /roundtrip, ...).")
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        env = f"VAE_{name.upper()}"
        kind, choices, is_bool, is_list = _flag_type(field.annotation)
        default = getattr(defaults, name)
        help_ = f"{field.description}. Env: {env}"
        if name == "models":  # repeatable, as NAME=PATH
            p.add_argument("--model", action="append", metavar="NAME=PATH", help=f"{help_} (repeatable)")
        elif is_bool:
            p.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif is_list:
            p.add_argument(flag_name(name), default=",".join(default), metavar="A,B",
                           help=f"{help_} (comma-separated; default {','.join(default) or 'none'})")
        else:
            p.add_argument(flag_name(name), type=kind, choices=choices, default=default,
                           help=f"{help_} (default {default})")
    add_ray_arguments(p)
    return p


def parse(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    """Environment (VAE_*) first, the command line on top, the shipped model when none is named."""
    env = Settings()
    args = build_parser(env).parse_args(argv)
    values = env.model_dump()
    values.update({k: v for k, v in vars(args).items() if k in Settings.model_fields})
    if args.model:
        values["models"] = args.model
    if not values["models"] and default_model_spec():
        values["models"] = [default_model_spec()]
    from pydantic import ValidationError

    try:
        return Settings(**values), args
    except ValidationError as exc:
        problems = "; ".join(f"{flag_name(str(e['loc'][0]))}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"vae serve: error: {problems}") from None


def settings_from_args(argv: list[str] | None) -> Settings:
    return parse(argv)[0]


def main(argv: list[str] | None = None) -> int:
    try:
        settings, args = parse(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise
    if not settings.models:
        print(NO_MODEL.format(path=DEFAULT_MODEL_DIR), file=sys.stderr)
        return 2
    if args.ray:  # Ray Serve: each replica loads the models itself
        from app.http.ray_serve import run as run_ray

        return run_ray(settings, args)
    from app.http.observability import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from app.http.app import create_app
    from app.http.registry import ModelRegistry

    try:
        registry = ModelRegistry.from_settings(settings)
    except (ModelLoadError, ValueError) as exc:  # one line, never a traceback: a bad folder or option
        print(f"vae serve: error: {exc}", file=sys.stderr)
        return 2
    from app.http.lifecycle import exit_process, serve

    app = create_app(settings, registry)
    for name, model in registry.models.items():
        print(f"vae serve: model {name!r} from {model.source} ({model.dtype}, {model.device})", file=sys.stderr)
    # Drains on SIGTERM, then 0. The process ends right here, without the interpreter's teardown
    # (seconds to minutes of garbage collection; app.http.lifecycle.exit_process).
    exit_process(serve(app, settings))


if __name__ == "__main__":
    sys.exit(main())
