"""One peers run: every system up at once per model, then for every (size, concurrency) cell the
rounds interleaved across systems, within the time budget; checkpoints after every cell."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import decode_path
from benchmarks.peers.load import _latents, _warm, agreement, run_round
from benchmarks.peers.markdown import render_markdown
from benchmarks.peers.stats import _summarise
from benchmarks.peers.systems import _argv_text, _cpu_seconds, _ensure_running, build_systems, start_system


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


def _skip(result, model, size, concurrency, systems, why):
    for conc in concurrency:
        for s in systems:
            result["cells"].append({"model": model, "size": size, "concurrency": conc, "system": s.name,
                                    "status": "skipped", "note": why, "rounds": []})
