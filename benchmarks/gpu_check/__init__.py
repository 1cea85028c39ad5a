"""The GPU benchmarks of issue 14: `python -m benchmarks.gpu_check` (run by
benchmarks/gpu_check.sh), whose --help (cli.py's docstring) describes the sections.

  cli          the command line (main), the sections in order, the result files
  timing       the time budget, timing a call
  variants     model variants, their inputs, error against the fp32 reference
  model        section model (+ compile): in-process timings, CUDA graphs, torch.compile
  batching     section batching: in process
  http_bench   section http: `vae serve` end to end, split by stage; dynamic batching
  targets      the goals of issue 14 and a result against them
  markdown     the report (gpu_check.md, RESULTS.md's gpu section)

The names the single module had are re-exported here (`gpu_check.goals`,
`from benchmarks.gpu_check import render_markdown`). Underscore names are private to this
package; the submodules import each other, never this package.
"""

from __future__ import annotations

from benchmarks.gpu_check.batching import bench_batching
from benchmarks.gpu_check.cli import main
from benchmarks.gpu_check.http_bench import bench_http
from benchmarks.gpu_check.markdown import render_markdown
from benchmarks.gpu_check.model import ModelBench
from benchmarks.gpu_check.targets import GOALS, goals
from benchmarks.gpu_check.timing import Budget, time_fn

__all__ = ["GOALS", "Budget", "time_fn", "ModelBench", "bench_batching", "bench_http", "goals", "render_markdown",
           "main"]
