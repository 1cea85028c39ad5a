"""Shared pieces of the benchmark tools (benchmarks/peers/, benchmarks/gpu_check/).

They reach the service only through its stable surface: the `vae` command (started as a
subprocess through its console-script entry point, so a restructured package still works) and
HTTP. In-process model work uses diffusers' AutoencoderKL directly.

  paths       the repository's files (ROOT, PHOTOS, SD_CONFIG, SHIPPED_MODEL)
  models      make_model, TINY_CONFIG
  images      photo, png_bytes
  client      decode_path, Client, encode_latents, random_latents
  metrics     scrape, metric, stage_split (Prometheus /metrics)
  processes   vae_command, exit_on_sigterm, free_port, Server
  machine     machine_info, mem_available_gib
  output      quantiles, md_table, write_outputs

Every name is re-exported here, so `from benchmarks import harness; harness.X` and
`from benchmarks.harness import X` work as they did when this was one module. The submodules
import each other, never this package (no import cycle through it).
"""

from __future__ import annotations

from benchmarks.harness.client import Client, decode_path, encode_latents, random_latents
from benchmarks.harness.images import photo, png_bytes
from benchmarks.harness.machine import machine_info, mem_available_gib
from benchmarks.harness.metrics import metric, scrape, stage_split
from benchmarks.harness.models import TINY_CONFIG, make_model
from benchmarks.harness.output import md_table, quantiles, write_outputs
from benchmarks.harness.paths import PHOTOS, ROOT, SD_CONFIG, SHIPPED_MODEL
from benchmarks.harness.processes import _LAUNCH, Server, exit_on_sigterm, free_port, vae_command

__all__ = [
    "ROOT", "PHOTOS", "SD_CONFIG", "SHIPPED_MODEL", "TINY_CONFIG", "_LAUNCH",
    "vae_command", "exit_on_sigterm", "free_port", "make_model", "photo", "png_bytes",
    "decode_path", "Client", "encode_latents", "random_latents", "scrape", "metric", "stage_split",
    "Server", "quantiles", "md_table", "machine_info", "mem_available_gib", "write_outputs",
]
