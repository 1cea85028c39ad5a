"""Reports: the Markdown table and the plot of a run's results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.bench.inputs import ALL_MODES, OPS



def fmt(v, nd=3):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(result: dict) -> str:
    meta, peak = result["meta"], result["peak"]
    lines = [
        f"# vae bench — {meta['date']}",
        "",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, {meta['machine']['memory_gib']} GiB, "
        f"GPU: {meta['machine']['gpu'] or 'none'}; torch {meta['machine']['torch']}, diffusers {meta['machine']['diffusers']}. "
        f"Load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}.",
        f"Measured peak (matmul {peak['matmul_n']}^3): float32 {peak['float32']} GFLOP/s, bfloat16 {peak['bfloat16']} GFLOP/s.",
        f"Command: `{meta['command']}`",
        "",
    ]
    concs = sorted({c for r in result["rows"] for c in r.get("images_per_s", {})}, key=int)
    head = (["model", "mode", "op", "size", "median s", "p90 s"] + [f"img/s c={c}" for c in concs]
            + ["peak RSS MiB", "GFLOP", "GFLOP/s", "% peak", "x diffusers fp32", "HTTP overhead %"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if "median_s" not in r:
            lines.append(f"| {r['model']} | {r['mode']} | skipped: {r.get('error', '')} |")
            continue
        cells = [r["model"], r["mode"], r["op"], r["size"], fmt(r["median_s"]), fmt(r["p90_s"])]
        cells += [fmt(r["images_per_s"].get(c), 2) for c in concs]
        cells += [fmt(r["peak_rss_mib"], 0), fmt(r["gflop"], 1), fmt(r["gflop_per_s"], 1), fmt(r["pct_of_peak"], 1),
                  fmt(r.get("speedup_vs_diffusers_fp32"), 2), fmt(r.get("overhead_vs_inproc_pct"), 1)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for q in result.get("quality", []):
        lines += ["", f"Kodak ({q['images']} images), model {q['model']}: PSNR fp32 {q['psnr_fp32']:.3f} dB, "
                      f"bf16 {q['psnr_bf16']:.3f} dB, loss {q['psnr_loss_db']:.3f} dB; SSIM fp32 {q['ssim_fp32']:.4f}, "
                      f"bf16 {q['ssim_bf16']:.4f}; bf16 against fp32 output {q['psnr_bf16_vs_fp32']:.2f} dB."]
    for t in result.get("tiling", []):
        lines += ["", f"Tiling at {t['size']}x{t['size']} ({t['model']}, tile {t['tile_size']}, overlap {t['tile_overlap']}, "
                      f"{t['dtype']}): PSNR untiled {t['psnr_untiled']:.3f} dB, tiled {t['psnr_tiled']:.3f} dB, "
                      f"difference {t['psnr_difference_db']:.3f} dB; tiled against untiled {t['psnr_tiled_vs_untiled']:.2f} dB. "
                      f"Images: {', '.join(t['images'])}."]
    for g in result.get("large", []):
        for tag in ("tiled", "untiled"):
            if tag in g:
                e = g[tag]
                lines += ["", f"{g['size']}x{g['size']} /roundtrip ({g['model']}, {g.get('dtype')}, {tag}): "
                              + (f"{e['seconds']} s, PSNR {e['psnr']:.2f} dB" if e["ok"] else f"failed: {e['error']}")
                              + f", server peak RSS {e.get('peak_rss_mib')} MiB."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "median_s" in r]
    models = sorted({r["model"] for r in rows}) or ["none"]
    ops = [op for op in OPS if any(r["op"] == op for r in rows)] or ["none"]
    fig, axes = plt.subplots(len(models), len(ops), figsize=(5 * len(ops), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            sel = [r for r in rows if r["model"] == model and r["op"] == op]
            sizes = sorted({r["size"] for r in sel})
            modes = [m for m in ALL_MODES if any(r["mode"] == m for r in sel)]
            width = 0.8 / max(1, len(modes))
            for k, mode in enumerate(modes):
                vals = [next((r["median_s"] for r in sel if r["mode"] == mode and r["size"] == s), np.nan) for s in sizes]
                ax.bar(np.arange(len(sizes)) + k * width, vals, width, label=mode)
            ax.set_xticks(np.arange(len(sizes)) + width * (len(modes) - 1) / 2, [str(s) for s in sizes])
            ax.set_yscale("log")
            ax.set_title(f"{model}: {op}")
            ax.set_xlabel("image side (px)")
            ax.set_ylabel("median latency (s)")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"vae bench {result['meta']['date']} ({result['meta']['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
