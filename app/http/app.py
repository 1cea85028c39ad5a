"""FastAPI app: `create_app(settings)` serves a registry of VAE models.

Every endpoint follows the same explicit lifecycle (as in LitServe):
    decode_request(request) -> a typed request      (async: reads the body, validates)
    predict(req) -> tensors                          (worker thread, bounded by `model_threads`)
    encode_response(result, req) -> Response         (worker thread: image codecs, wire formats)
so the event loop never runs a model or an image codec.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from app.http import limits
from app.http import request_path as ops
from app.protocol import wire
from app.protocol.errors import (
    BadRequest,
    ModelNotFound,
    PayloadTooLarge,
    Unprocessable,
    install_error_handlers,
)
from app.http.settings import Settings, parse_model_spec
from models.vae import imaging
from models.vae.inference import VAEModel, scale_latents, unscale_latents
from models.vae.loading import ModelLoadError

log = logging.getLogger("vae.server")


class ModelRegistry:
    """Named models; the first one is the default for requests without `?model=`."""

    def __init__(self, models: list[VAEModel]):
        if not models:
            raise ModelLoadError("no model to serve")
        self.models = {m.name: m for m in models}
        self.default = models[0].name

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelRegistry":
        """Load every `NAME=PATH` of settings.models (raises ModelLoadError naming the bad one)."""
        models = []
        for spec in settings.models:
            name, path = parse_model_spec(spec)
            models.append(VAEModel.load(
                name, path, device=settings.device, dtype=settings.dtype, config=settings.config,
                channels_last=settings.channels_last, compile=settings.compile,
                tile_threshold_pixels=settings.tile_threshold_pixels, tile_size=settings.tile_size,
                tile_overlap=settings.tile_overlap,
            ))
        return cls(models)

    def get(self, name: str | None) -> VAEModel:
        model = self.models.get(name or self.default)
        if model is None:
            raise ModelNotFound(f"unknown model {name!r}: available {', '.join(self.models)}")
        return model


# --- shared request helpers ---------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) more than `limit` bytes before reading them when possible."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        wire.check_size(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        wire.check_size(size, limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette re-reads a consumed stream from here (needed by request.form())
    return body


async def read_image_bytes(request: Request, limit: int) -> bytes:
    """Image bytes from a raw body or a multipart form field `image`."""
    body = await read_body(request, limit)
    if wire.media_type(request.headers.get("content-type")) == "multipart/form-data":
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise BadRequest("multipart form needs a file field named `image`")
        data = await upload.read()
    else:
        data = body
    if not data:
        raise BadRequest("empty request body: send an image or a tensor")
    limits.check_image_format(data, request.app.state.settings.image_formats)
    return data


def check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise Unprocessable(f"{what} contains NaN or Inf")


def check_factor(name: str, value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or (name == "scaling_factor" and value == 0)):
        raise BadRequest(f"`{name}` must be a finite number{' other than 0' if name == 'scaling_factor' else ''}")


def image_format_for(image_format: str | None, accept: str | None, default: str = "png") -> str:
    """`image_format` query parameter first, then an image type in Accept, then `default`."""
    if image_format:
        fmt = image_format.lower()
        if fmt not in imaging.FORMAT_ALIASES:
            raise BadRequest(f"unsupported image_format {image_format!r}: use png, jpg or webp")
        return fmt
    accept = (accept or "").lower()
    for media, fmt in (("image/png", "png"), ("image/jpeg", "jpg"), ("image/webp", "webp")):
        if media in accept:
            return fmt
    return default


def image_response(img, fmt: str, quality: int, headers: dict) -> Response:
    body = imaging.encode_image(img, fmt, quality)
    media = imaging.MEDIA_TYPES[imaging.FORMAT_ALIASES[fmt]]
    return Response(body, media_type=media, headers=headers)


def _query(params: dict) -> dict:
    """An endpoint's parsed query parameters (its locals minus the request)."""
    return {k: v for k, v in params.items() if k != "request"}


