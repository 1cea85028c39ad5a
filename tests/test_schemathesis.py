"""Property-based API tests (schemathesis 4.x) from the app's own OpenAPI schema: no server
errors, and every answer matches what the schema says (status codes, content types, bodies).
Bounded: a few examples per operation, in-process (ASGI)."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis import checks

from app.server import ModelRegistry, create_app
from app.settings import Settings
from models.inference import VAEModel

BINARY = ("image/png", "image/jpeg", "image/webp", "tensor/binary", "application/octet-stream",
          "application/x-safetensors", "application/x-npy")


@schemathesis.serializer(*BINARY)
def raw_bytes(ctx, value) -> bytes:
    """`format: binary` bodies are generated as bytes: send them as they are."""
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(scope="module")
def api_schema(tiny_vae_dir):
    settings = Settings(warmup=False, max_pixels=64 * 64, max_body_bytes=100_000, request_timeout=30)
    app = create_app(settings, ModelRegistry([VAEModel.load("tiny", tiny_vae_dir)]))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis.settings(max_examples=12, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_api_matches_its_schema(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    # positive_data_acceptance is left out on purpose: the schema cannot say "these bytes must be a
    # decodable PNG" or "the tensor must have 4 channels", so most schema-valid bodies are 4xx here.
    case.validate_response(response, excluded_checks=[checks.positive_data_acceptance])
