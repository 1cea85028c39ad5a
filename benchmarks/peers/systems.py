"""The systems a peers run compares, and their server processes: which systems (ours with its
arguments, the FastAPI and LitServe peers with their presets), the command line that starts
each, restarts, and the CPU a server burns while another one is measured."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import Server

PEERS = {
    "fastapi-default": ("fastapi", "default"),
    "fastapi-best": ("fastapi", "best"),
    "litserve-default": ("litserve", "default"),
    "litserve-best": ("litserve", "best"),
}
DEFAULT_OURS = ["ours-fp32=--dtype float32", "ours-bf16=--dtype bfloat16"]


@dataclass
class System:
    name: str
    kind: str  # ours | fastapi | litserve
    preset: str  # ours: its extra arguments; peers: default | best
    server: Server | None = None
    argv: list[str] = field(default_factory=list)
    cpu_idle_s: float = 0.0  # CPU seconds used while another system was being measured
    idle_wall_s: float = 0.0
    restarts: int = 0


def _cpu_seconds(server: Server) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in server.pids():
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(parts[11]) + int(parts[12])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return total


def build_systems(args) -> list[System]:
    out = []
    for spec in args.ours:
        name, _, extra = spec.partition("=")
        out.append(System(name.strip(), "ours", extra.strip()))
    for name in args.peers:
        kind, preset = PEERS[name]
        out.append(System(name, kind, preset))
    if not out:
        raise SystemExit("no systems to measure")
    return out


def start_system(sys_: System, model_path: Path, args, env: dict, logs: Path, model_name: str) -> None:
    port = harness.free_port()
    if sys_.kind == "ours":
        argv = harness.vae_command("serve", "--model", f"{model_name}={model_path}", "--device", args.device,
                                   "--port", str(port), "--log-level", "warning", *shlex.split(sys_.preset),
                                   *shlex.split(args.ours_args))
        ready = "/readyz"
    else:
        argv = [sys.executable, "-m", "benchmarks.peer_apps", sys_.kind, "--model", str(model_path),
                "--preset", sys_.preset, "--device", args.device, "--port", str(port)]
        if sys_.kind == "litserve" and sys_.preset == "best" and args.litserve_batch:
            argv += ["--max-batch-size", str(args.litserve_batch)]
        ready = "/health"
    sys_.argv = argv
    sys_.server = Server(sys_.name, argv, port, env, logs / f"{model_name}-{sys_.name}.log", ready).start()


def _argv_text(argv: list[str]) -> str:
    text = " ".join(shlex.quote(a) for a in argv)
    text = text.replace(shlex.quote(harness._LAUNCH), "<vae>").replace(shlex.quote(sys.executable) + " -c <vae>", "vae")
    return text.replace(shlex.quote(sys.executable) + " ", "python ")


def _ensure_running(s: System, cell: dict) -> bool:
    if s.server and s.server.alive():
        return True
    if s.restarts >= 2 or s.server is None:
        cell["status"] = "error"
        cell.setdefault("note", "server not running")
        return False
    s.restarts += 1
    s.server.start()
    try:
        s.server.wait_ready(timeout=600)
        return True
    except RuntimeError as exc:
        cell["status"], cell["note"] = "error", f"restart failed: {str(exc)[:200]}"
        return False
