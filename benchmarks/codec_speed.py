"""Image codec cost per size: encode and decode milliseconds and bytes of each answer format.

    python -m benchmarks.codec_speed                      # 256 512 1024 2048, 5 repetitions
    python -m benchmarks.codec_speed --sizes 256 --reps 20

Why: the codec is the part of a request that is not the model. This measures what the service
actually runs (models.vae.imaging.encode_image / open_image; Pillow, whose JPEG is libjpeg-turbo
and whose PNG uses zlib) on a vendored photograph resized to each size, so the choice of PNG level
and the question "is a faster JPEG binding worth a dependency" are answered by figures. Medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

from PIL import features

from benchmarks.harness.images import photo
from models.vae import imaging

FORMATS = {  # label -> encode_image arguments
    "PNG level 1 (answers)": dict(fmt="png", png_level=1),
    "PNG level 6 (Pillow default)": dict(fmt="png", png_level=6),
    "JPEG q95": dict(fmt="jpeg", quality=95),
    "WebP q95": dict(fmt="webp", quality=95),
}


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.codec_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    print(f"Pillow: libjpeg-turbo {features.check_feature('libjpeg_turbo')} (jpeg {features.version('jpg')}), "
          f"webp {features.version('webp')}, zlib {features.version('zlib')}")
    print("| size | format | encode ms | decode ms | bytes |\n|---|---|---|---|---|")
    for size in args.sizes:
        img = photo(size)
        for label, kw in FORMATS.items():
            data = imaging.encode_image(img, **kw)
            enc = median_ms(lambda: imaging.encode_image(img, **kw), args.reps)
            dec = median_ms(lambda: imaging.open_image(data, max_pixels=1 << 30).load(), args.reps)
            print(f"| {size} | {label} | {enc:.1f} | {dec:.1f} | {len(data):,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
