"""Latent-space exploration endpoints (`POST /sample`, `POST /interpolate`) and the web page at `/`.

Same lifecycle as app.http.app's endpoints: parse and validate on the event loop (codecs in a worker
thread), run the model in a worker thread under the app's limiter, encode the answer in a thread.
Images out are uint8 frames; tensors out are those frames, uint8 (N, H, W, 3), in any wire format.
"""

from __future__ import annotations

import io
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import anyio
import torch
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from app.protocol import wire
from app.protocol.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, Unprocessable
from app.http.request_path import run_predict
from app.http.app import image_format_for, image_response, read_body, validate_latents
from models.vae import imaging
from models.vae import latent_ops
from models.vae.inference import VAEModel, unscale_latents

STATIC_DIR = Path(__file__).parent / "static"
MAX_SAMPLES = 16
MAX_STEPS = 64
# Frames are decoded one at a time, but all of them are held as uint8 for the answer.
OUTPUT_PIXELS_PER_MAX = 8

router = APIRouter(tags=["explore"])


def install(app: FastAPI) -> None:
    """Add the endpoints, the page at `/` and its assets under `/static` (nothing else is shadowed)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _run(request: Request, predict, encode_response, req) -> Response:
    # Through the app's scheduler: bounded queue, deadline, dropped when the client leaves.
    return await run_predict(request, predict, encode_response, req)


def _check_size(model: VAEModel, height: int, width: int) -> None:
    f = model.downsample_factor
    for name, side in (("width", width), ("height", height)):
        if side <= 0 or side % f:
            raise Unprocessable(f"{name} {side} must be a positive multiple of {f} (model {model.name!r})")


def _check_pixels(height: int, width: int, count: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise PayloadTooLarge(f"{width}x{height} exceeds the limit of {max_pixels} pixels per image")
    if count * height * width > OUTPUT_PIXELS_PER_MAX * max_pixels:
        raise PayloadTooLarge(f"{count} images of {width}x{height} exceed {OUTPUT_PIXELS_PER_MAX * max_pixels} pixels")


def _wants_tensor(accept: str | None) -> bool:
    return wire.media_type(accept) in wire.TENSOR_TYPES and "image/" not in (accept or "")


def _strip(frames: torch.Tensor):
    """uint8 (N, H, W, 3) -> one PIL image with the frames side by side, left to right."""
    n, h, w, c = frames.shape
    return imaging.to_pil(frames.permute(1, 0, 2, 3).reshape(1, h, n * w, c))[0]


def _decode_frames(model: VAEModel, z: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    # One latent at a time: peak memory of one decode, whatever the number of frames.
    return torch.cat([imaging.to_uint8(model.decode(z[i : i + 1], size)) for i in range(z.shape[0])])


def _frame_headers(model: VAEModel, frames: torch.Tensor, latent_shape) -> dict[str, str]:
    return {
        "X-Model": model.name,
        "X-Frames": str(frames.shape[0]),
        "X-Frame-Size": json.dumps(list(frames.shape[1:3])),  # [H, W]
        "X-Latent-Shape": json.dumps(list(latent_shape)),
    }


# --- /sample ---------------------------------------------------------------------------------

@dataclass
class SampleRequest:
    model: VAEModel
    n: int
    size: tuple[int, int]  # (H, W) in pixels
    seed: int
    accept: str | None
    fmt: str
    quality: int


def _predict_sample(req: SampleRequest) -> torch.Tensor:
    f, m = req.model.downsample_factor, req.model
    z = latent_ops.sample_latents(
        req.n, m.latent_channels, (req.size[0] // f, req.size[1] // f), req.seed, m.scaling_factor, m.shift_factor
    )
    return _decode_frames(m, z, None)


def _sample_response(frames: torch.Tensor, req: SampleRequest) -> Response:
    f = req.model.downsample_factor
    headers = _frame_headers(req.model, frames, [req.n, req.model.latent_channels, req.size[0] // f, req.size[1] // f])
    headers["X-Seed"] = str(req.seed)
    if _wants_tensor(req.accept):
        body, media, tensor_headers = wire.write_tensor(frames, req.accept, "images", {"model": req.model.name, "seed": req.seed})
        return Response(body, media_type=media, headers={**headers, **tensor_headers})
    return image_response(_strip(frames), req.fmt, req.quality, headers)


@router.post("/sample", summary="decode z ~ N(0, I) / scaling_factor: random images from the latent space")
async def sample(
    request: Request,
    model: str | None = None,
    seed: int | None = Query(None, ge=0, le=2**53, description="sample i uses seed + i; random when absent (see X-Seed)"),
    width: int = Query(256, description="multiple of the model's downsample factor (8)"),
    height: int = Query(256, description="multiple of the model's downsample factor (8)"),
    n: int = Query(1, ge=1, le=MAX_SAMPLES, description="number of images; n > 1 gives a horizontal strip"),
    image_format: str | None = Query(None, description="png (default), jpg or webp; Accept works too"),
    quality: int | None = Query(None, ge=1, le=100),
):
    settings = request.app.state.settings
    vae = request.app.state.registry.get(model)
    _check_size(vae, height, width)
    _check_pixels(height, width, n, settings.max_pixels)
    accept = request.headers.get("accept")
    req = SampleRequest(
        vae, n, (height, width), secrets.randbelow(2**31) if seed is None else seed, accept,
        image_format_for(image_format, accept), quality or settings.jpeg_quality,
    )
    return await _run(request, _predict_sample, _sample_response, req)


# --- /interpolate ----------------------------------------------------------------------------

@dataclass
class Endpoint:
    """One end of an interpolation: an image tensor to encode, or raw latents as given."""

    x: torch.Tensor | None
    z: torch.Tensor | None
    size: tuple[int, int] | None  # original pixel size (H, W), when known


@dataclass
class InterpolateRequest:
    model: VAEModel
    a: Endpoint
    b: Endpoint
    steps: int
    method: str
    target: tuple[int, int] | None  # requested output (H, W); None: a's size
    output: str  # strip | webp | tensor
    accept: str | None
    duration: int
    quality: int


def _read_endpoint(name: str, data: bytes, content_type: str | None, model: VAEModel, max_pixels: int) -> Endpoint:
    """An uploaded part: an image (by its magic bytes), or a latent file (safetensors / npy / JSON)."""
    if not data:
        raise BadRequest(f"part `{name}` is empty")
    if imaging.sniff_format(data):
        img = imaging.open_image(data, max_pixels=max_pixels)
        return Endpoint(imaging.to_tensor(img), None, (img.height, img.width))
    kind = wire.media_type(content_type)
    if kind not in (wire.SAFETENSORS, wire.NPY, wire.JSON):
        kind = wire.NPY if data.startswith(b"\x93NUMPY") else wire.SAFETENSORS if data[8:9] == b"{" else None
    if kind is None:
        raise UnsupportedMediaType(
            f"part `{name}` is neither an image (PNG, JPEG, WebP) nor a latent file (safetensors, npy, JSON)"
        )
    z, meta = wire.read_tensor(data, kind, [], None)
    z = validate_latents(z, model, max_pixels)
    if z.shape[0] != 1:
        raise Unprocessable(f"part `{name}` holds {z.shape[0]} latents: send one (1, C, h, w)")
    # Latents saved by /encode?scaling_factor=... say so in their metadata: undo it to get raw ones.
    scale, shift, size = (_meta_json(meta, k, name) for k in ("scaling_factor", "shift_factor", "original_size"))
    if scale is not None:
        z = unscale_latents(z, float(scale), None if shift is None else float(shift))
    return Endpoint(None, z, tuple(int(s) for s in size) if size else None)


def _meta_json(meta: dict, key: str, part: str):
    value = meta.get(key)
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        raise BadRequest(f"malformed `{key}` metadata in part `{part}`: {value!r}") from None


def _predict_interpolate(req: InterpolateRequest) -> tuple[torch.Tensor, list[int]]:
    m, f = req.model, req.model.downsample_factor
    za, zb = (e.z if e.z is not None else m.encode(e.x) for e in (req.a, req.b))
    if req.target is not None:
        latent_size, crop = (req.target[0] // f, req.target[1] // f), None
    else:  # the 'from' image sets the shape, and its original size the crop
        latent_size, crop = tuple(za.shape[-2:]), req.a.size
    za, zb = (latent_ops.resize_latents(z, latent_size) for z in (za, zb))
    z = latent_ops.interpolate(za, zb, req.steps, req.method, m.scaling_factor, m.shift_factor)
    return _decode_frames(m, z, crop), list(za.shape)


def _interpolate_response(result, req: InterpolateRequest) -> Response:
    frames, latent_shape = result
    headers = _frame_headers(req.model, frames, latent_shape) | {"X-Method": req.method}
    if req.output == "tensor":
        body, media, tensor_headers = wire.write_tensor(frames, req.accept, "frames", {"model": req.model.name, "method": req.method})
        return Response(body, media_type=media, headers={**headers, **tensor_headers})
    if req.output == "webp":
        buf = io.BytesIO()
        first, *rest = imaging.to_pil(frames)
        first.save(buf, format="WEBP", save_all=True, append_images=rest, duration=req.duration, loop=0, quality=req.quality)
        return Response(buf.getvalue(), media_type="image/webp", headers=headers)
    return image_response(_strip(frames), "png", req.quality, headers)


def _output_kind(output: str | None, accept: str | None) -> str:
    if output is not None:
        if output not in ("strip", "webp", "tensor"):
            raise BadRequest(f"unsupported output {output!r}: use strip (PNG), webp (animated) or tensor")
        return output
    if "image/webp" in (accept or "").lower():
        return "webp"
    return "tensor" if _wants_tensor(accept) else "strip"


@router.post(
    "/interpolate",
    summary="frames between two images (or latents): a PNG strip, an animated WebP, or a tensor",
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["a", "b"],
        "properties": {"a": {"type": "string", "format": "binary"}, "b": {"type": "string", "format": "binary"}},
    }}}}},
)
async def interpolate(
    request: Request,
    model: str | None = None,
    steps: int = Query(8, ge=2, le=MAX_STEPS, description="frames including both ends"),
    method: str = Query("slerp", description="slerp or lerp (in the model's normalised latent space)"),
    output: str | None = Query(None, description="strip (PNG, default), webp (animated) or tensor; else by Accept"),
    width: int | None = Query(None, description="output size; default: image a's size"),
    height: int | None = Query(None, description="output size; default: image a's size"),
    duration: int = Query(100, ge=10, le=10_000, description="ms per animated WebP frame"),
    quality: int | None = Query(None, ge=1, le=100, description="animated WebP quality"),
):
    settings = request.app.state.settings
    vae = request.app.state.registry.get(model)
    if method not in latent_ops.METHODS:
        raise BadRequest(f"unknown method {method!r}: use slerp or lerp")
    accept = request.headers.get("accept")
    kind = _output_kind(output, accept)
    await read_body(request, settings.max_body_bytes)
    if wire.media_type(request.headers.get("content-type")) != "multipart/form-data":
        raise BadRequest("send a multipart form with two files: `a` and `b` (images or latent files)")
    form = await request.form()
    parts = []
    for name in ("a", "b"):
        upload = form.get(name)
        if upload is None or isinstance(upload, str):
            raise BadRequest(f"multipart form needs a file field named `{name}` (fields `a` and `b`)")
        data = await upload.read()
        parts.append(await anyio.to_thread.run_sync(
            _read_endpoint, name, data, upload.content_type, vae, settings.max_pixels))
    target = None
    if width is not None or height is not None:
        if width is None or height is None:
            raise BadRequest("give both `width` and `height` (or neither: the size of image `a`)")
        _check_size(vae, height, width)
        target = (height, width)
    f = vae.downsample_factor
    size = target or parts[0].size or tuple(s * f for s in parts[0].z.shape[-2:])
    _check_pixels(*size, steps, settings.max_pixels)
    req = InterpolateRequest(vae, parts[0], parts[1], steps, method, target, kind, accept, duration,
                             quality or settings.jpeg_quality)
    return await _run(request, _predict_interpolate, _interpolate_response, req)