def _json(value) -> str:
    return json.dumps(value)


# --- /encode ---------------------------------------------------------------------------------

@dataclass
class EncodeRequest:
    model: VAEModel
    x: torch.Tensor  # (N, 3, H, W) float32 in [-1, 1]
    original_size: tuple[int, int]
    sample: bool
    seed: int | None
    scaling_factor: float | None
    shift_factor: float | None
    out_dtype: torch.dtype
    accept: str | None
    tiled: bool | None = None  # None: tile above settings.tile_threshold_pixels


class EncodeEndpoint:
    @staticmethod
    async def decode_request(request: Request, q: dict) -> EncodeRequest:
        settings: Settings = request.app.state.settings
        model = request.app.state.registry.get(q["model"])
        for name in ("scaling_factor", "shift_factor"):
            check_factor(name, q[name])
        kind = wire.media_type(request.headers.get("content-type"))
        is_tensor = kind in (wire.SAFETENSORS, wire.NPY, wire.JSON, "tensor/binary") or bool(q["shape"])
        if is_tensor:
            body = await read_body(request, settings.max_body_bytes)
            x, _ = await anyio.to_thread.run_sync(wire.read_tensor, body, kind, q["shape"], q["dtype"])
            x = validate_image_tensor(x, model, settings.max_pixels)
            limits.check_latent_elements(limits.encode_latent_shape(x.shape, model), settings.max_latent_elements)
        else:
            data = await read_image_bytes(request, settings.max_body_bytes)
            x = await anyio.to_thread.run_sync(decode_image_tensor, data, settings.max_pixels)
        out_name = q["output_dtype"] or (None if is_tensor else q["dtype"]) or "float32"
        out_dtype = wire.parse_dtype(out_name)
        if not out_dtype.is_floating_point:
            raise Unprocessable(f"latents cannot be returned as {out_name}: use float32, float16 or bfloat16")
        return EncodeRequest(
            model, x, tuple(x.shape[-2:]), q["sample"], q["seed"],
            q["scaling_factor"], q["shift_factor"], out_dtype, request.headers.get("accept"), tiled=q["tiled"],
        )

    @staticmethod
    def predict(req: EncodeRequest) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(req.seed) if req.seed is not None else None
        z = req.model.encode(req.x, sample=req.sample, generator=generator, tiled=req.tiled).cpu()
        return scale_latents(z, req.scaling_factor, req.shift_factor).to(req.out_dtype)

    @staticmethod
    def encode_response(z: torch.Tensor, req: EncodeRequest) -> Response:
        meta = {
            "model": req.model.name,
            "scaling_factor": req.scaling_factor,
            "shift_factor": req.shift_factor,
            "original_size": list(req.original_size),
            "sample": req.sample,
        }
        body, media, headers = wire.write_tensor(z, req.accept, "latents", meta)
        headers.update({"X-Model": req.model.name, "X-Original-Size": _json(list(req.original_size))})
        return Response(body, media_type=media, headers=headers)


def decode_image_tensor(data: bytes, max_pixels: int) -> torch.Tensor:
    return imaging.to_tensor(imaging.open_image(data, max_pixels=max_pixels))


