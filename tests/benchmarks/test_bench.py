"""`vae bench --quick` on a tiny model: the JSON / Markdown / PNG come out with the expected
structure. Timings are never asserted."""

from __future__ import annotations

import json

from PIL import Image

from app.cli.main import main as vae


def test_bench_quick_writes_json_markdown_and_plot(tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = vae(["bench", "--quick", "--models", f"tiny={tiny_vae_dir}", "--out", str(out), "--no-kodak",
              "--large", "128", "--no-untiled"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert {"meta", "peak", "rows", "quality", "tiling", "large"} <= set(result)
    assert result["peak"]["float32"] > 0 and result["peak"]["bfloat16"] > 0
    assert result["meta"]["machine"]["cores"] >= 1 and result["meta"]["command"].startswith("vae bench")
    rows = result["rows"]
    modes = {r["mode"] for r in rows}
    assert modes == {"diffusers-fp32", "inproc-fp32", "inproc-bf16", "http-fp32", "http-bf16"}
    assert {(r["op"], r["size"]) for r in rows} == {("encode", 64), ("decode", 64), ("roundtrip", 64)}
    for r in rows:
        assert "error" not in r, r
        assert r["runs"] == 2 and len(r["times_s"]) == 2 and r["median_s"] > 0 and r["p90_s"] >= r["median_s"] * 0.999
        assert r["peak_rss_mib"] > 0 and r["gflop"] >= 0 and r["gflop_per_s"] >= 0 and "pct_of_peak" in r
        assert "speedup_vs_diffusers_fp32" in r
        expected = {"1", "2"} if r["mode"].startswith("http-") else {"1"}
        assert set(r["images_per_s"]) == expected
        if r["mode"].startswith("http-"):
            assert "overhead_vs_inproc_pct" in r
    tiling = result["tiling"][0]
    assert tiling["size"] == 128 and tiling["psnr_difference_db"] >= 0
    for name in tiling["images"]:
        assert Image.open(out / name).size == (128, 128)
    large = result["large"][0]
    assert large["tiled"]["ok"] and large["tiled"]["peak_rss_mib"] > 0 and "untiled" not in large
    md = (out / "results.md").read_text()
    assert "| model | mode | op | size | median s | p90 s |" in md and "diffusers-fp32" in md and "Tiling at 128x128" in md
    assert md in capsys.readouterr().out
    with Image.open(out / "results.png") as img:
        assert img.format == "PNG" and img.size[0] > 300


def test_colour_lock_cost_script_prints_one_row_per_setting(tiny_vae_dir, capsys):
    """`python -m benchmarks.colour_lock_cost` on a tiny model: the table has every dtype, size and op,
    with positive seconds. Timings are never asserted."""
    from benchmarks import colour_lock_cost

    assert colour_lock_cost.main(["--model", f"tiny={tiny_vae_dir}", "--sizes", "32", "64", "--runs", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| float", "| bfloat"))]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
        (d, s, op) for d in ("float32", "bfloat16") for s in ("32", "64") for op in ("encode", "roundtrip")]
    assert all(float(v) > 0 for r in rows for v in r[3:6])
