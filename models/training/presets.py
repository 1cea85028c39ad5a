"""Named AutoencoderKL architectures. All are KL-f8 with 4 latent channels (SD-compatible latents).

`sd` is the Stable Diffusion kl-f8 config. The smaller ones scale the widths: conv FLOPs grow
with width squared. Decoder FLOPs against `sd` at the same size (`vae info`, counted):
`small` 0.235x (SD's depth, widths about halved: the issue's "quarter of SD's cost" budget),
`compact` 0.175x, `tiny` 0.053x (trains at ~10 crops/s of 128x128 on 2 CPU cores).
"""

from __future__ import annotations

_BASE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    act_fn="silu",
    norm_num_groups=32,
    sample_size=256,
)

PRESETS: dict[str, dict] = {
    "sd": dict(_BASE, block_out_channels=[128, 256, 512, 512], layers_per_block=2, scaling_factor=0.18215),
    "small": dict(_BASE, block_out_channels=[64, 128, 224, 256], layers_per_block=2),
    "compact": dict(_BASE, block_out_channels=[64, 128, 192, 256], layers_per_block=1),
    "tiny": dict(_BASE, block_out_channels=[32, 64, 128, 128], layers_per_block=1),
}


def preset_config(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
