"""Exception handlers: every error becomes `{"error": {"type", "message"}}` with its status.

Anything unexpected is a 500 with a generic message: tracebacks go to the server log, never to
the client. That 500 is written by `UnexpectedErrors`, a middleware inside the app, and not by an
`Exception` handler: Starlette runs those in its outermost ServerErrorMiddleware, which re-raises
after answering, and uvicorn then closes the connection under the client's next request.
"""

from __future__ import annotations

import asyncio
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


class UnexpectedErrors:
    """Plain ASGI, the innermost middleware: an exception no handler took becomes a JSON 500 here
    and the request ends normally, so its keep-alive connection stays usable. A request cancelled
    at shutdown (past the grace period) gets a JSON 503 with Retry-After instead of uvicorn's
    plain-text 500. Once an answer has started nothing can be added to it: the error is re-raised
    (uvicorn closes that connection, the only way to end half an answer)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not started:
                await _answer(send, 503, error_body("unavailable", "the server is shutting down: retry on another instance"),
                              {"Retry-After": "1", "Connection": "close"})
            raise
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await _answer(send, 500, error_body("internal_error", "internal server error"))


async def _answer(send, status: int, body: dict, headers: dict | None = None) -> None:
    response = JSONResponse(body, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
