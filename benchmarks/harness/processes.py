"""Server processes: the `vae` command line, free ports, SIGTERM handling, and `Server` (start,
wait until ready, RSS, stop with its workers)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness.client import Client
from benchmarks.harness.paths import ROOT

# `vae ARGS` through the installed console script's entry point, with this interpreter.
_LAUNCH = (
    "import sys\n"
    "from importlib.metadata import entry_points\n"
    "eps = [e for e in entry_points(group='console_scripts') if e.name == 'vae']\n"
    "if not eps: sys.exit('the vae command is not installed: pip install -e .')\n"
    "sys.exit(eps[0].load()())\n"
)


def vae_command(*args: str) -> list[str]:
    """argv running `vae ARGS` with this Python (the project installed, editable or not)."""
    return [sys.executable, "-c", _LAUNCH, *args]


def exit_on_sigterm() -> None:
    """SIGTERM (e.g. from `timeout`) raises SystemExit in the main thread, so `finally` blocks
    stop the servers this process started (they run in their own sessions and would outlive it)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server subprocess on 127.0.0.1 in its own process group (so its workers stop with it)."""

    name: str
    argv: list[str]
    port: int
    env: dict = field(default_factory=dict)
    log_path: Path | None = None
    ready_path: str = "/readyz"
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        env = {**os.environ, **self.env}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        if log is not subprocess.DEVNULL:
            log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        client = Client(self.url, timeout=5)
        try:
            while True:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode if self.proc else '?'}) before "
                                       f"it was ready; last log lines:\n{self.log_tail()}")
                try:
                    if client.get(self.ready_path)[0] == 200:
                        self.ready_s = time.monotonic() - self.started_at
                        return self.ready_s
                except OSError:
                    client.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log:\n{self.log_tail()}")
                time.sleep(0.2)
        finally:
            client.close()

    def log_tail(self, n: int = 25) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return "(no log)"
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])

    def pids(self) -> list[int]:
        """This server's process and its descendants (LitServe runs its model in child processes)."""
        if not self.alive():
            return []
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parts = stat.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(parts[1]), []).append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                continue
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        members = self.pids()  # the server and its workers, by id, before any of them exits
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the process group this object started
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=min(2.0, timeout))
        except subprocess.TimeoutExpired:
            # `vae serve` drains on the first SIGTERM, for up to its grace period (30 s), even
            # when idle; a second signal is uvicorn's fast exit.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # LitServe's workers may outlive their parent: those of the recorded ids that are still
        # in this server's process group are stopped too.
        deadline = time.monotonic() + 5
        for pid in members[1:]:
            while _in_group(pid, self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _in_group(pid, self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _in_group(pid: int, pgid: int) -> bool:
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(parts[2]) == pgid and parts[0] != "Z"
    except (OSError, IndexError, ValueError):
        return False
