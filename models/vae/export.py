"""`vae export`: write a model in the original LDM / Stable Diffusion single-file layout, or as
a (smaller, e.g. float16) diffusers folder.

The file loads with diffusers' `AutoencoderKL.from_single_file(path, config=...)` and with
tools that read SD VAE checkpoints. The diffusers config travels in the safetensors metadata
(`diffusers_config`), so our loader rebuilds non-SD architectures without a side file.

An existing target is never touched unless `--replace` says so; the new file or folder is
written beside it under a temporary name and then takes its place in one rename (for a folder:
an atomic exchange where the kernel offers one), and a failed export leaves no temporary behind.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.options import Parser, fail
from models.vae.ldm_keys import diffusers_to_ldm

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROG = "vae export"


class TargetExistsError(FileExistsError):
    """The export target holds something and replacing it was not asked for."""


def _check_target(out: Path, replace: bool, folder: bool) -> None:
    if folder:
        if out.exists() and not out.is_dir():
            raise TargetExistsError(f"{out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not replace:
            raise TargetExistsError(f"{out} is not empty: pass --replace to replace it")
    else:
        if out.is_dir():
            raise TargetExistsError(f"{out} is a folder")
        if out.exists() and not replace:
            raise TargetExistsError(f"{out} exists: pass --replace to replace it")


def export_single_file(vae, out: str | Path, dtype: torch.dtype = torch.float32, replace: bool = False) -> Path:
    """Write `vae`'s weights with LDM key names to `out` (.safetensors), atomically.

    Raises TargetExistsError when `out` exists and `replace` is false."""
    out = Path(out)
    _check_target(out, replace, folder=False)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    metadata = {"format": "pt", "diffusers_config": json.dumps(dict(vae.config))}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; others (a container user) must read the weights
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not offered."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def export_diffusers(vae, out: str | Path, dtype: torch.dtype = torch.float16, replace: bool = False) -> Path:
    """save_pretrained in `dtype` (half the bytes at float16) into a temporary folder beside `out`,
    which then takes `out`'s place. Raises TargetExistsError when `out` is a non-empty folder and
    `replace` is false (an empty folder is simply filled)."""
    import copy

    out = Path(out)
    _check_target(out, replace, folder=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        copy.deepcopy(vae).to(dtype).save_pretrained(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # the weights are written 0600 (a temp file); others (a container user) must read them
        tmp.chmod(0o755)  # mkdtemp makes the folder 0700
        if out.is_dir() and any(out.iterdir()):
            if not _exchange(tmp, out):  # no atomic swap here: move the old folder aside, then rename
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                tmp = old
        else:
            os.replace(tmp, out)  # onto nothing, or onto an empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old folder
    return out


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="diffusers folder (or single file) to export")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--single-file", metavar="OUT.safetensors", help="original LDM single-file layout")
    target.add_argument("--diffusers", metavar="OUT_DIR", help="a diffusers folder (e.g. --dtype float16)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--replace", action="store_true", help="replace an existing file / non-empty folder (atomically)")
    args = p.parse_args(argv)
    if args.single_file and not args.single_file.endswith(".safetensors"):
        return fail(PROG, "--single-file must end in .safetensors")
    out = Path(args.diffusers or args.single_file)
    try:  # before loading the model: a refusal costs nothing
        _check_target(out, args.replace, folder=bool(args.diffusers))
    except TargetExistsError as exc:
        return fail(PROG, str(exc))
    from models.vae.loading import ModelLoadError, load_weights

    try:
        vae = load_weights(args.model).vae
    except ModelLoadError as exc:
        return fail(PROG, str(exc))
    try:
        if args.diffusers:
            path = export_diffusers(vae, out, DTYPES[args.dtype], args.replace)
            size = sum(f.stat().st_size for f in path.iterdir())
            print(f"wrote {path} ({size / 1e6:.1f} MB, {args.dtype}, diffusers folder)")
        else:
            path = export_single_file(vae, out, DTYPES[args.dtype], args.replace)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.dtype}, LDM layout)")
    except TargetExistsError as exc:  # appeared while the model was loading
        return fail(PROG, str(exc))
    except OSError as exc:
        print(f"{PROG}: error: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
