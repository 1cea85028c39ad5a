"""POST /interpolate: frames between two images (or latents): a PNG strip, an animated WebP, or a tensor."""

from __future__ import annotations

import io
from dataclasses import dataclass

import anyio
import torch
from fastapi import Request
from fastapi.responses import Response
from pydantic import Field

from app.http import cost, validation
from app.http.endpoint import Endpoint
from app.http.endpoints import frames
from app.http.endpoints.query import ModelQuery
from app.http.openapi_doc import IMAGES, TENSORS
from app.http.request_io import (image_response, read_body, read_form_file, tensor_limits, tensor_response,
                                 wants_tensor)
from app.protocol import wire
from app.protocol.errors import BadRequest, UnsupportedMediaType, Unprocessable
from models.vae import imaging, latent_ops, latents
from models.vae.inference import VAEModel

MAX_STEPS = 64
_PART = {"type": "string", "format": "binary"}


class InterpolateQuery(ModelQuery):
    steps: int = Field(8, ge=2, le=MAX_STEPS, description="frames including both ends")
    method: str = Field("slerp", max_length=20, description="slerp or lerp (in the model's scaled latent space)")
    output: str | None = Field(None, max_length=20, description="strip (PNG, default), webp (animated) or tensor; else by Accept")
    width: int | None = Field(None, le=1 << 16, description="output size; default: image a's size")
    height: int | None = Field(None, le=1 << 16, description="output size; default: image a's size")
    duration: int = Field(100, ge=10, le=10_000, description="ms per animated WebP frame")
    quality: int | None = Field(None, ge=1, le=100, description="animated WebP quality")


@dataclass
class Part:
    """One end of an interpolation: an image tensor to encode, or raw latents."""

    x: torch.Tensor | None
    z: torch.Tensor | None
    size: tuple[int, int] | None  # original pixel size (H, W), when known


@dataclass
class InterpolateRequest:
    model: VAEModel
    a: Part
    b: Part
    steps: int
    method: str
    target: tuple[int, int] | None  # requested output (H, W); None: a's size
    output: str  # strip | webp | tensor
    accept: str | None
    duration: int
    quality: int