def validate_image_tensor(x: torch.Tensor, model: VAEModel, max_pixels: int) -> torch.Tensor:
    """A float image tensor (N, C, H, W) or (C, H, W) in [-1, 1] -> float32 (N, C, H, W)."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise Unprocessable(f"image tensor must be (N, {model.in_channels}, H, W), got shape {list(x.shape)}")
    if x.shape[1] != model.in_channels:
        raise Unprocessable(f"image tensor has {x.shape[1]} channels, model {model.name!r} takes {model.in_channels}")
    if not x.is_floating_point():
        raise Unprocessable(f"image tensor must be float in [-1, 1], got {wire.dtype_name(x.dtype)}")
    if x.shape[-2] * x.shape[-1] > max_pixels:
        raise PayloadTooLarge(f"image tensor of {x.shape[-2]}x{x.shape[-1]} exceeds {max_pixels} pixels")
    check_finite(x, "image tensor")
    if x.abs().max() > 1.0 + 1e-3:
        raise Unprocessable("image tensor values must be in [-1, 1] (x = 2 * pixel / 255 - 1)")
    return x.float()


# --- /decode ---------------------------------------------------------------------------------

@dataclass
class DecodeRequest:
    model: VAEModel
    z: torch.Tensor  # (N, C, h, w) float32, as sent (scaled or not)
    scaling_factor: float | None
    shift_factor: float | None
    output_type: str  # "pil" | "pt"
    image_format: str
    partial_postprocess: bool
    tensor_answer: bool  # pil with a tensor Accept: diffusers' "processor" path, [0, 1] float NCHW
    size: tuple[int, int] | None
    accept: str | None
    quality: int
    tiled: bool | None = None  # None: tile above settings.tile_threshold_pixels


class DecodeEndpoint:
    @staticmethod
    async def decode_request(request: Request, q: dict) -> DecodeRequest:
        settings: Settings = request.app.state.settings
        model = request.app.state.registry.get(q["model"])
        for name in ("scaling_factor", "shift_factor"):
            check_factor(name, q[name])
        if q["output_type"] not in ("pil", "pt"):
            raise BadRequest(f"unsupported output_type {q['output_type']!r}: use pil or pt")
        body = await read_body(request, settings.max_body_bytes)
        if not body:
            raise BadRequest("empty request body: send a latent tensor")
        kind = wire.media_type(request.headers.get("content-type"))
        z, meta = await anyio.to_thread.run_sync(wire.read_tensor, body, kind, q["shape"], q["dtype"])
        z = validate_latents(z, model, settings.max_pixels)
        limits.check_latent_elements(z.shape, settings.max_latent_elements)
        # HF semantics: explicit factors win; do_scaling alone means "use the model's own".
        scale, shift = q["scaling_factor"], q["shift_factor"]
        if scale is None and q["do_scaling"]:
            scale = model.scaling_factor
            shift = model.shift_factor if shift is None else shift
        size = crop_size(q["height"], q["width"], meta, z, model)
        accept = request.headers.get("accept")
        fmt = image_format_for(q["image_format"], accept, default="png")
        tensor_answer = (
            q["output_type"] == "pil"
            and wire.media_type(accept) in (wire.SAFETENSORS, wire.NPY, wire.JSON, "tensor/binary")
            and fmt != "webp"  # remote_decode asks webp with a tensor Accept but reads an image
        )
        if q["output_type"] == "pil" and not tensor_answer and z.shape[0] > 1:
            raise Unprocessable(f"a batch of {z.shape[0]} latents cannot be one image: use output_type=pt")
        return DecodeRequest(
            model, z, scale, shift, q["output_type"], fmt, q["partial_postprocess"],
            tensor_answer, size, accept, q["quality"] or settings.jpeg_quality, tiled=q["tiled"],
        )

    @staticmethod
    def predict(req: DecodeRequest) -> torch.Tensor:
        z = unscale_latents(req.z, req.scaling_factor, req.shift_factor)
        return req.model.decode(z, req.size, tiled=req.tiled).cpu()

    @staticmethod
    def encode_response(x: torch.Tensor, req: DecodeRequest) -> Response:
        headers = {"X-Model": req.model.name}
        if req.output_type == "pt":
            out = imaging.to_uint8(x) if req.partial_postprocess else x
        elif req.tensor_answer:
            out = (x * 0.5 + 0.5).clamp(0, 1)
        else:
            img = imaging.to_pil(x)[0]
            return image_response(img, req.image_format, req.quality, headers)
        body, media, tensor_headers = wire.write_tensor(out, req.accept, "images", {"model": req.model.name})
        return Response(body, media_type=media, headers={**headers, **tensor_headers})


def validate_latents(z: torch.Tensor, model: VAEModel, max_pixels: int) -> torch.Tensor:
    if z.ndim == 3:
        raise Unprocessable(f"packed 3-D latents {list(z.shape)} are not supported: send (N, C, h, w)")
    if z.ndim != 4:
        raise Unprocessable(f"latents must be (N, {model.latent_channels}, h, w), got shape {list(z.shape)}")
    if z.shape[1] != model.latent_channels:
        raise Unprocessable(f"latents have {z.shape[1]} channels, model {model.name!r} expects {model.latent_channels}")
    if not z.is_floating_point():
        raise Unprocessable(f"latents must be float32, float16 or bfloat16, got {wire.dtype_name(z.dtype)}")
    f = model.downsample_factor
    if z.shape[-2] * z.shape[-1] * f * f > max_pixels:
        raise PayloadTooLarge(
            f"latents {list(z.shape)} decode to {z.shape[-2] * f}x{z.shape[-1] * f}, over {max_pixels} pixels"
        )
    check_finite(z, "latents")
    return z.float()


def crop_size(height, width, meta: dict, z: torch.Tensor, model: VAEModel) -> tuple[int, int] | None:
    """Output crop: `height`/`width` query, else a safetensors body's `original_size` metadata."""
    if height is None and width is None and "original_size" in meta:
        try:
            value = meta["original_size"]
            height, width = json.loads(value) if isinstance(value, str) else value
        except (ValueError, TypeError):
            raise BadRequest(f"malformed original_size metadata {meta['original_size']!r}") from None
    if height is None and width is None:
        return None
    f = model.downsample_factor
    full = (z.shape[-2] * f, z.shape[-1] * f)
    size = (int(height or full[0]), int(width or full[1]))
    if not (0 < size[0] <= full[0] and 0 < size[1] <= full[1]):
        raise Unprocessable(f"crop {list(size)} does not fit the decoded size {list(full)}")
    return size


