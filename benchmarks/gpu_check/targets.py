"""The goals of issue 14 (on an H100) and a result's standing against them."""

from __future__ import annotations

GOALS = {"decode_512_ms": 12.0, "decode_1024_ms": 45.0, "batching_x": 1.5, "non_model_share": 0.10}


def goals(result: dict) -> list[dict]:
    rows = (result.get("model") or {}).get("rows", [])
    out = []
    for size, key in ((512, "decode_512_ms"), (1024, "decode_1024_ms")):
        cands = [r for r in rows if r["op"] == "decode" and r["size"] == size and r["variant"] != "fp32" and r["finite"]]
        best = min(cands, key=lambda r: r["median_ms"]) if cands else None
        out.append({"goal": f"SD decode {size}^2, fastest half-precision path", "target": f"<= {GOALS[key]:g} ms",
                    "measured": f"{best['median_ms']:.2f} ms ({best['variant']})" if best else "not measured",
                    "met": (best["median_ms"] <= GOALS[key]) if best else None})
    b = result.get("batching")
    out.append({"goal": f"batching in process, {b['n']} x {b['side']}^2" if b else "batching in process",
                "target": f">= {GOALS['batching_x']:g}x", "measured": f"{b['speedup']:.2f}x" if b else "not measured",
                "met": (b["speedup"] >= GOALS["batching_x"]) if b else None})
    hb = (result.get("http") or {}).get("batching")
    for fmt in ("pt", "png"):
        x = hb.get(fmt) if hb else None
        out.append({"goal": f"dynamic batching over HTTP, {hb['n']} x {hb['side']}^2 /decode {fmt}" if hb else
                    f"dynamic batching over HTTP ({fmt})", "target": f">= {GOALS['batching_x']:g}x",
                    "measured": f"{x['speedup']:.2f}x (mean batch {x['mean_batch_size']:.1f})" if x and x.get("mean_batch_size")
                    else (f"{x['speedup']:.2f}x" if x else "not measured"),
                    "met": (x["speedup"] >= GOALS["batching_x"]) if x else None})
    e2e = [r for r in (result.get("http") or {}).get("e2e", []) if r["size"] == max(
        [e["size"] for e in (result.get("http") or {}).get("e2e", [])] or [0])]
    for r in e2e:
        out.append({"goal": f"non-model share of a {r['size']}^2 /decode, {r['format']}",
                    "target": f"<= {GOALS['non_model_share'] * 100:g} %",
                    "measured": f"{r['non_model_share'] * 100:.1f} % (model {r['model_ms']:.1f} of {r['client_ms']:.1f} ms)",
                    "met": r["non_model_share"] <= GOALS["non_model_share"]})
    return out
