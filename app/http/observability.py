"""Prometheus metrics, request ids and JSON logs.

`Metrics` owns one CollectorRegistry per app (several apps can live in one test process) and
doubles as the scheduler's hooks. `RequestMiddleware` is plain ASGI (no BaseHTTPMiddleware:
that one buffers bodies and hides client disconnects): it assigns the request id, counts bytes,
times the request and writes one JSON access-log line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from app.http.scheduler import SchedulerHooks

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # anything else could forge log lines
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
access_log = logging.getLogger("vae.access")


class Metrics(SchedulerHooks):
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("vae_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("vae_request_duration_seconds", "whole request, arrival to last byte",
                                 ["route"], buckets=_LATENCY, registry=r)
        self.stages = Histogram("vae_stage_duration_seconds",
                                "time per stage: deserialize (read + decode body), queue, compute, serialize",
                                ["route", "stage"], buckets=_LATENCY, registry=r)
        self.in_flight = Gauge("vae_requests_in_flight", "HTTP requests being served", registry=r)
        self.queue_depth = Gauge("vae_queue_depth", "model work waiting for a worker", registry=r)
        self.model_running = Gauge("vae_model_in_flight", "requests whose model work is running", registry=r)
        self.batch_size = Histogram("vae_batch_size", "requests per forward pass",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.bytes_in = Counter("vae_request_bytes", "request body bytes", ["route"], registry=r)
        self.bytes_out = Counter("vae_response_bytes", "response body bytes", ["route"], registry=r)
        self.rejections = Counter("vae_rejected", "model work refused or dropped, by reason "
                                  "(queue_full, shutting_down, client_gone, deadline)", ["reason"], registry=r)
        self.model_info = Info("vae_model", "served models", ["name"], registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds

    def describe_models(self, registry) -> None:
        for name, m in registry.models.items():
            d = m.describe()
            self.model_info.labels(name=name).info({
                "dtype": d["dtype"], "device": d["device"], "sha256": str(d["sha256"]),
                "parameters": str(d["parameters"]), "default": str(name == registry.default).lower(),
            })

    # scheduler hooks
    def depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def running(self, n: int) -> None:
        self.model_running.set(n)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()


def route_of(scope, known: frozenset = frozenset()) -> str:
    """The matched route template, or the path when it names a route that was never reached
    (a 401 answers before routing); 'unmatched' otherwise: label values stay bounded."""
    route = scope.get("route")
    path = scope.get("path", "")
    return getattr(route, "path", None) or (path if path in known else "/static" if path.startswith("/static/") else "unmatched")


class RequestMiddleware:
    def __init__(self, app, metrics: Metrics, state):
        self.app, self.metrics, self.state = app, metrics, state  # state: the FastAPI app.state
        self.known: frozenset = frozenset()  # route paths, read when the first request comes

    def _known(self, scope) -> frozenset:
        if not self.known and "app" in scope:
            self.known = frozenset(getattr(r, "path", "") for r in scope["app"].routes)
        return self.known

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        given = _header(scope, b"x-request-id")
        rid = given if given and _SAFE_ID.match(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(rid)
        scope.setdefault("state", {}).update(request_id=rid, t0=t0)
        seen = {"in": 0, "out": 0, "status": 500}
        self.metrics.in_flight.inc()
        self.state.http_in_flight += 1

        async def counting_receive():
            message = await receive()
            seen["in"] += len(message.get("body", b""))
            return message

        async def tagging_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        finally:
            self.state.http_in_flight -= 1
            self.metrics.in_flight.dec()
            route, took = route_of(scope, self._known(scope)), time.monotonic() - t0
            m = self.metrics
            m.requests.labels(route, scope["method"], str(seen["status"])).inc()
            m.latency.labels(route).observe(took)
            m.bytes_in.labels(route).inc(seen["in"])
            m.bytes_out.labels(route).inc(seen["out"])
            if route not in ("/healthz", "/readyz", "/metrics"):  # probes would drown the log
                access_log.info("request", extra={"fields": {
                    "method": scope["method"], "path": scope["path"], "route": route, "status": seen["status"],
                    "duration_ms": round(took * 1000, 2), "bytes_in": seen["in"], "bytes_out": seen["out"],
                }})
            REQUEST_ID.reset(token)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extra `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": REQUEST_ID.get(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)  # server log only, never a response
        return json.dumps(doc, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time, not the one at creation: a stderr that was
    replaced and closed since (an embedding app, a test's capture) never breaks logging."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    handler = _StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []  # propagate to root: one format for every line
        logging.getLogger(name).propagate = True
