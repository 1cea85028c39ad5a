"""POST /decode: latents -> an image, or an image tensor (the protocol of diffusers' `remote_decode`).

Packed FLUX latents (N, (H/16)*(W/16), 64) with `height` and `width`, as remote_decode sends them,
are unpacked as FluxPipeline does and answered like any other decode (at the unpacked size)."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import torch
from fastapi import Request
from fastapi.responses import Response
from pydantic import Field

from app.http import cost, limits, validation
from app.http.batching import BatchSpec
from app.http.endpoint import Endpoint
from app.http.endpoints.query import ImageOutQuery, ModelQuery, RawTensorQuery, ScalingQuery, TilingQuery
from app.http.openapi_doc import IMAGES, TENSOR_BODY, TENSORS
from app.http.request_io import (body_limit, image_format_for, image_response, read_body, tensor_limits,
                                 tensor_response)
from app.protocol import wire
from app.protocol.errors import BadRequest, Unprocessable
from models.vae import imaging, latents
from models.vae.inference import VAEModel


class DecodeQuery(ModelQuery, ScalingQuery, RawTensorQuery, ImageOutQuery, TilingQuery):
    do_scaling: bool = Field(False, description="without scaling_factor: undo the model's own factors "
                                                "(and its latents_mean / latents_std)")
    output_type: str = Field("pil", max_length=20, description="pil (an image) or pt (a tensor)")
    partial_postprocess: bool = Field(False, description="pt only: uint8 (N, H, W, 3) instead of the float output")
    height: int | None = Field(None, ge=1, le=1 << 20, description="crop the output to this height "
                                                                  "(packed 3-D latents: the image height)")
    width: int | None = Field(None, ge=1, le=1 << 20, description="crop the output to this width "
                                                                "(packed 3-D latents: the image width)")


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
    latents_mean: tuple[float, ...] | None = None  # per-channel statistics (with latents_std), when scaled so
    latents_std: tuple[float, ...] | None = None


class Decode(Endpoint):
    path, summary, Query = "/decode", "latents -> image or image tensor", DecodeQuery
    body, answers = TENSOR_BODY, {**IMAGES, **TENSORS}
    batching = BatchSpec("z", ("model", "scaling_factor", "shift_factor", "size", "tiled", "latents_mean",
                               "latents_std"))

    async def decode_request(self, request: Request, q: DecodeQuery) -> DecodeRequest:
        settings = request.app.state.settings
        model = request.app.state.registry.get(q.model)
        if q.output_type not in ("pil", "pt"):
            raise BadRequest(f"unsupported output_type {q.output_type!r}: use pil or pt")
        kind = wire.media_type(request.headers.get("content-type"))
        body = await read_body(request, body_limit(settings, kind))
        if not body:
            raise BadRequest("empty request body: send a latent tensor")
        if kind == "application/x-www-form-urlencoded" and q.shape:
            kind = "application/octet-stream"  # `curl --data-binary` sends this type by default
        z, meta = await anyio.to_thread.run_sync(wire.read_tensor, body, kind, q.shape, q.dtype,
                                                 tensor_limits(settings, settings.max_latent_elements))
        info = validation.latent_info(meta)
        packed = z.ndim == 3
        if packed:
            z = validation.unpack(z, model, q.height, q.width)
        z = validation.latents(z, model, settings.max_pixels, info)
        limits.check_latent_elements(z.shape, settings.max_latent_elements)
        cost.admit(settings.max_cost, cost.cost_model(model).decode(z.shape[0], *z.shape[-2:], q.tiled))
        # Explicit factors win (diffusers' remote_decode); do_scaling alone means "the model's own";
        # else the body's own metadata, when it says the latents are scaled (the latent contract).
        scale, shift, stats = q.scaling_factor, q.shift_factor, (None, None)
        if scale is None and q.do_scaling:
            scale = model.scaling_factor
            shift = model.shift_factor if shift is None else shift
            stats = (model.latents_mean, model.latents_std)
        elif scale is None and shift is None and info.scaled:
            scale, shift, stats = info.scaling_factor, info.shift_factor, (info.latents_mean, info.latents_std)
        # Packed: height and width described the packing; the answer has the unpacked size, as in FluxPipeline.
        size = None if packed else validation.crop_size(q.height, q.width, info, z, model)
        accept = request.headers.get("accept")
        fmt = image_format_for(q.image_format, accept, default="png")
        tensor_answer = (
            q.output_type == "pil"
            and wire.media_type(accept) in (wire.SAFETENSORS, wire.NPY, wire.JSON, "tensor/binary")
            and fmt != "webp"  # remote_decode asks webp with a tensor Accept but reads an image
        )
        if q.output_type == "pil" and not tensor_answer and z.shape[0] > 1:
            raise Unprocessable(f"a batch of {z.shape[0]} latents cannot be one image: use output_type=pt")
        return DecodeRequest(model, z, scale, shift, q.output_type, fmt, q.partial_postprocess, tensor_answer,
                             size, accept, q.quality or settings.jpeg_quality, tiled=q.tiled,
                             latents_mean=stats[0], latents_std=stats[1])

    def predict(self, req: DecodeRequest) -> torch.Tensor:
        z = latents.unscale(req.z, req.scaling_factor, req.shift_factor, req.latents_mean, req.latents_std)
        return req.model.decode(z, req.size, tiled=req.tiled).cpu()

    def encode_response(self, x: torch.Tensor, req: DecodeRequest) -> Response:
        headers = {"X-Model": req.model.name}
        if req.output_type == "pt":
            out = imaging.to_uint8(x) if req.partial_postprocess else x
        elif req.tensor_answer:
            out = (x * 0.5 + 0.5).clamp(0, 1)
        else:
            return image_response(imaging.to_pil(x)[0], req.image_format, req.quality, headers)
        return tensor_response(out, req.accept, "images", {"model": req.model.name}, headers)
