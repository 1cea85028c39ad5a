"""The Markdown report of a peers run (peers.md; benchmarks/report.py puts it into RESULTS.md)."""

from __future__ import annotations

from benchmarks.harness import md_table


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
