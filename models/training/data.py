"""Training data: folders of images -> random RGB crops in [-1, 1].

The stream is a pure function of (seed, sample number): sample k picks its file from a
per-epoch permutation and its augmentation from `default_rng([seed, k])`. Resuming at step s
therefore needs no sampler state (start at sample s * samples_per_step), worker count does not
change the data, and each accelerate process reads its own disjoint slice.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from models.vae.imaging import ALLOWED_FORMATS, ImageError, open_image, resize_center_crop, resize_short_side

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# Local training files are trusted to be large, not to be well formed: a header claiming more pixels
# than this (a decompression bomb, or a damaged header) is skipped. PIL itself refuses above ~179M.
MAX_TRAIN_PIXELS = 128 * 1024 * 1024


def warn_skip(path, reason: str) -> None:
    """One line on stderr naming a skipped image and why (training goes on without it)."""
    print(f"vae train: warning: skipping {path}: {reason}", file=sys.stderr, flush=True)


def list_images(folders) -> list[Path]:
    """All JPEG / PNG / WebP files under the folders (recursive), sorted for reproducibility."""
    files: list[Path] = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_file():
            files.append(folder)
            continue
        if not folder.is_dir():
            raise FileNotFoundError(f"no such image folder: {folder}")
        files += [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(set(files))


def image_problem(path: Path, max_pixels: int = MAX_TRAIN_PIXELS) -> str | None:
    """Why `path` cannot be a training image, judged from its header (nothing is decoded), or None."""
    try:
        with Image.open(path) as im:
            fmt, (width, height) = im.format, im.size
    except Image.DecompressionBombError as exc:
        return f"image too large: {exc}"
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError, ...: not an image we can read
        return f"not a readable image: {' '.join(str(exc).split()) or type(exc).__name__}"
    if fmt not in ALLOWED_FORMATS:
        return f"unsupported format {fmt}: expected PNG, JPEG or WebP"
    if width * height > max_pixels:
        return f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}"
    return None


def usable_images(files, workers: int = 8) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split files into (usable, [(file, reason)]) by their headers, in the given order."""
    files = list(files)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(image_problem, files))
    good = [f for f, why in zip(files, problems) if why is None]
    return good, [(f, why) for f, why in zip(files, problems) if why is not None]


def load_rgb(path: Path, max_short_side: int | None = None) -> Image.Image:
    """Decode to 8-bit RGB (models.vae.imaging: EXIF orientation, greyscale / CMYK / alpha handled) and
    optionally downsize once so the short side is at most `max_short_side` (bounds per-crop work).
    Raises ImageError (or OSError) for a file that cannot be decoded."""
    im = open_image(path, max_pixels=MAX_TRAIN_PIXELS)
    if max_short_side and min(im.size) > max_short_side:
        im = resize_short_side(im, max_short_side)
    return im


