"""`vae bench`: side-by-side speed benchmark of the VAE service, on the same weights and inputs.

Systems ("modes"), all in one run:
  diffusers-fp32   in-process diffusers AutoencoderKL, float32, eager (the baseline)
  inproc-fp32      our VAEModel in process, float32 (the service's model call, no HTTP)
  inproc-bf16      our VAEModel in process, bfloat16 fast path (bf16 weights + channels_last)
  http-fp32        our server over loopback HTTP in its default mode (float32)
  http-bf16        our server over loopback HTTP, --dtype bfloat16
  http-bf16-compile  as http-bf16 plus --compile (not in the default list: compiling takes minutes)
Per model, op (encode, decode, roundtrip) and size: median and p90 latency of `--runs` runs
(after one warm-up call), images/s at each `--concurrency` (HTTP modes; in-process modes report
1 / median at concurrency 1), peak RSS of the process doing the work (VmHWM, reset per
measurement through /proc/PID/clear_refs), FLOPs (models.vae.info.count_flops) and achieved GFLOP/s
against this machine's measured peak (large bf16 and fp32 matmuls, in the same run).

HTTP requests: /encode gets a PNG and answers raw float32 latents; /decode gets raw float32
latents (tensor/binary) and answers a PNG; /roundtrip gets a PNG and answers a PNG with PSNR/SSIM
headers. In-process modes take and return tensors: the difference is what the service adds.

Extra sections: `--kodak DIR` (PSNR of bf16 against fp32 roundtrips on Kodak, trained models
only), `--tiling-size N` (tiled against untiled PSNR at NxN, sample image saved), `--large N`
(an NxN /roundtrip through the server, tiled by default, and untiled, peak RSS of each; the
untiled server is killed when it passes `--rss-cap-gib`).

Models (`--models`, a list): `sd` (SD-size kl-f8 with random weights, seed 0), `default` (the
shipped models/default, else the latest training export runs/default-v1/model), or NAME=PATH.
Writes results.json, results.md and results.png (plus tiling samples) to `--out`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as dt
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KODAK = ROOT.parent / "shared" / "data" / "kodak"
PHOTOS = ROOT / "tests" / "data" / "photos"
ALL_MODES = ["diffusers-fp32", "inproc-fp32", "inproc-bf16", "http-fp32", "http-bf16", "http-bf16-compile"]
DEFAULT_MODES = ["diffusers-fp32", "inproc-fp32", "inproc-bf16", "http-fp32", "http-bf16"]
OPS = ["encode", "decode", "roundtrip"]


# --------------------------------------------------------------------------- process facts
def rss_peak_mib(pid: int | str = "self") -> float:
    """VmHWM (peak resident set) of a process in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_now_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs "5"); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    import diffusers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
    }


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def measure_peak(n: int = 2048, reps: int = 3) -> dict:
    """Achievable GFLOP/s of one large matmul per dtype (best of `reps`)."""
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
        out[name] = round(2 * n**3 / best / 1e9, 1)
    out["matmul_n"] = n
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------- models and inputs
@dataclass
class ModelSpec:
    name: str
    path: Path
    trained: bool  # random weights make quality figures meaningless


def resolve_models(specs: list[str], workdir: Path) -> list[ModelSpec]:
    out = []
    for spec in specs:
        if spec == "sd":
            path = workdir / "sd-random"
            if not (path / "config.json").is_file():
                from diffusers import AutoencoderKL

                from models.training.presets import preset_config

                torch.manual_seed(0)
                AutoencoderKL(**preset_config("sd")).save_pretrained(path)
            out.append(ModelSpec("sd-random", path, False))
        elif spec == "default":
            for cand in (ROOT / "models" / "default", ROOT / "runs" / "default-v1" / "model"):
                if (cand / "config.json").is_file():
                    out.append(ModelSpec("default" if cand.parent.name == "models" else "default-v1-export", cand, True))
                    break
            else:
                raise SystemExit("vae bench: no default model (models/default or runs/default-v1/model)")
        else:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = Path(spec).name, spec
            out.append(ModelSpec(name, Path(path), True))
    return out


def photo_files() -> list[Path]:
    """The benchmark's photographs: Kodak beside the checkout, else the four vendored in
    tests/data/photos (so a fresh clone measures a real photo too, never a synthetic stand-in)."""
    for folder, pattern in ((KODAK, "*.png"), (PHOTOS, "*.*")):
        files = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if files:
            return files
    raise SystemExit(f"vae bench: no photographs found ({KODAK} or {PHOTOS})")


