"""Building blocks of `vae encode` / `vae decode`, shared by the local, `--server` and Ray paths.

Flow of an encode job: `collect_inputs` (files, folders, globs -> Items with relative paths) ->
skip what the sink already holds -> `plan_batches` (image headers -> size buckets -> batches) ->
`iter_loaded` (parallel image decoding, in order) -> an encoder (in-process model or HTTP
client) -> `encode_loaded` (latent file bytes) -> a sink (one file per image, or tar shards).
The plan is a pure function of the to-do list, so the Ray path, which runs the same batches on
actors, produces byte-identical files.
"""

from __future__ import annotations

import errno
import glob
import json
import math
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.vae import imaging
from models.vae import latent_files as latent_store
from models.training.data import IMAGE_SUFFIXES

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Item:
    path: str  # the file to read
    rel: str  # POSIX path relative to its input root: names the output
    nbytes: int = 0
    hw: tuple[int, int] | None = None  # oriented (H, W) from the header, once planned


@dataclass
class Outcome:
    item: Item
    payload: bytes | None = None
    error: str | None = None


# --- inputs ------------------------------------------------------------------------------------

def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: relative paths start there."""
    fixed = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def display(path) -> str:
    """A path as text that prints anywhere (bytes of a non-UTF-8 name shown as \\xNN)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def collect_inputs(inputs: list[str], suffixes=IMAGE_SUFFIXES,
                   check_names: bool = False) -> tuple[list[Item], list[tuple[str, str]]]:
    """Files, folders (recursive, by suffix) and globs -> (Items, [(input, reason)] for bad inputs).

    Relative paths: a folder's files relative to the folder, a glob's matches relative to the folder
    before its first wildcard, a plain file by its name. Two inputs with the same relative path
    would overwrite each other's output, so the second is reported instead. With `check_names`,
    a relative path that cannot be recorded as a latent file's `source` (not UTF-8) is reported.
    """
    items: list[Item] = []
    problems: list[tuple[str, str]] = []
    seen: dict[str, str] = {}

    def add(path: Path, rel: Path) -> None:
        key = rel.as_posix()
        if check_names:
            try:
                latent_store.check_source(key)
            except ValueError as exc:
                problems.append((display(path), str(exc)))
                return
        if key in seen:
            problems.append((str(path), f"same relative path {key!r} as {seen[key]}"))
            return
        seen[key] = str(path)
        items.append(Item(str(path), key, path.stat().st_size))

    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
                add(f, f.relative_to(path))
        elif path.is_file():
            add(path, Path(path.name))
        elif glob.has_magic(raw):
            root = _glob_root(raw)
            matches = sorted(Path(m) for m in glob.glob(raw, recursive=True) if Path(m).is_file())
            if not matches:
                problems.append((raw, "pattern matches no file"))
            for f in matches:
                add(f, f.relative_to(root))
        else:
            problems.append((raw, "no such file or folder"))
    return items, problems


# --- planning and loading ----------------------------------------------------------------------

def probe_size(path: str) -> tuple[int, int]:
    """(H, W) after EXIF orientation, from the header only (nothing is decoded)."""
    with Image.open(path) as img:
        w, h = img.size
        if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
    return h, w


