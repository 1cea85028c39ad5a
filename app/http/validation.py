"""Validation of what a request carries, after parsing: tensors, latent metadata, output sizes.

Parsing (bytes -> tensor) is app.protocol.wire's; query parameters are typed and bounded by each
endpoint's query model. Here: does the tensor fit the model (rank, channels, dtype, finite,
range), does the metadata follow the latent contract (models.vae.latents), does the output
stay within the server's pixel limit, and is the model's result finite (`finite_result`: every
endpoint's result passes it before it is answered). Every refusal is an APIError naming what was wrong.
"""

from __future__ import annotations

import torch

from app.protocol import wire
from app.protocol.errors import BadRequest, PayloadTooLarge, Unprocessable
from models.vae import latent_ops
from models.vae.inference import VAEModel
from models.vae.latents import LatentInfo, LatentMetadataError, dequantize_uint8


def check_finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise Unprocessable(f"{what} contains NaN or Inf")


def finite_result(result) -> None:
    """A model result (a tensor, or a tuple of them) holding NaN or Inf is never answered 200."""
    for t in result if isinstance(result, (tuple, list)) else (result,):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise Unprocessable("the model's output holds NaN or Inf for this input: its values are outside "
                                "what the model can decode (or the scaling factors do not match them)")


def image_tensor(x: torch.Tensor, model: VAEModel, max_pixels: int) -> torch.Tensor:
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


def latent_info(meta: dict, where: str = "body") -> LatentInfo:
    """The latent contract's reading of a body's metadata; 400 naming the bad key."""
    try:
        return LatentInfo.from_metadata(meta)
    except LatentMetadataError as exc:
        raise BadRequest(f"{exc} (in the {where})") from None


def latents(z: torch.Tensor, model: VAEModel, max_pixels: int, info: LatentInfo | None = None) -> torch.Tensor:
    """Latents as sent (N, C, h, w), float or uint8 with quantisation metadata -> float32 as sent
    (scaled or not: the caller decides), refused unless they fit the model and the pixel limit."""
    if z.ndim == 3:
        raise Unprocessable(f"packed 3-D latents {list(z.shape)} need `height` and `width`, else send (N, C, h, w)")
    if z.ndim != 4:
        raise Unprocessable(f"latents must be (N, {model.latent_channels}, h, w), got shape {list(z.shape)}")
    if z.shape[1] != model.latent_channels:
        raise Unprocessable(f"latents have {z.shape[1]} channels, model {model.name!r} expects {model.latent_channels}")
    if z.dtype == torch.uint8 and info is not None and info.quant_scale is not None:
        if len(info.quant_scale) != z.shape[1]:
            raise BadRequest(f"`quant_scale` has {len(info.quant_scale)} values for {z.shape[1]} latent channels")
        z = dequantize_uint8(z, info.quant_scale, info.quant_offset)  # still scaled if it was
    if info is not None and info.latents_mean is not None and len(info.latents_mean) != z.shape[1]:
        raise BadRequest(f"`latents_mean` has {len(info.latents_mean)} values for {z.shape[1]} latent channels")
    if not z.is_floating_point():
        raise Unprocessable(f"latents must be float32, float16 or bfloat16, got {wire.dtype_name(z.dtype)}")
    f = model.downsample_factor
    if z.shape[-2] * z.shape[-1] * f * f > max_pixels:
        raise PayloadTooLarge(
            f"latents {list(z.shape)} decode to {z.shape[-2] * f}x{z.shape[-1] * f}, over {max_pixels} pixels"
        )
    check_finite(z, "latents")
    return z.float()


def unpack(z: torch.Tensor, model: VAEModel, height: int | None, width: int | None) -> torch.Tensor:
    """Packed FLUX latents (N, (H/2f)*(W/2f), 4C), as diffusers' remote_decode sends them with the
    image's height and width -> (N, C, h, w), exactly as FluxPipeline._unpack_latents does."""
    if height is None or width is None:
        raise Unprocessable(f"packed 3-D latents {list(z.shape)} need `height` and `width` (the image size)")
    c, f = model.latent_channels, model.downsample_factor
    h, w = latent_ops.packed_latent_size(height, width, f)
    if z.shape[2] != 4 * c or z.shape[1] != (h // 2) * (w // 2) or not h or not w:
        raise Unprocessable(
            f"packed latents {list(z.shape)} do not fit a {height}x{width} image: model {model.name!r} "
            f"packs 2x2 patches of {c} channels, expected [N, {(h // 2) * (w // 2)}, {4 * c}]")
    return latent_ops.unpack_latents(z.contiguous(), height, width, f)


def crop_size(height: int | None, width: int | None, info: LatentInfo, z: torch.Tensor,
              model: VAEModel) -> tuple[int, int] | None:
    """Output crop: `height`/`width` query, else the body's `original_size` metadata; None: none."""
    if height is None and width is None:
        if info.original_size is None:
            return None
        height, width = info.original_size
    f = model.downsample_factor
    full = (z.shape[-2] * f, z.shape[-1] * f)
    size = (int(height or full[0]), int(width or full[1]))
    if not (0 < size[0] <= full[0] and 0 < size[1] <= full[1]):
        raise Unprocessable(f"crop {list(size)} does not fit the decoded size {list(full)}")
    return size
