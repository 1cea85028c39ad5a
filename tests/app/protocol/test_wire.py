"""The tensor wire formats as the one validation layer for request tensors (app/protocol/wire.py):
every malformed-but-parseable body is an APIError naming what was wrong (issue 12, findings 1
and 8), never another exception, and the valid spellings still read back exactly."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import safetensors.torch
import torch

from app.protocol import wire
from app.protocol.errors import APIError, BadRequest, PayloadTooLarge, Unprocessable

Z = torch.arange(64, dtype=torch.float32).reshape(1, 4, 4, 4) / 64


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def st_raw(header: dict, data: bytes) -> bytes:
    """A safetensors body written by hand (for headers the library refuses to write)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def refused(kind: type[APIError], fn, *args, words: str = "") -> str:
    with pytest.raises(APIError) as info:
        fn(*args)
    assert type(info.value) is kind or kind is APIError, (type(info.value), info.value.message)
    assert words in info.value.message, info.value.message
    return info.value.message


@pytest.mark.parametrize("values, words", [
    (["[1e999,4,4,4]"], "not an integer"),
    (["[1.9,4,4,4.2]"], "not an integer"),  # used to be truncated to [1, 4, 4, 4]
    (["[true,4,4,4]"], "integers"),
    (['["1",4,4,4]'], "integers"),
    (["[[1],4,4,4]"], "integers"),
    (["[NaN,4,4,4]"], "not an integer"),
    (["1,4,4,4.0"], "integers"),
    (["1,4,4,1e3"], "integers"),
    (["1,4,-4,4"], "integers"),
    (["4", "4.5"], "integers"),
    (["[" + "9" * 400 + "]"], "digits"),
    (["1," + "9" * 30], "integers"),
    (["[1,4,"], "shape"),
    (["[]"], "integers"),
    (["1,1,1,1,1,1,1,1,1"], "1 to 8"),
])
def test_query_shape_is_integers_only(values, words):
    refused(BadRequest, wire.parse_shape, values, words=words)


def test_query_shape_spellings():
    for values in (["[1, 4, 4, 4]"], ["1,4,4,4"], ["1", "4", "4", "4"], [" 1 , 4,4 ,4"]):
        assert wire.parse_shape(values) == (1, 4, 4, 4)
    refused(Unprocessable, wire.parse_shape, ["1,4,0,4"], words="zero-size")
    refused(PayloadTooLarge, wire.parse_shape, ["1,4,64,64"], wire.TensorLimits(max_elements=1000), words="16384 elements")


@pytest.mark.parametrize("name, error", [(5, BadRequest), (["float32"], BadRequest), (True, BadRequest),
                                         ("float64", Unprocessable), ("int8", Unprocessable), ("x" * 10_000, Unprocessable)])
def test_dtype_names(name, error):
    message = refused(error, wire.parse_dtype, name, words="dtype")
    assert len(message) < 200  # never echoed in full


@pytest.mark.parametrize("doc, error, words", [
    ({"data": Z.tolist(), "dtype": 5}, BadRequest, "dtype"),
    ({"data": [], "shape": [1, 4, 0, 0]}, Unprocessable, "zero-size"),
    ({"data": [[[[]]]]}, Unprocessable, "zero-size"),
    ([[[], [], [], []]], Unprocessable, "zero-size"),
    ({"data": [1.0] * 4, "shape": "1444"}, BadRequest, "shape"),
    ({"data": [1.0] * 4, "shape": [1, 4, 1.0, 1]}, BadRequest, "shape"),
    ({"data": [1.0] * 4, "shape": [True, 4, 1, 1]}, BadRequest, "shape"),
    ({"data": [1.0] * 4, "shape": [1, 2, 2, 2]}, BadRequest, "needs 8"),
    ({"data": [[True, False]]}, BadRequest, "booleans"),
    ({"data": [["1", "2"]]}, BadRequest, "strings"),
    ({"data": [[1, "2"]]}, BadRequest, "strings"),
    ({"data": [[1, [2]]]}, BadRequest, "rectangular"),
    ({"data": [[1, None]]}, BadRequest, "rectangular"),
    ({"data": {"a": 1}}, BadRequest, "nested list"),
    ({"data": 3}, BadRequest, "nested list"),
    ({"data": [300, 2], "dtype": "uint8"}, Unprocessable, "0 to 255"),
    ({"data": [1.5], "dtype": "uint8"}, Unprocessable, "0 to 255"),
    ({"shape": [1]}, BadRequest, "data"),
])
def test_json_bodies(doc, error, words):
    refused(error, wire.tensor_from_json, json.dumps(doc).encode(), words=words)


def test_json_huge_integers_and_sizes():
    big = "9" * 400
    refused(BadRequest, wire.tensor_from_json, f'{{"data": [[[[{big}]]]]}}'.encode(), words="digits")
    refused(BadRequest, wire.tensor_from_json, f'{{"data": [1], "shape": [{big}]}}'.encode(), words="digits")
    refused(BadRequest, wire.tensor_from_json, f'{{"data": [1], "original_size": [{big}, 8]}}'.encode(), words="digits")
    refused(BadRequest, wire.tensor_from_json, b"[" * 100 + b"1" + b"]" * 100, words="rectangular")
    body = json.dumps({"data": Z.tolist()}).encode()
    refused(PayloadTooLarge, wire.tensor_from_json, body, wire.TensorLimits(max_json_bytes=len(body) - 1), words="JSON")
    refused(PayloadTooLarge, wire.tensor_from_json, body, wire.TensorLimits(max_elements=63), words="64 elements")
    t, meta = wire.tensor_from_json(json.dumps({"data": Z.flatten().tolist(), "shape": [1, 4, 4, 4], "model": "m"}).encode())
    assert torch.equal(t, Z) and meta == {"model": "m"}
    t, _ = wire.tensor_from_json(b'{"data": [[1, 2.5]], "dtype": "bfloat16"}')
    assert t.dtype == torch.bfloat16 and t.tolist() == [[1.0, 2.5]]


