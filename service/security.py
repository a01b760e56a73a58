"""Access control: API keys checked before anything else of a request is read.

With keys configured (API_KEY, API_KEY_FILE), every path but the open ones (/health, the API's
documentation, and /metrics unless METRICS_REQUIRE_KEY) needs `Authorization: Bearer <key>`,
what OpenAI's clients send. Anything else is a 401 with a JSON body (OpenAI's envelope on /v1).
The check is an ASGI middleware, so an unauthenticated request gets its 401 before its body is
read or parsed; the routes declare the scheme (`bearer_scheme`) only so that /openapi.json says so.
"""

from __future__ import annotations

import hmac

from fastapi.security import HTTPBearer
from starlette.responses import JSONResponse

DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

# Declared on the keyed routes for the OpenAPI document; APIKeyMiddleware does the checking.
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="APIKey",
                           description="`Authorization: Bearer <key>`, one of API_KEY's or API_KEY_FILE's keys.")

MISSING = "Missing API key: send it in the header 'Authorization: Bearer <key>'."
INCORRECT = "Incorrect API key provided."


def key_matches(token: bytes, keys: list[bytes]) -> bool:
    """Whether `token` is one of `keys`, comparing with every key in constant time (the time
    tells neither which key nor how much of one matched)."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched


def bearer_token(headers) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case), or None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


def unauthorized(path: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"}
    if path.startswith("/v1/") or path == "/v1":
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
        return JSONResponse(body, status_code=401, headers=headers)
    return JSONResponse({"detail": message}, status_code=401, headers=headers)


class APIKeyMiddleware:
    """401 unless the request carries one of `keys`, on every path but `open_paths`."""

    def __init__(self, app, keys: tuple[str, ...], open_paths: frozenset[str]):
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope["headers"])
        if token is not None and key_matches(token, self.keys):
            await self.app(scope, receive, send)
            return
        response = unauthorized(scope["path"], MISSING if token is None else INCORRECT)
        await response(scope, receive, send)


def open_paths(metrics_require_key: bool) -> frozenset[str]:
    return DOCS_PATHS | {"/health"} | (frozenset() if metrics_require_key else {"/metrics"})