class Interpolate(Endpoint):
    path, Query = "/interpolate", InterpolateQuery
    summary = "frames between two images (or latents): a PNG strip, an animated WebP, or a tensor"
    body = {"multipart/form-data": {"schema": {"type": "object", "required": ["a", "b"],
                                               "properties": {"a": _PART, "b": _PART}}}}
    answers = {**IMAGES, **TENSORS}

    async def decode_request(self, request: Request, q: InterpolateQuery) -> InterpolateRequest:
        settings = request.app.state.settings
        model = request.app.state.registry.get(q.model)
        if q.method not in latent_ops.METHODS:
            raise BadRequest(f"unknown method {q.method!r}: use slerp or lerp")
        accept = request.headers.get("accept")
        kind = _output_kind(q.output, accept)
        await read_body(request, settings.max_body_bytes)
        if wire.media_type(request.headers.get("content-type")) != "multipart/form-data":
            raise BadRequest("send a multipart form with two files: `a` and `b` (images or latent files)")
        parts = []
        for name in ("a", "b"):
            data, content_type = await read_form_file(request, name, " (fields `a` and `b`)")
            parts.append(await anyio.to_thread.run_sync(read_part, name, data, content_type, model, settings.max_pixels,
                                                        tensor_limits(settings, settings.max_latent_elements)))
        target = None
        if q.width is not None or q.height is not None:
            if q.width is None or q.height is None:
                raise BadRequest("give both `width` and `height` (or neither: the size of image `a`)")
            frames.check_size(model, q.height, q.width)
            target = (q.height, q.width)
        f = model.downsample_factor
        size = target or parts[0].size or tuple(s * f for s in parts[0].z.shape[-2:])
        frames.check_pixels(*size, q.steps, settings.max_pixels)
        costs = cost.cost_model(model)
        latent = (target[0] // f, target[1] // f) if target else _latent_size(parts[0], f)
        cost.admit(settings.max_cost, *(costs.encode(1, *p.x.shape[-2:]) for p in parts if p.x is not None),
                   costs.decode(q.steps, *latent))
        return InterpolateRequest(model, parts[0], parts[1], q.steps, q.method, target, kind, accept, q.duration,
                                  q.quality or settings.jpeg_quality)

    def predict(self, req: InterpolateRequest) -> tuple[torch.Tensor, list[int]]:
        m, f = req.model, req.model.downsample_factor
        za, zb = (p.z if p.z is not None else m.encode(p.x) for p in (req.a, req.b))
        if req.target is not None:
            latent_size, crop = (req.target[0] // f, req.target[1] // f), None
        else:  # the 'from' image sets the shape, and its original size the crop
            latent_size, crop = tuple(za.shape[-2:]), req.a.size
        za, zb = (latent_ops.resize_latents(z, latent_size) for z in (za, zb))
        z = latent_ops.interpolate(za, zb, req.steps, req.method, m.scaling_factor, m.shift_factor,
                                   m.latents_mean, m.latents_std)
        return frames.decode_frames(m, z, crop), list(za.shape)

    def encode_response(self, result, req: InterpolateRequest) -> Response:
        images, latent_shape = result
        headers = frames.frame_headers(req.model, images, latent_shape) | {"X-Method": req.method}
        if req.output == "tensor":
            return tensor_response(images, req.accept, "frames", {"model": req.model.name, "method": req.method}, headers)
        if req.output == "webp":
            buf = io.BytesIO()
            first, *rest = imaging.to_pil(images)
            first.save(buf, format="WEBP", save_all=True, append_images=rest, duration=req.duration, loop=0,
                       quality=req.quality)
            return Response(buf.getvalue(), media_type="image/webp", headers=headers)
        return image_response(frames.strip(images), "png", req.quality, headers)


def read_part(name: str, data: bytes, content_type: str | None, model: VAEModel, max_pixels: int,
              limits: wire.TensorLimits | None = None) -> Part:
    """An uploaded part: an image (by its magic bytes), or a latent file (safetensors / npy / JSON),
    read through the latent contract: scaled latents (its metadata says so) are unscaled."""
    if not data:
        raise BadRequest(f"part `{name}` is empty")
    if imaging.sniff_format(data):
        img = imaging.open_image(data, max_pixels=max_pixels)
        return Part(imaging.to_tensor(img), None, (img.height, img.width))
    kind = wire.media_type(content_type)
    if kind not in (wire.SAFETENSORS, wire.NPY, wire.JSON):
        kind = wire.NPY if data.startswith(b"\x93NUMPY") else wire.SAFETENSORS if data[8:9] == b"{" else None
    if kind is None:
        raise UnsupportedMediaType(
            f"part `{name}` is neither an image (PNG, JPEG, WebP) nor a latent file (safetensors, npy, JSON)"
        )
    z, meta = wire.read_tensor(data, kind, [], None, limits)
    info = validation.latent_info(meta, where=f"part `{name}`")
    z = validation.latents(z, model, max_pixels, info)
    if z.shape[0] != 1:
        raise Unprocessable(f"part `{name}` holds {z.shape[0]} latents: send one (1, C, h, w)")
    if info.scaled:
        z = latents.unscale(z, info.scaling_factor, info.shift_factor, info.latents_mean, info.latents_std)
    return Part(None, z, info.original_size)


def _latent_size(part: Part, f: int) -> tuple[int, int]:
    """The latent (h, w) frames are decoded at when no output size is asked: part a's."""
    if part.z is not None:
        return tuple(part.z.shape[-2:])
    return -(-part.x.shape[-2] // f), -(-part.x.shape[-1] // f)


def _output_kind(output: str | None, accept: str | None) -> str:
    if output is not None:
        if output not in ("strip", "webp", "tensor"):
            raise BadRequest(f"unsupported output {output!r}: use strip (PNG), webp (animated) or tensor")
        return output
    if "image/webp" in (accept or "").lower():
        return "webp"
    return "tensor" if wants_tensor(accept) else "strip"
