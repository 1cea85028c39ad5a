"""The machine a result was measured on: CPU, cores, memory, load, library versions, GPU, git."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from benchmarks.harness.paths import ROOT


def machine_info() -> dict:
    info = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host_cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "loadavg": list(os.getloadavg()), "mem_total_gib": _meminfo("MemTotal") / 2**20,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                           "KMP_BLOCKTIME", "CUDA_VISIBLE_DEVICES") if k in os.environ},
        "git": _git_head(),
    }
    for mod in ("torch", "diffusers", "fastapi", "uvicorn", "litserve"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod)
        except Exception:  # noqa: BLE001 - absent is fine
            info[mod] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo(key: str) -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def mem_available_gib() -> float:
    return _meminfo("MemAvailable") / 2**20


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
