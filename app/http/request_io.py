"""Reading request bodies and writing answers: the I/O every endpoint shares.

Bodies are read with their size checked as they arrive (413 before the whole body is held);
answers are images (PNG/JPEG/WebP, chosen by `image_format` or Accept) or tensors in a wire
format (app.protocol.wire, chosen by Accept).
"""

from __future__ import annotations

import json
import time

import anyio
import torch
from fastapi import Request
from fastapi.responses import Response

from app.http import limits
from app.protocol import wire
from app.protocol.errors import BadRequest, RequestTimeout
from models.vae import imaging


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) more than `limit` bytes before reading them when possible,
    and (408, connection closed) a body not complete `body_timeout` seconds after the request came."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        wire.check_size(int(declared), limit)
    chunks, size = [], 0
    timeout = request.app.state.settings.body_timeout
    arrived = getattr(request.state, "t0", time.monotonic())
    try:
        with anyio.fail_after(max(0.0, arrived + timeout - time.monotonic())):
            async for chunk in request.stream():
                size += len(chunk)
                wire.check_size(size, limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s ({size} bytes came)",
                             {"Connection": "close"}) from None
    body = b"".join(chunks)
    request._body = body  # Starlette re-reads a consumed stream from here (needed by request.form())
    return body


def tensor_limits(settings, max_elements: int) -> wire.TensorLimits:
    return wire.TensorLimits(max_elements=max_elements, max_json_bytes=settings.max_json_bytes)


def body_limit(settings, content_type: str | None) -> int:
    """Bytes a body may have: max_body_bytes, and max_json_bytes for JSON (parsed into objects)."""
    if wire.media_type(content_type) == wire.JSON:
        return min(settings.max_body_bytes, settings.max_json_bytes)
    return settings.max_body_bytes


async def read_form_file(request: Request, name: str, hint: str) -> tuple[bytes, str | None]:
    """(bytes, content type) of the multipart file field `name`; 400 naming it when absent."""
    form = await request.form()
    upload = form.get(name)
    if upload is None or isinstance(upload, str):
        raise BadRequest(f"multipart form needs a file field named `{name}`{hint}")
    return await upload.read(), upload.content_type


async def read_image_bytes(request: Request, limit: int) -> bytes:
    """Image bytes from a raw body or a multipart form field `image`."""
    body = await read_body(request, limit)
    if wire.media_type(request.headers.get("content-type")) == "multipart/form-data":
        body, _ = await read_form_file(request, "image", "")
    if not body:
        raise BadRequest("empty request body: send an image or a tensor")
    limits.check_image_format(body, request.app.state.settings.image_formats)
    return body


def image_format_for(image_format: str | None, accept: str | None, default: str = "png") -> str:
    """`image_format` query parameter first, then an image type in Accept, then `default`."""
    if image_format:
        fmt = image_format.lower()
        if fmt not in imaging.FORMAT_ALIASES:
            raise BadRequest(f"unsupported image_format {image_format[:40]!r}: use png, jpg or webp")
        return fmt
    accept = (accept or "").lower()
    for media, fmt in (("image/png", "png"), ("image/jpeg", "jpg"), ("image/webp", "webp")):
        if media in accept:
            return fmt
    return default


def wants_tensor(accept: str | None) -> bool:
    """A tensor wire format asked for in Accept, and no image type."""
    return wire.media_type(accept) in wire.TENSOR_TYPES and "image/" not in (accept or "")


def image_response(img, fmt: str, quality: int, headers: dict) -> Response:
    body = imaging.encode_image(img, fmt, quality)
    media = imaging.MEDIA_TYPES[imaging.FORMAT_ALIASES[fmt]]
    return Response(body, media_type=media, headers=headers)


def tensor_response(t: torch.Tensor, accept: str | None, name: str, metadata: dict, headers: dict) -> Response:
    body, media, tensor_headers = wire.write_tensor(t, accept, name, metadata)
    return Response(body, media_type=media, headers={**headers, **tensor_headers})


def json_header(value) -> str:
    return json.dumps(value)
