"""`vae encode` / `vae decode`: whole image collections to latent files and back.

    vae encode photos/ 'more/**/*.jpg' --out latents/ [--latent-dtype float16|bfloat16|float32]
               [--quantize uint8] [--shard-size N] [--server URL | --ray [--address ADDR]]
    vae decode latents/ --out restored/ [--format png|jpg|webp]

Jobs are resumable: outputs are written atomically (temporary name + rename), a rerun skips what
is already there, and a killed run (even `kill -9`) loses at most the work in flight (with shards:
the shard in progress). A bad input is reported in the summary and skipped; the exit status is 1
when anything failed, 2 when the job could not start (a bad option, no model, an unwritable --out:
one line, checked before the model loads), 130 on Ctrl-C (finished files are kept; rerun to resume).
The building blocks are in app.bulk.jobs.
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
from models.options import Parser, fail, int_range, nonnegative_int, positive_int
from models.vae import imaging
from models.vae import latent_files as latent_store
from models.vae.colour_lock import MAX_STEPS as COLOUR_LOCK_MAX

MULTI_COMMAND = True  # app.cli.main passes the command name: this module serves `encode` and `decode`
LATENT_SUFFIXES = {latent_store.SUFFIX, ".tar"}
PROG_ENCODE, PROG_DECODE = "vae encode", "vae decode"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", metavar="[NAME=]PATH", help="model (diffusers folder or single file); default: the shipped model")
    p.add_argument("--config", help="config folder for a single-file checkpoint")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (in-process model)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the model runs in (float16 needs cuda)")
    p.add_argument("--server", metavar="URL", help="use a running `vae serve` instead of an in-process model")
    p.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight with --server (default 4)")
    p.add_argument("--retries", type=nonnegative_int, default=5, help="retries on 429/502/503/504 and connection errors")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per model batch (default 8)")
    p.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="image decoding/reading threads")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--report", metavar="FILE", help="also write the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def encode_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vae encode", description="Encode images (files, folders, globs) into latent files.")
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or quoted globs")
    _common(p)
    p.add_argument("--latent-dtype", default="float16", choices=list(latent_store.STORE_DTYPES),
                   help="storage dtype of the latent files (default float16; the model's own dtype is --compute-dtype)")
    p.add_argument("--dtype", dest="deprecated_dtype", choices=list(latent_store.STORE_DTYPES),
                   help=argparse.SUPPRESS)  # the old spelling of --latent-dtype
    p.add_argument("--quantize", choices=["uint8"], help="store uint8 with per-channel scale/offset (0.5 bit/pixel at f8x4)")
    p.add_argument("--colour-lock", type=int_range(0, COLOUR_LOCK_MAX), default=0, metavar="N",
                   help="N closed-loop steps (N + 1 decodes more) so each image's latents decode to its own mean "
                        "colour (default 0: plain encode; 1 is usually enough)")
    p.add_argument("--scaled", action="store_true", help="store (z - shift) * scaling_factor (diffusion-ready) instead of raw z")
    p.add_argument("--shard-size", type=nonnegative_int, default=0, metavar="N",
                   help="write WebDataset tar shards of N samples")
    p.add_argument("--max-pixels", type=positive_int, default=imaging.DEFAULT_MAX_PIXELS, help="per-image pixel limit")
    p.add_argument("--ray", action="store_true", help="run as a Ray Data job (pip install 'sd-vae-service[ray]')")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--actors", type=positive_int, default=2, help="Ray actors holding a model (default 2)")
    return p


def decode_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vae decode", description="Decode latent files (or tar shards) back into images.")
    p.add_argument("latents", nargs="+", help=".safetensors latent files, .tar shards or folders of them")
    _common(p)
    p.add_argument("--format", default="png", choices=["png", "jpg", "webp"], help="image format (default png)")
    p.add_argument("--quality", type=int_range(1, 100), default=95, help="JPEG / WebP quality (default 95)")
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


def _unwritable(args) -> str | None:
    """Why --out (or the --report folder) cannot be written, checked before any model loads; None if fine."""
    try:
        core.check_writable(args.out)
        if args.report:
            core.check_writable(Path(args.report).parent)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


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
        return fail(PROG_ENCODE, "--overwrite does not apply to shards: use a new --out")
    if args.ray and args.server:
        return fail(PROG_ENCODE, "--ray runs the model on Ray actors; it excludes --server")
    if (problem := _unwritable(args)) is not None:
        return fail(PROG_ENCODE, problem)
    items, problems = core.collect_inputs(args.inputs, check_names=True)
    summary = core.Summary("encode", total=len(items) + len(problems))
    for label, reason in problems:
        summary.fail(label, reason)
    from models.vae.loading import ModelLoadError

    try:
        if args.server:
            encoder = encoders.RemoteEncoder(args.server, concurrency=args.concurrency, retries=args.retries,
                                             colour_lock=args.colour_lock)
            multiple = int(encoder.info()["downsample_factor"])
        else:
            encoder = encoders.LocalEncoder(load_model(args), colour_lock=args.colour_lock)
            multiple = encoder.model.downsample_factor
        facts = encoder.store_facts()
    except (ModelLoadError, OSError, RuntimeError) as exc:  # requests errors are OSErrors
        return fail(PROG_ENCODE, str(exc))
    options = latent_store.StoreOptions(**facts, dtype=args.latent_dtype, quantize=args.quantize, scaled=args.scaled,
                                        colour_lock=args.colour_lock)
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
                try:
                    summary.bytes_out += sink.write(outcome.item, outcome.payload)
                except OSError as exc:
                    if isinstance(sink, core.ShardSink):
                        raise  # a tar shard cannot skip a member: the job stops (main: one line)
                    summary.fail(outcome.item.path, f"cannot write its latent file: {exc}")
                else:
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


def _plan_record(data: bytes, out: Path, ext: str, factor: int) -> tuple[torch.Tensor, dict, Path]:
    """(raw latents, metadata, image path) of one latent file; ValueError naming what is wrong with it."""
    z, meta = latent_store.decode_record(data)  # validates the contract's metadata (models.vae.latents)
    raw = meta.get("source")
    try:
        source = Path(latent_store.check_source(raw)) if isinstance(raw, str) else None
    except ValueError as exc:
        raise ValueError(f"unsafe source path in metadata: {exc}") from None
    if source is None or not source.name or source.is_absolute() or ".." in source.parts:  # never outside --out
        raise ValueError(f"unsafe or missing source path {raw!r} in metadata")
    h, w = meta["original_size"]
    full = (z.shape[-2] * factor, z.shape[-1] * factor)
    if not (h <= full[0] and w <= full[1]):
        raise ValueError(f"metadata `original_size` {[h, w]} does not fit the decoded size {list(full)}")
    return z, meta, out / source.with_suffix(ext)


def decode_main(argv: list[str]) -> int:
    args = decode_parser().parse_args(argv)
    if (problem := _unwritable(args)) is not None:
        return fail(PROG_DECODE, problem)
    summary = core.Summary("decode")
    from models.vae.loading import ModelLoadError

    try:
        if args.server:
            decoder = encoders.RemoteEncoder(args.server, concurrency=args.concurrency, retries=args.retries)
            info = decoder.info()
            sha, factor = info["sha256"], int(info["downsample_factor"])
        else:
            decoder = _LocalDecoder(load_model(args))
            sha, factor = decoder.model.sha256, decoder.model.downsample_factor
    except (ModelLoadError, OSError, RuntimeError) as exc:
        return fail(PROG_DECODE, str(exc))
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
                try:
                    data = imaging.encode_image(imaging.to_pil(img[:, :h, :w])[0], args.format, args.quality)
                    latent_store.write_atomic(target, data)
                except OSError as exc:  # this image cannot be written (its folder, the disk): the job goes on
                    summary.fail(label, f"cannot write {target}: {exc}")
                else:
                    summary.done += 1
                    summary.bytes_in += nbytes
                    summary.bytes_out += len(data)
            bar.update(1)

    try:
        for label, data in iter_records(args.latents, summary):
            summary.total += 1
            try:
                z, meta, target = _plan_record(data, out, ext, factor)
            except ValueError as exc:  # LatentFormatError, unsafe source, size that does not fit
                summary.fail(label, str(exc))
                bar.update(1)
                continue
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
    jobs = {"encode": encode_main, "decode": decode_main}
    if command not in jobs:
        print(f"vae: unknown command {command!r}", file=sys.stderr)
        return 2
    prog = f"vae {command}"
    try:
        return jobs[command](argv)
    except KeyboardInterrupt:  # the job's `finally` has closed the shard in progress
        print(f"{prog}: interrupted: finished files are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as exc:  # e.g. the disk filled up under a shard: the job cannot go on
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
