"""VAE training losses: reconstruction, KL, PatchGAN hinge, LDM's adaptive GAN weight.

Normalisation. LDM sums the reconstruction over pixels and the KL over latent elements (both
per image) with KL weight 1e-6. We average the reconstruction over pixel values instead (so
the loss and learning rate do not depend on crop size) and scale the summed KL by the same
1 / (3 * H * W): `kl_weight` keeps LDM's meaning, 1e-6 here equals LDM's 1e-6.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.metrics import gaussian_window


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, l1: float = 1.0, mse: float = 0.0,
                        colour: float = 0.0, ssim: float = 0.0, image_colour: float = 0.0) -> torch.Tensor:
    """Mean per pixel value; x, y are (N, 3, H, W) in [-1, 1].

    `colour` weighs the MSE of the two images averaged over 8x8 blocks (one value per latent
    position): the low-frequency colour, which a plain pixel loss weighs by its small share of the
    error energy although it is what a person sees first (a green field turned grey).

    `image_colour` weighs the MSE of the two images' mean colours (one value per image and
    channel): the image-wide cast. At Kodak's size the default model's per-image offset spreads by
    about 2.6 levels even on its training images (models/default/README.md), an error that
    `colour` weighs as one block among thousands at a 512 crop.

    `ssim` weighs 1 - SSIM (`ssim_index`): the structure term that MSE under-weighs in textured
    regions, and the metric the model is judged by next to PSNR."""
    x, y = x.float(), y.float()
    loss = x.new_zeros(())
    if l1:
        loss = loss + l1 * (x - y).abs().mean()
    if mse:
        loss = loss + mse * F.mse_loss(x, y)
    if colour:
        loss = loss + colour * F.mse_loss(F.avg_pool2d(x, 8, ceil_mode=True), F.avg_pool2d(y, 8, ceil_mode=True))
    if image_colour:
        loss = loss + image_colour * F.mse_loss(x.mean((2, 3)), y.mean((2, 3)))
    if ssim:
        loss = loss + ssim * (1.0 - ssim_index(x, y))
    return loss


def ssim_index(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of (N, 3, H, W) images in [-1, 1], differentiable; the same definition as
    `models.metrics.ssim` (11-tap gaussian window, sigma 1.5, positions where the window fits,
    per channel, then averaged). Computed on [0, 1] values: SSIM's luminance term is not shift
    invariant, and the metric sees 0..255."""
    x, y = (x + 1) / 2, (y + 1) / 2
    w = torch.from_numpy(gaussian_window()).to(x)  # the metric's own window
    c = x.shape[1]
    rows, cols = w.view(1, 1, -1, 1).repeat(c, 1, 1, 1), w.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=c), cols, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean()


def latent_colour_loss(z_mean: torch.Tensor, x: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """How badly each latent position's 8x8-block mean colour is read from its latent linearly: the
    residual MSE of the least-squares read-out (4 channels -> RGB, both centred) fitted on this batch.

    Why: measured on Kodak, the latents of the models trained here with MSE alone carry the block's
    luminance (linear R^2 0.99) and the main chroma axis, orange-blue (0.82), but hardly the second,
    green-magenta (0.19): the encoder spends its 4 channels on texture instead, and no decoder can
    restore a colour the latent does not hold (models/default/README.md). This term keeps all three
    colour directions linearly readable, as they are in SD's kl-f8 latents. Fitted in closed form
    per batch, so there is no read-out to train, checkpoint or initialise.

    `ridge` is in latent units squared (real images' latents vary by 1 to 3): a batch whose latents
    hardly vary (a flat sky) would otherwise get a huge read-out, and the gradient, which is the
    residual times the read-out, would be huge too (a flat batch like the test's: a gradient of
    order 1 per element with a negligible ridge, of order 1e-6 with this one)."""
    z = z_mean.float().permute(0, 2, 3, 1).reshape(-1, z_mean.shape[1])
    colour = F.avg_pool2d(x.float(), x.shape[-1] // z_mean.shape[-1]).permute(0, 2, 3, 1).reshape(-1, 3)
    z, colour = z - z.mean(0), colour - colour.mean(0)
    gram = z.T @ z / len(z) + ridge * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    read = torch.linalg.solve(gram, z.T @ colour / len(z))
    return F.mse_loss(z @ read, colour)


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor, pixels_per_image: int) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements, averaged over the batch, divided by
    the number of pixel values per image (see module docstring)."""
    mean, logvar = mean.float(), logvar.float().clamp(-30.0, 20.0)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean() / pixels_per_image


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming-transformers' NLayerDiscriminator layout): 70x70 receptive field
    at 3 layers; GroupNorm instead of BatchNorm so it behaves the same with any batch size."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            nxt = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, nxt, 4, stride, 1, bias=False), nn.GroupNorm(32, nxt), nn.LeakyReLU(0.2, True)]
            width = nxt
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """LDM's balance: ||d rec / d W_last|| / ||d g / d W_last||, W_last = decoder.conv_out.weight."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
