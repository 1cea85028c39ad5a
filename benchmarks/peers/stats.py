"""A cell's numbers from its rounds: throughput median and spread, pooled p50/p99 latency, status."""

from __future__ import annotations

from benchmarks import harness


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
