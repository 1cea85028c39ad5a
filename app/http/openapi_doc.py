"""Honest OpenAPI responses for the binary endpoints.

FastAPI documents every 200 as JSON and every error as its own 422 validation body; this service
answers images and tensors, and errors as `{"error": {"type", "message"}}` (app.protocol.errors) with
400/401/404/413/415/422/503/504. The schema is patched once, when first served.
"""

from __future__ import annotations

from fastapi import FastAPI

_BIN = {"schema": {"type": "string", "format": "binary"}}
IMAGES = {t: _BIN for t in ("image/png", "image/jpeg", "image/webp")}
TENSORS = {t: _BIN for t in ("application/octet-stream", "tensor/binary", "application/x-safetensors", "application/x-npy")}
TENSORS["application/json"] = {"schema": {"type": "object"}}
# Request bodies (the endpoints declare theirs: app.http.endpoint.Endpoint.body).
IMAGE_BODY = {**IMAGES, "multipart/form-data": {"schema": {"type": "object", "properties": {"image": _BIN["schema"]}}}}
TENSOR_BODY = {"tensor/binary": _BIN, "application/x-safetensors": _BIN, "application/x-npy": _BIN, "application/json": {}}
ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["type", "message"],
                             "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
}
ERRORS = {
    "400": "malformed request or query", "401": "missing or wrong API key", "404": "unknown model",
    "413": "body, image or tensor over a limit", "415": "unsupported format", "422": "valid syntax, unservable tensor",
    "503": "queue full or shutting down (Retry-After)", "504": "deadline passed",
}


def install(app: FastAPI, secured: bool, answers: dict[str, dict]) -> None:
    """`answers`: path -> the media types of its 200 answer (from the endpoints' declarations)."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
            errors = {code: {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                      for code, text in ERRORS.items()}
            for path, ops in schema.get("paths", {}).items():
                for op in ops.values():
                    responses = op.setdefault("responses", {})
                    responses.pop("422", None)  # FastAPI's validation body: never what this app sends
                    if path in answers:
                        responses["200"] = {"description": "the result", "content": answers[path]}
                        responses.update(errors)
                    elif secured and path not in ("/healthz", "/readyz"):
                        responses["401"] = errors["401"]
            if secured:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
