"""Request bodies: bounded, parsed off the event loop, and refused early when they are abuse.

Theory of operation
-------------------
`BodyGuardMiddleware` sits in front of routing (behind the token check, so an unauthenticated
client never makes us read or parse anything) and handles every HTTP request's body once:

1. Framing. A request carrying both ``Content-Length`` and ``Transfer-Encoding`` is ambiguous
   (RFC 9112 §6.1: the way request smuggling works); it is answered 400 ``BadRequest`` with
   ``Connection: close``, so hypercorn closes the connection and nothing behind it on the same
   connection is served.
2. Size. A body larger than ``max_body`` bytes (``portolan serve --api-max-body``, default
   `DEFAULT_MAX_BODY`) is answered 413 ``PayloadTooLarge`` as soon as that is known: at once
   when ``Content-Length`` announces it, otherwise (chunked) when the bytes read pass the
   limit. The rest is never read, and the connection is closed.
3. Parsing. A JSON body (``application/json``, ``+json`` or no Content-Type, as the routes
   read it) is decoded and parsed in a worker thread (`trio.to_thread.run_sync` under one
   `trio.CapacityLimiter`), so the trio thread, which also answers SVP, only waits for it. The
   body must be UTF-8 and valid JSON nested at most `MAX_DEPTH` levels with integers of at
   most `MAX_INT_DIGITS` digits; otherwise 422 ``InvalidParameters`` naming the field ``body``.
   Values JSON text may spell but the API can neither store nor answer (``NaN``,
   ``Infinity``, lone UTF-16 surrogates such as ``"\\ud800"``) are 422 naming the field where
   they sit (``tags.k``; a bad key names its object).
4. Hand-over. The parsed value is left in the ASGI scope under `PARSED_KEY` and the bytes are
   replayed to the app; routes built with `ParsedBodyRoute` (every router of this package)
   take the parsed value instead of parsing again. A route without it still works: it
   re-parses a body already known to be good and bounded.

Invariants: no request body larger than ``max_body`` is ever held in memory; no JSON is
parsed on the trio thread by a `ParsedBodyRoute`; a body that reaches a route decodes to JSON
that ``JSONResponse`` can answer again.

Lifecycle: one middleware per app (`portolan.api.app.create_app`); nothing to start or stop.
"""

from __future__ import annotations

import json
import math
from typing import Any

import trio
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: the default limit on a request body, bytes (``--api-max-body``)
DEFAULT_MAX_BODY = 1 << 20
#: deepest nesting of arrays/objects a body may have (the API's bodies need 2)
MAX_DEPTH = 32
#: longest integer literal accepted, digits (no field needs more than 20)
MAX_INT_DIGITS = 40
#: the scope key holding a body's parsed JSON
PARSED_KEY = "portolan.parsed_json"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_UNSET: Any = object()


class BodyError(ValueError):
    """A body the API refuses: ``field`` names where (``body`` for the whole)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BodyError("body", f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and any("\ud800" <= c <= "\udfff" for c in text)


def _path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]" if parent else f"[{key}]"
    return f"{parent}.{key}" if parent else key


def check_value(value: Any) -> None:
    """Raise `BodyError` naming the first place where ``value`` nests deeper than `MAX_DEPTH`
    or holds a non-finite float or a string with a lone surrogate (iterative: no recursion)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                raise BodyError(where or "body", "a string holds a lone UTF-16 surrogate")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise BodyError(where or "body", "NaN and Infinity are not JSON numbers")
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise BodyError("body", f"the body nests deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for k, v in item.items():
                    if _has_surrogate(k):
                        raise BodyError(where or "body", "a key holds a lone UTF-16 surrogate")
                    stack.append((v, _path(where, k), depth + 1))
            else:
                stack.extend((v, _path(where, i), depth + 1) for i, v in enumerate(item))


def parse_body(raw: bytes) -> Any:
    """The JSON value of a request body, or `BodyError` (see the module docstring)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError("body", f"the body is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_int=_parse_int)
    except BodyError as exc:
        raise BodyError("body", exc.message) from None
    except json.JSONDecodeError as exc:
        raise BodyError("body", f"malformed JSON at character {exc.pos}: {exc.msg}") from None
    except RecursionError:
        raise BodyError("body", f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise BodyError("body", f"malformed JSON: {exc}") from None
    check_value(value)
    return value


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # the app reads a body without a Content-Type as JSON
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def _answer(send: Send, status: int, doc: dict[str, Any], close: bool = False) -> None:
    body = json.dumps(doc).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _field_error(field: str, message: str) -> dict[str, Any]:
    return {
        "code": "InvalidParameters",
        "message": f"Invalid parameters: {field}",
        "errors": [{"field": field, "code": "InvalidParameter", "message": message}],
    }


class BodyGuardMiddleware:
    """Bounds, checks and parses request bodies (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_body: int = DEFAULT_MAX_BODY) -> None:
        if max_body < 1:
            raise ValueError("max_body must be positive")
        self.app = app
        self.max_body = max_body
        self.limiter = trio.CapacityLimiter(1)

    def _too_large(self) -> dict[str, Any]:
        return {
            "code": "PayloadTooLarge",
            "message": f"the request body is larger than {self.max_body} bytes",
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: int | None = None
        chunked = False
        content_type: str | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"content-type":
                content_type = value.decode("latin-1")
        if chunked and length is not None:
            # Read what h11 framed as the body first (bounded): answering while hypercorn still
            # parses this request races its own handling of what follows on the connection.
            size = 0
            while size <= self.max_body:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
                size += len(message.get("body", b""))
            doc = {
                "code": "BadRequest",
                "message": "Content-Length and Transfer-Encoding together are ambiguous",
            }
            await _answer(send, 400, doc, close=True)
            return
        if length is not None and length > self.max_body:
            await _answer(send, 413, self._too_large(), close=True)
            return
        if scope["method"] not in BODY_METHODS or (length == 0 and not chunked):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _answer(send, 413, self._too_large(), close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        chunks.clear()
        if raw and _is_json(content_type):
            try:
                parsed = await trio.to_thread.run_sync(parse_body, raw, limiter=self.limiter)
            except BodyError as exc:
                await _answer(send, 422, _field_error(exc.field, exc.message))
                return
            scope[PARSED_KEY] = parsed
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ParsedBodyRoute(APIRoute):
    """An `APIRoute` that takes the body `BodyGuardMiddleware` already parsed."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            parsed = request.scope.get(PARSED_KEY, _UNSET)
            if parsed is not _UNSET:
                request._json = parsed  # Starlette's cache of Request.json()
            return await handler(request)

        return handle


__all__ = [
    "DEFAULT_MAX_BODY",
    "MAX_DEPTH",
    "PARSED_KEY",
    "BodyError",
    "BodyGuardMiddleware",
    "ParsedBodyRoute",
    "check_value",
    "parse_body",
]