# --- /roundtrip ------------------------------------------------------------------------------

@dataclass
class RoundtripRequest:
    model: VAEModel
    image: object  # PIL RGB
    x: torch.Tensor
    fmt: str
    quality: int
    tiled: bool | None = None  # None: tile above settings.tile_threshold_pixels


class RoundtripEndpoint:
    @staticmethod
    async def decode_request(request: Request, q: dict) -> RoundtripRequest:
        settings: Settings = request.app.state.settings
        model = request.app.state.registry.get(q["model"])
        data = await read_image_bytes(request, settings.max_body_bytes)
        img = await anyio.to_thread.run_sync(functools.partial(imaging.open_image, data, max_pixels=settings.max_pixels))
        fmt = image_format_for(q["image_format"], request.headers.get("accept"), default="png")
        return RoundtripRequest(model, img, imaging.to_tensor(img), fmt, q["quality"] or settings.jpeg_quality,
                                tiled=q["tiled"])

    @staticmethod
    def predict(req: RoundtripRequest) -> tuple[torch.Tensor, torch.Tensor]:
        z = req.model.encode(req.x, tiled=req.tiled)
        return z, req.model.decode(z, tuple(req.x.shape[-2:]), tiled=req.tiled).cpu()

    @staticmethod
    def encode_response(result, req: RoundtripRequest) -> Response:
        from models.metrics import psnr, ssim

        z, x = result
        out = imaging.to_uint8(x)[0].numpy()
        ref = np.asarray(req.image)
        headers = {
            "X-Model": req.model.name,
            "X-PSNR": f"{psnr(ref, out):.4f}",
            "X-SSIM": _ssim_text(ssim, ref, out),
            "X-Latent-Shape": _json(list(z.shape)),
            "X-Original-Size": _json(list(ref.shape[:2])),
        }
        return image_response(imaging.to_pil(x)[0], req.fmt, req.quality, headers)


