"""benchmarks/gpu_check.sh --quick: the GPU check's CPU mode runs end to end (so the script
that a lent GPU machine runs cannot rot), and the pieces that turn /metrics into a per-request
split and results into goals. Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check, harness

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_sh_quick_writes_json_and_markdown(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--quick"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {"cuda_tests.log", "gpu_check.log", "gpu_check.json", "gpu_check.md"} <= {p.name for p in out.iterdir()}
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["meta"]["quick"] and result["meta"]["device"] == "cpu"
    assert "skipped" in result["tests"] or "deselected" in result["tests"]
    assert {k: v["status"] for k, v in result["sections"].items()} == {"model": "ok", "batching": "ok", "http": "ok", "compile": "ok"}
    rows = result["model"]["rows"]
    assert {(r["variant"], r["op"]) for r in rows} == {(v, op) for v in ("fp32", "bf16-cl") for op in ("decode", "encode")}
    assert all(r["median_ms"] > 0 and r["finite"] for r in rows)
    assert next(r for r in rows if r["variant"] == "fp32")["rel_l2"] == 0.0
    assert result["batching"]["speedup"] > 0 and result["batching"]["n"] == 4
    e2e = result["http"]["e2e"]
    assert [r["format"] for r in e2e] == ["png", "jpg", "pt"]
    for r in e2e:
        assert r["client_ms"] >= r["model_ms"] > 0 and 0 <= r["non_model_share"] < 1 and r["bytes_out"] > 0
    hb = result["http"]["batching"]
    assert hb["pt"]["mean_batch_size"] > 1 and hb["pt"]["speedup"] > 0  # batches really formed
    goals = {g["goal"]: g for g in result["goals"]}
    assert goals["SD decode 512^2, fastest half-precision path"]["measured"] == "not measured"  # quick: 64 only
    md = (out / "gpu_check.md").read_text()
    assert "quick CPU smoke run" in md and "| goal | target | measured | met |" in md and "transport" in md


def test_stage_split_from_metrics():
    def samples(n, total, stages):
        out = {("vae_request_duration_seconds_count", (("route", "/decode"),)): n,
               ("vae_request_duration_seconds_sum", (("route", "/decode"),)): total}
        for k, v in stages.items():
            out[("vae_stage_duration_seconds_sum", (("route", "/decode"), ("stage", k)))] = v
        return out

    before = samples(3, 1.0, {"deserialize": 0.1, "queue": 0.0, "compute": 0.6, "serialize": 0.2})
    after = samples(5, 1.5, {"deserialize": 0.12, "queue": 0.01, "compute": 0.9, "serialize": 0.3})
    split = harness.stage_split(before, after)
    assert split["requests"] == 2
    assert abs(split["server_total"] - 0.25) < 1e-9 and abs(split["compute"] - 0.15) < 1e-9
    assert abs(split["deserialize"] - 0.01) < 1e-9 and abs(split["serialize"] - 0.05) < 1e-9


def test_goals_compare_against_issue_14_targets():
    def row(variant, size, ms):
        return {"variant": variant, "op": "decode", "size": size, "median_ms": ms, "finite": True}

    result = {
        "model": {"rows": [row("fp32", 512, 5.0), row("bf16-cl", 512, 13.0), row("bf16-cl+compile", 512, 11.0),
                           row("bf16-cl", 1024, 50.0)]},
        "batching": {"n": 16, "side": 256, "speedup": 1.4},
        "http": {"e2e": [{"size": 1024, "format": "png", "non_model_share": 0.3, "model_ms": 40.0, "client_ms": 57.0},
                         {"size": 512, "format": "png", "non_model_share": 0.05, "model_ms": 1.0, "client_ms": 2.0}],
                 "batching": {"n": 16, "side": 256, "pt": {"speedup": 2.0, "mean_batch_size": 8.0}}},
    }
    goals = {g["goal"]: g for g in gpu_check.goals(result)}
    assert goals["SD decode 512^2, fastest half-precision path"]["met"] is True  # fp32 never counts
    assert "bf16-cl+compile" in goals["SD decode 512^2, fastest half-precision path"]["measured"]
    assert goals["SD decode 1024^2, fastest half-precision path"]["met"] is False
    assert goals["batching in process, 16 x 256^2"]["met"] is False
    assert goals["dynamic batching over HTTP, 16 x 256^2 /decode pt"]["met"] is True
    assert goals["dynamic batching over HTTP, 16 x 256^2 /decode png"]["met"] is None
    assert goals["non-model share of a 1024^2 /decode, png"]["met"] is False
    assert not any("512^2 /decode" in g for g in goals)  # the share goal is for the largest size


def test_benchmark_paths_exist():
    """The files the benchmark tools read by path (a package move once left SD_CONFIG dangling, so a
    full gpu_check or peers run failed at model creation)."""
    from benchmarks import harness

    for path in (harness.SD_CONFIG, harness.PHOTOS, harness.SHIPPED_MODEL):
        assert path.exists(), path
    config = json.loads(harness.SD_CONFIG.read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 4
