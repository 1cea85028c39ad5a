"""`vae encode --ray`: the same encode job as a Ray Data pipeline.

    file list (one row per planned batch) -> map_batches(EncodeActor, actor pool; each actor holds
    the model, one GPU each when --device cuda) -> latent file bytes -> the driver's sink

The batches are `bulk_core.plan_batches`' (a pure function of the to-do list) and each actor runs
`bulk_encoders.encode_loaded` on them, so the files equal the local path's byte for byte. Actors read
the images themselves (on a cluster the inputs must be at the same path on every node: a shared
file system); they send back only the latent bytes (1/24 of the RGB bytes at fp16), and the
driver writes them through the same sink as the local path, which keeps resume and sharding in
one place.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from app.bulk import encoders
from app.bulk import jobs as core
from models.vae import latent_files as latent_store


class EncodeActor:
    """Holds one model; called with a pyarrow batch of planned batches (column `items`, JSON)."""

    def __init__(self, model: str, device: str, compute_dtype: str, config: str | None,
                 options: dict, max_pixels: int):
        from models.vae.inference import VAEModel

        name, _, path = model.partition("=")
        self.options = latent_store.StoreOptions(**options)
        model = VAEModel.load(name, path, device=device, dtype=compute_dtype, config=config)
        self.encoder = encoders.LocalEncoder(model, colour_lock=self.options.colour_lock)
        if self.encoder.model.sha256 != self.options.model_sha256:  # e.g. another file at this path on a node
            raise RuntimeError(f"model weights at {path} differ from the driver's ({self.options.model_sha256})")
        self.max_pixels = max_pixels

    def __call__(self, batch):
        import pyarrow as pa

        cols: dict[str, list] = {"path": [], "rel": [], "nbytes": [], "payload": [], "error": []}
        for text in batch["items"].to_pylist():
            items = [core.Item(d["path"], d["rel"], d["nbytes"], tuple(d["hw"])) for d in json.loads(text)]
            loaded = [core.load_image(item, self.max_pixels) for item in items]
            for outcome in encoders.encode_loaded(self.encoder, loaded, self.options):
                cols["path"].append(outcome.item.path)
                cols["rel"].append(outcome.item.rel)
                cols["nbytes"].append(outcome.item.nbytes)
                cols["payload"].append(outcome.payload or b"")
                cols["error"].append(outcome.error or "")
        # Explicit binary type: numpy's fixed-width bytes would drop trailing NUL bytes of a payload.
        return pa.table({k: pa.array(v, type=pa.binary() if k == "payload" else None) for k, v in cols.items()})


def _model_spec(args, options: latent_store.StoreOptions) -> str:
    """NAME=ABSOLUTE_PATH: actors may start in another working directory."""
    from models.vae.loading import default_model_spec, parse_model_spec

    name, path = parse_model_spec(args.model or default_model_spec())
    return f"{name}={Path(path).resolve() if Path(path).exists() else path}"


def encode(batches: list[list[core.Item]], options: latent_store.StoreOptions, args):
    """Run the planned batches on a Ray actor pool; yields `core.Outcome`s in plan order."""
    try:
        import ray
    except ImportError:
        raise SystemExit("vae encode: error: --ray needs Ray: pip install 'sd-vae-service[ray]'") from None
    if not batches:
        return
    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards fill in plan order, as in the local path
    ctx.enable_progress_bars = False  # the driver's tqdm bar counts images
    rows = [{"items": json.dumps([asdict(item) for item in batch])} for batch in batches]
    use_gpu = str(args.device).startswith("cuda")
    ds = ray.data.from_items(rows).map_batches(
        EncodeActor,
        batch_size=1,
        batch_format="pyarrow",
        concurrency=max(1, min(args.actors, len(rows))),
        num_cpus=0 if use_gpu else 1,
        num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs=dict(
            model=_model_spec(args, options), device="cuda" if use_gpu else args.device,
            compute_dtype=args.compute_dtype, config=args.config, options=asdict(options),
            max_pixels=args.max_pixels,
        ),
    )
    for row in ds.iter_rows():
        item = core.Item(row["path"], row["rel"], int(row["nbytes"]))
        yield core.Outcome(item, row["payload"] or None, row["error"] or None)
