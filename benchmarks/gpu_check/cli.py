"""The GPU benchmarks of issue 14, sized for one short lease (run by benchmarks/gpu_check.sh).

    python -m benchmarks.gpu_check --out $OUT            # on a CUDA machine (gpu_check.sh sets it up)
    python -m benchmarks.gpu_check --quick --out DIR     # CPU smoke of the same code (CI)

Sections, in this order (each part is skipped, and says so, when the time budget is spent):
  model     SD-size AutoencoderKL (models/configs/sd-kl-f8, random weights) encode and decode at
            512^2 and 1024^2 in process through diffusers: fp32, fp16, bf16, each half precision
            with channels_last, and a captured CUDA graph of the eager model; CUDA-event timing,
            medians; error of each against a strict fp32 (no TF32) reference
  batching  16 x 256^2 decodes as one batch against 16 one-image calls (in process)
  http      `vae serve --device cuda --dtype bfloat16` (a subprocess): /decode at 1024^2 (and
            512^2) answering PNG, JPEG and pt, each request split into model (compute stage),
            codec (deserialize + serialize stages), queue, framework and transport (client
            time minus the server's whole-request time), from /metrics histogram deltas around
            each request; then 16 concurrent 256^2 /decode requests against a server with
            --max-batch-size 16 and one with --max-batch-size 1, rounds interleaved
  compile   with the time left (rows added to `model`): torch.compile of the decoder at each size,
            then with CUDA graphs (mode reduce-overhead), then of the encoder
Writes gpu_check.json and gpu_check.md to --out (default $OUT). Goals (issue 14, on an H100):
decode 512^2 <= 12 ms and 1024^2 <= 45 ms, batching >= 1.5x at 16 x 256^2, non-model share of a
1024^2 /decode <= 10 %.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.gpu_check.batching import bench_batching
from benchmarks.gpu_check.http_bench import bench_http
from benchmarks.gpu_check.markdown import render_markdown
from benchmarks.gpu_check.model import ModelBench
from benchmarks.gpu_check.targets import goals
from benchmarks.gpu_check.timing import Budget


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "out/gpu_check"))
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny model, small sizes, few runs, no compile")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--budget-s", type=float, default=None, help="time for all sections (default 330, quick 150)")
    p.add_argument("--model", default=None, help="sd (default), tiny (quick), default (shipped) or a diffusers folder")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="in-process sizes (default 512 1024; quick 64)")
    p.add_argument("--http-sizes", type=int, nargs="+", default=None, help="/decode sizes (default 1024 512; quick 64)")
    p.add_argument("--http-runs", type=int, default=None, help="timed requests per size and format (default 10, quick 2)")
    p.add_argument("--http-dtype", default="bfloat16")
    p.add_argument("--serve-args", default="", help="extra `vae serve` arguments for the HTTP servers (e.g. --compile)")
    p.add_argument("--batch", type=int, default=None, help="default 16, quick 4")
    p.add_argument("--device-threads", type=int, default=None,
                   help="torch threads here and in the servers (default: torch's own; quick 1)")
    p.add_argument("--batch-side", type=int, default=None, help="default 256, quick 64")
    p.add_argument("--http-batch-rounds", type=int, default=None, help="default 5, quick 1")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--compile-on-cpu", action="store_true", help="also torch.compile on a CPU (slow)")
    p.add_argument("--compile-decode-only", action="store_true", help="compile only the decoder (saves time)")
    p.add_argument("--compile-estimate-s", type=float, default=70.0, help="seconds one compile is assumed to take")
    p.add_argument("--skip-cudagraph", action="store_true")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument("--tests-log", type=Path, default=None, help="pytest output to summarise in the report")
    args = p.parse_args(argv)

    import torch

    harness.exit_on_sigterm()
    q = args.quick
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or ("tiny" if q else "sd")
    args.sizes = args.sizes or ([64] if q else [512, 1024])
    args.http_sizes = args.http_sizes or ([64] if q else [1024, 512])
    args.http_runs = args.http_runs or (2 if q else 10)
    args.batch = args.batch or (4 if q else 16)
    args.batch_side = args.batch_side or (64 if q else 256)
    args.http_batch_rounds = args.http_batch_rounds or (1 if q else 5)
    if q and not args.device_threads:
        args.device_threads = 1  # a smoke run on a shared CI machine: no OpenMP barrier storms
    if args.device_threads:
        torch.set_num_threads(args.device_threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["VAE_TORCH_THREADS"] = str(args.device_threads)
    budget = Budget(args.budget_s or (150.0 if q else 330.0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str):
        print(f"[{time.monotonic() - budget.t0:6.1f}s] {msg}", flush=True)

    meta = harness.machine_info()
    meta.update(command="python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
                quick=q, device=args.device, model=args.model, budget_s=budget.seconds)
    result: dict = {"meta": meta, "sections": {}}
    if args.tests_log and args.tests_log.is_file():
        result["tests"] = _pytest_summary(args.tests_log.read_text(errors="replace"))

    import diffusers
    from diffusers import AutoencoderKL

    diffusers.utils.logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model_dir = harness.make_model(args.model, tmp / "model")
    base = AutoencoderKL.from_pretrained(model_dir).eval().requires_grad_(False)
    meta["model_parameters"] = sum(t.numel() for t in base.parameters())
    meta["model_dir"] = str(model_dir)

    def section(name, fn):
        t0 = time.monotonic()
        try:
            result[name] = fn()
            result["sections"][name] = {"status": "ok", "seconds": time.monotonic() - t0}
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            import traceback

            traceback.print_exc()
            result["sections"][name] = {"status": "error", "seconds": time.monotonic() - t0,
                                        "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        _write(out, result)

    mb = ModelBench(base, args, budget, log)
    mb.on_row = lambda: _write(out, result) if "model" in result else None
    section("model", mb.eager)
    section("batching", lambda: bench_batching(base, args, mb.half[0], log))
    if args.skip_http:
        result["sections"]["http"] = {"status": "skipped (--skip-http)"}
    elif budget.allows(30):
        section("http", lambda: bench_http(model_dir, args, budget, out, log))
    else:
        result["sections"]["http"] = {"status": "skipped: time budget"}
    section("compile", lambda: mb.compile() and None)  # its rows go to result["model"]
    result.pop("compile", None)
    result["goals"] = goals(result)
    meta["seconds"] = time.monotonic() - budget.t0
    md = _write(out, result)
    print(md)
    return 0 if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in result["sections"].values()) else 1


def _write(out: Path, result: dict) -> str:
    md = render_markdown(result)
    harness.write_outputs(out, "gpu_check", result, md)
    return md


def _pytest_summary(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        s = line.strip("= ").strip()
        if any(w in s for w in (" passed", " failed", " skipped", " error", "no tests ran")):
            return s
    return "no pytest summary line"
