"""Our service against its peers: the same VAE behind LitServe and behind a plain FastAPI app.

    python -m benchmarks.peers --out benchmarks/results/peers            # the full comparison (bounded:
                                                                         #   --budget-s, default 90 min)
    python -m benchmarks.peers --quick --out /tmp/peers                  # CI smoke: tiny model, few requests
    python -m benchmarks.report                                          # RESULTS.md from the JSON

On a 2-core CPU the SD-size model at 512x512 takes tens of seconds per float32 request: measure it
in its own, smaller run (e.g. `--models sd --sizes 256 --waves 1 --name peers-sd`) or with
`--device cuda`; every JSON in benchmarks/results/peers/ goes into RESULTS.md.

Systems (all answer `POST /decode?shape=...&dtype=float32&image_format=png` with a raw float32
body and a PNG, so one client drives them all):
  ours-fp32, ours-bf16     `vae serve --dtype float32|bfloat16` (+ `--ours-args`), or any
                           `--ours NAME="ARGS"` configuration
  fastapi-default|best     benchmarks/peer_apps.py: plain FastAPI + diffusers (presets there)
  litserve-default|best    benchmarks/peer_apps.py: LitServe + diffusers (best: its own batching)

Method: every server is up at once on 127.0.0.1, each under the same OMP_WAIT_POLICY (default
PASSIVE: an idle server's OpenMP threads must not spin on cores another server is measured on)
and the same torch thread count. For every (model, size, concurrency) cell the rounds are
interleaved, A B C A B C ..., so a drift in the machine's load hits every system alike; a round is
a closed loop of `concurrency` clients sending `waves x concurrency` requests. Throughput is the
median over rounds with its min-max spread; p50/p99 latency pool every round's requests. The
load average, each server's peak RSS and the CPU time servers burn while *another* system is
measured are recorded. Request counts, per-round and total time are bounded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks import harness
from benchmarks.peers.markdown import render_markdown
from benchmarks.peers.runner import run
from benchmarks.peers.systems import DEFAULT_OURS, PEERS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=Path("out/peers"), help="folder for peers.json, peers.md, server logs")
    p.add_argument("--quick", action="store_true", help="tiny random model, 64x64, concurrency 1 and 4, 2 rounds")
    p.add_argument("--models", nargs="+", default=None,
                   help="default (shipped), sd (SD kl-f8 architecture, random weights), tiny, or a diffusers folder")
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="image sides (latents are side/8)")
    p.add_argument("--concurrency", nargs="+", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per cell (default 3, quick 2)")
    p.add_argument("--waves", type=int, default=None,
                   help="requests per client per round: a round sends waves x concurrency (default 2, quick 1)")
    p.add_argument("--round-seconds", type=float, default=120.0, help="no request starts later in a round")
    p.add_argument("--budget-s", type=float, default=None, help="whole run; later cells are skipped (default 5400, quick 120)")
    p.add_argument("--ours", action="append", default=None, metavar='NAME="ARGS"',
                   help=f"our service with these `vae serve` arguments (repeatable; default {DEFAULT_OURS})")
    p.add_argument("--ours-args", default="", help="arguments added to every ours-* server, e.g. "
                   "'--model-threads 1 --max-batch-size 4'")
    p.add_argument("--peers", nargs="*", default=None, choices=sorted(PEERS), help="default: all four")
    p.add_argument("--litserve-batch", type=int, default=None, help="max_batch_size of litserve-best (default 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--torch-threads", type=int, default=None, help="every server's torch threads (default: all cores)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of every server ('unset': leave it)")
    p.add_argument("--rss-cap-gib", type=float, default=8.0, help="a server over this is stopped, its cell fails")
    p.add_argument("--logs", type=Path, default=Path("out/peers-logs"), help="server logs (default out/peers-logs)")
    p.add_argument("--name", default="peers", help="file stem: OUT/NAME.json and OUT/NAME.md (one per run; "
                   "python -m benchmarks.report shows every JSON in benchmarks/results/peers/)")
    p.add_argument("--note", default="", help="a sentence printed with the results (e.g. the machine's state)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    q = args.quick
    args.models = args.models or (["tiny"] if q else ["default", "sd"])
    args.sizes = args.sizes or ([64] if q else [256, 512])
    args.concurrency = args.concurrency or ([1, 4] if q else [1, 4, 16])
    args.rounds = args.rounds or (2 if q else 3)
    args.waves = args.waves or (1 if q else 2)
    args.budget_s = args.budget_s or (120.0 if q else 5400.0)
    args.ours = args.ours if args.ours is not None else list(DEFAULT_OURS)
    if args.peers is None:
        args.peers = sorted(PEERS)
    threads = args.torch_threads or os.cpu_count() or 1
    harness.exit_on_sigterm()
    result = run(args, threads)
    md = render_markdown(result)
    j, m = harness.write_outputs(args.out, args.name, result, md)
    print(md)
    print(f"\nwrote {j} and {m}")
    failed = [c for c in result["cells"] if c["status"] == "error"]
    return 1 if failed and q else 0
