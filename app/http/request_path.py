"""Wires the production concerns into an app: scheduler, metrics, request ids, API keys, CORS,
/metrics, and the request path every model endpoint takes (`run_endpoint`, `run_predict`).

A request's stages are timed separately: deserialize (read + parse the body, image decode),
queue (waiting for a worker), compute (the model), serialize (encode the answer).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.http import openapi_doc
from app.http.auth import APIKeyMiddleware
from app.http.batching import make_work
from app.http.observability import Metrics, RequestMiddleware, route_of
from app.http.scheduler import Scheduler, Work


def default_batch_size(settings) -> int:
    # Measured (docs/operations.md): a CPU forward pass already uses every core, so batching
    # there only adds waiting; GPUs gain from fuller kernels.
    if settings.max_batch_size is not None:
        return settings.max_batch_size
    return 8 if str(settings.device).startswith("cuda") else 1


def install(app: FastAPI, settings, registry) -> None:
    app.state.draining = False
    app.state.http_in_flight = 0
    app.state.metrics = metrics = Metrics()
    metrics.describe_models(registry)
    app.state.scheduler = Scheduler(
        workers=settings.model_threads, max_queue=settings.max_queue, max_batch=default_batch_size(settings),
        max_wait=settings.batch_wait_ms / 1000, limiter=app.state.limiter, hooks=metrics,
    )
    # add_middleware: the last added is the outermost. Order of a request: ids/metrics, CORS, keys.
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "X-Model", "shape", "dtype"])
    app.add_middleware(RequestMiddleware, metrics=metrics, state=app.state)

    openapi_doc.install(app, secured=bool(settings.api_keys))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def begin_drain(app: FastAPI) -> None:
    """SIGTERM: /readyz turns 503 and new model work is refused; queued and running work finishes."""
    app.state.draining = True
    app.state.scheduler.closed = True


def is_idle(app: FastAPI) -> bool:
    return app.state.http_in_flight == 0 and app.state.scheduler.idle


@contextmanager
def stage(request: Request, name: str):
    t0 = time.monotonic()
    try:
        yield
    finally:
        request.app.state.metrics.stages.labels(route_of(request.scope), name).observe(time.monotonic() - t0)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read: only disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_work(request: Request, work: Work):
    """Queue model work under the request's deadline; record its queue and compute time."""
    state = request.app.state
    t0 = getattr(request.state, "t0", time.monotonic())
    result = await state.scheduler.run(work, deadline=t0 + state.settings.request_timeout,
                                       abandoned=lambda: _client_gone(request))
    stages, route = state.metrics.stages, route_of(request.scope)
    stages.labels(route, "queue").observe(max(0.0, work.started - work.enqueued))
    stages.labels(route, "compute").observe(max(0.0, work.finished - work.started))
    return result


async def run_endpoint(endpoint, request: Request, q: dict):
    """decode_request -> predict (scheduled, maybe batched) -> encode_response (worker thread)."""
    with stage(request, "deserialize"):
        req = await endpoint.decode_request(request, q)
    result = await run_work(request, make_work(endpoint, req))
    with stage(request, "serialize"):
        return await anyio.to_thread.run_sync(endpoint.encode_response, result, req)


async def run_predict(request: Request, predict, encode_response, req):
    """The same path for endpoints with plain functions (app.http.explore): never batched."""
    result = await run_work(request, Work(predict, req, None))
    with stage(request, "serialize"):
        return await anyio.to_thread.run_sync(encode_response, result, req)
