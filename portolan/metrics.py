"""Prometheus metrics of one portolan (served over HTTP by the shared `httpmetrics`).

Every server object owns one `PortolanMetrics`, which owns its own `CollectorRegistry`, so
several portolans can live in one process (tests, the demo).

The SVP hot path must stay cheap, so its counters are plain Python ints in dicts, bumped with
``d[key] += 1`` (no lock, no label lookup); a custom collector turns them into Prometheus
counters when ``/metrics`` is scraped. Only the latency histogram is a real
`prometheus_client.Histogram`, and the SVP server observes it for one batch in
`LATENCY_SAMPLE_EVERY`, never for every request.

Series (all names prefixed ``portolan_``):

- ``svp_requests_total{op, status}``: requests answered (or, for ``shootdown``, accepted).
  ``op`` is one of `OPS`; ``status`` is ``ok``, ``notfound``, ``fatal``, ``badbulk`` or
  ``none`` (no reply: SHOOTDOWN).
- ``svp_protocol_errors_total{kind}``: connections closed for malformed input, by the codec's
  error kind (``bad_crc``, ``unknown_op``, ``short_body``, ``oversize``, ``bad_version``,
  ``bad_log_entry``, ``bad_length``) or the server's own (``ack_op``: a reply op sent to the
  server; ``idle_timeout``: a frame left half-sent for too long; ``internal``: a bug of ours
  closed the connection, see the log).
- ``svp_connections``: connections open now; ``svp_connections_accepted_total``: since start.
- ``svp_internal_errors_total{op}``: FATAL replies caused by our side (store failures).
- ``svp_lookup_seconds``: sampled time from the receipt of the bytes carrying a batch of
  requests to the moment its replies were handed to the kernel.

Other parts of portolan (the API: requests, store errors) add their collectors with
`PortolanMetrics.register` or by creating them with ``registry=metrics.registry``.

The HTTP side is the responder varpd uses too, `httpmetrics.serve_metrics` (re-exported
here): ``GET``/``HEAD /metrics`` on a trio TCP listener, anything else 404; no threads, one
short-lived task per scrape, 10 s to send the request head.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from httpmetrics import serve_metrics

log = logging.getLogger("portolan.metrics")

#: the ``op`` label values of ``svp_requests_total``
OPS = ("ping", "vl2", "vl3", "bulk", "log", "log_rm", "shootdown", "route")

#: observe the latency histogram for one batch in this many
LATENCY_SAMPLE_EVERY = 16

LATENCY_BUCKETS = (
    0.00002,
    0.00005,
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
)


class _SvpCollector(Collector):
    """Reads the plain-int SVP counters of a `PortolanMetrics` at scrape time."""

    def __init__(self, metrics: PortolanMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        req = CounterMetricFamily(
            "portolan_svp_requests",
            "SVP requests handled, by op and reply status",
            labels=["op", "status"],
        )
        for (op, status), n in sorted(m.svp_requests.items()):
            req.add_metric([op, status], n)
        yield req
        err = CounterMetricFamily(
            "portolan_svp_protocol_errors",
            "SVP connections closed for malformed input, by kind",
            labels=["kind"],
        )
        for kind, n in sorted(m.svp_protocol_errors.items()):
            err.add_metric([kind], n)
        yield err
        internal = CounterMetricFamily(
            "portolan_svp_internal_errors",
            "SVP requests answered FATAL because of a failure on our side, by op",
            labels=["op"],
        )
        for op, n in sorted(m.svp_internal_errors.items()):
            internal.add_metric([op], n)
        yield internal
        yield GaugeMetricFamily(
            "portolan_svp_connections", "SVP connections open now", value=m.svp_connections_open
        )
        yield CounterMetricFamily(
            "portolan_svp_connections_accepted",
            "SVP connections accepted since start",
            value=m.svp_connections_accepted,
        )


class PortolanMetrics:
    """The collectors of one portolan, all on a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Plain counters, written by the SVP server's hot path, read by _SvpCollector.
        self.svp_requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.svp_protocol_errors: defaultdict[str, int] = defaultdict(int)
        self.svp_internal_errors: defaultdict[str, int] = defaultdict(int)
        self.svp_connections_open = 0
        self.svp_connections_accepted = 0
        self.registry.register(_SvpCollector(self))
        self.svp_lookup_seconds = Histogram(
            "portolan_svp_lookup_seconds",
            "Sampled time from receiving a batch of SVP requests to handing its replies to the kernel",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def register(self, collector: Collector) -> None:
        """Add a collector of another part of portolan (API requests, store errors...)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        """The text exposition of every collector on this registry."""
        return generate_latest(self.registry)


def register_collectors(metrics: PortolanMetrics, collectors: Iterable[Collector]) -> None:
    """Register several collectors at once (for modules that build theirs in a list)."""
    for collector in collectors:
        metrics.register(collector)


__all__ = [
    "LATENCY_SAMPLE_EVERY",
    "OPS",
    "PortolanMetrics",
    "register_collectors",
    "serve_metrics",
]
