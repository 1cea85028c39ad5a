"""The endpoint protocol: every model endpoint is one `Endpoint`, and every request takes one path.

A request's life, as explicit hooks (the shape of LitServe's `api.py`):

    decode_request(request, query) -> a typed request    event loop: read and validate the body
                                                          (image codecs in a worker thread)
    predict(req) -> result                                worker thread, through the scheduler:
                                                          bounded queue, deadline, maybe batched
    encode_response(result, req) -> Response              worker thread: image codecs, wire formats

An endpoint declares, beside the hooks: its `path` and `summary`, its query parameters as a
pydantic model (`Query`: typed, bounded, documented in OpenAPI), the media types of its request
body and of its answers (OpenAPI), and `batching` (app.http.batching.BatchSpec, or None: never
batched). `mount` turns it into a FastAPI route; `run` is the path every request takes.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from typing import Annotated, Any, ClassVar

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from app.http import validation
from app.http.batching import BatchSpec, make_work
from app.http.observability import route_of
from app.http.scheduler import Work


class Endpoint:
    path: ClassVar[str]
    summary: ClassVar[str]
    Query: ClassVar[type[BaseModel]]
    body: ClassVar[dict] = {}  # request body media types -> OpenAPI media objects
    answers: ClassVar[dict] = {}  # 200 answer media types -> OpenAPI media objects
    batching: ClassVar[BatchSpec | None] = None

    async def decode_request(self, request: Request, q: Any) -> Any:
        raise NotImplementedError

    def predict(self, req: Any) -> Any:
        raise NotImplementedError

    def encode_response(self, result: Any, req: Any) -> Response:
        raise NotImplementedError


def mount(app: FastAPI, endpoint: Endpoint) -> None:
    """POST `endpoint.path`: query parameters parsed into `endpoint.Query`, then `run`."""

    async def handler(request: Request, q) -> Response:
        return await run(endpoint, request, q)

    # The signature FastAPI reads: the query model's fields become documented query parameters.
    handler.__signature__ = inspect.Signature([
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
        inspect.Parameter("q", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[endpoint.Query, Query()]),
    ])
    extra = {"requestBody": {"required": True, "content": endpoint.body}} if endpoint.body else None
    app.post(endpoint.path, summary=endpoint.summary, openapi_extra=extra, name=type(endpoint).__name__)(handler)


@contextmanager
def stage(request: Request, name: str):
    """Time one stage of a request (deserialize, serialize; queue and compute come from the work)."""
    t0 = time.monotonic()
    try:
        yield
    finally:
        request.app.state.metrics.stages.labels(route_of(request.scope), name).observe(time.monotonic() - t0)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is already read: only disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run(endpoint: Endpoint, request: Request, q: Any) -> Response:
    """decode_request -> predict (scheduled, maybe batched) -> encode_response (worker thread)."""
    state = request.app.state
    with stage(request, "deserialize"):
        req = await endpoint.decode_request(request, q)
    work: Work = make_work(endpoint, req)
    t0 = getattr(request.state, "t0", time.monotonic())
    result = await state.scheduler.run(work, deadline=t0 + state.settings.request_timeout,
                                       abandoned=lambda: _client_gone(request))
    stages, route = state.metrics.stages, route_of(request.scope)
    stages.labels(route, "queue").observe(max(0.0, work.started - work.enqueued))
    stages.labels(route, "compute").observe(max(0.0, work.finished - work.started))
    with stage(request, "serialize"):
        return await anyio.to_thread.run_sync(_serialize, endpoint, result, req)


def _serialize(endpoint: Endpoint, result: Any, req: Any) -> Response:
    validation.finite_result(result)  # NaN or Inf out of the model: 422, never a 200
    return endpoint.encode_response(result, req)