def test_safetensors_bodies():
    save = safetensors.torch.save
    refused(Unprocessable, wire.tensor_from_safetensors, save({"latents": torch.zeros(1, 4, 0, 4)}), words="zero-size")
    for dtype, name in ((torch.float8_e4m3fn, "F8_E4M3"), (torch.int64, "I64"), (torch.bool, "BOOL"),
                        (torch.complex64, "C64"), (torch.int8, "I8")):
        refused(Unprocessable, wire.tensor_from_safetensors, save({"latents": Z.to(dtype)}), words=name)
    refused(BadRequest, wire.tensor_from_safetensors, save({"latents": torch.tensor(1.0)}), words="shape")
    data = Z.numpy().tobytes()
    entry = {"dtype": "F32", "shape": [1, 4, 4, 4], "data_offsets": [0, 256]}
    for bad, words in (({**entry, "shape": [1, 4, 4, 4.0]}, "integers"), ({**entry, "shape": "1444"}, "integers"),
                       ({**entry, "shape": [1, 4, 4, 5]}, "data_offsets"), ({**entry, "data_offsets": [0, 512]}, "data_offsets"),
                       ({**entry, "data_offsets": [-256, 0]}, "data_offsets"), ({**entry, "dtype": 5}, "dtype"),
                       ({**entry, "shape": [2**30, 2**30]}, "elements"), ("x", "dtype")):
        refused(APIError, wire.tensor_from_safetensors, st_raw({"latents": bad}, data), words=words)
    refused(BadRequest, wire.tensor_from_safetensors, st_raw({"__metadata__": {"scaled": True}, "latents": entry}, data),
            words="__metadata__")
    refused(BadRequest, wire.tensor_from_safetensors, st_raw([1, 2], b""), words="object")
    refused(BadRequest, wire.tensor_from_safetensors, b"\x01\x00", words="header length")
    refused(BadRequest, wire.tensor_from_safetensors, struct.pack("<Q", 2**63) + b"{}", words="header length")
    t, meta = wire.tensor_from_safetensors(st_raw({"__metadata__": {"m": "1"}, "latents": entry, "other": entry}, data))
    assert torch.equal(t, Z) and meta == {"m": "1"}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        t, _ = wire.tensor_from_safetensors(save({"latents": (Z * 100).to(dtype)}))
        assert t.dtype == dtype and torch.equal(t, (Z * 100).to(dtype))
    t, _ = wire.tensor_from_safetensors(save({"x": Z.double()}))
    assert t.dtype == torch.float32 and torch.equal(t, Z)


def test_npy_bodies():
    refused(Unprocessable, wire.tensor_from_npy, npy(np.zeros((1, 4, 0, 4), np.float32)), words="zero-size")
    refused(BadRequest, wire.tensor_from_npy, npy(np.float32(1.0)), words="shape")
    refused(BadRequest, wire.tensor_from_npy, npy(Z.numpy()) + b"junk", words="4 bytes after the array")
    refused(BadRequest, wire.tensor_from_npy, npy(Z.numpy())[:-4], words="truncated")
    for array in (Z.numpy().astype(np.complex64), Z.numpy().astype(np.int64), Z.numpy() > 0,
                  np.zeros(2, dtype=[("a", "<f4"), ("b", "<f4")])):
        refused(Unprocessable, wire.tensor_from_npy, npy(array), words="dtype")
    # A header claiming 2**40 floats over a few bytes: refused from the header, nothing allocated.
    header = npy(np.zeros(1, np.float32)).replace(b"(1,)", b"(1099511627776,)".ljust(4))
    refused(APIError, wire.tensor_from_npy, header, wire.TensorLimits(max_elements=1 << 20))
    refused(APIError, wire.tensor_from_npy, header)
    # Big-endian and Fortran-ordered arrays are converted, not refused (finding 8).
    for array in (Z.numpy().astype(">f4"), np.asfortranarray(Z.numpy()), Z.numpy().astype(">f2"), Z.numpy().astype(np.float64)):
        t = wire.tensor_from_npy(npy(array))
        assert t.dtype in (torch.float32, torch.float16)
        torch.testing.assert_close(t.float(), Z, atol=1e-3, rtol=0)


def test_raw_bodies():
    refused(BadRequest, wire.read_tensor, Z.numpy().tobytes(), "tensor/binary", ["[1.9,4,4,4.2]"], None)
    refused(Unprocessable, wire.read_tensor, b"", "tensor/binary", ["1,4,0,4"], None, words="zero-size")
    refused(PayloadTooLarge, wire.read_tensor, b"", "tensor/binary", ["100000,4,100000,100000"], None,
            wire.TensorLimits(max_elements=1 << 20))
    refused(BadRequest, wire.read_tensor, b"x", "tensor/binary", ["1"], 5, words="dtype")
    refused(APIError, wire.read_tensor, b"x", "text/" + "p" * 10_000, ["1"], None)
    t, _ = wire.read_tensor(Z.numpy().tobytes(), "tensor/binary", ["1,4,4,4"], "float32")
    assert torch.equal(t, Z)
