"""A small in-process stand-in for portolan's policy endpoint, for varpd's firewall tests.

It serves ``GET /firewalls/cns/{cn_uuid}/policy[?wait=N]`` the way CONVENTIONS describes:
an ETag per document, and with ``wait`` + ``If-None-Match`` the answer is held until the
document changes (200) or the wait ends (304). Raw HTTP/1.1 over trio, ``Connection: close``.

Test controls: ``publish(cn, vnics)`` (a new generation for that CN), ``down`` (every request,
including held long-polls, is answered 503 while set), ``requests`` (what was asked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

PREFIX = "/firewalls/cns/"
SUFFIX = "/policy"


@dataclass
class Seen:
    cn: str
    wait: str | None
    if_none_match: str | None
    status: int = 0


@dataclass
class PolicyServer:
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    _down: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)
    _generation: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ test controls

    def publish(self, cn: str, vnics: dict[str, Any]) -> int:
        """Replace the policy of ``cn``; returns its new generation."""
        self._generation += 1
        self.docs[cn] = {
            "version": 1,
            "cn_uuid": cn,
            "generation": self._generation,
            "vnics": vnics,
        }
        self._wake()
        return self._generation

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        self._down = value
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def etag(self, cn: str) -> str | None:
        doc = self.docs.get(cn)
        return None if doc is None else f'"g{doc["generation"]}"'

    # ------------------------------------------------------------------ serving

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            status, extra, body = await self._answer(method, target, headers)
            reason = {200: "OK", 304: "Not Modified", 404: "Not Found", 503: "Unavailable"}
            out = [f"HTTP/1.1 {status} {reason.get(status, 'Error')}"]
            out += [f"{k}: {v}" for k, v in extra.items()]
            out += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
            await stream.send_all("\r\n".join(out).encode() + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(
        self, method: str, target: str, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(target)
        path = parts.path
        if method != "GET" or not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
            return 404, {}, b'{"code": "ResourceNotFound", "message": "no such route"}'
        cn = path[len(PREFIX) : -len(SUFFIX)]
        wait = parse_qs(parts.query).get("wait", [None])[0]
        seen = Seen(cn, wait, headers.get("if-none-match"))
        self.requests.append(seen)
        if wait is not None and seen.if_none_match is not None:
            with trio.move_on_after(float(wait)):
                while not self._down and self.etag(cn) == seen.if_none_match:
                    await self._changed.wait()
        if self._down:
            seen.status = 503
            return 503, {}, b'{"code": "ServiceUnavailable", "message": "down for the test"}'
        etag = self.etag(cn)
        if etag is None:
            seen.status = 404
            return 404, {}, b'{"code": "ResourceNotFound", "message": "unknown cn"}'
        if wait is not None and seen.if_none_match == etag:
            seen.status = 304
            return 304, {"ETag": etag}, b""
        seen.status = 200
        body = json.dumps(self.docs[cn]).encode()
        return 200, {"ETag": etag, "Content-Type": "application/json"}, body
