"""POST /roundtrip: image -> latents -> image of the same size, with PSNR and SSIM headers."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import anyio
import numpy as np
import torch
from fastapi import Request
from fastapi.responses import Response

from app.http import cost
from app.http.batching import BatchSpec
from app.http.endpoint import Endpoint
from app.http.endpoints.query import ColourLockQuery, ImageOutQuery, ModelQuery, TilingQuery
from app.http.openapi_doc import IMAGE_BODY, IMAGES
from app.http.request_io import image_format_for, image_response, json_header, read_image_bytes
from models.vae import imaging
from models.vae.inference import VAEModel


class RoundtripQuery(ModelQuery, ImageOutQuery, TilingQuery, ColourLockQuery):
    pass


@dataclass
class RoundtripRequest:
    model: VAEModel
    image: object  # PIL RGB
    x: torch.Tensor
    fmt: str
    quality: int
    tiled: bool | None = None  # None: tile above settings.tile_threshold_pixels
    colour_lock: int = 0  # colour-lock steps of the encode (models/vae/colour_lock.py)


class Roundtrip(Endpoint):
    path, summary, Query = "/roundtrip", "image -> latents -> image, with PSNR/SSIM", RoundtripQuery
    body, answers = IMAGE_BODY, IMAGES
    batching = BatchSpec("x", ("model", "tiled", "colour_lock"))

    async def decode_request(self, request: Request, q: RoundtripQuery) -> RoundtripRequest:
        settings = request.app.state.settings
        model = request.app.state.registry.get(q.model)
        data = await read_image_bytes(request, settings.max_body_bytes)
        costs = cost.cost_model(model)

        def admit(width: int, height: int) -> None:  # from the image header, before decoding it
            f = model.downsample_factor
            # with a colour lock, the decode it checked and kept is the answer (VAEModel.roundtrip)
            cost.admit(settings.max_cost, costs.encode(1, height, width, q.tiled),
                       costs.colour_lock(1, height, width, q.colour_lock, q.tiled) if q.colour_lock
                       else costs.decode(1, -(-height // f), -(-width // f), q.tiled))

        img = await anyio.to_thread.run_sync(functools.partial(imaging.open_image, data, max_pixels=settings.max_pixels,
                                                               check_size=admit))
        fmt = image_format_for(q.image_format, request.headers.get("accept"), default="png")
        return RoundtripRequest(model, img, imaging.to_tensor(img), fmt, q.quality or settings.jpeg_quality,
                                tiled=q.tiled, colour_lock=q.colour_lock)

    def predict(self, req: RoundtripRequest) -> tuple[torch.Tensor, torch.Tensor]:
        z, image = req.model.roundtrip(req.x, tiled=req.tiled, colour_lock=req.colour_lock)
        return z, image.cpu()

    def encode_response(self, result, req: RoundtripRequest) -> Response:
        from models.metrics import psnr, ssim

        z, x = result
        out = imaging.to_uint8(x)[0].numpy()
        ref = np.asarray(req.image)
        headers = {
            "X-Model": req.model.name,
            "X-PSNR": f"{psnr(ref, out):.4f}",
            "X-SSIM": _ssim_text(ssim, ref, out),
            "X-Latent-Shape": json_header(list(z.shape)),
            "X-Original-Size": json_header(list(ref.shape[:2])),
        }
        return image_response(imaging.to_pil(x)[0], req.fmt, req.quality, headers)


def _ssim_text(ssim, ref, out) -> str:
    try:
        return f"{ssim(ref, out):.6f}"
    except ValueError:  # an image smaller than SSIM's window: undefined, not a server error
        return "nan"
