"""API keys: `Authorization: Bearer KEY` on every route but the probes, /metrics and the web page.

Keys come from settings.api_keys (VAE_API_KEYS, comma-separated); none configured = open.
Every configured key is compared, in constant time (hmac.compare_digest), so neither a key's
prefix nor its position in the list shows in the response time.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse

from app.protocol.errors import error_body

PUBLIC = {"/healthz", "/readyz", "/metrics", "/", "/favicon.ico"}
PUBLIC_PREFIXES = ("/static/", "/static-docs/")  # page and API-docs assets; the page sends the key on its API calls


def key_matches(presented: str, keys: list[bytes]) -> bool:
    given = presented.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    return ok


class APIKeyMiddleware:
    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or _public(scope["path"]) or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers", ())).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip() and key_matches(token.strip(), self.keys):
            return await self.app(scope, receive, send)
        message = "missing API key: send `Authorization: Bearer KEY`" if not auth else "invalid API key"
        response = JSONResponse(error_body("unauthorized", message), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _public(path: str) -> bool:
    return path in PUBLIC or path.startswith(PUBLIC_PREFIXES)