def test_image(size: int, seed: int = 0) -> np.ndarray:
    """An (size, size, 3) uint8 photo: one of photo_files(), short side scaled and centre-cropped."""
    from PIL import Image

    from models.vae.imaging import resize_center_crop

    files = photo_files()
    img = Image.open(files[seed % len(files)]).convert("RGB")
    return np.asarray(resize_center_crop(img, size))


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


# --------------------------------------------------------------------------- systems
class InProcess:
    """diffusers AutoencoderKL (baseline) or our VAEModel, called with tensors."""

    def __init__(self, mode: str, model: ModelSpec):
        self.mode = mode
        if mode == "diffusers-fp32":
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(str(model.path), local_files_only=True).eval()
            self.ours = None
        else:
            from models.vae.inference import VAEModel

            self.ours = VAEModel.load(model.name, model.path, dtype="bfloat16" if "bf16" in mode else "float32")

    def pid(self):
        return "self"

    def call(self, op: str, x: torch.Tensor, z: torch.Tensor):
        with torch.inference_mode():
            if self.ours is None:
                if op == "encode":
                    return self.vae.encode(x).latent_dist.mode()
                if op == "decode":
                    return self.vae.decode(z).sample
                return self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
            if op == "encode":
                return self.ours.encode(x)
            if op == "decode":
                return self.ours.decode(z)
            return self.ours.decode(self.ours.encode(x))

    def close(self):
        pass


class Server:
    """`vae serve` in a subprocess on a free loopback port."""

    def __init__(self, model: ModelSpec, *extra: str, max_pixels: int = 4096 * 4096, ready_timeout: float = 900):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "app.cli.serve", "--model", f"{model.name}={model.path}", "--port", str(self.port),
               "--max-pixels", str(max_pixels), "--max-body-bytes", str(512 * 2**20), "--log-level", "warning", *extra]
        env = {**os.environ, "VAE_REQUEST_TIMEOUT": "7200", "VAE_MAX_QUEUE": "256", "VAE_LOG_FORMAT": "text"}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.cmd = cmd
        import requests

        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log.read().decode()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("server not ready in time")
            time.sleep(0.2)
        self._local = threading.local()

    def pid(self):
        return self.proc.pid

    def _session(self):
        import requests

        if not hasattr(self._local, "s"):
            self._local.s = requests.Session()
        return self._local.s

    def call(self, op: str, png: bytes, z: torch.Tensor):
        s = self._session()
        if op == "decode":
            params = [("shape", str(d)) for d in z.shape] + [("dtype", "float32"), ("output_type", "pil"),
                                                               ("image_format", "png")]
            r = s.post(self.url + "/decode", params=params, data=z.numpy().tobytes(),
                       headers={"Content-Type": "tensor/binary"}, timeout=7200)
        else:
            r = s.post(f"{self.url}/{op}", data=png, headers={"Content-Type": "image/png"}, timeout=7200)
        if r.status_code != 200:
            raise RuntimeError(f"{op}: HTTP {r.status_code}: {r.text[:300]}")
        return r

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_system(mode: str, model: ModelSpec):
    if mode.startswith("http-"):
        extra = ["--dtype", "bfloat16" if "bf16" in mode else "float32"]
        if mode.endswith("-compile"):
            extra.append("--compile")
        return Server(model, *extra)
    return InProcess(mode, model)


# --------------------------------------------------------------------------- measurement
def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_one(system, op: str, size: int, inputs: dict, runs: int, concurrency: list[int]) -> dict:
    http = isinstance(system, Server)
    arg = inputs["png"] if http else inputs["x"]
    pid = system.pid()
    system.call(op, arg, inputs["z"])  # warm-up (not timed)
    reset_peak(pid)
    times = [_timed(lambda: system.call(op, arg, inputs["z"])) for _ in range(runs)]
    row = {
        "median_s": statistics.median(times),
        "p90_s": percentile(times, 90),
        "runs": runs,
        "times_s": [round(t, 4) for t in times],
        "images_per_s": {"1": 1 / statistics.median(times)},
    }
    if http:
        for c in concurrency:
            if c <= 1:
                continue
            n = 2 * c
            with cf.ThreadPoolExecutor(c) as pool:
                t = time.perf_counter()
                list(pool.map(lambda _: system.call(op, arg, inputs["z"]), range(n)))
                row["images_per_s"][str(c)] = n / (time.perf_counter() - t)
    row["peak_rss_mib"] = round(rss_peak_mib(pid), 1)
    return row


