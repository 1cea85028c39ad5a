"""Property-based fuzzing (hypothesis) of every wire decoder and of query, header and metadata
parsing (issue 12): generated bodies of random format, dtype, shape, size and content either read
as a tensor the model layer can take, or are refused with the API's own 4xx error. In-process
for the decoders, then as HTTP requests on one keep-alive connection to a live server, which must
answer each with a 2xx or a JSON 4xx (never a 5xx or a traceback) and keep the connection usable.
Bounded and derandomized: the same examples on every CI run."""

from __future__ import annotations

import http.client
import io
import json
import math
import struct
from urllib.parse import urlencode, urlparse

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from app.http.app import create_app
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from app.protocol import wire
from app.protocol.errors import APIError
from models.vae.inference import VAEModel
from support import live_server

FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
LIMITS = wire.TensorLimits(max_elements=4096, max_json_bytes=20_000)

# --- generated pieces -------------------------------------------------------------------------
SMALL_INT = st.integers(-2, 5)
ODD_INT = st.sampled_from([0, 2**31, 2**62, 10**30, -(2**63)])
JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-300, 300) | ODD_INT | st.floats() | st.text(max_size=4),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                       max_leaves=12)
DIMS = st.lists(SMALL_INT | ODD_INT, min_size=0, max_size=9)
SHAPE_JSON = DIMS | JSONISH
NUMERIC_TEXT = st.sampled_from(["1e999", "-1e999", "NaN", "nan", "inf", "-0", "0", "1.5", "4.0", "true", "1444",
                                "18446744073709551616", "9" * 40, "0x10", " 4", "", "[1,4,4,4]", "1,4,2,2"])
QUERY_VALUE = NUMERIC_TEXT | st.integers(-5, 300).map(str) | st.text(max_size=12)
DTYPE_NAME = st.sampled_from(["float32", "float16", "bfloat16", "uint8", "float64", "int8", "bool", "torch.float32",
                              "F32", "F8_E4M3", ""]) | st.text(max_size=6)


@st.composite
def raw_request(draw):
    dims = draw(st.lists(st.integers(0, 4), min_size=0, max_size=5))
    spelled = draw(st.sampled_from(["json", "comma", "repeated", "text"]))
    if spelled == "json":
        shape = [json.dumps(draw(st.lists(st.integers(0, 4) | st.floats() | st.booleans(), max_size=5)) if draw(st.booleans()) else dims)]
    elif spelled == "comma":
        shape = [",".join(map(str, dims))]
    elif spelled == "repeated":
        shape = [str(d) for d in dims]
    else:
        shape = draw(st.lists(QUERY_VALUE, max_size=3))
    dtype = draw(st.none() | DTYPE_NAME)
    n = math.prod(dims) * draw(st.sampled_from([1, 2, 4])) + draw(st.integers(-2, 2))
    return bytes(max(0, min(n, 20_000))), "tensor/binary", shape, dtype


