"""Property-based API tests (schemathesis 4.x) from the app's own OpenAPI schema: no server
errors, and every answer matches what the schema says (status codes, content types, bodies).
Bounded: a few examples per operation, in-process (ASGI).

Each operation's strategy is driven by hypothesis directly, not through schemathesis' pytest
plugin (`schemathesis.pytest.from_fixture`): that plugin reaches into pytest internals that
pytest 9.2 removed (`Function._nodeid`), and a plain test keeps working across pytest releases."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis import checks

from app.http.app import create_app
from app.http.registry import ModelRegistry
from app.http.settings import Settings
from models.vae.inference import VAEModel

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


def _check(case) -> None:
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    # positive_data_acceptance is left out on purpose: the schema cannot say "these bytes must be a
    # decodable PNG" or "the tensor must have 4 channels", so most schema-valid bodies are 4xx here.
    case.validate_response(response, excluded_checks=[checks.positive_data_acceptance])


def test_api_matches_its_schema(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    for op in operations:
        run = hypothesis.settings(max_examples=12, deadline=None, derandomize=True, database=None,
                                  suppress_health_check=list(hypothesis.HealthCheck))(
            hypothesis.given(case=op.as_strategy())(_check))
        try:
            run()
        except Exception as exc:  # name the operation: hypothesis' own report does not
            raise AssertionError(f"{op.label}: {exc}") from exc