def to_signed_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 CHW in [-1, 1]."""
    array = np.array(im, dtype=np.uint8)  # a writable copy for torch.from_numpy
    return torch.from_numpy(array).permute(2, 0, 1).float().div(127.5).sub(1.0)


class RandomCrops(Dataset):
    """Item k is a random crop of one of the images, fully determined by (seed, k).

    Augmentation: the short side is resized to a random size in [crop, crop * max_zoom] (capped
    at the image's own short side, never upsampled past it unless the image is smaller than the
    crop), then a random crop and a random horizontal flip. With `colour_aug` > 0, that share of the
    crops also has its colours turned about the grey axis and its saturation scaled
    (`recolour`): photographs hold few saturated greens and purples, so every hue becomes as common
    as the orange-blue of daylight (an experiment against the default model's green loss; it did not
    cure it in a few hundred steps: models/default/README.md, "v3 campaign").

    With `sizes`, each optimiser step draws its crop side from them (`step_crop`, a pure function of
    (seed, step); item k belongs to step k // samples_per_step): GroupNorm and the mid-block attention
    take statistics over the whole image, so a model that only ever saw one side learns that side's
    statistics and shifts colour at others (the default model at Kodak's 768x512, trained at 256).

    A file that fails to decode (truncated after a good header, say) is named once on stderr and
    replaced by the next file in the list that decodes: whether a file decodes does not depend on
    when it is read, so the stream stays a pure function of (seed, k) and `--resume` sees it too.
    """

    def __init__(self, files, crop: int = 256, max_zoom: float = 2.0, seed: int = 0, cache: bool = True,
                 colour_aug: float = 0.0, sizes: tuple[int, ...] = (), samples_per_step: int = 1):
        self.files = list(files)
        if not self.files:
            raise ValueError("no training images found")
        self.crop, self.max_zoom, self.seed, self.cache = crop, max_zoom, seed, cache
        self.sizes, self.samples_per_step = tuple(sizes), samples_per_step
        self._max_short_side = int(max((crop, *self.sizes)) * max_zoom)  # what the largest crop may need
        self.colour_aug = colour_aug
        self._cache: dict[int, Image.Image] = {}  # per worker; decoded once, downsized
        self._bad: dict[int, str] = {}  # per worker: files that failed to decode, and why

    def __len__(self) -> int:  # nominal: the stream is endless, the sampler decides
        return 1 << 62

    def _image(self, index: int) -> Image.Image:
        im = self._cache.get(index)
        if im is None:
            im = load_rgb(self.files[index], max_short_side=self._max_short_side)
            if self.cache:
                self._cache[index] = im
        return im

    def _usable(self, index: int) -> Image.Image | None:
        if index in self._bad:
            return None
        try:
            return self._image(index)
        except (ImageError, OSError) as exc:
            self._bad[index] = str(exc)
            warn_skip(self.files[index], str(exc))
            return None

    def file_index(self, k: int) -> int:
        n = len(self.files)
        epoch, pos = divmod(k, n)
        return int(np.random.default_rng([self.seed, epoch]).permutation(n)[pos])

    def step_crop(self, step: int) -> int:
        """The crop side of optimiser step `step`: `crop`, or one of `sizes` drawn uniformly."""
        if not self.sizes:
            return self.crop
        return self.sizes[int(np.random.default_rng([self.seed, 2, step]).integers(len(self.sizes)))]

    def __getitem__(self, k: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, 1, k])
        crop = self.step_crop(k // self.samples_per_step)
        first, n = self.file_index(k), len(self.files)
        for offset in range(n):
            im = self._usable((first + offset) % n)
            if im is not None:
                break
        else:
            raise RuntimeError(f"none of the {n} training images can be decoded")
        short = min(im.size)
        hi = max(crop, min(short, int(crop * self.max_zoom)))
        target = int(rng.integers(crop, hi + 1))
        if target != short:
            im = resize_short_side(im, target)
        left = int(rng.integers(0, im.width - crop + 1))
        top = int(rng.integers(0, im.height - crop + 1))
        im = im.crop((left, top, left + crop, top + crop))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = to_signed_tensor(im)
        if self.colour_aug and rng.random() < self.colour_aug:
            x = recolour(x, hue=float(rng.uniform(0, 2 * math.pi)), saturation=float(rng.uniform(*SATURATION_RANGE)))
        return x


def batch_for_side(batch_size: int, crop: int, side: int) -> int:
    """How many of a step's `batch_size` crops of side `side` to train on: pixels per step stay
    near batch_size x crop^2 (so a step costs about the same at every side), and at least one."""
    return max(1, round(batch_size * (crop / side) ** 2))


# Saturation scale of a recoloured crop: mostly more saturated (the colours the decoder loses).
SATURATION_RANGE = (0.8, 1.8)


def recolour(x: torch.Tensor, hue: float, saturation: float) -> torch.Tensor:
    """(3, H, W) in [-1, 1] with its chroma turned `hue` radians about the grey axis and scaled by
    `saturation`, clipped back to [-1, 1]. Each pixel's grey level (mean of R, G, B) is kept before
    the clip: brightness stays, only the colour moves."""
    axis = torch.full((3,), 1 / math.sqrt(3))
    grey = x.mean(0, keepdim=True)
    chroma = x - grey
    # Rodrigues' rotation about the grey axis; chroma is orthogonal to it, so the term along it drops.
    cross = torch.linalg.cross(axis.view(3, 1, 1).expand_as(chroma), chroma, dim=0)
    turned = chroma * math.cos(hue) + cross * math.sin(hue)
    return (grey + saturation * turned).clamp(-1, 1)


class StreamSampler(Sampler):
    """Yields sample numbers start, start+1, ... for this process's shard of each global batch."""

    def __init__(self, start_sample: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start, self.batch_size, self.rank, self.world = start_sample, batch_size, rank, world_size

    def __iter__(self):
        k = self.start
        while True:
            base = k + self.rank * self.batch_size
            yield from range(base, base + self.batch_size)
            k += self.batch_size * self.world

    def __len__(self) -> int:
        return 1 << 62


def center_crops(files, size: int) -> torch.Tensor | None:
    """Deterministic validation batch: short side resized to `size`, centre crop. (N, 3, size, size);
    files that fail to decode are named on stderr and left out (None when none is left)."""
    out = []
    for path in files:
        try:
            out.append(to_signed_tensor(resize_center_crop(load_rgb(path), size)))
        except (ImageError, OSError) as exc:
            warn_skip(path, str(exc))
    return torch.stack(out) if out else None
