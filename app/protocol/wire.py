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

Reading is also the one validation layer for request tensors (`read_tensor`): every format's
declared dtype goes through an allow-list and its shape through `check_shape` (integers only, no
zero-size dimension, at most `TensorLimits.max_elements` numbers) before any memory is allocated,
and the bytes must match the shape exactly. Every refusal is an APIError naming what was wrong.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
from dataclasses import dataclass

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
MAX_DIGITS = 18  # a JSON or query integer longer than this is no size and no pixel value
_DIGITS = re.compile(r"\s*[0-9]{1,%d}\s*" % MAX_DIGITS)


@dataclass(frozen=True)
class TensorLimits:
    """What a request tensor may be, checked from its declared shape before anything is allocated."""

    max_elements: int = 1 << 28  # numbers in the tensor (413 above)
    max_json_bytes: int = 8 << 20  # JSON bodies become Python objects, ~15 bytes of memory per byte


def media_type(header: str | None) -> str:
    """'Text/Plain; charset=x' -> 'text/plain'; '' when absent."""
    return (header or "").split(";")[0].strip().lower()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _short(value, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_dtype(name, default: str = "float32") -> torch.dtype:
    """A dtype name (query, header or JSON body) -> one of DTYPES; 400 unless a string, 422 unless listed."""
    if name is None:
        name = default
    if not isinstance(name, str):
        raise BadRequest(f"`dtype` must be a string such as \"float32\", got {_short(name)}")
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise Unprocessable(f"unsupported dtype {_short(name)!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_shape(dims, what: str = "shape", limits: TensorLimits | None = None) -> tuple[int, ...]:
    """A declared shape -> a tuple of ints: a list of 1 to MAX_DIMS integers (never floats, bools or
    strings), each at least 1 (422 for a zero-size tensor), at most `limits.max_elements` numbers in
    all (413). The one check every format's shape goes through, before any allocation."""
    if (not isinstance(dims, (list, tuple)) or not dims
            or any(isinstance(d, bool) or not isinstance(d, int) for d in dims)):
        raise BadRequest(f"malformed {what} {_short(dims)}: need a list of 1 to {MAX_DIMS} integers")
    if len(dims) > MAX_DIMS or any(d < 0 for d in dims):
        raise BadRequest(f"malformed {what} {_short(list(dims))}: need 1 to {MAX_DIMS} positive sizes")
    if 0 in dims:
        raise Unprocessable(f"zero-size tensor of shape {_short(list(dims))}: every dimension must be at least 1")
    n = math.prod(dims)
    limit = (limits or TensorLimits()).max_elements
    if n > limit:
        raise PayloadTooLarge(f"tensor {_short(list(dims))} holds {n} elements, the limit is {limit}")
    return tuple(int(d) for d in dims)


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"integer {_short(text, 24)} has more than {MAX_DIGITS} digits")
    return int(text)


def _no_float(text: str):
    raise ValueError(f"{_short(text, 24)} is not an integer")


def parse_shape(values: list[str], limits: TensorLimits | None = None) -> tuple[int, ...]:
    """Query values of `shape` -> a tuple of positive ints (see module doc for the accepted spellings).
    Only integers: `[1.9,4,4,4.2]`, `[true,4,4,4]`, `1e999` or `4.0` are refused, never truncated."""
    if not values:
        raise BadRequest("missing `shape` query parameter for a raw tensor body")
    if len(values) == 1 and values[0].strip().startswith("["):
        try:
            dims = json.loads(values[0], parse_int=_json_int, parse_float=_no_float, parse_constant=_no_float)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"malformed `shape` {_short(values[0])}: {_short(str(exc), 80)}") from None
    else:
        parts = values[0].split(",") if len(values) == 1 else values
        if not all(_DIGITS.fullmatch(p) for p in parts):
            raise BadRequest(f"malformed `shape` {_short(values)}: need 1 to {MAX_DIMS} positive integers")
        dims = [int(p) for p in parts]
    return check_shape(dims, "`shape`", limits)


