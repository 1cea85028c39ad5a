"""`vae info PATH`: a model's config, parameter counts and FLOPs of encode / decode.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on a copy of the architecture on
the meta device: no weights are read and nothing is computed, so 512x512 costs milliseconds.
FlopCounterMode counts a multiply-add as 2 FLOPs and covers matmuls / convolutions / attention
(norms and activations are not counted).
"""

from __future__ import annotations

import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.options import Parser, fail, int_range

MAX_SIZE = 1 << 16  # FLOPs are counted on the meta device: a large side costs no memory, only sense


def count_flops(vae, size: int | tuple[int, int] = 512) -> dict[str, int]:
    """FLOPs of one encode (image of `size` -> posterior mode) and one decode (its latent -> image).

    `vae` is an AutoencoderKL or AutoencoderTiny (only its class and config are used).
    Returns {"encode": int, "decode": int}.
    """
    from models.vae.inference import diffusers_latents

    h, w = (size, size) if isinstance(size, int) else size
    with torch.device("meta"):
        meta = type(vae).from_config(vae.config)
        x = torch.zeros(1, int(vae.config.in_channels), h, w)
        with FlopCounterMode(display=False) as counter:
            z = diffusers_latents(meta, x)
        encode = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            meta.decode(z)
        decode = counter.get_total_flops()
    return {"encode": int(encode), "decode": int(decode)}


def model_info(model, size: int = 512) -> dict:
    """Everything `vae info` prints, as a JSON-able dict. `model` is a models.vae.inference.VAEModel."""
    info = model.describe()
    info["parameters"] = model.param_counts()
    info["flops"] = {"size": [size, size], **count_flops(model.vae, size)}
    info["source"] = model.source
    return info


def main(argv: list[str] | None = None) -> int:
    from models.vae.inference import VAEModel
    from models.vae.loading import ModelLoadError

    parser = Parser(prog="vae info", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="diffusers folder, single-file checkpoint or hub id")
    parser.add_argument("--config", help="config folder for a single-file checkpoint (default: bundled SD kl-f8)")
    parser.add_argument("--size", type=int_range(1, MAX_SIZE), default=512,
                        help="square image side for FLOPs (default 512)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        model = VAEModel.load("info", args.path, config=args.config)
    except ModelLoadError as exc:
        return fail("vae info", str(exc))
    info = model_info(model, args.size)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    params, flops = info["parameters"], info["flops"]
    print(f"model:      {info['source']} ({info['layout']})")
    print(f"sha256:     {info['sha256']}")
    print(f"latents:    {info['latent_channels']} channels, downsample x{info['downsample_factor']}, "
          f"scaling {info['scaling_factor']}, shift {info['shift_factor']}")
    print(f"parameters: encoder {params['encoder']:,}  decoder {params['decoder']:,}  total {params['total']:,}")
    print(f"FLOPs @ {args.size}x{args.size}: encode {flops['encode'] / 1e9:.2f} G  decode {flops['decode'] / 1e9:.2f} G")
    print("config:")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