def _ssim_text(ssim, ref, out) -> str:
    try:
        return f"{ssim(ref, out):.6f}"
    except ValueError:  # an image smaller than SSIM's window: undefined, not a server error
        return "nan"


# --- app -------------------------------------------------------------------------------------

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_BODY = {"image/png": _BINARY, "image/jpeg": _BINARY, "image/webp": _BINARY,
               "multipart/form-data": {"schema": {"type": "object", "properties": {"image": _BINARY["schema"]}}}}
_TENSOR_BODY = {"tensor/binary": _BINARY, wire.SAFETENSORS: _BINARY, wire.NPY: _BINARY, wire.JSON: {}}


def _body_doc(content: dict) -> dict:
    return {"requestBody": {"required": True, "content": content}}


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None) -> FastAPI:
    """The service. Loads `settings.models` unless a ready `registry` is given (ModelLoadError on failure)."""
    settings = settings or Settings()
    registry = registry or ModelRegistry.from_settings(settings)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.warmup:
            for model in registry.models.values():
                await anyio.to_thread.run_sync(model.warmup, limiter=app.state.limiter)
        app.state.ready = True
        yield

    app = FastAPI(title="sd-vae-service", version="0.1.0", lifespan=lifespan,
                  description="Encode images to Stable-Diffusion VAE latents and decode them back.")
    app.state.settings, app.state.registry, app.state.ready = settings, registry, False
    app.state.limiter = anyio.CapacityLimiter(max(1, settings.model_threads))
    install_error_handlers(app)
    ops.install(app, settings, registry)  # scheduler (queue, batching), metrics, request ids, API keys, CORS

    async def run(endpoint, request: Request, q: dict) -> Response:
        return await ops.run_endpoint(endpoint, request, q)

    @app.post("/encode", openapi_extra=_body_doc({**_IMAGE_BODY, **_TENSOR_BODY}),
              summary="image (or [-1, 1] image tensor) -> latents")
    async def encode(
        request: Request,
        model: str | None = None,
        sample: bool = False,
        seed: int | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        dtype: str | None = Query(None, description="tensor body dtype; for image bodies the result dtype"),
        output_dtype: str | None = Query(None, description="result dtype (float32 default)"),
        shape: list[str] = Query([], description="tensor body shape: repeated, JSON list or comma-separated"),
        tiled: bool | None = Query(None, description="tiled encode/decode; default: only above the server's tile threshold"),
    ):
        return await run(EncodeEndpoint, request, _query(locals()))

    @app.post("/decode", openapi_extra=_body_doc(_TENSOR_BODY), summary="latents -> image or image tensor")
    async def decode(
        request: Request,
        model: str | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        do_scaling: bool = False,
        output_type: str = "pil",
        image_format: str | None = None,
        partial_postprocess: bool = False,
        height: int | None = None,
        width: int | None = None,
        quality: int | None = Query(None, ge=1, le=100),
        dtype: str | None = None,
        shape: list[str] = Query([]),
        tiled: bool | None = Query(None, description="tiled encode/decode; default: only above the server's tile threshold"),
    ):
        return await run(DecodeEndpoint, request, _query(locals()))

    @app.post("/roundtrip", openapi_extra=_body_doc(_IMAGE_BODY), summary="image -> latents -> image, with PSNR/SSIM")
    async def roundtrip(
        request: Request,
        model: str | None = None,
        image_format: str | None = None,
        quality: int | None = Query(None, ge=1, le=100),
        tiled: bool | None = Query(None, description="tiled encode/decode; default: only above the server's tile threshold"),
    ):
        return await run(RoundtripEndpoint, request, _query(locals()))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not app.state.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ready", "models": list(registry.models)}

    @app.get("/v1/models")
    async def list_models():
        return {"default": registry.default, "models": [m.describe() for m in registry.models.values()]}

    from app.http.explore import install as install_explore  # late import: app.http.explore imports this module

    install_explore(app)  # /sample, /interpolate, the web page at / and /static
    return app
