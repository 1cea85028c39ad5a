"""Storage table: bytes per image and PSNR / SSIM of VAE latent files beside PNG, JPEG and WebP.

    python -m benchmarks.codec_table --model PATH [--data ../shared/data/kodak] [--json out.json]

For every image (full size, padded to 8 for the model and cropped back, as /roundtrip does):
  * PNG (PIL, lossless), JPEG q90, WebP q90: the encoded bytes, decoded and compared;
  * latent files as `vae encode` writes them (float32, float16, bfloat16, uint8 with per-channel
    scale/offset): the whole file (header and metadata included), decoded by the model and compared;
  * JPEG and WebP at the uint8 latent file's size (best quality that fits, per image): rate-matched.
PSNR / SSIM follow models.metrics (uint8 RGB; identical images count as 100 dB in the mean).
Prints a Markdown table. A VAE is a perceptual codec: the latent rows show the model's
reconstruction quality at a fixed rate, not a rate-distortion win over image codecs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.vae import imaging
from models.vae import latent_files as latent_store
from models.training.data import list_images
from models.metrics import mean_psnr, psnr, ssim

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak"
LATENT_VARIANTS = {  # row label -> StoreOptions fields
    "VAE latents float32": dict(dtype="float32"),
    "VAE latents float16": dict(dtype="float16"),
    "VAE latents bfloat16": dict(dtype="bfloat16"),
    "VAE latents uint8": dict(quantize="uint8"),
}
IMAGE_CODECS = {"PNG (lossless)": ("png", None), "JPEG q90": ("jpg", 90), "WebP q90": ("webp", 90)}
# Rate-matched rows: per image, the best quality whose file is no larger than the uint8 latent file.
MATCHED = {"JPEG at the uint8 latents' size": "jpg", "WebP at the uint8 latents' size": "webp"}


def best_under(img, fmt: str, budget: int) -> bytes:
    """The highest-quality encoding (quality 1..100, binary search) of at most `budget` bytes."""
    lo, hi, best = 1, 100, imaging.encode_image(img, fmt, 1)
    while lo <= hi:
        q = (lo + hi) // 2
        data = imaging.encode_image(img, fmt, q)
        if len(data) <= budget:
            best, lo = data, q + 1
        else:
            hi = q - 1
    return best


def measure(model, files: list[Path], progress: bool = True) -> dict[str, dict]:
    """-> {row label: {"bytes": [...], "psnr": [...], "ssim": [...]}} over `files`."""
    from tqdm.auto import tqdm

    rows: dict[str, dict] = {k: {"bytes": [], "psnr": [], "ssim": [], "pixels": []}
                             for k in [*IMAGE_CODECS, *LATENT_VARIANTS, *MATCHED]}

    def add(label, nbytes, ref, out):
        rows[label]["bytes"].append(nbytes)
        rows[label]["psnr"].append(psnr(ref, out))
        rows[label]["ssim"].append(ssim(ref, out))
        rows[label]["pixels"].append(ref.shape[0] * ref.shape[1])

    base = dict(model=model.name, model_sha256=model.sha256, scaling_factor=model.scaling_factor,
                shift_factor=model.shift_factor)
    for path in tqdm(files, unit="img", disable=not progress, file=sys.stderr):
        img = imaging.open_image(path, max_pixels=1 << 30)
        ref = np.asarray(img)
        for label, (fmt, quality) in IMAGE_CODECS.items():
            # PNG at PIL's default level 6 (the usual lossless baseline; answers use a faster level)
            data = imaging.encode_image(img, fmt, quality or 95, png_level=6)
            add(label, len(data), ref, np.asarray(imaging.open_image(data, max_pixels=1 << 30)))
        z = model.encode(imaging.to_tensor(img))
        size = (img.height, img.width)
        for label, fields in LATENT_VARIANTS.items():
            data = latent_store.encode_record(z, latent_store.StoreOptions(**base, **fields), path.name, size)
            restored, _ = latent_store.decode_record(data)
            add(label, len(data), ref, imaging.to_uint8(model.decode(restored, size))[0].numpy())
        for label, fmt in MATCHED.items():
            data = best_under(img, fmt, rows["VAE latents uint8"]["bytes"][-1])
            add(label, len(data), ref, np.asarray(imaging.open_image(data, max_pixels=1 << 30)))
    return rows


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| format | bytes / image | bits / pixel | PSNR (dB) | SSIM |", "|---|---:|---:|---:|---:|"]
    for label, r in rows.items():
        bpp = 8 * sum(r["bytes"]) / sum(r["pixels"])
        lossless = all(np.isinf(r["psnr"]))
        p = "lossless" if lossless else f"{mean_psnr(r['psnr']):.2f}"
        lines.append(f"| {label} | {np.mean(r['bytes']):,.0f} | {bpp:.3f} | {p} | {np.mean(r['ssim']):.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.codec_table", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers folder or single file")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="image folder (default: ../shared/data/kodak)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=0, help="first N images only")
    p.add_argument("--json", help="also write the per-format means as JSON")
    args = p.parse_args(argv)

    from models.vae.inference import VAEModel

    model = VAEModel.load(Path(args.model).name, args.model, device=args.device)
    files = list_images([args.data])[: args.limit or None]
    started = time.time()
    rows = measure(model, files)
    table = markdown(rows)
    print(f"Model {args.model} (sha256 {model.sha256[:12]}), {len(files)} images from {args.data}, "
          f"{time.time() - started:.0f} s on {args.device} ({torch.get_num_threads()} threads)\n")
    print(table)
    if args.json:
        summary = {label: {"bytes_per_image": float(np.mean(r["bytes"])), "psnr": mean_psnr(r["psnr"]),
                           "ssim": float(np.mean(r["ssim"]))} for label, r in rows.items()}
        Path(args.json).write_text(json.dumps({"model": args.model, "sha256": model.sha256, "images": len(files),
                                               "rows": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
