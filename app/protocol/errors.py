"""Error types of the HTTP API, shared by the server and the client (no web framework here).

400 malformed request, 404 unknown model, 408 body not received in time, 413 too large (body,
pixels, elements, or a request whose estimated compute is over the budget), 415 unsupported format,
422 a tensor or request that parses but cannot be served (shape, channels, dtype, NaN/Inf in or out),
401 no or wrong API key, 503 queue full or shutting down (with Retry-After), 504 deadline passed. The body of every error
is `{"error": {"type", "message"}}` (`error_body`); app.http.errors installs the handlers.
"""

from __future__ import annotations


class APIError(Exception):
    status = 400
    type = "bad_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers  # e.g. Retry-After on 503


class BadRequest(APIError):
    status, type = 400, "bad_request"


class ModelNotFound(APIError):
    status, type = 404, "model_not_found"


class PayloadTooLarge(APIError):
    status, type = 413, "payload_too_large"


class RequestTimeout(APIError):
    status, type = 408, "request_timeout"  # the body did not arrive in time (the connection is closed)


class CostTooHigh(APIError):
    status, type = 413, "cost_too_high"  # estimated compute above settings.max_cost


class UnsupportedMediaType(APIError):
    status, type = 415, "unsupported_media_type"


class Unprocessable(APIError):
    status, type = 422, "unprocessable"


class Unauthorized(APIError):
    status, type = 401, "unauthorized"


class Unavailable(APIError):
    status, type = 503, "unavailable"  # queue full or shutting down: retry later (Retry-After)


class DeadlineExceeded(APIError):
    status, type = 504, "deadline_exceeded"


def error_body(type_: str, message: str) -> dict:
    return {"error": {"type": type_, "message": message}}
