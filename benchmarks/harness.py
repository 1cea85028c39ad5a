"""Shared pieces of the benchmark tools (benchmarks/peers.py, benchmarks/gpu_check.py).

They reach the service only through its stable surface: the `vae` command (started as a
subprocess through its console-script entry point, so a restructured package still works) and
HTTP. In-process model work uses diffusers' AutoencoderKL directly.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "photos"
SD_CONFIG = ROOT / "models" / "configs" / "sd-kl-f8" / "config.json"
SHIPPED_MODEL = ROOT / "models" / "default"

# The tiny model the tests use (an SD-shaped VAE: 8x downsampling, 4 latent channels).
TINY_CONFIG = dict(
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64,
)

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


# --- models -------------------------------------------------------------------------------------

def make_model(kind: str, folder: Path, seed: int = 0) -> Path:
    """A diffusers folder for `kind`: 'tiny' (random, the tests' config), 'sd' (the SD kl-f8
    architecture of models/configs/sd-kl-f8 with random weights), 'default' (the shipped model,
    returned as is) or a path to a diffusers folder (returned as is)."""
    if kind == "default":
        return SHIPPED_MODEL
    if kind not in ("tiny", "sd"):
        path = Path(kind)
        if not (path / "config.json").is_file():
            raise SystemExit(f"model {kind!r}: not tiny, sd, default or a diffusers folder")
        return path
    import torch
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    if kind == "tiny":
        vae = AutoencoderKL(**TINY_CONFIG)
    else:
        vae = AutoencoderKL.from_config(json.loads(SD_CONFIG.read_text()))
    vae.eval().save_pretrained(folder)
    return folder


def photo(size: int, index: int = 0):
    """A vendored photograph (tests/data/photos), short side resized to `size`, centre-cropped
    square, as a PIL RGB image; a smooth synthetic image when the photos are absent."""
    from PIL import Image

    files = sorted(PHOTOS.glob("*.png")) + sorted(PHOTOS.glob("*.jpg"))
    if not files:
        import numpy as np

        yy, xx = np.mgrid[0:size, 0:size]
        arr = np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1), (xx + yy) % 256], -1)
        return Image.fromarray(arr.astype("uint8"), "RGB")
    with Image.open(files[index % len(files)]) as img:
        img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- HTTP ---------------------------------------------------------------------------------------

def decode_path(shape, image_format: str | None = "png", output_type: str | None = None, extra: dict | None = None) -> str:
    """The /decode URL path with the raw-body query (shape repeated, dtype float32)."""
    q = [("shape", str(int(s))) for s in shape] + [("dtype", "float32")]
    if image_format:
        q.append(("image_format", image_format))
    if output_type:
        q.append(("output_type", output_type))
    q += list((extra or {}).items())
    return "/decode?" + urllib.parse.urlencode(q)


class Client:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 (http.client: the least client overhead)."""

    def __init__(self, base: str, timeout: float = 600):
        u = urllib.parse.urlsplit(base)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """-> (status, headers dict (lower-case names), body bytes). Reconnects once on a stale connection."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
                return r.status, {k.lower(): v for k, v in r.getheaders()}, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post(self, path: str, body: bytes, content_type: str = "application/octet-stream", **headers):
        return self.request("POST", path, body, {"Content-Type": content_type, **headers})

    def get(self, path: str):
        return self.request("GET", path)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def encode_latents(base: str, img) -> tuple[bytes, list[int]]:
    """/encode of a PIL image on our service -> (raw little-endian float32 latents, shape)."""
    c = Client(base)
    try:
        status, headers, body = c.post("/encode", png_bytes(img), "image/png")
    finally:
        c.close()
    if status != 200:
        raise RuntimeError(f"/encode answered {status}: {body[:300]!r}")
    return body, json.loads(headers["shape"])


def random_latents(shape, seed: int = 0) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).standard_normal(shape).astype("<f4").tobytes()


# --- Prometheus ---------------------------------------------------------------------------------

def scrape(base: str, client: Client | None = None) -> dict[tuple, float]:
    """/metrics as {(sample name, ((label, value), ...)): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    own = client is None
    client = client or Client(base)
    try:
        status, _, body = client.get("/metrics")
    finally:
        if own:
            client.close()
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def stage_split(before: dict, after: dict, route: str = "/decode") -> dict[str, float]:
    """Seconds per request spent in each server stage between two scrapes (mean over the requests
    between them), plus the server's whole-request time and the request count."""
    n = metric(after, "vae_request_duration_seconds_count", route=route) - metric(
        before, "vae_request_duration_seconds_count", route=route)
    out = {"requests": n}
    if n <= 0:
        return out
    out["server_total"] = (metric(after, "vae_request_duration_seconds_sum", route=route)
                           - metric(before, "vae_request_duration_seconds_sum", route=route)) / n
    for st in ("deserialize", "queue", "compute", "serialize"):
        out[st] = (metric(after, "vae_stage_duration_seconds_sum", route=route, stage=st)
                   - metric(before, "vae_stage_duration_seconds_sum", route=route, stage=st)) / n
    return out


# --- server processes ---------------------------------------------------------------------------

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


# --- numbers and tables -------------------------------------------------------------------------

def quantiles(values, qs=(50, 90, 99)) -> dict[str, float | None]:
    import numpy as np

    if not len(values):
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


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


def write_outputs(out: Path, stem: str, result: dict, markdown: str) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / f"{stem}.json", out / f"{stem}.md"
    j.write_text(json.dumps(result, indent=1, default=str) + "\n")
    m.write_text(markdown.rstrip() + "\n")
    return j, m