def run_benchmarks(args, models: list[ModelSpec], peak: dict, log) -> list[dict]:
    from diffusers import AutoencoderKL

    from models.vae.info import count_flops

    rows = []
    for model in models:
        config_vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(model.path)))
        ref = AutoencoderKL.from_pretrained(str(model.path), local_files_only=True).eval()
        inputs = {}
        for size in args.sizes:
            array = test_image(size)
            x = to_tensor(array)
            with torch.inference_mode():
                z = ref.encode(x).latent_dist.mode().contiguous()
            flops = count_flops(config_vae, size)
            flops["roundtrip"] = flops["encode"] + flops["decode"]
            inputs[size] = {"png": png_bytes(array), "x": x, "z": z, "flops": flops}
        del ref
        for mode in args.modes:
            log(f"[{model.name}] {mode}: starting")
            try:
                system = make_system(mode, model)
            except Exception as exc:  # a mode that cannot run here (e.g. compile without a compiler)
                log(f"[{model.name}] {mode}: skipped: {exc}")
                rows.append({"model": model.name, "mode": mode, "error": str(exc)[:300]})
                continue
            try:
                for op in args.ops:
                    for size in args.sizes:
                        inp = inputs[size]
                        conc = args.concurrency if size in args.concurrency_sizes else [1]
                        load = loadavg()
                        row = bench_one(system, op, size, inp, args.runs, conc)
                        precision = "bfloat16" if "bf16" in mode else "float32"
                        gflops = inp["flops"][op] / row["median_s"] / 1e9
                        row.update({
                            "model": model.name, "mode": mode, "op": op, "size": size,
                            "gflop": round(inp["flops"][op] / 1e9, 2), "gflop_per_s": round(gflops, 3),
                            "peak_gflop_per_s": peak[precision], "pct_of_peak": round(100 * gflops / peak[precision], 1),
                            "loadavg": load,
                        })
                        rows.append(row)
                        ips = ", ".join(f"c{c}={v:.2f}" for c, v in row["images_per_s"].items())
                        log(f"[{model.name}] {mode:18s} {op:9s} {size:5d}: median {row['median_s']:.3f}s "
                            f"p90 {row['p90_s']:.3f}s img/s {ips} rss {row['peak_rss_mib']:.0f}MiB "
                            f"{row['gflop_per_s']:.0f} GFLOP/s ({row['pct_of_peak']:.0f}% of {precision} peak)")
            finally:
                system.close()
                del system
    base = {(r["model"], r["op"], r["size"]): r["median_s"] for r in rows if r.get("mode") == "diffusers-fp32"}
    same = {(r["model"], r["op"], r["size"], r["mode"]): r["median_s"] for r in rows if "median_s" in r}
    for r in rows:
        if "median_s" not in r:
            continue
        key = (r["model"], r["op"], r["size"])
        if key in base:
            r["speedup_vs_diffusers_fp32"] = round(base[key] / r["median_s"], 3)
        if r["mode"].startswith("http-"):
            inproc = same.get((*key, "inproc-" + r["mode"].removeprefix("http-").removesuffix("-compile")))
            if inproc:
                r["overhead_vs_inproc_pct"] = round(100 * (r["median_s"] / inproc - 1), 2)
    return rows


# --------------------------------------------------------------------------- quality sections
def kodak_quality(model: ModelSpec, kodak: Path, limit: int | None) -> dict:
    """Mean PSNR / SSIM of fp32 and bf16 (fast path) roundtrips against the originals."""
    from PIL import Image

    from models.vae import imaging
    from models.vae.inference import VAEModel
    from models.metrics import psnr, ssim

    files = sorted(kodak.glob("*.png"))[:limit]
    m32 = VAEModel.load(model.name, model.path, dtype="float32")
    mbf = VAEModel.load(model.name, model.path, dtype="bfloat16")
    res = {"images": len(files), "psnr_fp32": [], "psnr_bf16": [], "ssim_fp32": [], "ssim_bf16": [], "psnr_bf16_vs_fp32": []}
    for f in files:
        ref = np.asarray(Image.open(f).convert("RGB"))
        x = to_tensor(ref)
        outs = {}
        for tag, m in (("fp32", m32), ("bf16", mbf)):
            outs[tag] = imaging.to_uint8(m.decode(m.encode(x), tuple(x.shape[-2:])))[0].numpy()
            res[f"psnr_{tag}"].append(psnr(ref, outs[tag]))
            res[f"ssim_{tag}"].append(ssim(ref, outs[tag]))
        res["psnr_bf16_vs_fp32"].append(min(psnr(outs["fp32"], outs["bf16"]), 100.0))
    summary = {k: (float(np.mean(v)) if isinstance(v, list) else v) for k, v in res.items()}
    summary["psnr_loss_db"] = summary["psnr_fp32"] - summary["psnr_bf16"]
    return summary


