"""The server's Prometheus /metrics: scraping, one sample, the per-stage split of a request."""

from __future__ import annotations

from benchmarks.harness.client import Client


def scrape(base: str, client: Client | None = None) -> dict[tuple, float]:
    """/metrics as {(sample name, ((label, value), ...)): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    own = client is None
    client = client or Client(base)
    try:
        status, _, body = client.get("/metrics")
    finally:
        if own:
            client.close()
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def stage_split(before: dict, after: dict, route: str = "/decode") -> dict[str, float]:
    """Seconds per request spent in each server stage between two scrapes (mean over the requests
    between them), plus the server's whole-request time and the request count."""
    n = metric(after, "vae_request_duration_seconds_count", route=route) - metric(
        before, "vae_request_duration_seconds_count", route=route)
    out = {"requests": n}
    if n <= 0:
        return out
    out["server_total"] = (metric(after, "vae_request_duration_seconds_sum", route=route)
                           - metric(before, "vae_request_duration_seconds_sum", route=route)) / n
    for st in ("deserialize", "queue", "compute", "serialize"):
        out[st] = (metric(after, "vae_stage_duration_seconds_sum", route=route, stage=st)
                   - metric(before, "vae_stage_duration_seconds_sum", route=route, stage=st)) / n
    return out
