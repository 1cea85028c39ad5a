"""POST /encode: an image (or a [-1, 1] image tensor) -> latents, raw or scaled."""

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
from app.http.endpoints.query import ColourLockQuery, ModelQuery, RawTensorQuery, ScalingQuery, TilingQuery
from app.http.openapi_doc import IMAGE_BODY, TENSOR_BODY, TENSORS
from app.http.request_io import body_limit, json_header, read_body, read_image_bytes, tensor_limits, tensor_response
from app.protocol import wire
from app.protocol.errors import Unprocessable
from models.vae import imaging, latents
from models.vae.inference import VAEModel
from models.vae.latents import LatentInfo


class EncodeQuery(ModelQuery, ScalingQuery, RawTensorQuery, TilingQuery, ColourLockQuery):
    do_scaling: bool = Field(False, description="without scaling_factor: apply the model's own factors "
                                                "(and its latents_mean / latents_std)")
    sample: bool = Field(False, description="false: the posterior mean; true: a sample (reproducible with `seed`)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    output_dtype: str | None = Field(None, max_length=20, description="result dtype (float32 default)")


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
    latents_mean: tuple[float, ...] | None = None  # the model's per-channel statistics, with do_scaling
    latents_std: tuple[float, ...] | None = None
    colour_lock: int = 0  # colour-lock steps (models/vae/colour_lock.py)


class Encode(Endpoint):
    path, summary, Query = "/encode", "image (or [-1, 1] image tensor) -> latents", EncodeQuery
    body, answers = {**IMAGE_BODY, **TENSOR_BODY}, TENSORS
    # Seeded sampling is never batched: one generator over a batch draws different noise.
    batching = BatchSpec("x", ("model", "scaling_factor", "shift_factor", "out_dtype", "tiled", "latents_mean",
                               "latents_std", "colour_lock"), lambda r: not r.sample)

    async def decode_request(self, request: Request, q: EncodeQuery) -> EncodeRequest:
        settings = request.app.state.settings
        model = request.app.state.registry.get(q.model)
        kind = wire.media_type(request.headers.get("content-type"))
        is_tensor = kind in (wire.SAFETENSORS, wire.NPY, wire.JSON, "tensor/binary") or bool(q.shape)
        if is_tensor:
            body = await read_body(request, body_limit(settings, kind))
            # Before allocation: as many numbers as images whose latents fit max_latent_elements.
            per_latent = model.in_channels * model.downsample_factor ** 2 // model.latent_channels
            limits_ = tensor_limits(settings, settings.max_latent_elements * per_latent)
            x, _ = await anyio.to_thread.run_sync(wire.read_tensor, body, kind, q.shape, q.dtype, limits_)
            x = validation.image_tensor(x, model, settings.max_pixels)
            limits.check_latent_elements(limits.encode_latent_shape(x.shape, model), settings.max_latent_elements)
            costs = cost.cost_model(model)
            cost.admit(settings.max_cost, costs.encode(x.shape[0], *x.shape[-2:], q.tiled),
                       costs.colour_lock(x.shape[0], *x.shape[-2:], q.colour_lock, q.tiled))
        else:
            data = await read_image_bytes(request, settings.max_body_bytes)

            def admit(width: int, height: int) -> None:  # from the image header, before decoding it
                costs = cost.cost_model(model)
                cost.admit(settings.max_cost, costs.encode(1, height, width, q.tiled),
                           costs.colour_lock(1, height, width, q.colour_lock, q.tiled))

            x = await anyio.to_thread.run_sync(_image_tensor, data, settings.max_pixels, admit)
        out_name = q.output_dtype or (None if is_tensor else q.dtype) or "float32"
        out_dtype = wire.parse_dtype(out_name)
        if not out_dtype.is_floating_point:
            raise Unprocessable(f"latents cannot be returned as {out_name}: use float32, float16 or bfloat16")
        scale, shift, stats = q.scaling_factor, q.shift_factor, (None, None)
        if scale is None and q.do_scaling:  # the model's own factors (remote_encode passes them explicitly)
            scale = model.scaling_factor
            shift = model.shift_factor if shift is None else shift
            stats = (model.latents_mean, model.latents_std)
        return EncodeRequest(model, x, tuple(x.shape[-2:]), q.sample, q.seed, scale, shift,
                             out_dtype, request.headers.get("accept"), tiled=q.tiled,
                             latents_mean=stats[0], latents_std=stats[1], colour_lock=q.colour_lock)

    def predict(self, req: EncodeRequest) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(req.seed) if req.seed is not None else None
        z = req.model.encode(req.x, sample=req.sample, generator=generator, tiled=req.tiled,
                             colour_lock=req.colour_lock).cpu()
        return latents.scale(z, req.scaling_factor, req.shift_factor, req.latents_mean, req.latents_std).to(req.out_dtype)

    def encode_response(self, z: torch.Tensor, req: EncodeRequest) -> Response:
        scaled = req.scaling_factor is not None or req.shift_factor is not None or req.latents_mean is not None
        info = LatentInfo(req.scaling_factor, req.shift_factor, scaled, req.original_size,
                          latents_mean=req.latents_mean, latents_std=req.latents_std)
        meta = {"model": req.model.name, "sample": req.sample, **info.to_metadata()}
        if req.colour_lock:
            meta["colour_lock"] = req.colour_lock
        headers = {"X-Model": req.model.name, "X-Original-Size": json_header(list(req.original_size))}
        return tensor_response(z, req.accept, "latents", meta, headers)


def _image_tensor(data: bytes, max_pixels: int, check_size=None) -> torch.Tensor:
    return imaging.to_tensor(imaging.open_image(data, max_pixels=max_pixels, check_size=check_size))
