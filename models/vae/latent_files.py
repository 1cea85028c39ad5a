"""The latent file format: one safetensors file per image, or WebDataset tar shards of them.

A latent file holds one tensor `latents` of shape (1, C, h, w) — 4-D so a float file can be POSTed
unchanged to `/decode` as `application/x-safetensors` — and string metadata:

  format          "sd-vae-latents/1"
  source          the image's path relative to its input root (decode restores it)
  original_size   JSON [H, W] before padding to the downsample factor (decode crops back to it)
  model, model_sha256, scaling_factor, shift_factor   the encoder (factors: JSON number or null)
  scaled          "true": stored as (z - shift) * scale (diffusion-ready); "false": raw latents
  dtype           storage dtype: float32 | float16 | bfloat16 | uint8
  quant_scale, quant_offset   uint8 only: JSON per-channel lists, z = q * scale + offset

Shards are plain POSIX tar files `shard-NNNNNN.tar` (WebDataset layout: member `<key>.safetensors`)
written by the stdlib `tarfile` with fixed mtime/owner, so equal inputs give byte-identical shards.
Every file (latent file, shard, image) is written to a temporary name and renamed: a reader or
a restarted job never sees a half-written file.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from models.vae import latents
from models.vae.latents import LatentInfo, LatentMetadataError, quantize_uint8

FORMAT = "sd-vae-latents/1"
SUFFIX = ".safetensors"
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_PATTERN = re.compile(r"shard-(\d{6})\.tar$")
PARTIAL = ".partial"


class LatentFormatError(ValueError):
    """A file that is not a latent file of this format (or is damaged)."""


@dataclass(frozen=True)
class StoreOptions:
    """How latents are stored, plus the encoder facts every file records. Picklable (sent to Ray)."""

    model: str
    model_sha256: str
    scaling_factor: float | None
    shift_factor: float | None
    dtype: str = "float16"  # storage dtype of float latents
    quantize: str | None = None  # None | "uint8"
    scaled: bool = False
    latents_mean: tuple[float, ...] | None = None  # per-channel statistics, where the config defines them
    latents_std: tuple[float, ...] | None = None
    colour_lock: int = 0  # colour-lock steps of the encode (models/vae/colour_lock.py), recorded when > 0

    def __post_init__(self):
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"unknown latent dtype {self.dtype!r}: use {', '.join(STORE_DTYPES)}")
        if self.quantize not in (None, "uint8"):
            raise ValueError(f"unknown quantisation {self.quantize!r}: only uint8")

    @property
    def stored_dtype(self) -> str:
        return "uint8" if self.quantize else self.dtype


def encode_record(z: torch.Tensor, options: StoreOptions, source: str, original_size: tuple[int, int]) -> bytes:
    """Raw latents (1, C, h, w) or (C, h, w) of one image -> the bytes of a latent file."""
    z = z.detach().float().cpu()
    z = z[None] if z.ndim == 3 else z
    if options.scaled:
        z = latents.scale(z, options.scaling_factor, options.shift_factor, options.latents_mean, options.latents_std)
    info = LatentInfo(options.scaling_factor, options.shift_factor, options.scaled,
                      (int(original_size[0]), int(original_size[1])),
                      latents_mean=options.latents_mean, latents_std=options.latents_std)
    if options.quantize == "uint8":
        stored, step, offset = quantize_uint8(z)
        info = LatentInfo(**{**info.__dict__, "quant_scale": step, "quant_offset": offset})
    else:
        stored = z.to(STORE_DTYPES[options.dtype])
    meta = {"format": FORMAT, "source": source, "model": options.model, "model_sha256": options.model_sha256,
            "dtype": options.stored_dtype, **{k: json.dumps(v) for k, v in info.to_metadata().items()}}
    if options.colour_lock:
        meta["colour_lock"] = str(options.colour_lock)
    return save_safetensors("latents", stored, meta)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}


def save_safetensors(name: str, tensor: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """One tensor -> safetensors bytes with a sorted header.

    `safetensors.torch.save` orders metadata by a per-process hash, so two processes (say, the
    local path and a Ray actor) would write different bytes for the same content. The layout is
    the documented one: u64 header length, JSON header padded to 8 bytes, little-endian data.
    """
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    header = {
        "__metadata__": dict(sorted(metadata.items())),
        name: {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [0, len(data)]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (reads only the header)."""
    if len(data) < 8:
        raise LatentFormatError("not a safetensors file: too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100_000_000:
        raise LatentFormatError("not a safetensors file: bad header length")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as exc:
        raise LatentFormatError(f"not a safetensors file: {exc}") from None
    return header.get("__metadata__") or {}


def read_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a latent file on disk without reading its tensor (cheap resume checks)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LatentFormatError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        return header_metadata(head + f.read(min(n, 100_000_000)))


def decode_record(data: bytes) -> tuple[torch.Tensor, dict]:
    """Latent file bytes -> (raw float32 latents (1, C, h, w), metadata: the file's strings, with the
    contract's keys (models.vae.latents) replaced by their parsed values).

    Undoes quantisation and scaling, so the result always feeds `VAEModel.decode` directly.
    """
    import safetensors.torch

    meta = header_metadata(data)
    if meta.get("format") != FORMAT:
        raise LatentFormatError(f"not an {FORMAT} file (format={_short(meta.get('format'))})")
    try:
        info = LatentInfo.from_metadata(meta)
        if info.original_size is None:
            raise LatentMetadataError("metadata `original_size` is missing")
        stored = safetensors.torch.load(data)["latents"]
        if stored.ndim != 4 or stored.shape[0] != 1:
            raise LatentMetadataError(f"`latents` must be (1, C, h, w), got {list(stored.shape)}")
        z = info.to_raw(stored)
    except Exception as exc:  # SafetensorError, KeyError, LatentMetadataError: all mean a damaged file
        raise LatentFormatError(f"damaged latent file: {exc}".replace("\n", " ")) from None
    parsed = {k: list(v) if isinstance(v, tuple) else v for k, v in info.__dict__.items() if v is not None}
    return z, {**meta, **parsed}


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- atomic files -----------------------------------------------------------------------------

def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling + fsync + rename (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_partials(root: str | Path) -> int:
    """Delete temporary files a killed run left under `root`; returns how many."""
    count = 0
    for tmp in Path(root).rglob(f"*{PARTIAL}"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count


def latent_path(out: str | Path, source: str) -> Path:
    """`<out>/<relative source path>.safetensors` (the image suffix is kept: a.png and a.jpg differ)."""
    return Path(out) / (source + SUFFIX)


# --- WebDataset shards --------------------------------------------------------------------------

def sample_key(source: str) -> str:
    """WebDataset key of a source path: no dots (WebDataset splits a member name at the first dot).

    `.` becomes `_`; `_` and `~` are escaped as `~_` and `~~`, so two paths never share a key
    (`a.b.png` -> `a_b_png`, `a_b.png` -> `a~_b_png`) and paths without `_` or `~` keep the key
    earlier versions gave them.
    """
    return "".join(_KEY_ESCAPES.get(c, c) for c in source)


_KEY_ESCAPES = {"~": "~~", "_": "~_", ".": "_"}


def check_source(source: str) -> str:
    """`source` if it can name a file in metadata and on disk (valid UTF-8, no NUL); else ValueError."""
    if "\x00" in source:
        raise ValueError(f"path {_short(source)} holds a NUL byte")
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        shown = source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ValueError(f"file name {shown!r} is not valid UTF-8 (latent metadata is UTF-8): rename the file") from None
    return source


def shard_members(path: str | Path) -> list[str]:
    with tarfile.open(path, "r") as tar:
        return [m.name for m in tar.getmembers() if m.isfile()]


def shard_sources(path: str | Path) -> set[str]:
    """The `source` metadata of the readable latent files in a shard (reads only their headers)."""
    sources = set()
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(SUFFIX)):
                continue
            f = tar.extractfile(member)
            head = f.read(8)
            try:
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                meta = header_metadata(head + f.read(min(n, 100_000_000)))
            except LatentFormatError:
                continue  # damaged member: not done
            if isinstance(meta.get("source"), str):
                sources.add(meta["source"])
    return sources


def iter_shard(path: str | Path):
    """Yield (member name, bytes) of the latent files in a shard, in order."""
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(SUFFIX):
                yield member.name, tar.extractfile(member).read()


class ShardWriter:
    """Append samples to `shard-NNNNNN.tar` files of `shard_size` samples each.

    A shard is written as `<name>.partial` and renamed when full (or on `close`), so finished shards
    are immutable and a killed run loses only the shard in progress, which a rerun redoes.
    Numbering continues after the highest existing shard.
    """

    def __init__(self, out: str | Path, shard_size: int):
        if shard_size < 1:
            raise ValueError("shard size must be at least 1")
        self.out, self.shard_size = Path(out), shard_size
        self.out.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for p in self.out.iterdir() if (m := SHARD_PATTERN.match(p.name))]
        self.next_index = max(numbers, default=-1) + 1
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._count = 0
        self.bytes_written = 0

    def done_keys(self) -> set[str]:
        """Keys already in finished shards."""
        keys = set()
        for p in sorted(self.out.iterdir()):
            if SHARD_PATTERN.match(p.name):
                keys.update(name[: -len(SUFFIX)] for name in shard_members(p) if name.endswith(SUFFIX))
        return keys

    def done_sources(self) -> set[str]:
        """Source paths already in finished shards (what a resumed run skips): by the metadata, not the
        key, so shards from versions whose keys could collide are read right."""
        sources: set[str] = set()
        for p in sorted(self.out.iterdir()):
            if SHARD_PATTERN.match(p.name):
                sources |= shard_sources(p)
        return sources

    def _final_path(self) -> Path:
        return self.out / f"shard-{self.next_index:06d}.tar"

    def add(self, key: str, data: bytes) -> None:
        if self._tar is None:
            self._file = open(self._final_path().with_name(self._final_path().name + PARTIAL), "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w")  # PAX: long and non-ASCII names
        info = tarfile.TarInfo(key + SUFFIX)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed fields: reproducible bytes
        self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._final_path()
        os.replace(final.with_name(final.name + PARTIAL), final)
        self.bytes_written += final.stat().st_size
        self._tar, self._file, self._count = None, None, 0
        self.next_index += 1

    def close(self) -> None:
        """Finish the shard in progress (a short last shard)."""
        self._finish()
