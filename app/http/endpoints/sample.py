"""POST /sample: decode z ~ N(0, I) in the model's scaled space: random images from the latent space."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from fastapi import Request
from fastapi.responses import Response
from pydantic import Field

from app.http import cost
from app.http.endpoint import Endpoint
from app.http.endpoints import frames
from app.http.endpoints.query import ImageOutQuery, ModelQuery
from app.http.openapi_doc import IMAGES, TENSORS
from app.http.request_io import image_format_for, image_response, tensor_response, wants_tensor
from models.vae import latent_ops
from models.vae.inference import VAEModel

MAX_SAMPLES = 16


class SampleQuery(ModelQuery, ImageOutQuery):
    seed: int | None = Field(None, ge=0, le=2**53, description="sample i uses seed + i; random when absent (see X-Seed)")
    width: int = Field(256, le=1 << 16, description="multiple of the model's downsample factor (8)")
    height: int = Field(256, le=1 << 16, description="multiple of the model's downsample factor (8)")
    n: int = Field(1, ge=1, le=MAX_SAMPLES, description="number of images; n > 1 gives a horizontal strip")


@dataclass
class SampleRequest:
    model: VAEModel
    n: int
    size: tuple[int, int]  # (H, W) in pixels
    seed: int
    accept: str | None
    fmt: str
    quality: int


class Sample(Endpoint):
    path, Query = "/sample", SampleQuery
    summary = "decode z ~ N(0, I) / scaling_factor + shift_factor: random images from the latent space"
    answers = {**IMAGES, **TENSORS}

    async def decode_request(self, request: Request, q: SampleQuery) -> SampleRequest:
        settings = request.app.state.settings
        model = request.app.state.registry.get(q.model)
        frames.check_size(model, q.height, q.width)
        frames.check_pixels(q.height, q.width, q.n, settings.max_pixels)
        f = model.downsample_factor
        cost.admit(settings.max_cost, cost.cost_model(model).decode(q.n, q.height // f, q.width // f))
        accept = request.headers.get("accept")
        seed = secrets.randbelow(2**31) if q.seed is None else q.seed
        return SampleRequest(model, q.n, (q.height, q.width), seed, accept, image_format_for(q.image_format, accept),
                             q.quality or settings.jpeg_quality)

    def predict(self, req: SampleRequest) -> torch.Tensor:
        f, m = req.model.downsample_factor, req.model
        z = latent_ops.sample_latents(
            req.n, m.latent_channels, (req.size[0] // f, req.size[1] // f), req.seed, m.scaling_factor, m.shift_factor,
            m.latents_mean, m.latents_std,
        )
        return frames.decode_frames(m, z, None)

    def encode_response(self, images: torch.Tensor, req: SampleRequest) -> Response:
        f = req.model.downsample_factor
        shape = [req.n, req.model.latent_channels, req.size[0] // f, req.size[1] // f]
        headers = {**frames.frame_headers(req.model, images, shape), "X-Seed": str(req.seed)}
        if wants_tensor(req.accept):
            return tensor_response(images, req.accept, "images", {"model": req.model.name, "seed": req.seed}, headers)
        return image_response(frames.strip(images), req.fmt, req.quality, headers)
