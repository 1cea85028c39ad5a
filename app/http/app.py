"""The FastAPI app: `create_app(settings)` serves a registry of VAE models.

Routes: the model endpoints (app.http.endpoints, each an `Endpoint` mounted by
app.http.endpoint.mount), the operational ones here (/healthz, /readyz, /v1/models, /metrics),
and the page at `/`. The event loop never runs a model or an image codec: those run in worker
threads, model work through the scheduler (bounded queue, deadline, dynamic batching).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from app.http import cost, middleware, openapi_doc, page
from app.http.endpoint import mount
from app.http.endpoints import ENDPOINTS
from app.http.errors import install_error_handlers
from app.http.observability import Metrics
from app.http.registry import ModelRegistry
from app.http.scheduler import Scheduler
from app.http.settings import Settings
from models.vae import threads
from models.vae.loading import ModelLoadError

DOCS_ASSETS = "/static-docs"  # Swagger UI / ReDoc files (public, like the page's /static)


def default_batch_size(settings: Settings) -> int:
    # Measured (docs/operations.md): a CPU forward pass already uses every core, so batching
    # there only adds waiting; GPUs gain from fuller kernels.
    if settings.max_batch_size is not None:
        return settings.max_batch_size
    return 8 if str(settings.device).startswith("cuda") else 1


def default_model_threads(settings: Settings) -> int:
    # Measured on 2 cores (benchmarks/RESULTS.md, "CPU: calls in parallel"): two calls side by side,
    # one core each, beat one call on both cores by ~1.2-1.3x in throughput, and a call alone still
    # gets every core (models/vae/threads.py). Capped at 4: each running call holds its activations.
    if settings.model_threads is not None:
        return settings.model_threads
    if str(settings.device).startswith("cuda"):
        return 1
    return max(1, min(4, intra_op_threads(settings)))


def intra_op_threads(settings: Settings) -> int:
    """The torch threads all model calls share (create_app has set them when configured)."""
    return settings.torch_threads or torch.get_num_threads()


def limits_of(settings: Settings) -> dict:
    """What a client may send, as GET /v1/models states it (docs/operations.md, "Limits")."""
    return {"max_cost_gflop": settings.max_cost, "max_pixels": settings.max_pixels,
            "max_latent_elements": settings.max_latent_elements, "max_body_bytes": settings.max_body_bytes,
            "max_json_bytes": settings.max_json_bytes, "body_timeout_s": settings.body_timeout,
            "request_timeout_s": settings.request_timeout}


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """The service. Loads `settings.models` unless a ready `registry` is given (ModelLoadError on failure)."""
    settings = settings or Settings()
    registry = registry or ModelRegistry.from_settings(settings)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            if settings.warmup:
                for model in registry.models.values():
                    await anyio.to_thread.run_sync(model.warmup, limiter=app.state.limiter)
        except ModelLoadError as exc:  # never ready; `vae serve` exits 2 with this line
            app.state.startup_error = str(exc)
        else:
            app.state.ready = True
        yield

    # FastAPIOffline: /docs and /redoc with Swagger UI and ReDoc assets served from here (fastapi-offline
    # ships them), not from a CDN: the API docs work on machines without internet.
    app = FastAPIOffline(title="sd-vae-service", version="0.1.0", lifespan=lifespan, static_url=DOCS_ASSETS,
                         description="Encode images to Stable-Diffusion VAE latents and decode them back.")
    state = app.state
    state.settings, state.registry, state.ready, state.draining, state.http_in_flight = settings, registry, False, False, 0
    state.startup_error = None
    workers = default_model_threads(settings)
    state.limiter = anyio.CapacityLimiter(workers)
    state.metrics = Metrics()
    state.metrics.describe_models(registry)
    state.scheduler = Scheduler(
        workers=workers, max_queue=settings.max_queue, max_batch=default_batch_size(settings),
        max_wait=settings.batch_wait_ms / 1000, limiter=state.limiter, hooks=state.metrics,
        share=threads.ThreadShare(intra_op_threads(settings)),
    )
    install_error_handlers(app)
    middleware.install(app, settings)
    for endpoint in ENDPOINTS:
        mount(app, endpoint)
    openapi_doc.install(app, secured=bool(settings.api_keys), answers={e.path: e.answers for e in ENDPOINTS})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if state.startup_error:
            return JSONResponse({"status": "failed", "error": state.startup_error}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ready", "models": list(registry.models)}

    for path, probe in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD: probes that read no body
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    costs = {name: cost.cost_model(m) for name, m in registry.models.items()}  # FLOP fits, counted once

    @app.get("/v1/models")
    async def list_models():
        return {"default": registry.default, "limits": limits_of(settings),
                "models": [{**m.describe(), "cost": cost.describe(costs[m.name])} for m in registry.models.values()]}

    page.install(app)
    return app
