"""Load VAE weights from local folders, original single files or (when reachable) the hub.

Served classes (`SUPPORTED_CLASSES`, read from the config's `_class_name`): diffusers'
`AutoencoderKL` (SD 1.x, SDXL, SD3, FLUX: 4 or 16 latent channels) and `AutoencoderTiny` (TAESD).
A folder holding any other class is refused with one line naming it (docs/families.md).

Accepted sources, tried in this order:
  * a diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors`, or a pipeline folder
    holding them under `vae/`;
  * a single file in the original LDM / Stable Diffusion layout (`.safetensors`; `.ckpt`/`.pt` only
    through `torch.load(weights_only=True)`), built with `AutoencoderKL.from_single_file` and a
    local diffusers config (`config=`, else a `config.json` beside the file, else the bundled SD kl-f8
    config) — never the hub;
  * a hub id `org/name`, only when the hub is reachable.
Every failure is a `ModelLoadError` whose message is one line naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL_DIR = Path(__file__).parents[1] / "default"
SD_KL_F8_CONFIG_DIR = Path(__file__).parent / "configs" / "sd-kl-f8"
CONFIGS_DIR = Path(__file__).parent / "configs"  # the families' published configs (docs/families.md)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SUPPORTED_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Old diffusers attention names, still present in some published VAE folders.
_LEGACY_ATTN = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def parse_model_spec(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare PATH is named after its last path component."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, path
    path = spec
    stem = path.rstrip("/").split("/")[-1]
    return (stem.rsplit(".", 1)[0] if "." in stem else stem) or "default", path


def default_model_spec() -> str | None:
    """`default=<models/default>` when the shipped default model is installed, else None: what
    every command serves or uses when no model is named (the one home of that fallback)."""
    return f"default={DEFAULT_MODEL_DIR}" if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


class ModelLoadError(RuntimeError):
    """Weights or configuration that cannot be used; `str(err)` is a one-line reason."""


def model_class(config: dict, where: str | Path = "config"):
    """The diffusers class a config describes (`_class_name`; absent: AutoencoderKL, as older
    folders were), or ModelLoadError naming the class and what is supported."""
    import diffusers

    name = config.get("_class_name") or "AutoencoderKL"
    if name not in SUPPORTED_CLASSES:
        raise ModelLoadError(f"{where} holds a {name}, which this service cannot serve: "
                             f"supported are {' and '.join(SUPPORTED_CLASSES)} (docs/families.md)")
    return getattr(diffusers, name)


@dataclass
class LoadedWeights:
    vae: "torch.nn.Module"  # diffusers AutoencoderKL or AutoencoderTiny, eval mode, on the requested device and dtype
    sha256: str  # of the weights file that was read
    path: str  # the file the weights came from
    layout: str  # "diffusers" | "single_file" | "hub"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Name -> torch dtype; refuses float16 on CPU (many CPU kernels lack it, and it is slow)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if resolved == torch.float16 and torch.device(device).type == "cpu":
        raise ModelLoadError("dtype float16 is not supported on CPU: use float32 or bfloat16, or --device cuda")
    return resolved


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda requested but no CUDA device is available: use --device cpu")
    return dev


def _torch_dtype_arg(dtype: torch.dtype) -> torch.dtype | None:
    # float32 is what diffusers builds anyway; passing it only triggers a spurious cast warning.
    return None if dtype == torch.float32 else dtype


def _check_safetensors(path: Path) -> list[str]:
    """Open the header (cheap) so truncated or garbage files fail with a clear reason; returns keys."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # SafetensorError, OSError: both mean the file is unusable
        raise ModelLoadError(f"corrupt weights file {path}: {exc}".replace("\n", " ")) from None


def _check_keys(config: dict, keys, path: Path, config_dir: Path, allow_unexpected: bool = False) -> None:
    """Refuse files with missing or unexpected tensors (diffusers would silently re-initialise them)."""
    cls = model_class(config, config_dir / "config.json")
    try:
        with torch.device("meta"):
            expected = set(cls.from_config(config).state_dict())
    except Exception as exc:  # a config the class cannot build (e.g. channels not divisible by the groups)
        raise ModelLoadError(f"{config_dir / 'config.json'} does not describe a valid {cls.__name__}: {exc}"
                             .replace("\n", " ")) from None
    found = set()
    for key in keys:
        for old, new in _LEGACY_ATTN.items():
            key = key.replace(old, new)
        found.add(key)
    missing, unexpected = sorted(expected - found), [] if allow_unexpected else sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise ModelLoadError(f"weights {path} do not match {config_dir / 'config.json'}: {', '.join(parts)}")


