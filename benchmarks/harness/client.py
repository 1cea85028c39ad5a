"""Talking to a server over HTTP: the /decode path, a keep-alive client, latents from /encode or
random ones."""

from __future__ import annotations

import http.client
import json
import urllib.parse

from benchmarks.harness.images import png_bytes


def decode_path(shape, image_format: str | None = "png", output_type: str | None = None, extra: dict | None = None) -> str:
    """The /decode URL path with the raw-body query (shape repeated, dtype float32)."""
    q = [("shape", str(int(s))) for s in shape] + [("dtype", "float32")]
    if image_format:
        q.append(("image_format", image_format))
    if output_type:
        q.append(("output_type", output_type))
    q += list((extra or {}).items())
    return "/decode?" + urllib.parse.urlencode(q)


class Client:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 (http.client: the least client overhead)."""

    def __init__(self, base: str, timeout: float = 600):
        u = urllib.parse.urlsplit(base)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """-> (status, headers dict (lower-case names), body bytes). Reconnects once on a stale connection."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
                return r.status, {k.lower(): v for k, v in r.getheaders()}, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def post(self, path: str, body: bytes, content_type: str = "application/octet-stream", **headers):
        return self.request("POST", path, body, {"Content-Type": content_type, **headers})

    def get(self, path: str):
        return self.request("GET", path)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def encode_latents(base: str, img) -> tuple[bytes, list[int]]:
    """/encode of a PIL image on our service -> (raw little-endian float32 latents, shape)."""
    c = Client(base)
    try:
        status, headers, body = c.post("/encode", png_bytes(img), "image/png")
    finally:
        c.close()
    if status != 200:
        raise RuntimeError(f"/encode answered {status}: {body[:300]!r}")
    return body, json.loads(headers["shape"])


def random_latents(shape, seed: int = 0) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).standard_normal(shape).astype("<f4").tobytes()
