"""LitServe's side of benchmarks/peer_apps.py (module level: LitServe pickles the API into its
worker process). See peer_apps for the presets and the raw-body work-around."""

from __future__ import annotations

import litserve as ls
import torch
from fastapi import Depends, Request, Response
from litserve.callbacks.base import EventTypes
from litserve.server import RegularRequestHandler

from benchmarks.peer_common import _set_threads, latents_from, load_vae, png_of


class VAEDecodeAPI(ls.LitAPI):
    def __init__(self, model: str, opts: dict, **kwargs):
        super().__init__(**kwargs)
        self.model_path, self.opts = model, dict(opts)

    def setup(self, device):
        from diffusers.image_processor import VaeImageProcessor

        _set_threads()
        self.device = device
        self.vae = load_vae(self.model_path, device, self.opts["dtype"], self.opts["channels_last"])
        self.processor = VaeImageProcessor(vae_scale_factor=2 ** (len(self.vae.config.block_out_channels) - 1))

    def decode_request(self, request):
        shape = [int(s) for s in request["query"]["shape"]]
        return latents_from(request["body"], shape)

    def batch(self, inputs):
        return torch.cat(inputs)

    def predict(self, z):
        z = z.to(self.device, self.vae.dtype)
        if self.opts["channels_last"]:
            z = z.contiguous(memory_format=torch.channels_last)
        with (torch.inference_mode() if self.opts["inference_mode"] else torch.no_grad()):
            return self.vae.decode(z).sample.float().cpu()

    def unbatch(self, output):
        return list(output.split(1))

    def encode_response(self, output) -> Response:
        image = self.processor.postprocess(output, output_type="pil")[0]
        return Response(content=png_of(image), media_type="image/png")


class RawBodyHandler(RegularRequestHandler):
    """LitServe issue #732's work-around: decode_request gets the raw body (a picklable dict)."""

    async def _prepare_request(self, request, request_type):
        q = request.query_params
        return {"body": await request.body(), "query": {k: q.getlist(k) for k in q.keys()}}


class RawBodyLitServer(ls.LitServer):
    def _register_api_endpoints(self, lit_api, request_type, response_type):
        self._callback_runner.trigger_event(EventTypes.ON_SERVER_START.value, litserver=self)
        handler = RawBodyHandler(lit_api, self)

        async def endpoint_handler(request: Request) -> Response:
            return await handler.handle_request(request, Request)

        self.app.add_api_route(lit_api.api_path, endpoint_handler, methods=["POST"],
                               dependencies=[Depends(self.setup_auth(lit_api))])
