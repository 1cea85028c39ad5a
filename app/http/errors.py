"""Exception handlers: every error becomes `{"error": {"type", "message"}}` with its status.

Anything unexpected is a 500 with a generic message: tracebacks go to the server log, never to
the client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.protocol.errors import APIError, BadRequest, PayloadTooLarge, UnsupportedMediaType, error_body
from models.vae.imaging import ImageError

log = logging.getLogger("vae.server")


def from_image_error(exc: ImageError) -> APIError:
    cls = {"unsupported": UnsupportedMediaType, "too_large": PayloadTooLarge}.get(exc.kind, BadRequest)
    return cls(exc.message)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(exc.type, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ImageError)
    async def _image_error(request: Request, exc: ImageError):
        err = from_image_error(exc)
        return JSONResponse(error_body(err.type, err.message), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # Query parameters of the wrong type: name them, without echoing pydantic internals.
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ())[1:]) or "request"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return JSONResponse(error_body("bad_request", "; ".join(parts)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # exc.headers: e.g. the Allow header a 405 must carry (RFC 9110).
        return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
