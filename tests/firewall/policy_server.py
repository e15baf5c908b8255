"""A tiny trio HTTP/1.1 server (h11) serving one CN's policy with ETag, 304 and long-poll.

Enough of portolan's ``GET /firewalls/cns/{cn}/policy[?wait=N]`` for the fetcher's tests:
``set_policy(doc)`` publishes a new document (ETag = ``"<generation>"``) and wakes waiting
long-polls; ``stop()`` closes the listener and every connection; ``start()`` again on the same
port. Every request is recorded (path, query, headers).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio


class PolicyServer:
    def __init__(self, cn_uuid: str) -> None:
        self.cn_uuid = cn_uuid
        self.doc: dict[str, Any] | None = None
        self.etag: str | None = None
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self.status_override: int | None = None
        self.body_override: bytes | None = None
        self.send_etag = True
        self._changed = trio.Event()
        self._scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_policy(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.etag = f'"{doc["generation"]}"'
        self._changed.set()
        self._changed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._run)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    status, headers, body = await self._respond(event)
                    await stream.send_all(
                        conn.send(h11.Response(status_code=status, headers=headers))
                    )
                    if body:
                        await stream.send_all(conn.send(h11.Data(data=body)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                elif isinstance(event, h11.EndOfMessage):
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            await stream.aclose()

    async def _respond(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        target = urlsplit(request.target.decode())
        query = {k: v[0] for k, v in parse_qs(target.query).items()}
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        self.requests.append({"path": target.path, "query": query, "headers": headers})
        if self.status_override is not None:
            body = b'{"code": "ServiceUnavailable", "message": "test"}'
            return self.status_override, [("Content-Length", str(len(body)))], body
        if target.path != f"/firewalls/cns/{self.cn_uuid}/policy" or self.doc is None:
            return 404, [("Content-Length", "0")], b""
        inm = headers.get("if-none-match")
        if inm is not None and inm == self.etag and "wait" in query:
            changed = self._changed
            with trio.move_on_after(float(query["wait"])):
                await changed.wait()
        if inm is not None and inm == self.etag:
            return 304, [("ETag", self.etag), ("Content-Length", "0")], b""
        body = (
            self.body_override if self.body_override is not None else json.dumps(self.doc).encode()
        )
        out = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if self.send_etag and self.etag:
            out.append(("ETag", self.etag))
        return 200, out, body
