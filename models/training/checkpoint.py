"""Training checkpoints: written atomically (a killed run leaves the old or the new file, never
half of one), with every RNG state so that `--resume` continues bit-exactly. `--resume` reads them
back through `load_checkpoint` (a damaged file is one ValueError naming it, not a traceback) and
refuses recipe options that differ from the saved ones (`recipe_conflicts`)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"
# What every checkpoint holds (GAN runs add disc, opt_d, sched_d).
CHECKPOINT_KEYS = frozenset({"args", "step", "model", "opt", "sched", "ema", "rng"})


def atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old or the new file, never half of one


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What may change when a run is resumed: its length, logging, and how the machine runs it. Every other
# option is the recipe, which comes from the checkpoint; a different value given with --resume is refused.
RESUMABLE = {"steps", "max_minutes", "max_cpu_minutes", "stop_at", "workers", "checkpoint_every", "eval_every",
             "log_every", "threads"}


def recipe_conflicts(given: dict, saved: dict, defaults: dict) -> list[str]:
    """Explicit recipe options whose value differs from the checkpoint's, as `--name VALUE (checkpoint: OLD)`."""
    conflicts = []
    for key, value in given.items():
        if key in RESUMABLE or key in ("resume", "out"):
            continue
        old = saved.get(key, defaults.get(key))
        same = ([os.path.realpath(v) for v in value] == [os.path.realpath(v) for v in old or []]
                if key == "data" else value == old)
        if not same:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            old_shown = " ".join(map(str, old)) if isinstance(old, list) else old
            conflicts.append(f"{'data' if key == 'data' else '--' + key.replace('_', '-')} {shown} (checkpoint: {old_shown})")
    return conflicts


def load_checkpoint(path: Path) -> dict:
    """The training state in `path`; ValueError with the reason when it is not a readable checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, OSError: a damaged file
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    missing = CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else CHECKPOINT_KEYS
    if missing or not isinstance(state.get("args"), dict):
        raise ValueError(f"{path} is not a vae train checkpoint (missing {', '.join(sorted(missing)) or 'args'})")
    return state


def restore(state: dict, vae, opt, sched, ema, gan=None) -> None:
    """Load a checkpoint's model, optimiser, scheduler and EMA (and GAN) states into this run's objects."""
    vae.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    ema.load_state_dict(state["ema"])
    if gan is not None:
        for obj, key in zip(gan, ("disc", "opt_d", "sched_d")):
            obj.load_state_dict(state[key])