def _load_folder(folder: Path, dtype: torch.dtype) -> LoadedWeights:
    from diffusers import AutoencoderKL

    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a pipeline folder
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json (nor vae/config.json): not a diffusers model folder")
    try:
        config = AutoencoderKL.load_config(str(folder))  # ConfigMixin's reader: any class's config.json
    except Exception as exc:
        raise ModelLoadError(f"unreadable config {folder / 'config.json'}: {exc}".replace("\n", " ")) from None
    cls = model_class(config, folder / "config.json")  # an unservable class is refused before anything else
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
        hint = f" (found {', '.join(others)}; only .safetensors weights are loaded)" if others else ""
        raise ModelLoadError(f"missing weights file {weights}{hint}")
    _check_keys(config, _check_safetensors(weights), weights, folder)
    try:
        vae = cls.from_pretrained(str(folder), torch_dtype=_torch_dtype_arg(dtype), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {folder}: {exc}".replace("\n", " ")) from None
    return LoadedWeights(vae, sha256_file(weights), str(weights), "diffusers")


def _single_file_config(path: Path, config: str | Path | None) -> Path:
    if config is not None:
        cfg = Path(config)
        if cfg.is_file():
            cfg = cfg.parent
        if not (cfg / "config.json").is_file():
            raise ModelLoadError(f"config {config} is not a folder with config.json")
        return cfg
    if (path.parent / "config.json").is_file():
        return path.parent
    return SD_KL_F8_CONFIG_DIR


def _load_single_file(path: Path, dtype: torch.dtype, config: str | Path | None) -> LoadedWeights:
    from diffusers import AutoencoderKL

    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = _single_file_config(path, config)
    if path.suffix == ".safetensors":
        _check_safetensors(path)
        import safetensors.torch

        checkpoint = safetensors.torch.load_file(str(path))
    else:
        try:  # weights_only: never unpickle arbitrary objects
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # torch's message advises weights_only=False: not here
            found = re.search(r"GLOBAL (\S+)", str(exc))
            raise ModelLoadError(f"unsafe checkpoint {path}: it holds Python objects, not only tensors"
                                 f"{f' ({found.group(1)})' if found else ''}; this service loads weights only: "
                                 "convert it to .safetensors") from None
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"corrupt checkpoint {path}: {reason}") from None
        while isinstance(checkpoint, dict) and "state_dict" in checkpoint:
            checkpoint = checkpoint["state_dict"]
        if not isinstance(checkpoint, dict):
            raise ModelLoadError(f"checkpoint {path} does not hold a state dict")
    model_config = AutoencoderKL.load_config(str(cfg))
    if model_class(model_config, cfg / "config.json") is not AutoencoderKL:
        raise ModelLoadError(f"single-file checkpoints are AutoencoderKL only, but {cfg / 'config.json'} holds a "
                             f"{model_config.get('_class_name')}: serve a diffusers folder instead")
    # Convert once here only to name missing tensors clearly (from_single_file would fail obscurely);
    # other tensors of a full SD checkpoint (UNet, text encoder) are ignored.
    try:
        converted = convert_ldm_vae_checkpoint(checkpoint, model_config)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not an LDM VAE checkpoint: {exc}".replace("\n", " ")) from None
    _check_keys(model_config, converted, path, cfg, allow_unexpected=True)
    try:
        vae = AutoencoderKL.from_single_file(
            checkpoint, config=str(cfg), torch_dtype=_torch_dtype_arg(dtype), local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load single file {path} with config {cfg}: {exc}".replace("\n", " ")) from None
    return LoadedWeights(vae, sha256_file(path), str(path), "single_file")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers (and offline mode is not set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        requests.head(endpoint, timeout=timeout)
        return True
    except requests.RequestException:
        return False


def _load_hub(repo_id: str, dtype: torch.dtype) -> LoadedWeights:
    if not hub_reachable():
        raise ModelLoadError(
            f"{repo_id!r} is not a local path and the Hugging Face hub is not reachable: "
            "pass a local diffusers folder or single .safetensors file"
        )
    from huggingface_hub import snapshot_download

    patterns = [f"{sub}{name}" for sub in ("", "vae/") for name in ("config.json", WEIGHTS_NAME)]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ModelLoadError(f"cannot download {repo_id!r}: {exc}".replace("\n", " ")) from None
    loaded = _load_folder(folder, dtype)
    loaded.layout = "hub"
    return loaded


def load_weights(
    source: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    config: str | Path | None = None,
) -> LoadedWeights:
    """Load an AutoencoderKL or AutoencoderTiny from `source` (see module doc) onto `device` in `dtype`, in eval mode.

    `config` only matters for single files: a folder (or its config.json) describing the architecture.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = Path(source).expanduser()
    if path.is_dir():
        loaded = _load_folder(path, torch_dtype)
    elif path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"unsupported weights file {path}: expected .safetensors (or .ckpt / .pt)")
        loaded = _load_single_file(path, torch_dtype, config)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith((".", "/")):
        loaded = _load_hub(str(source), torch_dtype)
    else:
        raise ModelLoadError(f"model path {source} does not exist")
    _check_finite(loaded)
    if dev.type != "cpu":  # dtype was applied by the loaders (torch_dtype=...)
        loaded.vae = loaded.vae.to(dev)
    loaded.vae.eval().requires_grad_(False)
    return loaded


def _check_finite(loaded: LoadedWeights) -> None:
    """Weights holding NaN or Inf would answer NaN to every request: refuse them at load."""
    bad = [name for name, t in loaded.vae.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ModelLoadError(f"weights {loaded.path} hold NaN or Inf in {len(bad)} tensors (e.g. {bad[0]})")
