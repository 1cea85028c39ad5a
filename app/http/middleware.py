"""The production concerns around every route: request ids, metrics and the access log, CORS,
API keys, and the Prometheus scrape endpoint `/metrics`."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.http.auth import APIKeyMiddleware
from app.http.errors import UnexpectedErrors
from app.http.observability import RequestMiddleware
from app.http.settings import Settings


def install(app: FastAPI, settings: Settings) -> None:
    metrics = app.state.metrics
    # add_middleware: the last added is the outermost. Order of a request: ids/metrics, CORS, keys,
    # unexpected errors (innermost: its 500 still gets CORS headers, a request id and a metric).
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "X-Model", "shape", "dtype"])
    app.add_middleware(RequestMiddleware, metrics=metrics, state=app.state)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
