"""Prometheus metrics of one varpd (served over HTTP by the shared `httpmetrics`).

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

Two custom collectors read counters that live elsewhere at scrape time (the data path never
calls prometheus_client; it only bumps plain ints in dicts):

- `ShimCollector` exports ``OverlayDriver.metrics()`` and the VNICs' counters:
  ``varpd_overlay_frames_total{device, direction=tx|rx|local}``,
  ``varpd_overlay_bytes_total{device, direction=tx|rx}``,
  ``varpd_overlay_tx_dropped_total{device, reason}`` (inactive, runt, mtu, tagged, cache,
  queue_full and lookup_queue_full = miss queue drops, lookup, bad_header, backend, flushed),
  ``varpd_overlay_rx_dropped_total{device, reason}`` (runt, spoofed, unclaimed),
  ``varpd_overlay_filter_dropped_total{device, direction=in|out}``,
  ``varpd_overlay_device_events_total{device, event}`` (tx_queued, injected, resent, lookups),
  ``varpd_overlay_mux_datagrams_total{listen}``, ``varpd_overlay_mux_dropped_total{listen,
  reason}`` (short, no_i_bit, unknown_vni), ``varpd_overlay_upcalls_total{event}`` (lookups,
  responds, drops, stale_lookups, unknown_requests, injects, resends), gauges
  ``varpd_overlay_lookups_waiting``, ``varpd_overlay_lookups_outstanding``,
  ``varpd_overlay_queued_bytes``, ``varpd_overlay_degraded_devices``, and per VNIC
  ``varpd_overlay_vnic_frames_total{device, mac, direction=tx|rx}`` and
  ``varpd_overlay_vnic_dropped_total{device, mac, reason=guest_full|filter_in|filter_out}``.
  Device counters start again from zero when a device is re-created.
- `FirewallCollector` exports the firewall: ``varpd_firewall_policy_generation`` (absent before
  the first policy), ``varpd_firewall_policies_applied_total``,
  ``varpd_firewall_fetches_total{result=applied|not_modified|error}``,
  ``varpd_firewall_fetch_errors_total``, ``varpd_firewall_fetcher_state{state}`` (1 for the
  current one), ``varpd_firewall_vnics`` (VNICs in the policy), ``varpd_firewall_flows``,
  ``varpd_firewall_flows_dropped_by_policy_total``,
  ``varpd_firewall_packets_total{direction=in|out, action=blocked}`` (the shim's filter
  drops; passes are not counted per direction, so only ``blocked`` is exported: see
  ``varpd_firewall_verdicts_total``; on the linux backend instead the kernel firewall's nft
  counters ``{vnic, direction, verdict}``, see ``varpd/firewall/kernel/counters.py``),
  ``varpd_firewall_verdicts_total{verdict}`` (the engine's reasons: pass_state, pass_rule,
  pass_default, drop_rule, drop_default, ...),
  ``varpd_firewall_conntrack_events_total{event}`` (created, evicted, expired, flushed) and
  per VNIC ``varpd_firewall_vnic_rules{mac, direction}``, ``varpd_firewall_vnic_flows{mac}``.

The HTTP side is the responder portolan uses too, `httpmetrics.serve_metrics` (re-exported
here): ``GET``/``HEAD /metrics`` on a trio TCP listener, anything else 404; no threads, one
short-lived task per connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from httpmetrics import serve_metrics as serve_metrics
from protocol.addr import format_mac

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


# ---------------------------------------------------------------------- scrape-time collectors

_DRIVER_GAUGES = ("lookups_waiting", "lookups_outstanding", "queued_bytes", "degraded_devices")
FETCHER_STATES = ("starting", "fetching", "polling", "backoff", "stopped")


class ShimCollector:
    """The shim's plain-int counters as prometheus families, read at scrape time.

    ``get_driver()`` returns the `OverlayDriver` (or None before the daemon made it).
    """

    def __init__(self, get_driver: Callable[[], Any]) -> None:
        self._get_driver = get_driver

    def describe(self) -> list[Metric]:
        return []  # names are only known at scrape time; nothing to check at register

    def collect(self) -> Iterator[Metric]:
        driver = self._get_driver()
        if driver is None or not hasattr(driver, "metrics"):
            return
        data = driver.metrics()
        frames = CounterMetricFamily(
            "varpd_overlay_frames",
            "Frames through overlay devices (tx: encapsulated and sent; rx: decapsulated and "
            "accepted; local: switched between local VNICs)",
            labels=["device", "direction"],
        )
        nbytes = CounterMetricFamily(
            "varpd_overlay_bytes", "Inner bytes sent and received", labels=["device", "direction"]
        )
        tx_drop = CounterMetricFamily(
            "varpd_overlay_tx_dropped",
            "Frames dropped on the transmit path, by reason",
            labels=["device", "reason"],
        )
        rx_drop = CounterMetricFamily(
            "varpd_overlay_rx_dropped",
            "Frames dropped on the receive path, by reason",
            labels=["device", "reason"],
        )
        filt = CounterMetricFamily(
            "varpd_overlay_filter_dropped",
            "Frames dropped by a VNIC's firewall, by direction",
            labels=["device", "direction"],
        )
        events = CounterMetricFamily(
            "varpd_overlay_device_events",
            "Other per-device events (queued misses, injected/resent frames, lookups)",
            labels=["device", "event"],
        )
        for device, counters in data.get("devices", {}).items():
            for key, value in counters.items():
                if key in ("tx_frames", "rx_frames", "local_frames"):
                    frames.add_metric([device, key.split("_", 1)[0]], value)
                elif key in ("tx_bytes", "rx_bytes"):
                    nbytes.add_metric([device, key.split("_", 1)[0]], value)
                elif key.startswith("tx_drop_"):
                    tx_drop.add_metric([device, key[len("tx_drop_") :]], value)
                elif key.startswith("rx_drop_"):
                    rx_drop.add_metric([device, key[len("rx_drop_") :]], value)
                elif key == "rx_unclaimed":
                    rx_drop.add_metric([device, "unclaimed"], value)
                elif key.startswith("filter_drop_"):
                    filt.add_metric([device, key[len("filter_drop_") :]], value)
                else:
                    events.add_metric([device, key], value)
        yield from (frames, nbytes, tx_drop, rx_drop, filt, events)

        mux_dg = CounterMetricFamily(
            "varpd_overlay_mux_datagrams",
            "Datagrams received per listen address",
            labels=["listen"],
        )
        mux_drop = CounterMetricFamily(
            "varpd_overlay_mux_dropped",
            "Datagrams dropped by a mux, by reason",
            labels=["listen", "reason"],
        )
        for listen, counters in data.get("muxes", {}).items():
            for key, value in counters.items():
                if key == "rx_datagrams":
                    mux_dg.add_metric([listen], value)
                else:
                    reason = key[len("rx_drop_") :] if key.startswith("rx_drop_") else key
                    mux_drop.add_metric([listen, reason], value)
        yield from (mux_dg, mux_drop)

        upcalls = CounterMetricFamily(
            "varpd_overlay_upcalls",
            "Upcall interface events between the driver and varpd",
            labels=["event"],
        )
        for key, value in data.get("driver", {}).items():
            if key in _DRIVER_GAUGES:
                yield GaugeMetricFamily(
                    f"varpd_overlay_{key}", f"Driver gauge {key.replace('_', ' ')}", value=value
                )
            else:
                upcalls.add_metric([key], value)
        yield upcalls

        vnic_frames = CounterMetricFamily(
            "varpd_overlay_vnic_frames",
            "Frames a VNIC sent (tx) and delivered to its guest (rx)",
            labels=["device", "mac", "direction"],
        )
        vnic_drop = CounterMetricFamily(
            "varpd_overlay_vnic_dropped",
            "Frames dropped at a VNIC (guest_full: the guest port was full)",
            labels=["device", "mac", "reason"],
        )
        names = driver.devices() if hasattr(driver, "devices") else []
        for device in names:
            try:
                vnics = driver.vnics(device)
            except Exception:  # deleted between the two calls
                continue
            for vnic in vnics:
                mac = format_mac(vnic.mac)
                c = vnic.counters
                vnic_frames.add_metric([device, mac, "tx"], c.get("tx_frames", 0))
                vnic_frames.add_metric([device, mac, "rx"], c.get("rx_frames", 0))
                vnic_drop.add_metric([device, mac, "guest_full"], c.get("rx_drop_full", 0))
                vnic_drop.add_metric([device, mac, "filter_in"], c.get("filter_drop_in", 0))
                vnic_drop.add_metric([device, mac, "filter_out"], c.get("filter_drop_out", 0))
        yield from (vnic_frames, vnic_drop)


class FirewallCollector:
    """The firewall table, the policy fetcher and the engine's counters, at scrape time.

    ``varpd`` is the daemon (anything with ``firewall``, ``fetcher``, ``firewall_retired``
    and ``_driver``).
    """

    def __init__(self, varpd: Any) -> None:
        self._varpd = varpd

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        v = self._varpd
        table = v.firewall
        if table.generation is not None:
            yield GaugeMetricFamily(
                "varpd_firewall_policy_generation",
                "Generation of the firewall policy in force",
                value=table.generation,
            )
        yield CounterMetricFamily(
            "varpd_firewall_policies_applied",
            "Firewall policies applied (each one a full replacement)",
            value=table.applied,
        )
        fetcher = v.fetcher
        if fetcher is not None:
            c = fetcher.counters
            fetches = CounterMetricFamily(
                "varpd_firewall_fetches", "Policy requests by result", labels=["result"]
            )
            fetches.add_metric(["applied"], c.get("applied", 0))
            fetches.add_metric(["not_modified"], c.get("not_modified", 0))
            fetches.add_metric(["error"], c.get("errors", 0))
            yield fetches
            yield CounterMetricFamily(
                "varpd_firewall_fetch_errors",
                "Failed policy fetches (connection, HTTP status, invalid policy)",
                value=c.get("errors", 0),
            )
            state = GaugeMetricFamily(
                "varpd_firewall_fetcher_state",
                "State of the policy fetcher (1 for the current state)",
                labels=["state"],
            )
            for name in dict.fromkeys((*FETCHER_STATES, fetcher.state)):
                state.add_metric([name], 1.0 if name == fetcher.state else 0.0)
            yield state
        firewalls = dict(table.firewalls)
        yield GaugeMetricFamily(
            "varpd_firewall_vnics", "VNICs in the firewall policy", value=len(firewalls)
        )
        yield GaugeMetricFamily(
            "varpd_firewall_flows",
            "Connections tracked by the firewall",
            value=sum(len(fw.conntrack) for fw in firewalls.values()),
        )
        yield CounterMetricFamily(
            "varpd_firewall_flows_dropped_by_policy",
            "Tracked flows dropped because a new policy refuses them",
            value=table.flows_dropped,
        )
        verdicts: dict[str, int] = {}
        conntrack: dict[str, int] = {}
        for key, value in v.firewall_retired.items():
            target = conntrack if key.startswith("conntrack_") else verdicts
            target[key.removeprefix("conntrack_")] = value
        for fw in firewalls.values():
            for key, value in fw.counters.items():
                verdicts[key] = verdicts.get(key, 0) + value
            for key, value in fw.conntrack.counters.items():
                conntrack[key] = conntrack.get(key, 0) + value
        fam = CounterMetricFamily(
            "varpd_firewall_verdicts", "Firewall decisions by reason", labels=["verdict"]
        )
        for key, value in sorted(verdicts.items()):
            fam.add_metric([key], value)
        yield fam
        fam = CounterMetricFamily(
            "varpd_firewall_conntrack_events", "Connection table events", labels=["event"]
        )
        for key, value in sorted(conntrack.items()):
            fam.add_metric([key], value)
        yield fam
        blocked = {"in": 0, "out": 0}
        driver = getattr(v, "_driver", None)
        if driver is not None and hasattr(driver, "metrics"):
            for counters in driver.metrics().get("devices", {}).values():
                blocked["in"] += counters.get("filter_drop_in", 0)
                blocked["out"] += counters.get("filter_drop_out", 0)
        kernel = getattr(v, "kernel_firewall", None)
        if kernel is not None:  # backend linux: nft counters {vnic, direction, verdict}
            yield kernel.packets_metric()
        else:
            fam = CounterMetricFamily(
                "varpd_firewall_packets",
                "Frames the firewall blocked at a VNIC boundary, by direction",
                labels=["direction", "action"],
            )
            for direction, value in blocked.items():
                fam.add_metric([direction, "blocked"], value)
            yield fam
        rules = GaugeMetricFamily(
            "varpd_firewall_vnic_rules",
            "Effective firewall rules of a VNIC, by direction",
            labels=["mac", "direction"],
        )
        flows = GaugeMetricFamily(
            "varpd_firewall_vnic_flows", "Connections tracked for a VNIC", labels=["mac"]
        )
        for mac, fw in sorted(firewalls.items()):
            text = format_mac(mac)
            n_in = sum(1 for r in fw.rules if r.direction == "in")
            rules.add_metric([text, "in"], n_in)
            rules.add_metric([text, "out"], len(fw.rules) - n_in)
            flows.add_metric([text], len(fw.conntrack))
        yield from (rules, flows)
