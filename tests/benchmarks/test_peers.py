"""python -m benchmarks.peers --quick (our service against plain FastAPI and, when installed, LitServe)
and benchmarks/report.py (RESULTS.md's generated sections). Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import peers, report

HAVE_LITSERVE = importlib.util.find_spec("litserve") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    systems = ["fastapi-default"] + (["litserve-best"] if HAVE_LITSERVE else [])
    rc = peers.main(["--quick", "--out", str(out), "--logs", str(out / "logs"), "--ours", "ours-bf16=--dtype bfloat16",
                     "--peers", *systems, "--note", "test run"])
    return rc, out, ["ours-bf16", *systems]


def test_quick_run_measures_every_system_in_interleaved_rounds(quick_run):
    rc, out, systems = quick_run
    assert rc == 0
    result = json.loads((out / "peers.json").read_text())
    meta = result["meta"]
    assert meta["omp_wait_policy"] == "PASSIVE" and meta["torch_threads"] >= 1
    assert meta["server_env"]["OMP_NUM_THREADS"] == str(meta["torch_threads"])
    assert len(meta["loadavg_start"]) == 3 and len(meta["loadavg_end"]) == 3
    assert list(result["systems"]) == systems
    assert all(s["argv"] and s["ready_s"]["tiny"] > 0 for s in result["systems"].values())
    assert result["systems"]["ours-bf16"]["argv"].startswith("vae serve --model tiny=")
    cells = result["cells"]
    assert {(c["system"], c["concurrency"]) for c in cells} == {(s, k) for s in systems for k in (1, 4)}
    for c in cells:
        assert c["status"] == "ok", c
        assert len(c["rounds"]) == meta["rounds"] == 2
        assert c["n_ok"] == 2 * c["concurrency"] * meta["waves"] and c["errors"] == 0
        assert c["throughput_min"] <= c["throughput_median"] <= c["throughput_max"]
        assert 0 < c["p50_ms"] <= c["p99_ms"] and c["rss_peak_mib"] > 0
    # every server decoded the same latents into (nearly) the same image
    agree = {a["system"]: a for a in result["agreement"]}
    assert set(agree) == set(systems) and agree["ours-bf16"]["psnr_db"] == float("inf")
    assert all(a["psnr_db"] >= 30 for a in agree.values())
    md = (out / "peers.md").read_text()
    assert "| system | c=1 req/s | c=4 req/s |" in md and "OMP_WAIT_POLICY=PASSIVE" in md and "test run" in md


def test_report_rewrites_only_its_sections(quick_run, tmp_path):
    _, out, _ = quick_run
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nhand-written text\n")
    argv = ["--results", str(results), "--peers-json", str(out / "peers.json"), "--gpu-json", str(tmp_path / "none.json")]
    assert report.main(argv) == 0
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nhand-written text\n")
    assert report.begin("peers") in text and report.end("peers") in text and "ours-bf16" in text
    assert "Not measured yet. Run `bash benchmarks/gpu_check.sh`" in text
    results.write_text(text + "\nmore hand-written text\n")
    assert report.main(argv) == 0  # again: the sections are replaced in place, the rest kept
    again = results.read_text()
    assert again == text + "\nmore hand-written text\n"


def test_fastapi_peer_presets_answer_png(tmp_path):
    """Both FastAPI presets in process (LitServe's run in the quick run when installed)."""
    from fastapi.testclient import TestClient

    from benchmarks import harness, peer_apps

    model = harness.make_model("tiny", tmp_path / "tiny")
    body = harness.random_latents([1, 4, 8, 8])
    for preset in ("default", "best"):
        app = peer_apps.fastapi_app(str(model), "cpu", preset)
        with TestClient(app) as client:
            r = client.post(harness.decode_path([1, 4, 8, 8]), content=body,
                            headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:200]
        assert r.content.startswith(peers.PNG_MAGIC)