def tensor_from_raw(body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(body) != expected:
        raise BadRequest(
            f"body has {len(body)} bytes but shape {list(shape)} of {dtype_name(dtype)} needs {expected}"
        )
    return _from_buffer(body, 0, shape, _NUMPY[dtype], dtype)


def _from_buffer(body: bytes, offset: int, shape, wire_dtype, dtype: torch.dtype, fortran: bool = False) -> torch.Tensor:
    """Bytes at `offset` -> a tensor of `dtype` that owns native-order memory (frombuffer is read-only)."""
    wire_dtype = np.dtype(wire_dtype)
    array = np.frombuffer(body, dtype=wire_dtype, count=math.prod(shape), offset=offset)
    array = array.reshape(shape, order="F" if fortran else "C")
    array = np.ascontiguousarray(array.astype(wire_dtype.newbyteorder("=")))
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    if array.dtype == np.float64:
        array = array.astype(np.float32)  # lossless enough, and what the model runs in anyway
    return torch.from_numpy(array)


def tensor_to_raw(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype(_NUMPY[t.dtype]).tobytes()


# safetensors dtype -> (numpy dtype on the wire, tensor dtype); anything else (F8_*, I*, BOOL, ...) is 422
SAFETENSORS_DTYPES = {"F32": ("<f4", torch.float32), "F16": ("<f2", torch.float16), "BF16": ("<u2", torch.bfloat16),
                      "U8": ("u1", torch.uint8), "F64": ("<f8", torch.float32)}
MAX_HEADER_BYTES = 1 << 20


def _safetensors_header(body: bytes) -> tuple[dict, int]:
    """(header dict, offset of the data) of a safetensors body; 400 when malformed."""
    if len(body) < 8:
        raise BadRequest(f"malformed safetensors body: {len(body)} bytes, not even a header length")
    (n,) = struct.unpack("<Q", body[:8])
    if n > min(len(body) - 8, MAX_HEADER_BYTES):
        raise BadRequest(f"malformed safetensors body: header length {n} exceeds the body or {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(body[8 : 8 + n], parse_int=_json_int)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed safetensors header: {_short(str(exc), 80)}") from None
    if not isinstance(header, dict):
        raise BadRequest("malformed safetensors header: not a JSON object")
    return header, 8 + n


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    meta = _safetensors_header(body)[0].get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadRequest("malformed safetensors header: `__metadata__` must map strings to strings")
    return meta


def tensor_from_safetensors(body: bytes, limits: TensorLimits | None = None) -> tuple[torch.Tensor, dict[str, str]]:
    """A safetensors file with one tensor (or one named `latents` / `images`) -> (tensor, metadata).

    The header is read and checked here (dtype allow-list, shape, offsets inside the body) before
    the one tensor used is copied out; other tensors are never materialised."""
    metadata = _safetensors_metadata(body)
    header, start = _safetensors_header(body)
    names = [k for k in header if k != "__metadata__"]
    name = next((n for n in ("latents", "images") if n in header), names[0] if len(names) == 1 else None)
    if name is None:
        raise BadRequest(f"safetensors body must hold one tensor (or `latents`), found {_short(sorted(names))}")
    entry = header[name]
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise BadRequest(f"malformed safetensors header: tensor {_short(name)!r} has no dtype")
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise Unprocessable(f"safetensors dtype {_short(entry['dtype'])} is not accepted: use "
                            f"{', '.join(SAFETENSORS_DTYPES)}")
    wire_dtype, dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    shape = check_shape(entry.get("shape"), f"safetensors shape of {_short(name)!r}", limits)
    offsets = entry.get("data_offsets")
    size = math.prod(shape) * np.dtype(wire_dtype).itemsize
    if (not isinstance(offsets, list) or len(offsets) != 2
            or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= len(body) - start or offsets[1] - offsets[0] != size):
        raise BadRequest(f"malformed safetensors header: data_offsets {_short(offsets)} of {_short(name)!r} "
                         f"do not hold {size} bytes inside the body")
    return _from_buffer(body, start + offsets[0], shape, wire_dtype, dtype), metadata


def tensor_to_safetensors(t: torch.Tensor, name: str, metadata: dict | None = None) -> bytes:
    import safetensors.torch

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return safetensors.torch.save({name: t.detach().cpu().contiguous()}, metadata=meta)


# npy dtypes accepted (any byte order: big-endian arrays are converted); float64 is read as float32
_NPY_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
               np.dtype(np.uint8): torch.uint8, np.dtype(np.float64): torch.float32}


def tensor_from_npy(body: bytes, limits: TensorLimits | None = None) -> torch.Tensor:
    """A .npy file of one plain array (version 1 or 2 header, no pickles, nothing after the data)."""
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"npy format version {version} is not supported (1.0 or 2.0)")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fp, max_header_size=10_000)
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, TokenError...
        raise BadRequest(f"malformed npy body: {_short(str(exc), 120)}".replace("\n", " ")) from None
    native = dtype.newbyteorder("=") if dtype.byteorder not in ("|", "=") else dtype
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or native not in _NPY_DTYPES:
        raise Unprocessable(f"unsupported array dtype {_short(str(dtype))}: use float32, float16 or uint8")
    shape = check_shape(list(shape), "npy shape", limits)
    offset = fp.tell()
    need, have = math.prod(shape) * dtype.itemsize, len(body) - offset
    if have != need:
        what = "is truncated" if have < need else f"has {have - need} bytes after the array"
        raise BadRequest(f"npy body {what}: shape {list(shape)} of {dtype} needs {need} bytes of data, got {have}")
    return _from_buffer(body, offset, shape, dtype, _NPY_DTYPES[native], fortran)


