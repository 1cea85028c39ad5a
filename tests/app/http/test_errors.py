"""Unexpected errors on a real loopback server: a JSON 500 without a traceback, and the keep-alive
connection it came on stays usable (issue 12, finding 2: the old handler answered, then re-raised,
and uvicorn closed the connection under the next request)."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlparse

import pytest
import requests
import torch

from app.http.app import create_app
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from app.protocol import wire
from models.vae.inference import VAEModel
from support import live_server

Z = torch.zeros(1, 4, 2, 2)
BOOM = torch.zeros(1, 4, 2, 3)  # this shape makes the patched model fail


@pytest.fixture(scope="module")
def base(tiny_vae_dir):
    model = VAEModel.load("tiny", tiny_vae_dir)
    inner = model.decode

    def decode(z, *args, **kwargs):
        if z.shape[-1] == 3:
            raise RuntimeError("secret internal detail")
        return inner(z, *args, **kwargs)

    model.decode = decode
    with live_server(create_app(Settings(warmup=False), ModelRegistry([model]))) as url:
        yield url


def target(z: torch.Tensor) -> str:
    return f"/decode?shape={','.join(map(str, z.shape))}&dtype=float32&output_type=pt"


def test_500_is_json_without_traceback_and_the_connection_survives(base):
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.connect()
    sock = conn.sock
    for _ in range(10):  # one connection: a closed one would fail the next request
        for z, status in ((BOOM, 500), (Z, 200)):
            conn.request("POST", target(z), body=wire.tensor_to_raw(z), headers={"Content-Type": "tensor/binary"})
            r = conn.getresponse()
            body = r.read()
            assert r.status == status, body[:300]
            if status == 500:
                assert r.getheader("content-type") == "application/json"
                assert json.loads(body) == {"error": {"type": "internal_error", "message": "internal server error"}}
                assert b"secret" not in body and b"Traceback" not in body
            assert (r.getheader("connection") or "").lower() != "close"
    assert conn.sock is sock  # never reconnected
    conn.close()


def test_one_session_after_a_500_all_valid_requests_succeed(base):
    with requests.Session() as s:
        def post(z):
            return s.post(base + target(z), data=wire.tensor_to_raw(z), headers={"Content-Type": "tensor/binary"},
                          timeout=30)

        assert post(BOOM).status_code == 500
        statuses = [post(Z).status_code for _ in range(30)]
    assert statuses == [200] * 30


def test_a_body_that_never_arrives_gets_408_and_the_server_goes_on(tiny_vae_dir):
    import socket
    import time

    app = create_app(Settings(warmup=False, body_timeout=1.0), ModelRegistry([VAEModel.load("tiny", tiny_vae_dir)]))
    with live_server(app) as url:
        parsed = urlparse(url)
        with socket.create_connection((parsed.hostname, parsed.port), timeout=20) as s:
            t0 = time.monotonic()
            s.sendall(b"POST /decode?shape=1,4,2,2 HTTP/1.1\r\nHost: x\r\nContent-Type: tensor/binary\r\n"
                      b"Content-Length: 64\r\n\r\n" + bytes(10))  # 54 bytes never come
            answer = b""
            while b"}" not in answer:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
            took = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"request_timeout"' in answer and b"connection: close" in answer.lower()
        assert 0.9 < took < 5, took
        z = torch.zeros(1, 4, 2, 2)
        r = requests.post(url + target(z), data=wire.tensor_to_raw(z), headers={"Content-Type": "tensor/binary"}, timeout=30)
        assert r.status_code == 200