@st.composite
def npy_body(draw):
    descr = draw(st.sampled_from(["<f4", ">f4", "<f2", ">f2", "|u1", "<f8", "<i8", "|b1", "<c8", "O", "|V4", "<U3"])
                 | st.text(max_size=5))
    shape = tuple(draw(st.lists(SMALL_INT | ODD_INT, max_size=5)))
    header = repr({"descr": descr, "fortran_order": draw(st.booleans()), "shape": shape})
    if draw(st.integers(0, 9)) == 0:
        header = draw(st.text(max_size=40))
    text = header.encode("latin-1", "replace")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    version = draw(st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x09"]))
    length = struct.pack("<H", len(text)) if version == b"\x01\x00" else struct.pack("<I", len(text))
    itemsize = int(descr[-1]) if descr[-1:] and descr[-1] in "123456789" else 1
    count = math.prod(s for s in shape if 0 <= s < 100) * itemsize + draw(st.sampled_from([0, 0, 0, -1, 1, 7]))
    return b"\x93NUMPY" + version + length + text + bytes(max(0, min(count, 20_000)))


@st.composite
def safetensors_body(draw):
    dtype = draw(st.sampled_from(["F32", "F16", "BF16", "U8", "F64", "F8_E4M3", "I64", "BOOL", "C64"]) | JSONISH)
    shape = draw(DIMS | SHAPE_JSON)
    size = math.prod(s for s in shape if isinstance(s, int) and 0 <= s < 100) if isinstance(shape, list) else 1
    data = bytes(max(0, min(size * 4 + draw(st.sampled_from([0, 0, -4, 4])), 20_000)))
    offsets = draw(st.just([0, len(data)]) | st.lists(st.integers(-5, 50_000) | ODD_INT, max_size=3) | JSONISH)
    entry = draw(st.just({"dtype": dtype, "shape": shape, "data_offsets": offsets}) | JSONISH)
    header = {draw(st.sampled_from(["latents", "images", "x"])): entry}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.sampled_from(["scaling_factor", "shift_factor", "scaled",
                                                                       "original_size", "quant_scale", "model"]),
                                                      JSONISH.map(json.dumps) | st.text(max_size=6), max_size=4) | JSONISH)
    if draw(st.integers(0, 5)) == 0:
        header["other"] = entry
    text = json.dumps(header).encode()
    n = len(text) if draw(st.integers(0, 7)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", n) + text + data


@st.composite
def json_body(draw):
    data = draw(st.recursive(st.floats(width=32) | st.integers(-300, 300),
                             lambda inner: st.lists(inner, min_size=0, max_size=4), max_leaves=40) | JSONISH)
    if draw(st.booleans()):
        return json.dumps(data).encode()
    doc = {"data": data}
    for key, value in (("shape", SHAPE_JSON), ("dtype", DTYPE_NAME | JSONISH),
                       ("original_size", JSONISH), ("scaling_factor", JSONISH), ("scaled", JSONISH)):
        if draw(st.booleans()):
            doc[key] = draw(value)
    text = json.dumps(doc)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


def tensor_request():
    """(body, content type, shape query values, dtype query value) of any format."""
    return st.one_of(
        raw_request(),
        st.tuples(npy_body(), st.just(wire.NPY), st.just([]), st.just(None)),
        st.tuples(safetensors_body(), st.just(wire.SAFETENSORS), st.just([]), st.just(None)),
        st.tuples(json_body(), st.just(wire.JSON), st.just([]), st.just(None)),
        st.tuples(st.binary(max_size=300), st.sampled_from([*wire.TENSOR_TYPES, "text/plain", ""]),
                  st.lists(QUERY_VALUE, max_size=2), st.none() | DTYPE_NAME),
    )


# --- in-process: the decoders ------------------------------------------------------------------
@settings(max_examples=600, **FUZZ)
@given(tensor_request())
def test_wire_decoders_give_a_servable_tensor_or_an_api_4xx(request):
    body, kind, shape, dtype = request
    try:
        t, meta = wire.read_tensor(body, kind, shape, dtype, LIMITS)
    except APIError as exc:
        assert 400 <= exc.status < 500 and exc.message and len(exc.message) < 600, exc.message
        event(f"{kind or 'raw'}: {exc.status}")
        return
    event(f"{kind or 'raw'}: tensor")
    assert t.dtype in wire.DTYPES.values()
    assert 1 <= t.ndim <= wire.MAX_DIMS and 1 <= t.numel() <= LIMITS.max_elements
    assert isinstance(meta, dict)


@st.composite
def written_tensor(draw):
    """A tensor the wire writers can write: random shape (1 to 5 dims), dtype and content."""
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    dtype = draw(st.sampled_from(list(wire.DTYPES.values())))
    seed = draw(st.integers(0, 2**16))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * draw(st.sampled_from([1.0, 100.0, 1e4]))
    return t.abs().clamp(0, 255).to(dtype) if dtype == torch.uint8 else t.to(dtype)


@settings(max_examples=200, **FUZZ)
@given(written_tensor(), st.sampled_from([wire.SAFETENSORS, wire.NPY, wire.JSON, "tensor/binary"]),
       st.dictionaries(st.sampled_from(["model", "scaled", "note"]), st.text(max_size=5), max_size=2))
def test_every_format_reads_back_what_it_writes(t, kind, meta):
    body, media, headers = wire.write_tensor(t, kind, metadata=meta)
    got, got_meta = wire.read_tensor(body, media, [headers["shape"]], headers["dtype"], LIMITS)
    if kind == wire.NPY and t.dtype == torch.bfloat16:  # npy has no bfloat16: sent as float32
        got = got.to(torch.bfloat16)
    assert got.dtype == t.dtype and torch.equal(got, t)
    if kind in (wire.SAFETENSORS, wire.JSON):
        assert {k: got_meta[k] for k in meta} == meta


# --- over HTTP: one keep-alive connection to a live server ------------------------------------
PATHS = ["/decode", "/encode", "/roundtrip", "/interpolate", "/sample"]
QUERY_KEYS = ["model", "shape", "dtype", "scaling_factor", "shift_factor", "do_scaling", "output_type", "height",
              "width", "tiled", "seed", "sample", "output_dtype", "steps", "method", "output", "n", "quality",
              "image_format", "duration", "partial_postprocess"]


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@st.composite
def servable(draw):
    """A body the server can serve: latents (decode, interpolate) or a small image, in any format."""
    if draw(st.booleans()):
        return _png(draw(st.integers(1, 40)), draw(st.integers(1, 40))), "image/png", [], None
    n, c, h, w = draw(st.integers(1, 2)), draw(st.sampled_from([4, 4, 4, 3])), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    z = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    if c == 3:
        z = z.clamp(-1, 1)  # an image tensor for /encode
    kind = draw(st.sampled_from([wire.SAFETENSORS, wire.NPY, wire.JSON, "tensor/binary"]))
    body, media, headers = wire.write_tensor(z.to(draw(st.sampled_from([torch.float32, torch.float16]))), kind)
    return body, media, [headers["shape"]], headers["dtype"]


@st.composite
def http_request(draw):
    path = draw(st.sampled_from(PATHS))
    body, kind, shape, dtype = draw(tensor_request() | servable() | servable() | st.tuples(
        st.sampled_from([_png(8, 8), _png(1, 64), _png(16, 3), b"\x89PNG\r\n\x1a\n" + bytes(20)]),
        st.sampled_from(["image/png", "image/jpeg", ""]), st.just([]), st.none()))
    query = [("shape", s) for s in shape] + ([("dtype", dtype)] if dtype is not None else [])
    query += draw(st.lists(st.tuples(st.sampled_from(QUERY_KEYS), QUERY_VALUE), max_size=draw(st.sampled_from([0, 0, 2, 4]))))
    headers = {"Content-Type": draw(st.just(kind) | st.just(kind) | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30))}
    for name, values in (("Accept", st.sampled_from(["image/png", "image/webp", wire.NPY, wire.JSON, wire.SAFETENSORS,
                                                     "tensor/binary", "*/*", "x/y;q=0.1"])),
                         ("X-Request-ID", st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20))):
        if draw(st.booleans()):
            headers[name] = draw(values)
    if path == "/interpolate" and draw(st.booleans()):  # a multipart form of two such parts
        boundary = "fuzzb0undary"
        parts = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"; filename="f"\r\n'
                         f"Content-Type: {kind or 'application/octet-stream'}\r\n\r\n".encode() + body + b"\r\n"
                         for n in ("a", "b"))
        body = parts + f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    return path, query, headers, body


