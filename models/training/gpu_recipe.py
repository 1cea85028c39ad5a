"""The default model's recipe on a lent GPU machine, in one command that fits its time box.

Here (where ../shared exists), once: resized training images into an ignored folder, small
enough to travel with the working tree (the device runner carries at most 64 MiB):

    python -m models.training.gpu_recipe prepare --data ../shared/data/train --out .gpu-data

On the GPU machine (H100 / H200; torch present, the project's wheels carried as for
benchmarks/gpu_check.sh):

    python -m models.training.gpu_recipe run --data .gpu-data --out "$OUT" --minutes 8

`run` fine-tunes the shipped model with v6's recipe (MSE, the latent-colour term, 0.6 x (1 - SSIM),
crops of 256, 384 and 512 at equal pixels per step; see the model card) for `--minutes` of wall-clock,
evaluates the held-out images (PSNR, SSIM, colour offset) and writes to OUT: the diffusers model
folder in float16 (one safetensors file of a few MiB: the device returns files of at most
16 MiB), metrics.csv, eval.json and the checkpoint-free summary. `--dry-run` does 3 steps on
whatever device there is (CI runs it on CPU so the recipe cannot rot).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from models.training.data import list_images, load_rgb

RECIPE = ["--init", "models/default", "--l1", "0", "--mse", "1", "--latent-colour", "5", "--ssim", "0.6",
          "--crop", "256", "--crop-sizes", "256,384,512", "--lr", "1e-4", "--warmup", "100", "--ema", "0.999",
          "--val-images", "8"]
GPU = ["--batch-size", "16", "--workers", "8", "--steps", "100000", "--checkpoint-every", "500",
       "--eval-every", "500", "--log-every", "50"]
DRY = ["--batch-size", "2", "--workers", "0", "--steps", "3", "--checkpoint-every", "3", "--eval-every", "3",
       "--log-every", "1", "--crop", "64", "--crop-sizes", "64,96", "--val-images", "1"]


def prepare(data: list[str], out: Path, short_side: int, quality: int) -> int:
    """Resized JPEG copies (short side `short_side`), same sorted order and names as the originals."""
    out.mkdir(parents=True, exist_ok=True)
    files = list_images(data)
    total = 0
    for i, path in enumerate(files):
        target = out / f"{i:04d}-{path.stem}.jpg"  # the index keeps the sorted order (held-out = last 8)
        load_rgb(path, max_short_side=short_side).save(target, quality=quality)
        total += target.stat().st_size
    print(f"wrote {len(files)} images, {total / 2**20:.1f} MiB, to {out}")
    return 0


def run(data: str, out: Path, minutes: float, dry_run: bool) -> int:
    import torch

    from models.training import train
    from models.training.evaluate import evaluate
    from models.vae.loading import load_weights

    run_dir = out / "run"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    argv = [data, "--out", str(run_dir), *RECIPE, *(DRY if dry_run else GPU), "--max-minutes", str(minutes)]
    t0 = time.time()
    rc = train.main(argv)
    if rc:
        return rc
    vae = load_weights(str(run_dir / "model"), device=device).vae
    held_out = list_images([data])[-8:]
    result = {"device": device, "dry_run": dry_run, "train_seconds": round(time.time() - t0, 1),
              "recipe": RECIPE, "settings": DRY if dry_run else GPU,
              "held_out_256": evaluate(vae, held_out, size=256, progress=False)}
    vae.half().save_pretrained(out / "model")  # float16: a few MiB, under the 16 MiB return limit
    shutil.copy(run_dir / "metrics.csv", out / "metrics.csv")
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(run_dir)  # the checkpoint (optimiser state) is far over the return limit
    print(json.dumps(result["held_out_256"]))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.training.gpu_recipe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="resized training images for the GPU machine")
    pp.add_argument("--data", nargs="+", required=True)
    pp.add_argument("--out", type=Path, required=True)
    # 512: the recipe's largest crop (smaller images are upsampled to it); 464 images are ~41 MiB
    # at JPEG quality 90, which leaves room for the wheels under the runner's 64 MiB.
    pp.add_argument("--short-side", type=int, default=512)
    pp.add_argument("--quality", type=int, default=90)
    pr = sub.add_parser("run", help="train the recipe, evaluate, write the model to --out")
    pr.add_argument("--data", required=True)
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget (default 8)")
    pr.add_argument("--dry-run", action="store_true", help="3 tiny steps on any device (CI)")
    args = p.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.data, args.out, args.short_side, args.quality)
    return run(args.data, args.out, args.minutes, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
