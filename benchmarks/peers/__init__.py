"""Our service against its peers (LitServe, plain FastAPI): `python -m benchmarks.peers`, whose
--help (cli.py's docstring) describes the method.

  cli         the command line (main)
  runner      one run: servers up per model, interleaved rounds per cell, budget, checkpoints
  systems     which systems, their server processes, restarts, idle CPU
  load        one closed-loop round over HTTP, warm-up, latents, cross-system agreement
  stats       a cell's throughput and latency from its rounds
  markdown    the report (peers.md, RESULTS.md's peers section)

The names the single module had are re-exported here (`peers.main`, `peers.PNG_MAGIC`,
`from benchmarks.peers import render_markdown`). Underscore names are private to this package;
the submodules import each other, never this package.
"""

from __future__ import annotations

from benchmarks.peers.cli import main
from benchmarks.peers.load import PNG_MAGIC, agreement, run_round
from benchmarks.peers.markdown import render_markdown
from benchmarks.peers.runner import run
from benchmarks.peers.systems import DEFAULT_OURS, PEERS, System, build_systems, start_system

__all__ = ["PEERS", "DEFAULT_OURS", "PNG_MAGIC", "System", "build_systems", "start_system", "run_round",
           "agreement", "main", "run", "render_markdown"]
