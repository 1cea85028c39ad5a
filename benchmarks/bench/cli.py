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

import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


from benchmarks.bench.inputs import ALL_MODES, DEFAULT_MODES, KODAK, OPS, ROOT
from benchmarks.bench.inputs import resolve_models
from benchmarks.bench.machine import loadavg, machine, measure_peak
from benchmarks.bench.quality import kodak_quality, large_check, tiling_check
from benchmarks.bench.report import markdown, plot
from benchmarks.bench.timing import run_benchmarks
from models.options import Parser, nonnegative_int, positive_float, positive_int




def parse_args(argv):
    p = Parser(prog="vae bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["sd"], help="sd | default | NAME=PATH (several: one table each)")
    p.add_argument("--modes", nargs="+", default=None, choices=ALL_MODES, help=f"default: {' '.join(DEFAULT_MODES)}")
    p.add_argument("--ops", nargs="+", default=None, choices=OPS)
    p.add_argument("--sizes", nargs="+", type=positive_int, default=None, help="square image sides (default 256 512 1024)")
    p.add_argument("--runs", type=positive_int, default=None, help="timed runs per measurement (default 5)")
    p.add_argument("--concurrency", nargs="+", type=positive_int, default=None, help="HTTP concurrency levels (default 1 4 16)")
    p.add_argument("--concurrency-sizes", nargs="+", type=positive_int, default=None,
                   help="sizes at which concurrency > 1 is measured (default: all)")
    p.add_argument("--kodak", type=Path, default=None, help=f"Kodak folder for bf16 vs fp32 PSNR (default {KODAK} if present)")
    p.add_argument("--kodak-limit", type=positive_int, default=None, help="use only the first N Kodak images")
    p.add_argument("--no-kodak", action="store_true")
    p.add_argument("--tiling-size", type=nonnegative_int, default=None, help="tiled vs untiled PSNR at this size (default 1024; 0: skip)")
    p.add_argument("--tile-size", type=positive_int, default=768)  # the server default (app.http.settings)
    p.add_argument("--large", type=nonnegative_int, default=0, help="an NxN /roundtrip through the server, tiled and untiled (e.g. 4096)")
    p.add_argument("--no-untiled", action="store_true", help="with --large: skip the untiled server")
    p.add_argument("--no-tiled", action="store_true", help="with --large: only the untiled server")
    p.add_argument("--large-dtype", default="float32", choices=["float32", "bfloat16"], help="server dtype for --large")
    p.add_argument("--rss-cap-gib", type=positive_float, default=12.0, help="kill the untiled --large server above this RSS")
    p.add_argument("--peak-n", type=positive_int, default=2048, help="matmul size for the machine's peak")
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
