"""Encoders of `vae encode` / `vae decode`: an in-process model, or a running `vae serve` over
HTTP (retries with backoff on 429/502/503/504 and connection errors); `encode_loaded` turns
their latents into latent file bytes."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from app.bulk.jobs import Loaded, Outcome
from models.vae import imaging
from models.vae import latent_files as latent_store

RETRY_STATUS = {429, 502, 503, 504}


class LocalEncoder:
    """In-process model. `encode(images)` -> raw latents (1, C, h, w) per image, in order."""

    def __init__(self, model, colour_lock: int = 0):
        self.model = model
        self.colour_lock = colour_lock

    def store_facts(self) -> dict:
        m = self.model
        return dict(model=m.name, model_sha256=m.sha256, scaling_factor=m.scaling_factor, shift_factor=m.shift_factor,
                    latents_mean=m.latents_mean, latents_std=m.latents_std)

    def encode(self, loaded: list[Loaded]) -> list[torch.Tensor | str]:
        f = self.model.downsample_factor
        tensors = [imaging.to_tensor(entry.image) for entry in loaded]
        if not self.colour_lock:
            # Pad each image to its bucket first so images of one bucket (not only of one size) batch
            # together. Not with a colour lock: there each image's own pixels are its target colour
            # (as on the server), so only images of one size batch together.
            tensors = [imaging.pad_to_multiple(t, f)[0] for t in tensors]
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        out: list = [None] * len(loaded)
        for idx in groups.values():
            z = self.model.encode(torch.cat([tensors[i] for i in idx]), colour_lock=self.colour_lock).cpu()
            for j, i in enumerate(idx):
                out[i] = z[j : j + 1]
        return out


class _ThreadClients:
    """One VAEClient (and so one requests.Session) per thread: Sessions are not thread-safe."""

    def __init__(self, url: str, model: str | None, timeout: float):
        self.url, self.model, self.timeout = url, model, timeout
        self._local = threading.local()

    def get(self):
        from app.client import VAEClient

        if not hasattr(self._local, "client"):
            self._local.client = VAEClient(self.url, model=self.model, timeout=self.timeout)
        return self._local.client


def call_with_retries(fn, retries: int = 5, backoff: float = 0.5, sleep=time.sleep):
    """`fn()`, retried with exponential backoff and jitter on 429/502/503/504 and connection errors."""
    import requests

    from app.client import VAEClientError

    for attempt in range(retries + 1):
        try:
            return fn()
        except VAEClientError as exc:
            if exc.status not in RETRY_STATUS or attempt == retries:
                raise
        except (requests.ConnectionError, requests.Timeout):
            if attempt == retries:
                raise
        sleep(min(backoff * 2**attempt, 30.0) * random.uniform(0.5, 1.0))


class RemoteEncoder:
    """A `vae serve` instance: `concurrency` requests in flight, retries on overload."""

    def __init__(self, url: str, model: str | None = None, concurrency: int = 4, retries: int = 5,
                 backoff: float = 0.5, timeout: float = 300.0, colour_lock: int = 0):
        self.clients = _ThreadClients(url, model, timeout)
        self.colour_lock = colour_lock
        self.pool = ThreadPoolExecutor(max(1, concurrency))
        self.retries, self.backoff = retries, backoff

    def info(self) -> dict:
        return call_with_retries(lambda: self.clients.get().model_info(), self.retries, self.backoff)

    def store_facts(self) -> dict:
        info = self.info()
        stats = [tuple(v) if v is not None else None for v in (info.get("latents_mean"), info.get("latents_std"))]
        return dict(model=info["name"], model_sha256=info["sha256"], scaling_factor=info["scaling_factor"],
                    shift_factor=info["shift_factor"], latents_mean=stats[0], latents_std=stats[1])

    def _call(self, fn):
        try:
            return call_with_retries(fn, self.retries, self.backoff)
        except Exception as exc:  # VAEClientError, requests errors: one image fails, the job goes on
            return f"server: {exc}"

    def encode(self, loaded: list[Loaded]) -> list[torch.Tensor | str]:
        lock = self.colour_lock
        futures = [self.pool.submit(self._call, lambda e=e: self.clients.get().encode(e.data, colour_lock=lock))
                   for e in loaded]
        return [f.result() for f in futures]

    def decode(self, latents: list[torch.Tensor]) -> list[torch.Tensor | str]:
        """Raw latents (1, C, h, w) each -> uint8 (1, H, W, 3) each (uncropped)."""
        futures = [self.pool.submit(self._call, lambda z=z: self.clients.get().decode_tensor(z, postprocess=True))
                   for z in latents]
        return [f.result() for f in futures]

    def close(self) -> None:
        self.pool.shutdown()


def encode_loaded(encoder, loaded: list[Loaded], options: latent_store.StoreOptions) -> list[Outcome]:
    """Loaded images of one batch -> Outcomes with latent file bytes (or the reason each one failed)."""
    good = [entry for entry in loaded if entry.error is None]
    outcomes = {id(entry): Outcome(entry.item, error=entry.error) for entry in loaded if entry.error is not None}
    if good:
        try:
            results = encoder.encode(good)
        except Exception as exc:  # a model failure (e.g. out of memory) fails this batch only
            results = [f"model: {type(exc).__name__}: {exc}"] * len(good)
        for entry, z in zip(good, results):
            if isinstance(z, str):
                outcomes[id(entry)] = Outcome(entry.item, error=z)
            else:
                size = (entry.image.height, entry.image.width)
                outcomes[id(entry)] = Outcome(entry.item, latent_store.encode_record(z, options, entry.item.rel, size))
    return [outcomes[id(entry)] for entry in loaded]
