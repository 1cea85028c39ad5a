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
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import Client, Server, decode_path, md_table

PEERS = {
    "fastapi-default": ("fastapi", "default"),
    "fastapi-best": ("fastapi", "best"),
    "litserve-default": ("litserve", "default"),
    "litserve-best": ("litserve", "best"),
}
DEFAULT_OURS = ["ours-fp32=--dtype float32", "ours-bf16=--dtype bfloat16"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class System:
    name: str
    kind: str  # ours | fastapi | litserve
    preset: str  # ours: its extra arguments; peers: default | best
    server: Server | None = None
    argv: list[str] = field(default_factory=list)
    cpu_idle_s: float = 0.0  # CPU seconds used while another system was being measured
    idle_wall_s: float = 0.0
    restarts: int = 0


def _cpu_seconds(server: Server) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in server.pids():
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(parts[11]) + int(parts[12])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return total


def build_systems(args) -> list[System]:
    out = []
    for spec in args.ours:
        name, _, extra = spec.partition("=")
        out.append(System(name.strip(), "ours", extra.strip()))
    for name in args.peers:
        kind, preset = PEERS[name]
        out.append(System(name, kind, preset))
    if not out:
        raise SystemExit("no systems to measure")
    return out


def start_system(sys_: System, model_path: Path, args, env: dict, logs: Path, model_name: str) -> None:
    port = harness.free_port()
    if sys_.kind == "ours":
        argv = harness.vae_command("serve", "--model", f"{model_name}={model_path}", "--device", args.device,
                                   "--port", str(port), "--log-level", "warning", *shlex.split(sys_.preset),
                                   *shlex.split(args.ours_args))
        ready = "/readyz"
    else:
        argv = [sys.executable, "-m", "benchmarks.peer_apps", sys_.kind, "--model", str(model_path),
                "--preset", sys_.preset, "--device", args.device, "--port", str(port)]
        if sys_.kind == "litserve" and sys_.preset == "best" and args.litserve_batch:
            argv += ["--max-batch-size", str(args.litserve_batch)]
        ready = "/health"
    sys_.argv = argv
    sys_.server = Server(sys_.name, argv, port, env, logs / f"{model_name}-{sys_.name}.log", ready).start()


def run_round(server: Server, path: str, body: bytes, concurrency: int, n: int, max_seconds: float,
              cap_mib: float) -> dict:
    """`concurrency` closed-loop clients send `n` requests in all (none started after
    `max_seconds`). Watches the server's RSS; over `cap_mib` it is stopped (the round fails)."""
    lock = threading.Lock()
    issued = [0]
    lat, errors = [], []
    barrier = threading.Barrier(concurrency + 1)
    t_start = [0.0]
    t_end = [0.0]

    def worker():
        c = Client(server.url, timeout=max(60.0, 4 * max_seconds))
        barrier.wait()
        try:
            while True:
                with lock:
                    if issued[0] >= n or time.monotonic() - t_start[0] > max_seconds:
                        return
                    issued[0] += 1
                t0 = time.monotonic()
                try:
                    status, headers, data = c.post(path, body)
                except OSError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                t1 = time.monotonic()
                dt = t1 - t0
                with lock:
                    t_end[0] = max(t_end[0], t1)
                if status == 200 and data.startswith(PNG_MAGIC):
                    lat.append(dt)
                else:
                    errors.append(f"HTTP {status}: {data[:120]!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    peak, killed = server.rss_mib(), None
    t_start[0] = time.monotonic()
    barrier.wait()
    while any(t.is_alive() for t in threads):
        time.sleep(0.25)
        rss = server.rss_mib()
        peak = max(peak, rss)
        low_mem = harness.mem_available_gib() < 1.0
        if (rss > cap_mib or low_mem) and killed is None:
            killed = f"stopped: RSS {rss:.0f} MiB over the cap {cap_mib:.0f} MiB" if rss > cap_mib else \
                f"stopped: machine below 1 GiB available (server RSS {rss:.0f} MiB)"
            server.stop(timeout=5)
    for t in threads:
        t.join()
    wall = (t_end[0] or time.monotonic()) - t_start[0]
    return {"n_ok": len(lat), "errors": len(errors), "error_examples": errors[:3], "wall_s": wall,
            "throughput_rps": len(lat) / wall if wall > 0 else 0.0, "latencies_s": lat,
            "rss_peak_mib": peak, "loadavg": list(os.getloadavg()), "killed": killed}


def _psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def agreement(systems: list[System], path: str, body: bytes) -> list[dict]:
    """Every system decodes the same latents once: PSNR of its PNG against the first system's
    (the same model must come out of every server)."""
    import io

    import numpy as np
    from PIL import Image

    images, out = {}, []
    for s in systems:
        if not s.server or not s.server.alive():
            continue
        c = Client(s.server.url)
        try:
            status, _, data = c.post(path, body)
        finally:
            c.close()
        if status == 200 and data.startswith(PNG_MAGIC):
            images[s.name] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    ref_name = next(iter(images), None)
    for name, img in images.items():
        out.append({"system": name, "reference": ref_name, "shape": list(img.shape),
                    "psnr_db": _psnr(img, images[ref_name]) if img.shape == images[ref_name].shape else None})
    return out


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


def run(args, threads: int) -> dict:
    t_begin = time.monotonic()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "VAE_TORCH_THREADS": str(threads),
           "PEER_TORCH_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.omp_wait_policy.lower() != "unset":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    meta = harness.machine_info()
    meta.update(command="python -m benchmarks.peers " + " ".join(shlex.quote(a) for a in args.argv),
                quick=args.quick, device=args.device, torch_threads=threads,
                omp_wait_policy=env.get("OMP_WAIT_POLICY", "unset"), rounds=args.rounds, waves=args.waves,
                round_seconds=args.round_seconds, budget_s=args.budget_s, server_env=env,
                loadavg_start=list(os.getloadavg()), note=args.note)
    systems = build_systems(args)
    result = {"meta": meta, "systems": {}, "models": {}, "agreement": [], "cells": []}
    cap_mib = args.rss_cap_gib * 1024
    tmp = Path(tempfile.mkdtemp(prefix="peers-models-"))

    for model in args.models:
        name = Path(model).name if model not in ("default", "sd", "tiny") else model
        path = harness.make_model(model, tmp / name)
        result["models"][name] = {"path": str(path), "spec": model}
        for s in systems:
            start_system(s, path, args, env, logs, name)
        try:
            for s in systems:
                try:
                    s.server.wait_ready(timeout=600)
                except RuntimeError as exc:
                    print(f"peers: {s.name} did not start: {exc}", file=sys.stderr)
                result["systems"].setdefault(s.name, {"kind": s.kind, "preset": s.preset,
                                                      "argv": _argv_text(s.argv), "ready_s": {}})
                result["systems"][s.name]["ready_s"][name] = s.server.ready_s
            for size in args.sizes:
                if time.monotonic() - t_begin > args.budget_s:
                    _skip(result, name, size, args.concurrency, systems, "time budget")
                    continue
                body, shape = _latents(systems, size)
                path_q = decode_path(shape, "png")
                for s in systems:  # warm-up, untimed: first-call costs stay out of the rounds
                    _warm(s, path_q, body)
                for row in agreement(systems, path_q, body):
                    result["agreement"].append({"model": name, "size": size, **row})
                for conc in args.concurrency:
                    cells = {s.name: {"model": name, "size": size, "concurrency": conc, "system": s.name,
                                      "rounds": [], "status": "ok"} for s in systems}
                    n = conc * args.waves
                    for r in range(args.rounds):
                        if time.monotonic() - t_begin > args.budget_s:
                            for c in cells.values():
                                c.setdefault("note", f"time budget: {r} of {args.rounds} rounds")
                            break
                        for s in systems:
                            cell = cells[s.name]
                            if not _ensure_running(s, cell):
                                continue
                            others = [o for o in systems if o is not s and o.server and o.server.alive()]
                            before = {o.name: _cpu_seconds(o.server) for o in others}
                            rr = run_round(s.server, path_q, body, conc, n, args.round_seconds, cap_mib)
                            for o in others:
                                o.cpu_idle_s += _cpu_seconds(o.server) - before[o.name]
                                o.idle_wall_s += rr["wall_s"]
                            cell["rounds"].append(rr)
                            if rr["killed"]:
                                cell["status"], cell["note"] = "error", rr["killed"]
                            print(f"peers: {name} {size}px c={conc} round {r + 1} {s.name}: "
                                  f"{rr['throughput_rps']:.2f} req/s, {rr['n_ok']} ok, {rr['errors']} errors, "
                                  f"load {rr['loadavg'][0]:.1f}", file=sys.stderr, flush=True)
                    for c in cells.values():
                        result["cells"].append(_summarise(c))
                    _checkpoint(args, result)
        finally:
            for s in systems:
                if s.server:
                    rss = s.server.rss_mib()
                    s.server.stop()
                    result["systems"][s.name].setdefault("rss_idle_end_mib", {})[name] = rss
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # the random-weight models made for this run
    for s in systems:
        info = result["systems"].setdefault(s.name, {"kind": s.kind, "preset": s.preset, "argv": _argv_text(s.argv)})
        info["idle_cpu_share"] = s.cpu_idle_s / s.idle_wall_s if s.idle_wall_s else None
        info["restarts"] = s.restarts
    meta["loadavg_end"] = list(os.getloadavg())
    meta["duration_s"] = time.monotonic() - t_begin
    return result


def _checkpoint(args, result: dict) -> None:
    """The files so far (a run cut short keeps every finished cell); the last write replaces them."""
    partial = {**result, "meta": {**result["meta"], "partial": True, "loadavg_end": list(os.getloadavg())}}
    try:
        harness.write_outputs(args.out, args.name, partial, render_markdown(partial))
    except Exception as exc:  # noqa: BLE001 - a failed checkpoint must not stop the run
        print(f"peers: could not write a checkpoint: {exc}", file=sys.stderr)


def _argv_text(argv: list[str]) -> str:
    text = " ".join(shlex.quote(a) for a in argv)
    text = text.replace(shlex.quote(harness._LAUNCH), "<vae>").replace(shlex.quote(sys.executable) + " -c <vae>", "vae")
    return text.replace(shlex.quote(sys.executable) + " ", "python ")


def _latents(systems: list[System], size: int) -> tuple[bytes, list[int]]:
    """Latents of a vendored photo from our /encode (the first ours-* server), else random ones."""
    for s in systems:
        if s.kind == "ours" and s.server and s.server.alive():
            try:
                return harness.encode_latents(s.server.url, harness.photo(size))
            except (RuntimeError, OSError):
                pass
    shape = [1, 4, size // 8, size // 8]
    return harness.random_latents(shape), shape


def _warm(s: System, path: str, body: bytes) -> None:
    if not s.server or not s.server.alive():
        return
    c = Client(s.server.url)
    try:
        for _ in range(2):
            c.post(path, body)
    except OSError:
        pass
    finally:
        c.close()


def _ensure_running(s: System, cell: dict) -> bool:
    if s.server and s.server.alive():
        return True
    if s.restarts >= 2 or s.server is None:
        cell["status"] = "error"
        cell.setdefault("note", "server not running")
        return False
    s.restarts += 1
    s.server.start()
    try:
        s.server.wait_ready(timeout=600)
        return True
    except RuntimeError as exc:
        cell["status"], cell["note"] = "error", f"restart failed: {str(exc)[:200]}"
        return False


def _skip(result, model, size, concurrency, systems, why):
    for conc in concurrency:
        for s in systems:
            result["cells"].append({"model": model, "size": size, "concurrency": conc, "system": s.name,
                                    "status": "skipped", "note": why, "rounds": []})


def _summarise(cell: dict) -> dict:
    import statistics

    rounds = cell["rounds"]
    thr = [r["throughput_rps"] for r in rounds if r["n_ok"]]
    lat = [x for r in rounds for x in r["latencies_s"]]
    q = harness.quantiles(lat, (50, 99))
    cell.update(
        n_ok=sum(r["n_ok"] for r in rounds), errors=sum(r["errors"] for r in rounds),
        throughput_median=statistics.median(thr) if thr else None,
        throughput_min=min(thr) if thr else None, throughput_max=max(thr) if thr else None,
        p50_ms=q["p50"] * 1000 if q["p50"] is not None else None,
        p99_ms=q["p99"] * 1000 if q["p99"] is not None else None,
        rss_peak_mib=max((r["rss_peak_mib"] for r in rounds), default=None),
        loadavg=[r["loadavg"][0] for r in rounds],
    )
    if cell["status"] == "ok" and (not rounds or cell["errors"]):
        cell["status"] = "error" if not cell["n_ok"] else "ok"
        if cell["errors"]:
            cell.setdefault("note", f"{cell['errors']} failed requests, e.g. "
                            + "; ".join(e for r in rounds for e in r["error_examples"])[:200])
    for r in rounds:  # keep the JSON small: latencies summarised per round
        lat_r = r.pop("latencies_s")
        r["latency_ms"] = {k: (v * 1000 if v is not None else None) for k, v in harness.quantiles(lat_r, (50, 99)).items()}
    return cell


def render_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        "### Our service against LitServe and plain FastAPI (`/decode` to PNG)",
        "",
        f"Command: `{m['command']}`{' (**quick smoke run: not a measurement**)' if m.get('quick') else ''}"
        f"{' (**cut short: the cells below are those that finished**)' if m.get('partial') else ''}. "
        f"{m['time_utc']}, git {m.get('git')}; {m['host_cpu']}, {m['cores']} cores, {m['mem_total_gib']:.1f} GiB; "
        f"device {m['device']}{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m.get('torch')}, diffusers "
        f"{m.get('diffusers')}, litserve {m.get('litserve')}, fastapi {m.get('fastapi')}.",
        f"Every server: torch threads {m['torch_threads']}, OMP_WAIT_POLICY={m['omp_wait_policy']}; all servers up "
        f"at once on 127.0.0.1, rounds interleaved ({m['rounds']} per cell, each {m['waves']} x concurrency requests "
        f"in a closed loop). Load average (1 min) at start {m['loadavg_start'][0]:.2f}, at end "
        f"{m.get('loadavg_end', [float('nan')])[0]:.2f}; run {m.get('duration_s', 0):.0f} s.",
        "",
        "Throughput: median req/s over rounds [min-max]; latency p50 / p99 in ms over every request of the cell.",
        "",
    ]
    if m.get("note"):
        lines[3:3] = [f"**Note:** {m['note']}"]
    rows = [[name, s["kind"], s["preset"] or "", f"{s['idle_cpu_share'] * 100:.1f} %" if s.get("idle_cpu_share") is not None else "",
             f"`{s['argv']}`"] for name, s in result["systems"].items()]
    lines += [md_table(["system", "kind", "preset / args", "CPU used while idle", "command"], rows), ""]
    cells = result["cells"]
    concs = sorted({c["concurrency"] for c in cells})
    for model in result["models"]:
        for size in sorted({c["size"] for c in cells if c["model"] == model}):
            sub = [c for c in cells if c["model"] == model and c["size"] == size]
            names = list(dict.fromkeys(c["system"] for c in sub))
            hdr = ["system"] + [f"c={k} req/s" for k in concs] + [f"c={k} p50/p99 ms" for k in concs]
            body = []
            for nm in names:
                row = [nm]
                by = {c["concurrency"]: c for c in sub if c["system"] == nm}
                for k in concs:
                    row.append(_thr_text(by.get(k)))
                for k in concs:
                    row.append(_lat_text(by.get(k)))
                body.append(row)
            loads = [x for c in sub for x in c.get("loadavg", [])]
            load = f"; load average {min(loads):.1f}-{max(loads):.1f} during the rounds" if loads else ""
            lines += [f"**{model}, {size}x{size}**{load}", "", md_table(hdr, body), ""]
    notes = [f"- {c['model']} {c['size']} c={c['concurrency']} {c['system']}: {c['status']}: {c.get('note', '')}"
             for c in cells if c["status"] != "ok" or c.get("note")]
    if result["agreement"]:
        rows = [[a["model"], a["size"], a["system"], a["reference"],
                 "identical" if a["psnr_db"] == float("inf") else a["psnr_db"]] for a in result["agreement"]]
        lines += ["Same latents, one request per system: PSNR of each PNG against the first system's "
                  "(checks that every server decodes the same model).", "",
                  md_table(["model", "size", "system", "against", "PSNR dB"], rows), ""]
    if notes:
        lines += ["Failures and cut cells:", "", *notes, ""]
    return "\n".join(lines)


def _thr_text(c) -> str:
    if not c:
        return ""
    if c["status"] == "skipped":
        return "skipped"
    if c.get("throughput_median") is None:
        return "failed"
    return f"{c['throughput_median']:.2f} [{c['throughput_min']:.2f}-{c['throughput_max']:.2f}]" + (
        "*" if c["status"] != "ok" or c.get("errors") else "")


def _lat_text(c) -> str:
    if not c or c.get("p50_ms") is None:
        return ""
    return f"{c['p50_ms']:.0f} / {c['p99_ms']:.0f}"


if __name__ == "__main__":
    sys.exit(main())
