"""`vae encode` / `vae decode`: whole image collections to latent files and back.

    vae encode photos/ 'more/**/*.jpg' --out latents/ [--latent-dtype float16|bfloat16|float32]
               [--quantize uint8] [--shard-size N] [--server URL | --ray [--address ADDR]]
    vae decode latents/ --out restored/ [--format png|jpg|webp]

Jobs are resumable: outputs are written atomically (temporary name + rename), a rerun skips what
is already there, and a killed run (even `kill -9`) loses at most the work in flight (with shards:
the shard in progress). A bad input is reported in the summary and skipped; the exit status is 1
when anything failed, 2 when the job could not start. The building blocks are in app.bulk.jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from app.bulk import encoders
from app.bulk import jobs as core
from models.vae import imaging
from models.vae import latent_files as latent_store

MULTI_COMMAND = True  # app.cli.main passes the command name: this module serves `encode` and `decode`
LATENT_SUFFIXES = {latent_store.SUFFIX, ".tar"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", metavar="[NAME=]PATH", help="model (diffusers folder or single file); default: the shipped model")
    p.add_argument("--config", help="config folder for a single-file checkpoint")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (in-process model)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model runs in (float16 needs cuda)")
    p.add_argument("--server", metavar="URL", help="use a running `vae serve` instead of an in-process model")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight with --server (default 4)")
    p.add_argument("--retries", type=int, default=5, help="retries on 429/502/503/504 and connection errors")
    p.add_argument("--batch-size", type=int, default=8, help="images per model batch (default 8)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding/reading threads")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--report", metavar="FILE", help="also write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def encode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae encode", description="Encode images (files, folders, globs) into latent files.")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or quoted globs")
    _common(p)
    p.add_argument("--latent-dtype", default="float16", choices=list(latent_store.STORE_DTYPES),
                   help="storage dtype of the latent files (default float16; the model's own dtype is --compute-dtype)")
    p.add_argument("--dtype", dest="deprecated_dtype", choices=list(latent_store.STORE_DTYPES),
                   help=argparse.SUPPRESS)  # the old spelling of --latent-dtype
    p.add_argument("--quantize", choices=["uint8"], help="store uint8 with per-channel scale/offset (0.5 bit/pixel at f8x4)")
    p.add_argument("--scaled", action="store_true", help="store (z - shift) * scaling_factor (diffusion-ready) instead of raw z")
    p.add_argument("--shard-size", type=int, default=0, metavar="N", help="write WebDataset tar shards of N samples")
    p.add_argument("--max-pixels", type=int, default=imaging.DEFAULT_MAX_PIXELS, help="per-image pixel limit")
    p.add_argument("--ray", action="store_true", help="run as a Ray Data job (pip install 'sd-vae-service[ray]')")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--actors", type=int, default=2, help="Ray actors holding a model (default 2)")
    return p


def decode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vae decode", description="Decode latent files (or tar shards) back into images.")
    p.add_argument("latents", nargs="+", help=".safetensors latent files, .tar shards or folders of them")
    _common(p)
    p.add_argument("--format", default="png", choices=["png", "jpg", "webp"], help="image format (default png)")
    p.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality (default 95)")
    return p


def load_model(args):
    """The in-process model named by --model (or the shipped default); raises ModelLoadError."""
    from models.vae.inference import VAEModel
    from models.vae.loading import DEFAULT_MODEL_DIR, ModelLoadError, default_model_spec, parse_model_spec

    spec = args.model or default_model_spec()
    if spec is None:
        raise ModelLoadError(f"no model: name one with --model PATH or --server URL "
                             f"(the shipped default {DEFAULT_MODEL_DIR} is not installed)")
    name, path = parse_model_spec(spec)
    return VAEModel.load(name, path, device=args.device, dtype=args.compute_dtype, config=args.config)


def _progress(total: int, args, unit: str = "img"):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, disable=args.quiet, dynamic_ncols=True, file=sys.stderr, mininterval=0.5)


def _finish(summary: core.Summary, args) -> int:
    print(summary.text(), file=sys.stderr)
    if args.report:
        latent_store.write_atomic(args.report, json.dumps(summary.as_dict(), indent=2).encode())
    return 1 if summary.failures else 0


# --- encode ------------------------------------------------------------------------------------

def _local_outcomes(encoder, batches, options, args):
    load = lambda item: core.load_image(item, args.max_pixels)  # noqa: E731
    # Two batches ahead keeps the model fed without holding many decoded images in memory.
    for loaded in core.iter_loaded(batches, load, args.workers, lookahead=max(2 * args.batch_size, 2 * args.workers)):
        yield from encoders.encode_loaded(encoder, loaded, options)


def encode_main(argv: list[str]) -> int:
    args = encode_parser().parse_args(argv)
    if args.deprecated_dtype:
        print("vae encode: --dtype is deprecated, use --latent-dtype (the storage dtype of the latents)", file=sys.stderr)
        args.latent_dtype = args.deprecated_dtype
    if args.shard_size and args.overwrite:
        print("vae encode: error: --overwrite does not apply to shards: use a new --out", file=sys.stderr)
        return 2
    if args.ray and args.server:
        print("vae encode: error: --ray runs the model on Ray actors; it excludes --server", file=sys.stderr)
        return 2
    items, problems = core.collect_inputs(args.inputs)
    summary = core.Summary("encode", total=len(items) + len(problems))
    for label, reason in problems:
        summary.fail(label, reason)
    from models.vae.loading import ModelLoadError

    try:
        if args.server:
            encoder = encoders.RemoteEncoder(args.server, concurrency=args.concurrency, retries=args.retries)
            multiple = int(encoder.info()["downsample_factor"])
        else:
            encoder = encoders.LocalEncoder(load_model(args))
            multiple = encoder.model.downsample_factor
        facts = encoder.store_facts()
    except (ModelLoadError, OSError, RuntimeError) as exc:  # requests errors are OSErrors
        print(f"vae encode: error: {exc}", file=sys.stderr)
        return 2
    options = latent_store.StoreOptions(**facts, dtype=args.latent_dtype, quantize=args.quantize, scaled=args.scaled)
    sink = core.ShardSink(args.out, args.shard_size) if args.shard_size else core.FileSink(args.out, options)
    todo = [item for item in items if args.overwrite or not sink.is_done(item)]
    summary.skipped = len(items) - len(todo)
    batches, unreadable = core.plan_batches(todo, args.batch_size, multiple, args.workers)
    bar = _progress(len(todo), args)
    summary.restart_clock()  # images/s measures the work, not the model loading
    try:
        outcomes = list(unreadable)
        if args.ray:
            from app.bulk import ray_jobs as bulk_ray

            stream = bulk_ray.encode(batches, options, args)
        else:
            stream = _local_outcomes(encoder, batches, options, args)
        for outcome in _chain(outcomes, stream):
            if outcome.error is not None:
                summary.fail(outcome.item.path, outcome.error)
            else:
                summary.bytes_out += sink.write(outcome.item, outcome.payload)
                summary.bytes_in += outcome.item.nbytes
                summary.done += 1
            bar.update(1)
            bar.set_postfix(failed=len(summary.failures), refresh=False)
    finally:
        sink.close()  # with shards: the shard in progress is finished, not lost
        bar.close()
        if isinstance(encoder, encoders.RemoteEncoder):
            encoder.close()
    return _finish(summary, args)


def _chain(first, second):
    yield from first
    yield from second


# --- decode ------------------------------------------------------------------------------------

def iter_records(inputs: list[str], summary: core.Summary):
    """Yield (label, latent file bytes) from files, tar shards and folders of them."""
    files, problems = core.collect_inputs(inputs, suffixes=LATENT_SUFFIXES)
    for label, reason in problems:
        summary.fail(label, reason)
    for item in files:
        if item.path.endswith(".tar"):
            try:
                for name, data in latent_store.iter_shard(item.path):
                    yield f"{item.path}:{name}", data
            except Exception as exc:  # tarfile.ReadError, OSError: a damaged shard
                summary.fail(item.path, f"cannot read shard: {exc}")
        else:
            try:
                data = Path(item.path).read_bytes()
            except OSError as exc:
                summary.fail(item.path, f"cannot read file: {exc}")
                continue
            yield item.path, data


class _LocalDecoder:
    def __init__(self, model):
        self.model = model

    def decode(self, latents: list[torch.Tensor]) -> list[torch.Tensor | str]:
        """Raw latents (1, C, h, w) of one shape -> uint8 (1, H, W, 3) each."""
        try:
            images = imaging.to_uint8(self.model.decode(torch.cat(latents)))
        except Exception as exc:  # e.g. out of memory: this batch fails, the job goes on
            return [f"model: {type(exc).__name__}: {exc}"] * len(latents)
        return [images[i : i + 1] for i in range(len(latents))]


def decode_main(argv: list[str]) -> int:
    args = decode_parser().parse_args(argv)
    summary = core.Summary("decode")
    from models.vae.loading import ModelLoadError

    try:
        if args.server:
            decoder = encoders.RemoteEncoder(args.server, concurrency=args.concurrency, retries=args.retries)
            sha = decoder.info()["sha256"]
        else:
            decoder = _LocalDecoder(load_model(args))
            sha = decoder.model.sha256
    except (ModelLoadError, OSError, RuntimeError) as exc:
        print(f"vae decode: error: {exc}", file=sys.stderr)
        return 2
    out, ext = Path(args.out), {"png": ".png", "jpg": ".jpg", "webp": ".webp"}[args.format]
    out.mkdir(parents=True, exist_ok=True)
    latent_store.remove_partials(out)
    bar = _progress(None, args)
    claimed: dict[Path, str] = {}
    pending: dict[tuple, list] = {}  # latent shape -> [(label, z, meta, target, nbytes)]
    other_model = 0
    summary.restart_clock()

    def flush(key):
        batch = pending.pop(key)
        for (label, _, meta, target, nbytes), img in zip(batch, decoder.decode([b[1] for b in batch])):
            if isinstance(img, str):
                summary.fail(label, img)
            else:
                h, w = meta["original_size"]
                pil = imaging.to_pil(img[:, :h, :w])[0]
                data = imaging.encode_image(pil, args.format, args.quality)
                latent_store.write_atomic(target, data)
                summary.done += 1
                summary.bytes_in += nbytes
                summary.bytes_out += len(data)
            bar.update(1)

    try:
        for label, data in iter_records(args.latents, summary):
            summary.total += 1
            try:
                z, meta = latent_store.decode_record(data)
            except latent_store.LatentFormatError as exc:
                summary.fail(label, str(exc))
                bar.update(1)
                continue
            source = Path(str(meta.get("source", "")))
            if not source.name or source.is_absolute() or ".." in source.parts:  # never write outside --out
                summary.fail(label, f"unsafe or missing source path {meta.get('source')!r} in metadata")
                bar.update(1)
                continue
            target = out / source.with_suffix(ext)
            if target in claimed:
                summary.fail(label, f"decodes to {target}, as {claimed[target]} does")
                continue
            claimed[target] = label
            if target.exists() and not args.overwrite:
                summary.skipped += 1
                bar.update(1)
                continue
            other_model += meta.get("model_sha256") != sha
            key = tuple(z.shape)
            pending.setdefault(key, []).append((label, z, meta, target, len(data)))
            if len(pending[key]) >= args.batch_size:
                flush(key)
        for key in list(pending):
            flush(key)
    finally:
        bar.close()
        if isinstance(decoder, encoders.RemoteEncoder):
            decoder.close()
    if other_model:
        print(f"vae decode: warning: {other_model} latent files were encoded by another model "
              "(different weights sha256): their images will not match", file=sys.stderr)
    return _finish(summary, args)


def main(command: str, argv: list[str]) -> int:
    if command == "encode":
        return encode_main(argv)
    if command == "decode":
        return decode_main(argv)
    print(f"vae: unknown command {command!r}", file=sys.stderr)
    return 2
