"""The model a training run starts from: a preset, a diffusers config, or `--init` weights, then
regrouped (`--norm-groups`) or grown (`--layers-per-block`) as the options ask."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.training.presets import preset_config


def build_model(args):
    """The model the options name; ValueError naming the file and the reason when it cannot be built."""
    vae = _base_model(args)
    groups = args.norm_groups  # 0 (also for checkpoints from before the option): the config's
    if groups and groups != vae.config.norm_num_groups:
        # Why: with 32 groups on the 32-channel last decoder block (preset tiny), GroupNorm is a
        # per-channel instance norm right before conv_out, which removes every channel's mean over
        # the image: the decoder cannot set the image's overall colour except through the shape of
        # its features, and that changes with the image size (models/default/README.md).
        widths = vae.config.block_out_channels
        if any(c % groups for c in widths):
            raise ValueError(f"--norm-groups {groups} must divide every block width {list(widths)}")
        regrouped = type(vae).from_config({**vae.config, "norm_num_groups": groups})
        regrouped.load_state_dict(vae.state_dict())
        vae = regrouped
    layers = args.layers_per_block  # 0 (also for checkpoints from before the option): the config's
    if layers and layers != vae.config.layers_per_block:
        vae = grow_layers(vae, layers)
    return vae


def grow_layers(vae, layers_per_block: int):
    """The same model with `layers_per_block` ResNet blocks per encoder stage (decoder: one more),
    computing exactly the same function: each stage keeps its blocks first and the added ones
    (channels in = out, no shortcut) start with conv2 zero, so they add nothing until trained.
    Why: a cheap way to give a trained model more capacity (for texture) without starting over."""
    if layers_per_block < vae.config.layers_per_block:
        raise ValueError(f"--layers-per-block {layers_per_block} would drop trained blocks "
                         f"(the model has {vae.config.layers_per_block}); it can only grow")
    grown = type(vae).from_config({**vae.config, "layers_per_block": layers_per_block})
    missing, unexpected = grown.load_state_dict(vae.state_dict(), strict=False)
    assert not unexpected, unexpected  # growing only adds blocks
    added = {key.rsplit(".", 2)[0] for key in missing}
    for name, module in grown.named_modules():
        if name in added:
            torch.nn.init.zeros_(module.conv2.weight)
            torch.nn.init.zeros_(module.conv2.bias)
    return grown.to(next(vae.parameters()).dtype)


def _base_model(args):
    from diffusers import AutoencoderKL

    if args.init:
        from models.vae.loading import ModelLoadError, load_weights  # a diffusers folder or an LDM single file

        try:
            return load_weights(args.init).vae.requires_grad_(True)
        except ModelLoadError as exc:
            raise ValueError(f"--init: {exc}") from None
    if args.config:
        try:
            return AutoencoderKL.from_config(json.loads(Path(args.config).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"--config {args.config}: {type(exc).__name__}: {exc}") from None
    return AutoencoderKL(**preset_config(args.preset))
