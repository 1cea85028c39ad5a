"""LPIPS-VGG (Zhang et al. 2018) from local weights only: a perceptual loss and metric.

No weights ship here and none are downloaded. The weights file is one `.safetensors` (or a
`.pth` read with `weights_only=True`) holding torchvision's VGG16 `features.*` tensors and the
LPIPS linear heads `lin0..lin4.model.1.weight` (the layout of the `lpips` package's vgg.pth).
`merge_weights(vgg16.pth, lpips_vgg.pth, out.safetensors)` builds that file from the two
published files. VGG16 is defined here so torchvision is not needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision vgg16 `features` layout: conv widths, "M" = max-pool.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in `features`
_WIDTHS = (64, 128, 256, 512, 512)


def _load_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    """d(x, y) per image, x and y (N, 3, H, W) in [-1, 1]; 0 for identical inputs."""

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(width, v, 3, padding=1), nn.ReLU(inplace=False)]
                width = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _WIDTHS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        state = _load_state(path)
        model = cls()
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        lins = {f"{i}.weight": state[f"lin{i}.model.1.weight"] for i in range(5) if f"lin{i}.model.1.weight" in state}
        if not features or len(lins) != 5:
            raise ValueError(f"{path}: expected VGG16 'features.*' and LPIPS 'lin0..4.model.1.weight' tensors")
        model.features.load_state_dict(features)
        model.lins.load_state_dict(lins)
        return model.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total = 0.0
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _TAPS[tap]:
                fx, fy = F.normalize(h, dim=1, eps=1e-10).chunk(2)
                total = total + self.lins[tap]((fx - fy) ** 2).mean(dim=(2, 3))
                tap += 1
                if tap == len(_TAPS):
                    break
        return total.flatten()


def merge_weights(vgg16_path: str | Path, lpips_path: str | Path, out: str | Path) -> Path:
    """torchvision vgg16 weights + lpips linear heads -> one safetensors file for `LPIPS.from_file`."""
    from safetensors.torch import save_file

    vgg = {k: v for k, v in _load_state(vgg16_path).items() if k.startswith("features.")}
    lins = {k: v for k, v in _load_state(lpips_path).items() if k.startswith("lin")}
    save_file({k: v.contiguous() for k, v in {**vgg, **lins}.items()}, str(out))
    return Path(out)
