"""httpmetrics: the one ``/metrics`` HTTP responder, shared by portolan and varpd.

Theory of operation
-------------------
A daemon hands `serve_metrics` something that renders its Prometheus text exposition (an
object with ``render() -> bytes``, normally its own `prometheus_client.CollectorRegistry`
wrapped by its metrics class) and a host and port. One trio TCP listener answers
``GET /metrics`` and ``HEAD /metrics`` (also ``/metrics/``, any query string ignored) with
``200``, the exposition and prometheus_client's ``CONTENT_TYPE_LATEST``; anything else gets
``404`` and a one-line hint. Every answer closes the connection.

Invariants: no threads, one short-lived task per connection; a client gets at most 10 s and
16 KiB to send its request head; a client that goes away is logged at DEBUG and forgotten
(a daemon never fails because of a scraper). Nothing here knows either daemon.

Why a package of its own: portolan and varpd each need it and may not import each other;
``protocol`` does no I/O; prometheus_client's own ASGI/WSGI apps would need an ASGI server in
varpd, which serves no other HTTP. See HACKING.md.

Lifecycle: `serve_metrics` runs until cancelled; ``task_status.started`` gets the bound
``(host, port)`` (port 0 picks one).
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("httpmetrics")

NOT_FOUND = b"not found; metrics are at /metrics\n"
HEAD_LIMIT = 16384
HEAD_TIMEOUT = 10.0


class Renders(Protocol):
    def render(self) -> bytes: ...


async def answer(stream: trio.abc.Stream, metrics: Renders) -> None:
    """Answer one HTTP request on ``stream`` and close it."""
    try:
        head = b""
        with trio.move_on_after(HEAD_TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < HEAD_LIMIT:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        words = head.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
        method = words[0] if words else ""
        path = words[1].split("?", 1)[0] if len(words) >= 2 else ""
        if method in ("GET", "HEAD") and path in ("/metrics", "/metrics/"):
            status, ctype, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), metrics.render()
        else:
            status, ctype, body = b"404 Not Found", b"text/plain; charset=utf-8", NOT_FOUND
        reply = (
            b"HTTP/1.1 " + status
            + b"\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
        )  # fmt: skip
        if method != "HEAD":
            reply += body
        await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("metrics scrape connection ended early: %s", exc)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_metrics(
    metrics: Renders,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` on host:port until cancelled; `started` with the bound (host, port)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    task_status.started((sockname[0], sockname[1]))

    async def handler(stream: trio.abc.Stream) -> None:
        await answer(stream, metrics)

    await trio.serve_listeners(handler, listeners)


__all__ = ["answer", "serve_metrics"]
