"""LPIPS loads from a local file in the published key layouts and behaves as a distance."""

import torch

from models.training.perceptual import LPIPS, merge_weights


def test_lpips_from_local_weights(tmp_path):
    torch.manual_seed(0)
    ref = LPIPS()
    vgg = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too
    lins = {f"lin{i}.model.1.weight": m.weight.abs() for i, m in enumerate(ref.lins)}  # LPIPS heads are >= 0
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lins, tmp_path / "lpips_vgg.pth")
    path = merge_weights(tmp_path / "vgg16.pth", tmp_path / "lpips_vgg.pth", tmp_path / "lpips.safetensors")
    model = LPIPS.from_file(path)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    same = model(x, x)
    assert same.shape == (2,) and torch.allclose(same, torch.zeros(2), atol=1e-6)
    near, far = model(x, x + 0.05 * torch.randn_like(x)), model(x, torch.rand_like(x) * 2 - 1)
    assert (near > 0).all() and (far > near).all()
    y = x.clone().requires_grad_(True)  # usable as a loss: gradients flow to the input
    model(y, x.flip(-1)).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
