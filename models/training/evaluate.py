"""`vae eval`: reconstruction quality of a VAE on a folder of images.

Conventions of ../shared/data/README.md: uint8 RGB, PSNR and SSIM per image, then averaged.
`--size S` resizes the short side to S and centre-crops S x S (how the published SD VAE COCO
figures were made); without it, full images are padded to a multiple of 8 and cropped back.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.options import Parser, fail, int_range, positive_int
from models.vae import colour_lock as colour_lock_ops, imaging
from models.vae.imaging import resize_center_crop
from models.training.data import MAX_TRAIN_PIXELS, list_images, recolour
from models.metrics import block_colour_gain, block_ycbcr, chroma_fidelity, linear_r2, mean_psnr, psnr, ssim

PROG = "vae eval"
# --size beyond this makes images past the service's own pixel limit (imaging.DEFAULT_MAX_PIXELS).
MAX_SIZE = 4096


class NoImagesError(ValueError):
    """None of the files given to `evaluate` could be decoded."""


@torch.inference_mode()
def reconstruct(vae, x: torch.Tensor, colour_lock: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float (N, 3, H, W) in [-1, 1], any H, W -> (uint8 (N, H, W, 3) reconstruction, latents).

    `colour_lock` > 0: latents corrected by that many colour-lock steps (models/vae/colour_lock.py),
    as `VAEModel.encode(x, colour_lock=N)` does."""
    padded, size = imaging.pad_to_multiple(x)
    param = next(vae.parameters())

    def encode(t: torch.Tensor) -> torch.Tensor:
        return vae.encode(t.to(param.device, param.dtype)).latent_dist.mode()

    def decode(t: torch.Tensor) -> torch.Tensor:
        return vae.decode(t).sample.float()

    z, y = encode(padded), None
    if colour_lock:
        target, scale = colour_lock_ops.mean_colour(x), vae.config.scaling_factor or 1.0
        jacobian = colour_lock_ops.jacobians(encode, decode, x, 8, scale)
        z, y = colour_lock_ops.correct(z, target, lambda t: imaging.crop_to(decode(t), size), jacobian,
                                       colour_lock, scale)
    y = imaging.crop_to(decode(z), size) if y is None else y
    return imaging.to_uint8(y), z.float().cpu()


