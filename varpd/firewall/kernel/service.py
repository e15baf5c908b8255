"""``KernelFirewallService``: the daemon's trio side of the kernel firewall (backend linux).

One task (``await nursery.start(service.run)``) owns a ``KernelFirewall`` and does all its
blocking work in a worker thread (``trio.to_thread.run_sync`` with a limiter of one):

- ``submit(policy)`` (sync, from the fetcher's ``apply``) stores the newest policy and wakes
  the task; policies that arrive while one is being applied are coalesced (the newest wins:
  each is a whole document).
- ``vnic_event(what, vnic)`` is the linux driver's VNIC listener (sync, trio thread): the
  VNIC's host-side port joins or leaves the port map, and its bridge gets
  ``nf_call_iptables``/``nf_call_ip6tables`` (conntrack for bridged packets) set.
- Port names are also derived from the policy (``varpd.linux.names.host_name(vnet_id,
  mac)``, the name the driver will give the VNIC's host end), so a firewalled VNIC's map
  entries are in the kernel *before* its port exists: no first frame slips through. A name
  the driver reports wins over the derived one.
- After each change the kernel-side view is read back (``list table``), and every
  ``refresh`` seconds the counters (``list counters``), for ``varpdadm firewall`` and the
  metrics, which never block.

Fail-closed: until the first policy arrives nothing is installed (a previous varpd's tables
stay in force); stopping the service leaves the tables in place. A refused transaction is
logged and counted; the next change (or the next refresh) retries with a full rebuild.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from protocol.addr import format_mac
from protocol.fwpolicy import Policy

from .applier import KernelFirewall
from .counters import packets_family

log = logging.getLogger("varpd.firewall.kernel")


def _derived_port(vnet_id: int, mac: str) -> str | None:
    try:
        from protocol.addr import parse_mac
        from varpd.linux import names
    except ImportError:  # pragma: no cover - the linux backend is part of the package
        return None
    return names.host_name(vnet_id, parse_mac(mac))


def _bridge_conntrack_on(bridge: str) -> None:
    """Make the bridge hand its IPv4/IPv6 packets to the inet hooks (conntrack)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=bridge)
        if idx:
            ipr.link(
                "set",
                index=idx[0],
                kind="bridge",
                br_nf_call_iptables=1,
                br_nf_call_ip6tables=1,
            )


class KernelFirewallService:
    """See the module docstring."""

    def __init__(self, kfw: KernelFirewall | None = None, *, refresh: float = 5.0) -> None:
        self.kfw = kfw if kfw is not None else KernelFirewall()
        self.refresh = refresh
        self._pending: Policy | None = None
        self._actual_ports: dict[str, str] = {}
        self._bridges: set[str] = set()
        self._bridges_done: set[str] = set()
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        self.kernel: dict[str, Any] = {"present": None}
        self.counters: dict[str, dict[str, int]] = {}
        self.retired: dict[str, int] = {}
        self.read_at: float | None = None
        self.errors = 0
        self.last_error: str | None = None
        self.applied_generation: int | None = None
        self.apply_seconds: float | None = None

    # ------------------------------------------------------------------ inputs (sync)

    def submit(self, policy: Policy) -> None:
        self._pending = policy
        self._wake.set()

    def vnic_event(self, what: str, vnic: Any) -> None:
        mac = format_mac(vnic.mac)
        if what == "added":
            self._actual_ports[mac] = vnic.host_ifname
            bridge = getattr(vnic, "bridge", None)
            if bridge:
                self._bridges.add(bridge)
        else:
            self._actual_ports.pop(mac, None)
        self._wake.set()

    # ------------------------------------------------------------------ the task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(self.refresh):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await trio.to_thread.run_sync(self._work, limiter=self._limiter)
            except Exception as exc:  # noqa: BLE001 - never crash the daemon; retry later
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("kernel firewall: %s", self.last_error)

    def _ports(self, policy: Policy | None) -> dict[str, str]:
        ports: dict[str, str] = {}
        if policy is not None:
            for mac, vp in policy.vnics.items():
                name = _derived_port(vp.vnet_id, mac)
                if name:
                    ports[mac] = name
        ports.update(self._actual_ports)
        return ports

    def _work(self) -> None:
        """One round in the worker thread: apply what is pending, then read back."""
        kfw = self.kfw
        for bridge in sorted(self._bridges - self._bridges_done):
            try:
                _bridge_conntrack_on(bridge)
            except Exception as exc:  # noqa: BLE001 - the netns sysctl may still cover it
                self.errors += 1
                self.last_error = f"bridge {bridge}: nf_call_iptables: {exc}"
                log.warning("kernel firewall: %s", self.last_error)
            self._bridges_done.add(bridge)
        policy, self._pending = self._pending, None
        before = dict(self.counters)
        changed = False
        if policy is not None:
            started = time.perf_counter()
            kfw.ports = self._ports(policy)
            try:
                kfw.apply(policy)
            except Exception:
                if self._pending is None:
                    self._pending = policy  # retried at the next round (refresh period)
                raise
            self.apply_seconds = time.perf_counter() - started
            self.applied_generation = policy.generation
            changed = True
        elif kfw.policy is not None:
            wanted = self._ports(kfw.policy)
            if wanted != kfw.ports or kfw.last_error is not None:
                if kfw.last_error is not None:
                    kfw.rebuild()
                kfw.set_ports(wanted)
                changed = True
        if kfw.policy is None:
            return
        if changed or self.kernel.get("present") is not True:
            self.kernel = kfw.kernel_state()  # the whole table: after changes only
            counters = {
                mac: dict(v.get("counters", {})) for mac, v in self.kernel.get("vnics", {}).items()
            }
        else:
            counters = kfw.read_counters()  # idle refresh: the counters alone (cheap)
        self._take_counters(before, counters)
        self.last_error = None

    def _take_counters(self, before: dict[str, dict[str, int]], counters: Any) -> None:
        for mac, kinds in counters.items():
            row = self.kernel.get("vnics", {}).get(mac)
            if row is not None:
                row["counters"] = dict(kinds)
        for mac, kinds in before.items():
            if mac not in counters:
                for kind, value in kinds.items():
                    self.retired[kind] = self.retired.get(kind, 0) + value
        self.counters = counters
        self.read_at = time.time()

    async def read_now(self) -> None:
        """Read the nft counters now rather than at the next refresh (``varpdadm firewall``)."""

        def read() -> None:
            if self.kfw.policy is not None:
                self._take_counters(dict(self.counters), self.kfw.read_counters())

        await trio.to_thread.run_sync(read, limiter=self._limiter)

    # ------------------------------------------------------------------ outputs (sync)

    def status(self) -> dict[str, Any]:
        return {
            **self.kfw.status(),
            "applied_generation": self.applied_generation,
            "apply_seconds": self.apply_seconds,
            "kernel": self.kernel,
            "read_at": self.read_at,
            "service_errors": self.errors,
            "service_last_error": self.last_error,
        }

    def packets_metric(self) -> Any:
        return packets_family(self.counters, self.retired)
