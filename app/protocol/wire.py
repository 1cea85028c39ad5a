"""The one home of tensor wire formats (requests and responses).

Formats, chosen by Content-Type (requests) or Accept (responses):
  * raw: `tensor/binary` or `application/octet-stream` — little-endian bytes in C order; shape and
    dtype travel beside it (query parameters `shape`, `dtype` on requests; response headers `shape`
    as a JSON list and `dtype`, which is what diffusers' remote_encode/remote_decode read);
  * `application/x-safetensors`: one tensor plus string metadata (model, scaling, original size);
  * `application/x-npy`: a .npy file (bfloat16 is sent as float32: numpy has no bfloat16);
  * `application/json`: `{"shape": [...], "dtype": "...", "data": nested lists, ...metadata}`;
    requests may also send a bare nested list.
`shape` on the query string is either repeated (`shape=1&shape=4`, how `requests` sends a list),
one JSON list (`shape=[1,4,8,8]`) or comma-separated (`shape=1,4,8,8`).
"""

from __future__ import annotations

import io
import json
import math
import struct

import numpy as np
import torch

from app.protocol.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, Unprocessable

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
_NUMPY = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<u2", torch.uint8: "u1"}
RAW_TYPES = ("tensor/binary", "application/octet-stream")
SAFETENSORS = "application/x-safetensors"
NPY = "application/x-npy"
JSON = "application/json"
TENSOR_TYPES = (*RAW_TYPES, SAFETENSORS, NPY, JSON)
MAX_DIMS = 8


def media_type(header: str | None) -> str:
    """'Text/Plain; charset=x' -> 'text/plain'; '' when absent."""
    return (header or "").split(";")[0].strip().lower()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | None, default: str = "float32") -> torch.dtype:
    name = (name or default).removeprefix("torch.")
    if name not in DTYPES:
        raise Unprocessable(f"unsupported dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_shape(values: list[str]) -> tuple[int, ...]:
    """Query values of `shape` -> a tuple of positive ints (see module doc for the accepted spellings)."""
    if not values:
        raise BadRequest("missing `shape` query parameter for a raw tensor body")
    try:
        if len(values) == 1 and values[0].strip().startswith("["):
            dims = json.loads(values[0])
        elif len(values) == 1 and "," in values[0]:
            dims = values[0].split(",")
        else:
            dims = values
        shape = tuple(int(d) for d in dims)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"malformed `shape` {values}: {exc}") from None
    if not shape or len(shape) > MAX_DIMS or any(d <= 0 for d in shape):
        raise BadRequest(f"malformed `shape` {list(shape)}: need 1 to {MAX_DIMS} positive sizes")
    return shape


def tensor_from_raw(body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(body) != expected:
        raise BadRequest(
            f"body has {len(body)} bytes but shape {list(shape)} of {dtype_name(dtype)} needs {expected}"
        )
    wire_dtype = np.dtype(_NUMPY[dtype])
    # astype to native byte order copies, so the tensor owns writable memory (frombuffer is read-only).
    tensor = torch.from_numpy(np.frombuffer(body, dtype=wire_dtype).astype(wire_dtype.newbyteorder("=")))
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16).view(torch.bfloat16)
    return tensor.reshape(shape)


def tensor_to_raw(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype(_NUMPY[t.dtype]).tobytes()


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8 : 8 + n]).get("__metadata__") or {}


def tensor_from_safetensors(body: bytes) -> tuple[torch.Tensor, dict[str, str]]:
    """A safetensors file with one tensor (or one named `latents` / `images`) -> (tensor, metadata)."""
    import safetensors.torch

    try:
        tensors = safetensors.torch.load(body)
        metadata = _safetensors_metadata(body)
    except Exception as exc:
        raise BadRequest(f"malformed safetensors body: {exc}".replace("\n", " ")) from None
    for name in ("latents", "images"):
        if name in tensors:
            return tensors[name], metadata
    if len(tensors) != 1:
        raise BadRequest(f"safetensors body must hold one tensor (or `latents`), found {sorted(tensors)}")
    return next(iter(tensors.values())), metadata