def bucket_of(hw: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Padded size: images of one bucket share a model batch after padding."""
    return (math.ceil(hw[0] / multiple) * multiple, math.ceil(hw[1] / multiple) * multiple)


def plan_batches(
    items: list[Item], batch_size: int, multiple: int, workers: int = 4
) -> tuple[list[list[Item]], list[Outcome]]:
    """Group items by size bucket (headers read in parallel) into batches of at most `batch_size`.

    Deterministic: buckets in size order, items in input order within a bucket.
    """

    def probe(item: Item):
        try:
            return probe_size(item.path)
        except Exception as exc:  # any unreadable header: report, never stop the job
            return f"cannot read image header: {exc}"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        sizes = list(pool.map(probe, items))
    buckets: dict[tuple[int, int], list[Item]] = {}
    failures = []
    for item, hw in zip(items, sizes):
        if isinstance(hw, str):
            failures.append(Outcome(item, error=hw))
            continue
        buckets.setdefault(bucket_of(hw, multiple), []).append(Item(item.path, item.rel, item.nbytes, hw))
    batches = [
        group[i : i + batch_size] for key in sorted(buckets) for group in [buckets[key]]
        for i in range(0, len(group), batch_size)
    ]
    return batches, failures


@dataclass
class Loaded:
    item: Item
    image: Image.Image | None = None  # 8-bit RGB
    data: bytes = b""  # the file as read (sent as is by the HTTP client)
    error: str | None = None


def load_image(item: Item, max_pixels: int = imaging.DEFAULT_MAX_PIXELS) -> Loaded:
    try:
        data = Path(item.path).read_bytes()
        return Loaded(item, imaging.open_image(data, max_pixels=max_pixels), data)
    except imaging.ImageError as exc:
        return Loaded(item, error=exc.message)
    except OSError as exc:
        return Loaded(item, error=f"cannot read file: {exc}")


def iter_loaded(batches: list[list[Item]], load, workers: int, lookahead: int = 64):
    """Yield each batch as a list of `load(item)` results, loading up to `lookahead` items ahead in threads.

    PIL releases the GIL while decoding, so threads decode images in parallel with the model.
    """
    flat = [(b, item) for b, batch in enumerate(batches) for item in batch]
    pending: deque = deque()
    current, current_index = [], 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        it = iter(flat)
        for b, item in it:
            pending.append((b, pool.submit(load, item)))
            if len(pending) >= lookahead:
                break
        while pending:
            b, future = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(load, nxt[1])))
            if b != current_index:
                yield current
                current, current_index = [], b
            current.append(future.result())
        if current:
            yield current


# --- sinks -------------------------------------------------------------------------------------

class FileSink:
    """One `<rel>.safetensors` per image. Done = exists and was made with the same model and storage."""

    def __init__(self, out: str | Path, options: latent_store.StoreOptions | None = None):
        self.out, self.options = Path(out), options
        self.out.mkdir(parents=True, exist_ok=True)
        latent_store.remove_partials(self.out)

    def is_done(self, item: Item) -> bool:
        path = latent_store.latent_path(self.out, item.rel)
        if not path.is_file():
            return False
        try:
            meta = latent_store.read_metadata(path)
        except (OSError, latent_store.LatentFormatError):
            return False  # damaged by something else: redo it
        o = self.options
        return o is None or (meta.get("model_sha256") == o.model_sha256 and meta.get("dtype") == o.stored_dtype
                             and meta.get("scaled") == json.dumps(o.scaled)
                             and int(meta.get("colour_lock", "0")) == o.colour_lock)

    def write(self, item: Item, payload: bytes) -> int:
        """Raises OSError when this one file cannot be written (the job may go on)."""
        latent_store.write_atomic(latent_store.latent_path(self.out, item.rel), payload)
        return len(payload)

    def close(self) -> None:
        pass


class ShardSink:
    """WebDataset tar shards of `shard_size` samples. Done = a finished shard holds a latent file of
    this source (by its metadata: keys of older versions could collide)."""

    def __init__(self, out: str | Path, shard_size: int):
        if Path(out).is_dir():
            latent_store.remove_partials(out)
        self.writer = latent_store.ShardWriter(out, shard_size)
        self.done = self.writer.done_sources()

    def is_done(self, item: Item) -> bool:
        return item.rel in self.done

    def write(self, item: Item, payload: bytes) -> int:
        self.writer.add(latent_store.sample_key(item.rel), payload)
        return len(payload)

    def close(self) -> None:
        self.writer.close()


def check_writable(folder: str | Path) -> None:
    """Create `folder` if needed and prove a file can be written in it; OSError naming it if not.

    Run before any model is loaded, so an unwritable --out costs nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write in {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vae-write-check.", suffix=latent_store.PARTIAL):
            pass
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write in {folder}: {exc.strerror or exc}") from None


# --- summary -----------------------------------------------------------------------------------

@dataclass
class Summary:
    """What a job did. `bytes_in`/`bytes_out`: sizes of the inputs and outputs of this run's work."""

    action: str
    total: int = 0
    done: int = 0
    skipped: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def restart_clock(self) -> None:
        self.started = time.monotonic()

    def fail(self, label: str, reason: str) -> None:
        self.failures.append((label, reason))

    def as_dict(self) -> dict:
        seconds = time.monotonic() - self.started
        return {
            "action": self.action, "total": self.total, "done": self.done, "skipped": self.skipped,
            "failed": len(self.failures), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "ratio": round(self.bytes_in / self.bytes_out, 3) if self.bytes_out else None,
            "seconds": round(seconds, 2), "images_per_second": round(self.done / seconds, 2) if seconds else None,
            "failures": [{"input": label, "reason": reason} for label, reason in self.failures],
        }

    def text(self) -> str:
        d = self.as_dict()
        ratio = f"{d['ratio']:.1f}x" if d["ratio"] else "-"
        lines = [
            f"vae {self.action}: {d['done']} done, {d['skipped']} already done (skipped), {d['failed']} failed "
            f"of {d['total']} in {d['seconds']:.1f} s ({d['images_per_second'] or 0:.1f} images/s)",
            f"  bytes in {d['bytes_in']:,}  bytes out {d['bytes_out']:,}  ratio in/out {ratio}",
        ]
        lines += [f"  FAILED {label}: {reason}" for label, reason in self.failures]
        return "\n".join(lines)


def crop_uint8(images: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """uint8 (1, H', W', 3) -> (H, W, 3) numpy, the top-left crop to the original `size`."""
    return images[0, : size[0], : size[1]].numpy()
