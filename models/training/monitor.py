"""What a training run shows and measures: validation PSNR and colour offset on held-out images,
reconstruction grids, loss/PSNR curves, and the latent factors measured at export."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


@torch.no_grad()
def evaluate(vae, images, autocast):
    """Mean PSNR (dB, uint8 convention) of the posterior-mean reconstruction of a fixed batch, its
    per-channel colour offset (original minus reconstruction, 8-bit levels, averaged over images),
    and the reconstruction."""
    from models.metrics import mean_psnr, psnr

    vae.eval()
    recons = []
    for chunk in images.split(4):
        with autocast():
            recons.append(vae.decode(vae.encode(chunk).latent_dist.mode()).sample.float().clamp(-1, 1))
    recon = torch.cat(recons)
    to_u8 = lambda t: ((t + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    a, b = to_u8(images), to_u8(recon)
    offset = (a.astype("float64").mean((1, 2)) - b.astype("float64").mean((1, 2))).mean(0)
    return mean_psnr([psnr(x, y) for x, y in zip(a, b)]), offset, recon


def save_grid(images, recon, path: Path):
    from PIL import Image

    top = torch.cat(list(images[:8]), dim=2)
    bottom = torch.cat(list(recon[:8]), dim=2)
    grid = ((torch.cat([top, bottom], dim=1) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0)
    Image.fromarray(grid.numpy()).save(path)


def plot_curves(csv_path: Path, png_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path)))
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [int(r["step"]) for r in rows]
    axes[0].plot(steps, [float(r["rec_loss"]) for r in rows], lw=0.8)
    axes[0].set(title="reconstruction loss (train)", xlabel="step", yscale="log")
    val = [(int(r["step"]), float(r["val_psnr"])) for r in rows if r.get("val_psnr")]
    axes[1].plot([s for s, _ in val], [v for _, v in val], "o-", label="val")
    axes[1].plot(steps, [float(r["psnr"]) for r in rows], lw=0.6, alpha=0.6, label="train batch")
    axes[1].set(title="PSNR (dB)", xlabel="step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


@torch.no_grad()
def measure_latent_factors(vae, dataset, autocast, n: int = 64, batch: int = 8) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the posterior-mean latents of `n` training crops, so that
    `(z - shift) * scale` has mean 0 and standard deviation 1 there (SD's 0.18215 is 1 / std with
    no shift; a KL weight of 1e-6 leaves the latents off-centre, so ours need the shift)."""
    vae.eval()
    zs = []
    for start in range(0, n, batch):
        crops = [dataset[k] for k in range(start, start + batch)]
        # Crops of one batch share a side unless the run mixes sides (--crop-sizes): then one by one.
        groups = [torch.stack(crops)] if len({c.shape for c in crops}) == 1 else [c[None] for c in crops]
        for x in groups:
            with autocast():
                zs.append(vae.encode(x.to(vae.device)).latent_dist.mode().float().flatten().cpu())
    z = torch.cat(zs)
    return float(1.0 / z.std()), float(z.mean())