def tensor_to_safetensors(t: torch.Tensor, name: str, metadata: dict | None = None) -> bytes:
    import safetensors.torch

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return safetensors.torch.save({name: t.detach().cpu().contiguous()}, metadata=meta)


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype == np.float64:
        array = array.astype(np.float32)  # lossless enough, and what the model runs in anyway
    if array.dtype not in (np.float32, np.float16, np.uint8):
        raise Unprocessable(f"unsupported array dtype {array.dtype}: use float32, float16 or uint8")
    return torch.from_numpy(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("=")))


def tensor_from_npy(body: bytes) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:
        raise BadRequest(f"malformed npy body: {exc}".replace("\n", " ")) from None
    if not isinstance(array, np.ndarray):
        raise BadRequest("npy body must hold one array")
    return _from_numpy(array)


def tensor_to_npy(t: torch.Tensor) -> bytes:
    t = t.detach().cpu()
    buf = io.BytesIO()
    np.save(buf, (t.float() if t.dtype == torch.bfloat16 else t).numpy(), allow_pickle=False)
    return buf.getvalue()


def tensor_from_json(body: bytes) -> tuple[torch.Tensor, dict]:
    """JSON nested list, or {"data": list, "shape"?: list, "dtype"?: str, ...metadata}."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[... nested beyond the parser
        raise BadRequest(f"malformed JSON body: {exc}") from None
    meta = {}
    if isinstance(doc, dict):
        if "data" not in doc:
            raise BadRequest("JSON body needs a `data` list")
        meta = {k: v for k, v in doc.items() if k not in ("data", "shape", "dtype")}
        dtype = parse_dtype(doc.get("dtype"))
        shape, data = doc.get("shape"), doc["data"]
    else:
        dtype, shape, data = torch.float32, None, doc
    try:
        array = np.asarray(data, dtype=np.float64)
        if shape is not None:
            array = array.reshape([int(d) for d in shape])
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"JSON `data` is not a rectangular list of numbers: {exc}") from None
    return torch.from_numpy(array).to(dtype), meta


def tensor_to_json(t: torch.Tensor, metadata: dict | None = None) -> bytes:
    t = t.detach().cpu()
    doc = {"shape": list(t.shape), "dtype": dtype_name(t.dtype), **(metadata or {})}
    doc["data"] = (t.float() if t.is_floating_point() else t).tolist()
    return json.dumps(doc).encode()


def read_tensor(
    body: bytes, content_type: str | None, shape_values: list[str], dtype: str | None
) -> tuple[torch.Tensor, dict]:
    """A request body in any tensor format -> (tensor, metadata dict)."""
    kind = media_type(content_type)
    if kind == SAFETENSORS:
        return tensor_from_safetensors(body)
    if kind == NPY:
        return tensor_from_npy(body), {}
    if kind == JSON:
        return tensor_from_json(body)
    if kind in ("", *RAW_TYPES):
        return tensor_from_raw(body, parse_shape(shape_values), parse_dtype(dtype)), {}
    raise UnsupportedMediaType(f"unsupported tensor Content-Type {kind!r}: use one of {', '.join(TENSOR_TYPES)}")


def response_format(accept: str | None) -> str:
    """Accept header -> the tensor media type to answer with (raw when nothing specific is asked)."""
    accept = (accept or "").lower()
    for kind in (SAFETENSORS, NPY, JSON, "tensor/binary"):
        if kind in accept:
            return kind
    return "application/octet-stream"


def write_tensor(
    t: torch.Tensor, accept: str | None, name: str = "latents", metadata: dict | None = None
) -> tuple[bytes, str, dict[str, str]]:
    """Tensor -> (body, media type, headers). Headers `shape` (JSON list) and `dtype` are always set."""
    kind = response_format(accept)
    headers = {"shape": json.dumps(list(t.shape)), "dtype": dtype_name(t.dtype)}
    if kind == SAFETENSORS:
        return tensor_to_safetensors(t, name, metadata), kind, headers
    if kind == NPY:
        return tensor_to_npy(t), kind, headers
    if kind == JSON:
        return tensor_to_json(t, metadata), kind, headers
    return tensor_to_raw(t), kind, headers


def check_size(n_bytes: int, limit: int) -> None:
    if n_bytes > limit:
        raise PayloadTooLarge(f"request body of {n_bytes} bytes exceeds the limit of {limit} bytes")