def fuzz_app(tiny_vae_dir):
    settings_ = Settings(warmup=False, max_pixels=64 * 64, max_body_bytes=60_000, max_latent_elements=4 * 16 * 16,
                         max_json_bytes=20_000, max_cost=50.0, request_timeout=30)
    return create_app(settings_, ModelRegistry([VAEModel.load("tiny", tiny_vae_dir)]))


def check_answer(status: int, content_type: str | None, content: bytes) -> None:
    assert status < 500, (status, content[:300])
    assert b"Traceback" not in content and b'File "' not in content
    if status >= 400:
        assert content_type == "application/json", (status, content[:200])
        err = json.loads(content)["error"]
        assert err["type"] and err["message"] and len(err["message"]) < 1000


@pytest.fixture(scope="module")
def client(tiny_vae_dir):
    from fastapi.testclient import TestClient

    with TestClient(fuzz_app(tiny_vae_dir), raise_server_exceptions=True) as c:
        yield c


@settings(max_examples=80, **FUZZ)
@given(http_request())
def test_in_process_answers_only_api_errors(client, request):
    """The same requests in-process (ASGI, no sockets): only 2xx and JSON 4xx."""
    path, query, headers, body = request
    r = client.post(f"{path}?{urlencode(query)}", content=body, headers=headers)
    check_answer(r.status_code, r.headers.get("content-type"), r.content)


@pytest.fixture(scope="module")
def server(tiny_vae_dir):
    with live_server(fuzz_app(tiny_vae_dir)) as url:
        parsed = urlparse(url)
        state = {"conn": http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60), "reconnects": 0}
        yield state
        state["conn"].close()


@settings(max_examples=120, **FUZZ)
@given(http_request())
def test_http_answers_only_api_errors_on_one_keep_alive_connection(server, request):
    path, query, headers, body = request
    conn = server["conn"]
    conn.request("POST", f"{path}?{urlencode(query)}", body=body, headers=headers)
    r = conn.getresponse()
    content = r.read()
    event(f"{path}: {r.status}")
    check_answer(r.status, r.getheader("content-type"), content)
    if (r.getheader("connection") or "").lower() == "close":  # a 408 or a body refused unread
        conn.close()
        server["reconnects"] += 1
    # The same connection answers the next request (a reset would raise here).
    conn.request("GET", "/healthz")
    probe = conn.getresponse()
    assert probe.status == 200 and probe.read() == b'{"status":"ok"}'


def test_the_fuzzed_connection_was_kept_alive(server):
    assert server["reconnects"] <= 5, server["reconnects"]  # only where the server said `Connection: close`