def tiling_check(model: ModelSpec, size: int, tile_size: int, out: Path, dtype: str = "float32") -> dict:
    """Tiled against untiled roundtrip at size x size: PSNR of each against the input, sample images."""
    from PIL import Image

    from models.vae import imaging
    from models.vae.inference import VAEModel
    from models.metrics import psnr

    m = VAEModel.load(model.name, model.path, dtype=dtype, tile_size=tile_size)
    ref = test_image(size, seed=3)
    x = to_tensor(ref)
    untiled = imaging.to_uint8(m.decode(m.encode(x, tiled=False), tiled=False))[0].numpy()
    tiled = imaging.to_uint8(m.decode(m.encode(x, tiled=True), tiled=True))[0].numpy()
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tiled).save(out / f"tiling_{model.name}_{size}_tiled.png")
    Image.fromarray(untiled).save(out / f"tiling_{model.name}_{size}_untiled.png")
    diff = np.clip(np.abs(tiled.astype(np.int16) - untiled.astype(np.int16)) * 8, 0, 255).astype(np.uint8)
    Image.fromarray(diff).save(out / f"tiling_{model.name}_{size}_diff_x8.png")
    p_un, p_t = psnr(ref, untiled), psnr(ref, tiled)
    return {"model": model.name, "size": size, "tile_size": tile_size, "tile_overlap": m.tile_overlap, "dtype": dtype,
            "psnr_untiled": p_un, "psnr_tiled": p_t, "psnr_difference_db": abs(p_un - p_t),
            "psnr_tiled_vs_untiled": psnr(untiled, tiled),
            "images": [f"tiling_{model.name}_{size}_{k}.png" for k in ("tiled", "untiled", "diff_x8")]}


def large_check(model: ModelSpec, size: int, rss_cap_gib: float, log, untiled: bool = True,
                dtype: str = "float32", tiled: bool = True) -> dict:
    """One size x size /roundtrip through a server (default mode, automatic tiling), then through
    a server with tiling off; peak RSS of each server process (killed past rss_cap_gib)."""
    png = png_bytes(test_image(size, seed=5))
    res = {"model": model.name, "size": size, "png_bytes": len(png), "dtype": dtype}
    variants = ([("tiled", [])] if tiled else []) + ([("untiled", ["--tile-threshold-pixels", "0"])] if untiled else [])
    for tag, extra in variants:
        server = Server(model, "--dtype", dtype, *extra, max_pixels=size * size)
        stop = threading.Event()
        killed = {"flag": False}

        def watch():
            while not stop.wait(0.2):
                with contextlib.suppress(OSError):
                    if rss_now_mib(server.pid()) > rss_cap_gib * 1024:
                        killed["flag"] = True
                        server.proc.kill()
                        return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t = time.perf_counter()
        try:
            r = server.call("roundtrip", png, None)
            entry = {"ok": True, "seconds": round(time.perf_counter() - t, 2), "psnr": float(r.headers["X-PSNR"])}
        except Exception as exc:
            entry = {"ok": False, "seconds": round(time.perf_counter() - t, 2),
                     "error": f"killed above the {rss_cap_gib} GiB cap" if killed["flag"] else str(exc)[:200]}
        stop.set()
        with contextlib.suppress(OSError):
            entry["peak_rss_mib"] = round(rss_peak_mib(server.pid()), 1)
        if killed["flag"]:
            entry["peak_rss_mib"] = f">{rss_cap_gib * 1024:.0f}"
        server.close()
        res[tag] = entry
        log(f"[{model.name}] {size}x{size} /roundtrip {tag}: {entry}")
    return res


