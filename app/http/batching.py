"""Which requests may share one forward pass, and how to merge and split them.

An endpoint declares `batching = BatchSpec(...)`. A request is batched with others only when
everything but its tensor's batch dimension is equal (endpoint, per-row shape, dtype and the
request fields `predict` reads), so the merged request runs through the endpoint's own `predict`
unchanged and each caller gets its rows back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from app.http.scheduler import Work


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    tensor: str  # the request field holding the (N, ...) input
    params: tuple[str, ...]  # request fields `predict` reads besides the tensor
    when: Callable[[Any], bool] = lambda req: True  # e.g. seeded sampling: one generator per request


def make_work(endpoint, req) -> Work:
    """The scheduler's unit for `endpoint.predict(req)`, batchable when the endpoint allows it."""
    spec: BatchSpec | None = endpoint.batching
    if spec is None or not spec.when(req):
        return Work(endpoint.predict, req, None)
    t: torch.Tensor = getattr(req, spec.tensor)
    values = tuple(_hashable(getattr(req, name)) for name in spec.params)
    key = (endpoint.path, values, tuple(t.shape[1:]), t.dtype)
    return Work(endpoint.predict, req, key, rows=int(t.shape[0]), merge=lambda reqs: _merge(spec.tensor, reqs))


def _hashable(value):
    return getattr(value, "name", value) if hasattr(value, "vae") else value  # a VAEModel: its name


def _merge(field: str, reqs: list) -> tuple[Any, Callable[[Any], list]]:
    sizes = [getattr(r, field).shape[0] for r in reqs]
    merged = dataclasses.replace(reqs[0], **{field: torch.cat([getattr(r, field) for r in reqs])})

    def split(result) -> list:
        # Clones: each answer owns its memory, not a view into the whole batch.
        if isinstance(result, tuple):
            parts = [[p.clone() for p in r.split(sizes)] for r in result]
            return [tuple(p[i] for p in parts) for i in range(len(sizes))]
        return [p.clone() for p in result.split(sizes)]

    return merged, split