def colour_offset(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-channel mean of reference minus test (uint8 (H, W, 3) images), in 8-bit levels: positive
    means the reconstruction is darker in that channel."""
    return reference.reshape(-1, 3).astype(np.float64).mean(0) - test.reshape(-1, 3).astype(np.float64).mean(0)


def evaluate(vae, files, size: int | None = None, batch_size: int = 8, lpips=None, progress: bool = True,
             colour_lock: int = 0) -> dict:
    """Mean PSNR / SSIM (and LPIPS when given) of posterior-mean reconstructions, latent statistics, speed.

    `colour_lock` > 0: the latents get that many colour-lock steps first (as `/encode?colour_lock=N`).
    A file that cannot be decoded is named on stderr, left out and counted in `skipped`."""
    from tqdm.auto import tqdm

    psnrs, ssims, lpips_values, offsets, chromas = [], [], [], [], []
    ref_blocks, rec_blocks, latent_blocks = [], [], []
    z_sum = z_sq = z_count = 0.0
    model_seconds = 0.0
    batch: list[Image.Image] = []
    bar = tqdm(total=len(files), unit="img", disable=not progress, dynamic_ncols=True)

    def flush():
        nonlocal z_sum, z_sq, z_count, model_seconds
        x = imaging.to_tensor(batch)
        start = time.perf_counter()
        recon, z = reconstruct(vae, x, colour_lock)
        model_seconds += time.perf_counter() - start
        reference = imaging.to_uint8(x)
        for ref, out, latent in zip(reference.numpy(), recon.numpy(), z.numpy()):
            ref_blocks.append(block_ycbcr(ref))
            rec_blocks.append(block_ycbcr(out))
            rows, cols = ref.shape[0] // 8, ref.shape[1] // 8
            if latent.shape[1:] == (math.ceil(ref.shape[0] / 8), math.ceil(ref.shape[1] / 8)):  # an f8 model
                latent_blocks.append(latent[:, :rows, :cols].reshape(latent.shape[0], -1).T)
            psnrs.append(psnr(ref, out))
            ssims.append(ssim(ref, out))
            offsets.append(colour_offset(ref, out))
            fidelity = chroma_fidelity(ref, out)
            if fidelity is not None:
                chromas.append(fidelity)
        if lpips is not None:
            rec = recon.permute(0, 3, 1, 2).float() / 127.5 - 1
            lpips_values.extend(lpips(rec, x).flatten().tolist())
        z_sum += float(z.sum()); z_sq += float((z.double() ** 2).sum()); z_count += z.numel()
        bar.update(len(batch))
        bar.set_postfix(psnr=f"{mean_psnr(psnrs):.2f}", ssim=f"{np.mean(ssims):.4f}")
        batch.clear()

    skipped = 0
    for path in files:
        try:
            img = imaging.open_image(path, max_pixels=MAX_TRAIN_PIXELS)
        except (imaging.ImageError, OSError) as exc:
            print(f"{PROG}: warning: skipping {path}: {exc}", file=sys.stderr, flush=True)
            skipped += 1
            bar.update(1)
            continue
        if size:
            img = resize_center_crop(img, size)
        if batch and (not size or img.size != batch[0].size or len(batch) == batch_size):
            flush()
        batch.append(img)
        if not size:
            flush()
    if batch:
        flush()
    bar.close()
    if not psnrs:
        raise NoImagesError(f"none of the {len(files)} images can be decoded")
    mean = z_sum / z_count
    std = math.sqrt(max(0.0, z_sq / z_count - mean**2))
    result = {
        "images": len(psnrs),
        "psnr": round(mean_psnr(psnrs), 3),
        "ssim": round(float(np.mean(ssims)), 4),
        "latent_mean": round(mean, 4),
        "latent_std": round(std, 4),
        "suggested_scaling_factor": round(1.0 / std, 5),
        "suggested_shift_factor": round(mean, 5),
        # Image mean minus reconstruction mean, per channel, in 8-bit levels: the signed average
        # over images (a bias) and the worst image's worst channel (issue 13's colour targets).
        "colour_offset_rgb": [round(float(v), 3) for v in np.mean(offsets, axis=0)],
        "colour_offset_max": round(float(np.abs(offsets).max()), 3),
        "images_per_s": round(len(psnrs) / model_seconds, 3),
    }
    if chromas:
        # Saturated colours (models.metrics.chroma_fidelity), over the images that have them: the
        # share of their chroma kept (1: all; lower: greyer) and the hue error in degrees.
        kept, hue = np.array(chromas).T
        result.update(saturated_images=len(chromas), chroma_kept=round(float(kept.mean()), 3),
                      chroma_kept_min=round(float(kept.min()), 3), hue_error_deg=round(float(hue.mean()), 2))
    # The 8x8-block mean colour (one latent position of an f8 model) along the images' own two chroma
    # axes (orange-blue, then green-magenta in photographs): the reconstruction's gain on each
    # (1: kept), and how much of Y and each axis the latent holds linearly (R^2).
    ref_blocks, rec_blocks = np.concatenate(ref_blocks), np.concatenate(rec_blocks)
    if len(ref_blocks) > 2:
        result["block_chroma_gain"] = [round(v, 3) for v in block_colour_gain(ref_blocks, rec_blocks)]
        if len(latent_blocks) == len(psnrs):
            result["latent_colour_r2"] = [round(v, 3) for v in linear_r2(np.concatenate(latent_blocks), ref_blocks)]
    if skipped:
        result["skipped"] = skipped
    if lpips_values:
        result["lpips"] = round(float(np.mean(lpips_values)), 4)
    return result


# A flat field at 12 hues, 30 degrees apart (same brightness and saturation as (204, 51, 51)),
# with +-10 levels of noise: the plainest test of whether a decoder can hold a colour.
FLAT_SIZE, FLAT_NOISE = 128, 0.08


@torch.inference_mode()
def flat_colours(vae) -> dict[str, list[float]]:
    """Chroma kept and hue error (models.metrics.chroma_fidelity) of flat noisy fields at 0, 30, ...,
    330 degrees of hue (0 red, 120 green, 240 blue)."""
    red = torch.tensor([0.6, -0.6, -0.6]).view(3, 1, 1).expand(3, FLAT_SIZE, FLAT_SIZE)
    noise = torch.from_numpy(np.random.default_rng(0).uniform(-FLAT_NOISE, FLAT_NOISE, (3, FLAT_SIZE, FLAT_SIZE)))
    kept, hue_error = [], []
    for k in range(12):
        x = (recolour(red, 2 * math.pi * k / 12, 1.0) + noise.float()).clamp(-1, 1)[None]
        recon, _ = reconstruct(vae, x)
        fidelity = chroma_fidelity(imaging.to_uint8(x)[0].numpy(), recon[0].numpy())
        kept.append(round(fidelity[0], 3))
        hue_error.append(round(fidelity[1], 1))
    return {"hue_deg": [30 * k for k in range(12)], "chroma_kept": kept, "hue_error_deg": hue_error}


def markdown_table(rows: list[dict]) -> str:
    cols = ["model", "data", "size", "colour_lock", "images", "psnr", "ssim", "lpips", "colour_offset_rgb", "colour_offset_max",
            "chroma_kept", "chroma_kept_min", "hue_error_deg", "block_chroma_gain", "latent_colour_r2", "latent_mean", "latent_std", "images_per_s"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="diffusers folder or single-file checkpoint")
    p.add_argument("--data", required=True, action="append", help="image folder (repeatable)")
    p.add_argument("--size", type=int_range(1, MAX_SIZE),
                   help=f"resize short side to SIZE (at most {MAX_SIZE}) and centre-crop (e.g. 256)")
    p.add_argument("--limit", type=positive_int, help="only the first N images (sorted)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--lpips-weights", help="local LPIPS-VGG weights file (enables LPIPS)")
    p.add_argument("--flat-colours", action="store_true",
                   help="also reconstruct flat fields at 12 hues and report the chroma each keeps")
    p.add_argument("--colour-lock", type=int_range(0, colour_lock_ops.MAX_STEPS), default=0, metavar="N",
                   help="encode with N colour-lock steps, as /encode?colour_lock=N (default 0: plain encode)")
    p.add_argument("--out", help="write JSON here (and a Markdown table beside it, .md)")
    args = p.parse_args(argv)

    from models.vae.loading import ModelLoadError, load_weights

    try:
        vae = load_weights(args.model, dtype=args.dtype, device=args.device).vae
    except ModelLoadError as exc:
        return fail(PROG, str(exc))
    lpips = None
    if args.lpips_weights:
        from models.training.perceptual import LPIPS

        try:
            lpips = LPIPS.from_file(args.lpips_weights).eval()
        except Exception as exc:  # OSError, safetensors / unpickling errors, missing keys
            return fail(PROG, f"--lpips-weights {args.lpips_weights}: {type(exc).__name__}: {exc}")
    rows = []
    for folder in args.data:
        try:
            files = list_images([folder])[: args.limit]
        except FileNotFoundError as exc:
            return fail(PROG, str(exc))
        if not files:
            return fail(PROG, f"no images in {folder}")
        try:
            result = evaluate(vae, files, args.size, args.batch_size, lpips, colour_lock=args.colour_lock)
        except NoImagesError as exc:
            return fail(PROG, f"{folder}: {exc}")
        lock = {"colour_lock": args.colour_lock} if args.colour_lock else {}
        rows.append({"model": args.model, "data": folder, "size": args.size or "full", "dtype": args.dtype, **lock,
                     **result})
    if args.flat_colours:
        flat = flat_colours(vae)
        for row in rows:
            row["flat_colours"] = flat
    print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    print(markdown_table(rows))
    if args.flat_colours:
        print("flat field hue (deg) | " + " | ".join(map(str, flat["hue_deg"])))
        print("chroma kept          | " + " | ".join(map(str, flat["chroma_kept"])))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
