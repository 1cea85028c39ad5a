"""The `vae` command: a thin dispatcher.

Each subcommand lives in the module that owns the concept and exposes `main(argv) -> int`,
so `vae train` is `models.training.train` and `vae serve` is `app.cli.serve`. Modules are imported lazily:
`vae --help` stays fast and a subcommand never pays for another's imports.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("app.cli.serve", "run the HTTP service (/encode, /decode, /roundtrip)"),
    "info": ("models.vae.info", "show a model's config, parameter count and FLOPs"),
    "train": ("models.training.train", "train or fine-tune a VAE on folders of images"),
    "eval": ("models.training.evaluate", "PSNR / SSIM / latent statistics of a model on a folder"),
    "export": ("models.vae.export", "write a model in the original LDM single-file layout"),
    "encode": ("app.bulk.cli", "encode images / folders into latent files"),
    "decode": ("app.bulk.cli", "decode latent files back into images"),
    "bench": ("benchmarks.bench.cli", "side-by-side speed benchmark"),
}


def _usage() -> str:
    lines = ["usage: vae COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `vae COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vae: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # Modules serving two commands (encode/decode) get the command name as well.
    if getattr(module, "MULTI_COMMAND", False):
        return int(module.main(name, rest) or 0)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
