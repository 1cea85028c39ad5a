"""Diffusers AutoencoderKL state-dict names -> original LDM / Stable Diffusion single-file names.

The inverse of diffusers' `convert_ldm_vae_checkpoint`, so that a file written with these names
loads through `AutoencoderKL.from_single_file`. Differences between the layouts:
  * blocks: `down_blocks.i.resnets.j` <-> `down.i.block.j`; `downsamplers.0` <-> `downsample`;
    decoder up blocks are stored in reverse order: `up_blocks.i` <-> `up.(n-1-i)`;
  * mid block: `mid_block.resnets.k` <-> `mid.block_(k+1)`, `mid_block.attentions.0` <-> `mid.attn_1`;
  * `conv_shortcut` <-> `nin_shortcut`, `conv_norm_out` <-> `norm_out`;
  * attention projections are Linear (out, in) in diffusers and 1x1 Conv2d (out, in, 1, 1) in LDM.
"""

from __future__ import annotations

import re

import torch

# Renames applied inside the attention block (diffusers -> LDM).
_ATTN_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _block_count(state_dict: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _rename(key: str, num_up: int) -> tuple[str, bool]:
    """One diffusers key -> (LDM key, is_attention_projection_weight)."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        block = num_up - 1 - int(m.group(1))
        if m.group(2) == "resnets":
            key = f"decoder.up.{block}.block.{m.group(3)}.{m.group(4)}"
        else:
            key = f"decoder.up.{block}.upsample.{m.group(4)}"
    key = re.sub(r"mid_block\.resnets\.(\d+)", lambda g: f"mid.block_{int(g.group(1)) + 1}", key)
    is_proj = False
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key)
    if m:
        name = _ATTN_NAMES.get(m.group(2), m.group(2))
        is_proj = name in ("q", "k", "v", "proj_out") and m.group(3) == "weight"
        key = f"{m.group(1)}.mid.attn_1.{name}.{m.group(3)}"
    return key, is_proj


def diffusers_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to LDM names (tensors are shared, not copied).

    `prefix` is prepended to every key, e.g. "first_stage_model." for a full SD checkpoint layout.
    Attention projection weights (out, in) become (out, in, 1, 1) like LDM's 1x1 convolutions.
    """
    num_up = _block_count(state_dict, "decoder.up_blocks")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key, is_proj = _rename(key, num_up)
        if is_proj and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + new_key] = value
    return out
