"""The peers of benchmarks/peers/: one diffusers AutoencoderKL behind (a) LitServe and (b) a
plain FastAPI app, written as each framework's documentation would have a user write it.

Both answer the same request as our service, so one client serves all three:
    POST /decode?shape=1&shape=4&shape=H&shape=W&dtype=float32[&image_format=png]
    body: raw little-endian float32 latents (application/octet-stream)  ->  image/png

    python -m benchmarks.peer_apps fastapi  --model PATH --preset default --port 8101
    python -m benchmarks.peer_apps litserve --model PATH --preset best    --port 8102

Presets (recorded by benchmarks/peers/ with every result):
  default  what the documentation shows: weights as loaded (float32), `torch.no_grad()`,
           diffusers' VaeImageProcessor to PIL, PIL's PNG. FastAPI: a plain `def` endpoint
           (FastAPI runs it in its thread pool). LitServe: one worker, no batching.
  best     the same code with the honest speed settings each framework offers a user:
           bfloat16 weights, channels_last, `torch.inference_mode()`; LitServe also its own
           dynamic batching (`max_batch_size`, `batch_timeout`). FastAPI has no batching.

LitServe parses every non-form body as JSON (LitServe issue #732, open): the raw body reaches
`decode_request` through the work-around given in that issue (a request handler that reads
`await request.body()`), which is the only change to LitServe's request path.
"""

from __future__ import annotations

import argparse
import sys

PRESETS = {
    "default": dict(dtype="float32", channels_last=False, inference_mode=False, max_batch_size=1, batch_timeout=0.0),
    "best": dict(dtype="bfloat16", channels_last=True, inference_mode=True, max_batch_size=4, batch_timeout=0.005),
}
from benchmarks.peer_common import _set_threads, latents_from, load_vae, png_of












# --- (b) plain FastAPI ---------------------------------------------------------------------------

def fastapi_app(model: str, device: str = "cpu", preset: str = "default", **overrides):
    import torch
    from diffusers.image_processor import VaeImageProcessor
    from fastapi import Body, FastAPI, Query, Response

    opts = {**PRESETS[preset], **overrides}
    _set_threads()
    vae = load_vae(model, device, opts["dtype"], opts["channels_last"])
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    grad_off = torch.inference_mode if opts["inference_mode"] else torch.no_grad
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/decode")
    def decode(body: bytes = Body(..., media_type="application/octet-stream"),
               shape: list[int] = Query(...), dtype: str = "float32", image_format: str = "png"):
        z = latents_from(body, shape).to(device, vae.dtype)
        if opts["channels_last"]:
            z = z.contiguous(memory_format=torch.channels_last)
        with grad_off():
            x = vae.decode(z).sample
        image = processor.postprocess(x.float(), output_type="pil")[0]
        return Response(png_of(image), media_type="image/png")

    app.state.options = opts
    return app


# --- (a) LitServe --------------------------------------------------------------------------------

def litserve_server(model: str, device: str = "cpu", preset: str = "default", **overrides):
    from benchmarks.peer_litserve import RawBodyLitServer, VAEDecodeAPI

    opts = {**PRESETS[preset], **overrides}
    api = VAEDecodeAPI(model, opts, max_batch_size=opts["max_batch_size"], batch_timeout=opts["batch_timeout"],
                       api_path="/decode")
    accelerator = "cuda" if str(device).startswith("cuda") else "cpu"
    # timeout: LitServe answers 504 after 30 s in its queue by default; a benchmark at
    # concurrency 16 on a CPU would hit it, so it is raised (it is a limit, not a speed setting).
    return RawBodyLitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=600)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_apps", description=__doc__.split("\n\n")[0])
    p.add_argument("framework", choices=["fastapi", "litserve"])
    p.add_argument("--model", required=True, help="diffusers AutoencoderKL folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, help="LitServe batching (overrides the preset)")
    p.add_argument("--batch-timeout", type=float, help="LitServe batch timeout in seconds (overrides the preset)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="overrides the preset")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("max_batch_size", args.max_batch_size), ("batch_timeout", args.batch_timeout),
                                   ("dtype", args.dtype)) if v is not None}
    if args.framework == "fastapi":
        import uvicorn

        app = fastapi_app(args.model, args.device, args.preset, **overrides)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    else:
        server = litserve_server(args.model, args.device, args.preset, **overrides)
        server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
