"""`vae export`: write a model in the original LDM / Stable Diffusion single-file layout, or as
a (smaller, e.g. float16) diffusers folder.

The file loads with diffusers' `AutoencoderKL.from_single_file(path, config=...)` and with
tools that read SD VAE checkpoints. The diffusers config travels in the safetensors metadata
(`diffusers_config`), so our loader rebuilds non-SD architectures without a side file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.vae.ldm_keys import diffusers_to_ldm

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_single_file(vae, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `vae`'s weights with LDM key names to `out` (.safetensors), atomically."""
    out = Path(out)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    metadata = {"format": "pt", "diffusers_config": json.dumps(dict(vae.config))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def export_diffusers(vae, out: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """save_pretrained in `dtype` (half the bytes at float16), into a temp folder then renamed."""
    import copy
    import shutil

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(vae).to(dtype).save_pretrained(tmp)
    for f in tmp.iterdir():
        f.chmod(0o644)  # the weights are written 0600 (a temp file); others (a container user) must read them
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vae export", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="diffusers folder (or single file) to export")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--single-file", metavar="OUT.safetensors", help="original LDM single-file layout")
    target.add_argument("--diffusers", metavar="OUT_DIR", help="a diffusers folder (e.g. --dtype float16)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    if args.single_file and not args.single_file.endswith(".safetensors"):
        print("vae export: --single-file must end in .safetensors", file=sys.stderr)
        return 2
    from models.vae.loading import ModelLoadError, load_weights

    try:
        vae = load_weights(args.model).vae
    except ModelLoadError as exc:
        print(f"vae export: {exc}", file=sys.stderr)
        return 2
    if args.diffusers:
        path = export_diffusers(vae, args.diffusers, DTYPES[args.dtype])
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"wrote {path} ({size / 1e6:.1f} MB, {args.dtype}, diffusers folder)")
        return 0
    path = export_single_file(vae, args.single_file, DTYPES[args.dtype])
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.dtype}, LDM layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
