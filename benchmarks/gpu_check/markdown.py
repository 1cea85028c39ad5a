"""The Markdown report of a GPU check (gpu_check.md; benchmarks/report.py puts it into RESULTS.md)."""

from __future__ import annotations

from benchmarks.harness import md_table


def render_markdown(result: dict) -> str:
    m = result["meta"]
    dev = m.get("gpu") or f"{m['host_cpu']} (CPU)"
    lines = [
        "### GPU check (issue 14)" + (" - **quick CPU smoke run: not a measurement**" if m.get("quick") else ""),
        "",
        f"Command: `{m['command']}`. {m['time_utc']}, git {m.get('git')}; device **{dev}**; torch {m.get('torch')} "
        f"(CUDA {m.get('cuda')}), diffusers {m.get('diffusers')}; host {m['host_cpu']}, {m['cores']} cores, load average "
        f"{m['loadavg'][0]:.2f}; model: {m['model']}. Goals are stated for an H100"
        + ("" if "H100" in str(m.get("gpu")) else " (this device is not one: the comparison is indicative)") + ".",
        "",
    ]
    if result.get("tests"):
        lines += [f"CUDA tests (`pytest -m gpu tests/benchmarks/test_cuda.py`): {result['tests']}", ""]
    g = result.get("goals", [])
    if g:
        lines += [md_table(["goal", "target", "measured", "met"],
                           [[x["goal"], x["target"], x["measured"], {True: "yes", False: "**no**", None: "-"}[x["met"]]]
                            for x in g]), ""]
    mod = result.get("model")
    if mod:
        lines += ["In process (diffusers AutoencoderKL, batch 1): median of CUDA-event-timed runs; error against a "
                  "strict fp32 reference (TF32 off); timing runs use torch's defaults "
                  f"({', '.join(f'{k}={v}' for k, v in mod['flags'].items()) or 'CPU'}).", ""]
        rows = [[r["variant"], r["op"], r["size"], r["median_ms"], f"{r['p10_ms']:.3g}-{r['p90_ms']:.3g}", r["runs"],
                 r.get("compile_s"), f"{r['rel_l2']:.1e}" if r["rel_l2"] is not None else "non-finite",
                 r.get("peak_mem_mib")] for r in mod["rows"]]
        lines += [md_table(["variant", "op", "size", "median ms", "p10-p90 ms", "runs", "compile s", "rel. L2 error",
                            "peak MiB"], rows), ""]
        lines += [f"- {n}" for n in mod.get("notes", [])] + ([""] if mod.get("notes") else [])
        tag = mod.get("half_for_fast_paths")
        paths = [tag, f"{tag}+cudagraph", f"{tag}+compile", f"{tag}+compile+cudagraphs"]
        by = {(r["variant"], r["op"], r["size"]): r["median_ms"] for r in mod["rows"]}
        keys = sorted({(r["op"], r["size"]) for r in mod["rows"]})
        if tag and any((p, op, size) in by for p in paths[1:] for op, size in keys):
            rows = []
            for op, size in keys:
                vals = [by.get((p, op, size)) for p in paths]
                gain = lambda a, b: f"{a / b:.2f}x" if a and b else ""  # noqa: E731
                rows.append([op, size, *vals, gain(vals[0], vals[1]), gain(vals[2], vals[3])])
            lines += [f"Do CUDA graphs and torch.compile pay? ({tag}, median ms)", "",
                      md_table(["op", "size", "eager", "eager + CUDA graph", "compile", "compile + CUDA graphs",
                                "graph gain, eager", "graph gain, compiled"], rows), ""]
    b = result.get("batching")
    if b:
        lines += [f"Batching in process ({b['dtype']}, channels_last): {b['n']} x {b['side']}^2 decodes one by one "
                  f"{b['unbatched_ms']:.1f} ms, as one batch {b['batched_ms']:.1f} ms: **{b['speedup']:.2f}x**; "
                  f"largest difference batched vs unbatched {b['max_abs_batched_vs_unbatched']:.2e}.", ""]
    h = result.get("http")
    if h:
        if h.get("e2e"):
            argv = (h.get("servers", {}).get("batched") or {}).get("argv", "")
            lines += [f"HTTP `/decode` end to end (`{argv}`; sequential requests, latents of a photo from its "
                      "/encode): medians per request in ms (each column its own median: they need not add up). "
                      "model = compute stage (forward pass and copy to the host); codec = deserialize (read + "
                      "parse the body) + serialize (image or tensor encoding); queue includes the batch wait "
                      "(--batch-wait-ms, 2 ms) a lone request spends; framework = server time outside the "
                      "stages; transport = client time minus the server's whole-request time (loopback, "
                      "client parsing).", ""]
            rows = [[r["size"], r["format"], r["client_ms"], r["model_ms"], r["codec_ms"], r["queue_ms"],
                     r["framework_ms"], r["transport_ms"], f"{r['non_model_share'] * 100:.1f} %", r["bytes_out"], r["runs"]]
                    for r in h["e2e"]]
            lines += [md_table(["size", "answer", "total", "model", "codec", "queue", "framework", "transport",
                                "non-model", "bytes", "runs"], rows), ""]
        hb = h.get("batching")
        if hb:
            rows = [[fmt, hb[fmt]["unbatched_ms"], hb[fmt]["batched_ms"], f"{hb[fmt]['speedup']:.2f}x",
                     hb[fmt]["mean_batch_size"]] for fmt in ("pt", "png") if fmt in hb]
            lines += [f"HTTP dynamic batching: {hb['n']} concurrent {hb['side']}^2 /decode requests, median of "
                      f"{hb['rounds']} interleaved rounds, `--max-batch-size {hb['n']}` against `--max-batch-size 1`:", "",
                      md_table(["answer", "unbatched ms", "batched ms", "speedup", "mean batch"], rows), ""]
        lines += [f"- {n}" for n in h.get("notes", [])] + ([""] if h.get("notes") else [])
    for name, sec in result.get("sections", {}).items():
        if sec.get("status") != "ok":
            lines.append(f"- section {name}: {sec.get('status')}" + (f": {sec['error']}" if sec.get("error") else ""))
    return "\n".join(lines).rstrip() + "\n"