def tensor_to_npy(t: torch.Tensor) -> bytes:
    t = t.detach().cpu()
    buf = io.BytesIO()
    np.save(buf, (t.float() if t.dtype == torch.bfloat16 else t).numpy(), allow_pickle=False)
    return buf.getvalue()


def tensor_from_json(body: bytes, limits: TensorLimits | None = None) -> tuple[torch.Tensor, dict]:
    """JSON nested list, or {"data": list, "shape"?: list, "dtype"?: str, ...metadata}."""
    limits = limits or TensorLimits()
    if len(body) > limits.max_json_bytes:
        raise PayloadTooLarge(f"JSON tensor body of {len(body)} bytes exceeds the limit of {limits.max_json_bytes} bytes: "
                              "send safetensors, npy or raw bytes")
    try:
        doc = json.loads(body, parse_int=_json_int)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[... nested beyond the parser
        raise BadRequest(f"malformed JSON body: {_short(str(exc), 120)}") from None
    meta = {}
    if isinstance(doc, dict):
        if "data" not in doc:
            raise BadRequest("JSON body needs a `data` list")
        meta = {k: v for k, v in doc.items() if k not in ("data", "shape", "dtype")}
        dtype = parse_dtype(doc.get("dtype"))
        shape, data = doc.get("shape"), doc["data"]
    else:
        dtype, shape, data = torch.float32, None, doc
    if not isinstance(data, list):
        raise BadRequest(f"JSON `data` must be a nested list of numbers, got {_short(data)}")
    try:
        array = np.asarray(data)  # no dtype: strings and booleans stay visible instead of being converted
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise BadRequest(f"JSON `data` is not a rectangular list of numbers: {_short(str(exc), 120)}") from None
    if array.dtype.kind not in "iuf":
        raise BadRequest("JSON `data` is not a rectangular list of numbers (found "
                         f"{'booleans' if array.dtype.kind == 'b' else 'strings' if array.dtype.kind == 'U' else 'other values'})")
    dims = check_shape(list(array.shape) if shape is None else shape, "JSON `shape`" if shape is not None else "JSON `data`", limits)
    if math.prod(dims) != array.size:
        raise BadRequest(f"JSON `data` holds {array.size} numbers, `shape` {list(dims)} needs {math.prod(dims)}")
    if dtype == torch.uint8 and (array.dtype.kind == "f" or array.min() < 0 or array.max() > 255):
        raise Unprocessable("JSON `data` of dtype uint8 must hold integers from 0 to 255")
    return torch.from_numpy(array.reshape(dims).astype(np.float64)).to(dtype), meta


def tensor_to_json(t: torch.Tensor, metadata: dict | None = None) -> bytes:
    t = t.detach().cpu()
    doc = {"shape": list(t.shape), "dtype": dtype_name(t.dtype), **(metadata or {})}
    doc["data"] = (t.float() if t.is_floating_point() else t).tolist()
    return json.dumps(doc).encode()


def read_tensor(
    body: bytes, content_type: str | None, shape_values: list[str], dtype: str | None,
    limits: TensorLimits | None = None,
) -> tuple[torch.Tensor, dict]:
    """A request body in any tensor format -> (tensor, metadata dict).

    Whatever the format, the tensor that comes out has a listed dtype (float32, float16, bfloat16,
    uint8), 1 to MAX_DIMS dimensions, no zero-size dimension and at most `limits.max_elements`
    numbers, all checked from the declared shape before allocation; anything else is an APIError."""
    kind = media_type(content_type)
    if kind == SAFETENSORS:
        return tensor_from_safetensors(body, limits)
    if kind == NPY:
        return tensor_from_npy(body, limits), {}
    if kind == JSON:
        return tensor_from_json(body, limits)
    if kind in ("", *RAW_TYPES):
        return tensor_from_raw(body, parse_shape(shape_values, limits), parse_dtype(dtype)), {}
    raise UnsupportedMediaType(f"unsupported tensor Content-Type {_short(kind)!r}: use one of {', '.join(TENSOR_TYPES)}")


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