# --------------------------------------------------------------------------- reports
def fmt(v, nd=3):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(result: dict) -> str:
    meta, peak = result["meta"], result["peak"]
    lines = [
        f"# vae bench — {meta['date']}",
        "",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, {meta['machine']['memory_gib']} GiB, "
        f"GPU: {meta['machine']['gpu'] or 'none'}; torch {meta['machine']['torch']}, diffusers {meta['machine']['diffusers']}. "
        f"Load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}.",
        f"Measured peak (matmul {peak['matmul_n']}^3): float32 {peak['float32']} GFLOP/s, bfloat16 {peak['bfloat16']} GFLOP/s.",
        f"Command: `{meta['command']}`",
        "",
    ]
    concs = sorted({c for r in result["rows"] for c in r.get("images_per_s", {})}, key=int)
    head = (["model", "mode", "op", "size", "median s", "p90 s"] + [f"img/s c={c}" for c in concs]
            + ["peak RSS MiB", "GFLOP", "GFLOP/s", "% peak", "x diffusers fp32", "HTTP overhead %"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if "median_s" not in r:
            lines.append(f"| {r['model']} | {r['mode']} | skipped: {r.get('error', '')} |")
            continue
        cells = [r["model"], r["mode"], r["op"], r["size"], fmt(r["median_s"]), fmt(r["p90_s"])]
        cells += [fmt(r["images_per_s"].get(c), 2) for c in concs]
        cells += [fmt(r["peak_rss_mib"], 0), fmt(r["gflop"], 1), fmt(r["gflop_per_s"], 1), fmt(r["pct_of_peak"], 1),
                  fmt(r.get("speedup_vs_diffusers_fp32"), 2), fmt(r.get("overhead_vs_inproc_pct"), 1)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for q in result.get("quality", []):
        lines += ["", f"Kodak ({q['images']} images), model {q['model']}: PSNR fp32 {q['psnr_fp32']:.3f} dB, "
                      f"bf16 {q['psnr_bf16']:.3f} dB, loss {q['psnr_loss_db']:.3f} dB; SSIM fp32 {q['ssim_fp32']:.4f}, "
                      f"bf16 {q['ssim_bf16']:.4f}; bf16 against fp32 output {q['psnr_bf16_vs_fp32']:.2f} dB."]
    for t in result.get("tiling", []):
        lines += ["", f"Tiling at {t['size']}x{t['size']} ({t['model']}, tile {t['tile_size']}, overlap {t['tile_overlap']}, "
                      f"{t['dtype']}): PSNR untiled {t['psnr_untiled']:.3f} dB, tiled {t['psnr_tiled']:.3f} dB, "
                      f"difference {t['psnr_difference_db']:.3f} dB; tiled against untiled {t['psnr_tiled_vs_untiled']:.2f} dB. "
                      f"Images: {', '.join(t['images'])}."]
    for g in result.get("large", []):
        for tag in ("tiled", "untiled"):
            if tag in g:
                e = g[tag]
                lines += ["", f"{g['size']}x{g['size']} /roundtrip ({g['model']}, {g.get('dtype')}, {tag}): "
                              + (f"{e['seconds']} s, PSNR {e['psnr']:.2f} dB" if e["ok"] else f"failed: {e['error']}")
                              + f", server peak RSS {e.get('peak_rss_mib')} MiB."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "median_s" in r]
    models = sorted({r["model"] for r in rows}) or ["none"]
    ops = [op for op in OPS if any(r["op"] == op for r in rows)] or ["none"]
    fig, axes = plt.subplots(len(models), len(ops), figsize=(5 * len(ops), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            sel = [r for r in rows if r["model"] == model and r["op"] == op]
            sizes = sorted({r["size"] for r in sel})
            modes = [m for m in ALL_MODES if any(r["mode"] == m for r in sel)]
            width = 0.8 / max(1, len(modes))
            for k, mode in enumerate(modes):
                vals = [next((r["median_s"] for r in sel if r["mode"] == mode and r["size"] == s), np.nan) for s in sizes]
                ax.bar(np.arange(len(sizes)) + k * width, vals, width, label=mode)
            ax.set_xticks(np.arange(len(sizes)) + width * (len(modes) - 1) / 2, [str(s) for s in sizes])
            ax.set_yscale("log")
            ax.set_title(f"{model}: {op}")
            ax.set_xlabel("image side (px)")
            ax.set_ylabel("median latency (s)")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"vae bench {result['meta']['date']} ({result['meta']['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
def parse_args(argv):
    p = argparse.ArgumentParser(prog="vae bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["sd"], help="sd | default | NAME=PATH (several: one table each)")
    p.add_argument("--modes", nargs="+", default=None, choices=ALL_MODES, help=f"default: {' '.join(DEFAULT_MODES)}")
    p.add_argument("--ops", nargs="+", default=None, choices=OPS)
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="square image sides (default 256 512 1024)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per measurement (default 5)")
    p.add_argument("--concurrency", nargs="+", type=int, default=None, help="HTTP concurrency levels (default 1 4 16)")
    p.add_argument("--concurrency-sizes", nargs="+", type=int, default=None,
                   help="sizes at which concurrency > 1 is measured (default: all)")
    p.add_argument("--kodak", type=Path, default=None, help=f"Kodak folder for bf16 vs fp32 PSNR (default {KODAK} if present)")
    p.add_argument("--kodak-limit", type=int, default=None, help="use only the first N Kodak images")
    p.add_argument("--no-kodak", action="store_true")
    p.add_argument("--tiling-size", type=int, default=None, help="tiled vs untiled PSNR at this size (default 1024; 0: skip)")
    p.add_argument("--tile-size", type=int, default=768)  # the server default (app.http.settings)
    p.add_argument("--large", type=int, default=0, help="an NxN /roundtrip through the server, tiled and untiled (e.g. 4096)")
    p.add_argument("--no-untiled", action="store_true", help="with --large: skip the untiled server")
    p.add_argument("--no-tiled", action="store_true", help="with --large: only the untiled server")
    p.add_argument("--large-dtype", default="float32", choices=["float32", "bfloat16"], help="server dtype for --large")
    p.add_argument("--rss-cap-gib", type=float, default=12.0, help="kill the untiled --large server above this RSS")
    p.add_argument("--peak-n", type=int, default=2048, help="matmul size for the machine's peak")
    p.add_argument("--quick", action="store_true", help="smoke run: size 64, 2 runs, concurrency 1 2, small extras")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [64]
        args.runs = args.runs or 2
        args.concurrency = args.concurrency or [1, 2]
        args.tiling_size = 128 if args.tiling_size is None else args.tiling_size
        args.tile_size = 64
        args.kodak_limit = args.kodak_limit or 1
        args.peak_n = min(args.peak_n, 512)
        args.modes = args.modes or ["diffusers-fp32", "inproc-fp32", "inproc-bf16", "http-fp32", "http-bf16"]
    args.modes = args.modes or DEFAULT_MODES
    args.ops = args.ops or OPS
    args.sizes = args.sizes or [256, 512, 1024]
    args.runs = args.runs or 5
    args.concurrency = args.concurrency or [1, 4, 16]
    args.concurrency_sizes = args.concurrency_sizes or args.sizes
    args.tiling_size = 1024 if args.tiling_size is None else args.tiling_size
    if args.kodak is None and not args.no_kodak and KODAK.is_dir():
        args.kodak = KODAK
    if args.no_kodak:
        args.kodak = None
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="vae-bench-"))
    try:
        models = resolve_models(args.models, workdir)
        meta = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
                "command": "vae bench " + " ".join(argv), "loadavg_start": loadavg(), "args": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        log(f"models: {', '.join(f'{m.name}={m.path}' for m in models)}; load average {meta['loadavg_start']}")
        peak = measure_peak(args.peak_n)
        log(f"peak: {peak}")
        result = {"meta": meta, "peak": peak, "rows": [], "quality": [], "tiling": [], "large": []}
        result["rows"] = run_benchmarks(args, models, peak, log)
        trained = [m for m in models if m.trained]
        if args.kodak:
            for m in trained:
                q = kodak_quality(m, args.kodak, args.kodak_limit)
                result["quality"].append({"model": m.name, **q})
                log(f"[{m.name}] Kodak: {q}")
        if args.tiling_size:
            for m in trained or models[:1]:
                t = tiling_check(m, args.tiling_size, args.tile_size, args.out)
                result["tiling"].append(t)
                log(f"[{m.name}] tiling: {t}")
        if args.large:
            for m in trained or models[:1]:
                result["large"].append(large_check(m, args.large, args.rss_cap_gib, log, untiled=not args.no_untiled,
                                                   dtype=args.large_dtype, tiled=not args.no_tiled))
        meta["loadavg_end"] = loadavg()
        (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
        md = markdown(result)
        (args.out / "results.md").write_text(md)
        plot(result, args.out / "results.png")
        print(md)
        log(f"wrote {args.out / 'results.json'}, results.md, results.png")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
