"""`vae bench` with an AutoencoderTiny (TAESD) folder beside an AutoencoderKL: both get rows, the
diffusers baseline included (in-process diffusers builds the class the folder's config names)."""

from __future__ import annotations

import json

from app.cli.main import main as vae


def test_bench_runs_autoencoder_tiny_beside_autoencoderkl(family_dirs, tmp_path):
    out = tmp_path / "bench"
    rc = vae(["bench", "--quick", "--models", f"taesd={family_dirs['taesd']}", f"sd1={family_dirs['sd1']}",
              "--modes", "diffusers-fp32", "inproc-fp32", "--ops", "encode", "roundtrip", "--sizes", "64",
              "--out", str(out), "--no-kodak", "--tiling-size", "0"])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["model"], r["mode"], r["op"]) for r in rows} == {
        (m, mode, op) for m in ("taesd", "sd1") for mode in ("diffusers-fp32", "inproc-fp32") for op in ("encode", "roundtrip")}
    for r in rows:
        assert "error" not in r, r
        assert r["median_s"] > 0 and r["gflop"] > 0 and "speedup_vs_diffusers_fp32" in r
    assert "taesd" in (out / "results.md").read_text()
