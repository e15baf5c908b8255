"""Prometheus metrics of one varpd, and the tiny trio HTTP responder that serves them.

Every `Varpd` owns one `VarpdMetrics`, which owns its own `CollectorRegistry`, so several
daemons can share a process (the demo, the tests). Plugins reach it as ``host.metrics``:

- ``lookups`` (counter, labels ``plugin``, ``result``): one per lookup request the workers
  took from the driver. Results: ``respond``, ``drop`` (plugin decided), ``no_answer`` (plugin
  returned without an outcome), ``proxy_arp``, ``proxy_ndp``, ``proxy_dhcp``, ``error``
  (plugin raised), ``timeout``, ``no_instance``.
- ``lookup_seconds`` (histogram, label ``plugin``): time from taking the request to its outcome.
- ``proxied`` (counter, label ``kind`` = arp | ndp | dhcp): proxied replies injected/resent.
- ``proxy_dropped`` (counter, labels ``kind``, ``reason``): frames the proxies refused.
- ``svp_connections`` (gauge, labels ``remote``, ``state``): set by the svp plugin, e.g.
  ``host.metrics.svp_connections.labels(remote="10.0.0.1:1296", state="ACTIVE").set(2)``.
- ``svp_shootdowns`` (counter, label ``type`` = vl2 | vl3): incremented by the svp plugin for
  every shootdown it applied.
- ``degraded_instances`` (gauge), ``instances`` (gauge, label ``state``).
- ``files_reloads`` (counter, label ``result`` = ok | invalid | error).

A plugin needing more registers its own collectors on ``host.metrics.registry``.

The HTTP side answers ``GET /metrics`` (anything else is 404) with `generate_latest`, on a
trio TCP listener: no threads, one short-lived task per connection.
"""

from __future__ import annotations

import logging

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("varpd.metrics")

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class VarpdMetrics:
    """The collectors of one daemon, all registered on a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.lookups = Counter(
            "varpd_lookups",
            "Lookup requests handled, by plugin and result",
            ["plugin", "result"],
            registry=r,
        )
        self.lookup_seconds = Histogram(
            "varpd_lookup_seconds",
            "Time to answer a lookup request",
            ["plugin"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.proxied = Counter(
            "varpd_proxied_replies", "Proxied ARP/NDP/DHCP replies", ["kind"], registry=r
        )
        self.proxy_dropped = Counter(
            "varpd_proxy_dropped",
            "Frames refused by the ARP/NDP/DHCP proxies",
            ["kind", "reason"],
            registry=r,
        )
        self.svp_connections = Gauge(
            "varpd_svp_connections",
            "SVP connections by remote and state",
            ["remote", "state"],
            registry=r,
        )
        self.svp_shootdowns = Counter(
            "varpd_svp_shootdowns",
            "SVP shootdowns applied, by log entry type",
            ["type"],
            registry=r,
        )
        self.degraded_instances = Gauge(
            "varpd_degraded_instances", "Instances currently degraded", registry=r
        )
        self.instances = Gauge("varpd_instances", "Instances by state", ["state"], registry=r)
        self.files_reloads = Counter(
            "varpd_files_reloads",
            "files plugin reloads of a changed file, by result",
            ["result"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def _handle_http(stream: trio.abc.Stream, metrics: VarpdMetrics) -> None:
    try:
        buf = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in buf and len(buf) < 16384:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
        request_line = buf.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
        if (
            len(request_line) >= 2
            and request_line[0] in ("GET", "HEAD")
            and (request_line[1].split("?", 1)[0] in ("/metrics", "/metrics/"))
        ):
            body = metrics.render()
            status = b"200 OK"
            ctype = CONTENT_TYPE_LATEST.encode()
        else:
            body = b"not found; try /metrics\n"
            status = b"404 Not Found"
            ctype = b"text/plain; charset=utf-8"
        head = (
            b"HTTP/1.1 "
            + status
            + b"\r\nContent-Type: "
            + ctype
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
        )
        if request_line and request_line[0] == "HEAD":
            body = b""
        await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("metrics connection ended: %s", exc)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_metrics(
    metrics: VarpdMetrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics on host:port until cancelled; `started` with the bound (host, port)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    task_status.started((sockname[0], sockname[1]))

    async def handler(stream: trio.abc.Stream) -> None:
        await _handle_http(stream, metrics)

    await trio.serve_listeners(handler, listeners)
