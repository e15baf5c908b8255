"""Bearer-token protection of writes.

When a token is configured, every request whose method changes state (POST, PUT, PATCH,
DELETE) must carry ``Authorization: Bearer <token>``; reads (GET, HEAD, OPTIONS) stay open.
The check is an ASGI middleware in front of routing and body parsing, so it covers routes
added later (firewall rules) without each one having to ask, and an unauthenticated client
learns nothing about its body (401 comes before any 422). Tokens are compared with
`hmac.compare_digest` on bytes, in constant time for equal lengths.

Refusing to serve an unauthenticated API on a non-loopback address is `portolan serve`'s
business, not this module's.
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def token_matches(header: bytes | None, token: bytes) -> bool:
    """True when an Authorization header value is ``Bearer <token>`` (scheme case-insensitive)."""
    if header is None:
        return False
    scheme, _, presented = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(presented.strip(), token)


class BearerTokenMiddleware:
    """Answer 401 to writes without the right bearer token; pass everything else through."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        if not token:
            raise ValueError("an empty API token would let anyone write; configure none instead")
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITE_METHODS:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        if token_matches(header, self.token):
            await self.app(scope, receive, send)
            return
        message = (
            "this API needs a bearer token for writes: send 'Authorization: Bearer <token>'"
            if header is None
            else "the bearer token is wrong"
        )
        body = json.dumps({"code": "Unauthorized", "message": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="portolan"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
