"""The varpd daemon object: `Varpd(config, driver=None, underlay=None)`.

``await Varpd(config).run(task_status=...)`` hosts, in one nursery: the driver (if varpd made
it), the lookup worker pool, the instances' plugin tasks, the metrics HTTP server and the
control socket server. Start-up order: restore instances from the state folder; create the
config devices that were not restored; bind the metrics and control listeners; then report
ready (``task_status.started(self)``; `ready_line` is what ``varpd run`` prints). Cancelling
``run`` is the shutdown: plugins get a short shielded grace period to stop; state files are
kept (as illumos keeps them), the control socket file is removed.

Firewall: ``self.firewall`` (a `FirewallTable`) exists always; every VNIC the daemon adds is
bound to it (its shim ``filter`` follows the policy) and unbound on removal. With
``portolan_api`` and ``cn_uuid`` configured, a `PolicyFetcher` long-polls the CN's policy in the
nursery and `_apply_policy` installs each one whole (a refetch after a reconnect is a full
resync). `firewall_status` is ``varpdadm firewall``; the metrics come from a scrape-time
collector, as do the shim's counters (`varpd.metrics`).

The admin methods (`create`, `set_props`, `activate`, `delete`, `cache_*`, `vnic_*`, `list`,
`show`) are what the control socket calls; they are also the Python API of the demo and the
tests. They are serialized by one lock, validate everything before changing anything, and
raise `VarpdError(code, message, field)`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import Any

import trio

from protocol.addr import format_mac, parse_mac
from protocol.fwpolicy import Policy
from varpd.config import (
    LINK_NAME,
    MTU_DEFAULT,
    MTU_MAX,
    MTU_MIN,
    VNETID_MAX,
    DeviceConfig,
    VarpdConfig,
)
from varpd.firewall import FirewallTable, PolicyFetcher
from varpd.instance import ACTIVE, INSTANCE_ID_MAX, Instance, VarpdError, VnicEntry, shim_error
from varpd.metrics import FirewallCollector, ShimCollector, VarpdMetrics, serve_metrics
from varpd.persist import InstanceRecord, StateDir
from varpd.plugins import PLUGINS
from varpd.plugins.base import Plugin, ReplyError
from varpd.proxy import proxy_arp, proxy_dhcp, proxy_ndp
from varpd.shim.types import (
    DROP,
    CacheEntry,
    LookupRequest,
    Point,
    ShimError,
)

log = logging.getLogger("varpd")

__all__ = ["StartupError", "Varpd", "VarpdError", "format_entry", "parse_destination"]


class StartupError(RuntimeError):
    """The daemon cannot start (reported by ``varpd run`` as one line, exit 1)."""


# ---------------------------------------------------------------------- lookups


class Reply:
    """The `LookupReply` of one request: exactly one outcome, recorded for metrics."""

    def __init__(self, varpd: Varpd, inst: Instance, req: LookupRequest) -> None:
        self._varpd = varpd
        self._inst = inst
        self._req = req
        self.result: str | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def _claim(self, result: str) -> None:
        if self.result is not None:
            raise ReplyError(
                f"lookup {self._req.req_id} already answered ({self.result}); second outcome "
                f"{result} refused"
            )
        self.result = result

    def respond(self, point: Point) -> None:
        self._claim("respond")
        self._varpd.driver.respond(self._req.req_id, point)

    def drop(self) -> None:
        self._claim("drop")
        self._varpd.driver.drop(self._req.req_id)

    def drop_as(self, result: str) -> None:
        """Drop on the plugin's behalf (no answer, error, timeout, cancelled)."""
        self._claim(result)
        try:
            self._varpd.driver.drop(self._req.req_id)
        except ShimError as exc:  # the device went away meanwhile
            log.debug("drop of request %d failed: %s", self._req.req_id, exc)

    async def _proxy(self, kind: str, fn: Any) -> None:
        self._claim("drop")
        plugin = self._inst.plugin
        assert plugin is not None
        if await fn(self._varpd.driver, self._req, plugin, self._varpd.metrics):
            self.result = f"proxy_{kind}"

    async def proxy_arp(self) -> None:
        await self._proxy("arp", proxy_arp)

    async def proxy_ndp(self) -> None:
        await self._proxy("ndp", proxy_ndp)

    async def proxy_dhcp(self) -> None:
        await self._proxy("dhcp", proxy_dhcp)


# ---------------------------------------------------------------------- helpers


def parse_destination(text: str) -> Point | None:
    """``drop`` (None) | ``a.b.c.d:port`` | ``[v6]:port`` (quirk 9.10 fixed)."""
    t = text.strip()
    if t.lower() == "drop":
        return None
    if t.startswith("["):
        addr, sep, port = t[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
    else:
        addr, sep, port = t.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected IP:PORT, [IPv6]:PORT or drop")
        if ":" in addr:
            raise ValueError(f"{text!r}: write an IPv6 destination as [ADDRESS]:PORT")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"{addr!r} is not an IP address") from None
    if not port.isdecimal() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} must be 1..65535")
    return Point.of(ip, int(port))


def format_entry(entry: CacheEntry) -> dict[str, object]:
    flags = []
    for bit, name in ((1, "pending"), (2, "valid"), (4, "drop")):
        if entry.flags & bit:
            flags.append(name)
    if entry.flags & DROP:
        dest = "drop"
    elif entry.point is not None:
        dest = str(entry.point)
    else:
        dest = None
    return {"mac": format_mac(entry.mac), "flags": flags, "dest": dest}


def _parse_mac_arg(value: object, field: str = "mac") -> bytes:
    if not isinstance(value, str):
        raise VarpdError("invalid", f"{field} must be a MAC address string", field)
    try:
        return parse_mac(value)
    except ValueError as exc:
        raise VarpdError("invalid", str(exc), field) from None


def _int_arg(value: object, field: str, lo: int, hi: int) -> int:
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise VarpdError("invalid", f"{field} must be an integer, got {value!r}", field)
    if not lo <= value <= hi:
        raise VarpdError("invalid", f"{field} {value} is out of range {lo}..{hi}", field)
    return value


# ---------------------------------------------------------------------- the daemon


class Varpd:
    """One varpd: instances, lookup workers, control socket, metrics."""

    def __init__(self, config: VarpdConfig, driver: Any = None, underlay: Any = None) -> None:
        self.config = config
        self.metrics = VarpdMetrics()
        self.state = StateDir(config.state_dir)
        self.shared: dict[str, Any] = {}
        self.instances: dict[str, Instance] = {}
        self._by_id: dict[int, Instance] = {}
        self._by_vnet: dict[int, Instance] = {}
        self._driver = driver
        self._underlay = underlay
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()
        self._io_limiter = trio.CapacityLimiter(1)
        self._next_id = 1
        self.control_path: str | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.started_at = time.time()
        self.restored: list[str] = []
        self.moved_aside: list[tuple[str, str]] = []
        if config.svp:
            from varpd.plugins.svp import SvpOptions

            self.shared["svp:options"] = SvpOptions(**config.svp)  # type: ignore[arg-type]
        # -- the cloud firewall: the table always exists (VNICs are bound to it as they are
        # added); the fetcher only when portolan_api is configured.
        self.firewall = FirewallTable(max_flows=config.firewall.max_flows)
        self.fetcher: PolicyFetcher | None = None
        if config.portolan_api and config.cn_uuid:
            self.fetcher = PolicyFetcher(
                config.portolan_api,
                config.cn_uuid,
                self._apply_policy,
                config.firewall.wait,
                token=config.portolan_api_token,
            )
        # engine verdict counters of VNICs that left the policy (keeps the totals monotonic)
        self.firewall_retired: dict[str, int] = {}
        # backend linux: the policy is enforced by nftables (varpd/firewall/kernel)
        self.kernel_firewall: Any = None
        self.metrics.registry.register(ShimCollector(lambda: self._driver))
        self._gauge_functions()
        self.metrics.registry.register(FirewallCollector(self))

    # ------------------------------------------------------------------ plumbing

    @property
    def driver(self) -> Any:
        if self._driver is None:
            raise RuntimeError("the driver is created when Varpd.run() starts")
        return self._driver

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("Varpd.run() is not running")
        return self._nursery

    def _make_driver(self) -> Any:
        from varpd.shim import OverlayDriver

        if self.config.backend == "linux":
            try:
                from varpd.linux import LinuxDriver
            except ImportError as exc:
                raise StartupError(f"the linux backend is not available: {exc}") from exc
            return LinuxDriver()
        if self.config.backend == "udp":
            try:
                from varpd.shim.udp import UdpBackend
            except ImportError as exc:
                raise StartupError(f"the udp backend is not available: {exc}") from exc
            return OverlayDriver(UdpBackend())
        from varpd.shim.memory import MemoryUnderlay

        if self._underlay is None:
            self._underlay = MemoryUnderlay()
        return OverlayDriver(self._underlay.backend())

    def ready_line(self) -> str:
        parts = ["READY"]
        if self.control_path:
            parts.append(f"control={self.control_path}")
        if self.metrics_address:
            host, port = self.metrics_address
            host = f"[{host}]" if ":" in host else host
            parts.append(f"metrics={host}:{port}")
        return " ".join(parts)

    async def run(self, *, task_status: trio.TaskStatus[Varpd] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started(self)`` once ready."""
        from varpd.control import check_control_socket, serve_control

        if self.config.control_socket:
            # refuse early, before touching the state folder another varpd may be using
            await check_control_socket(self.config.control_socket)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._driver is None:
                    self._driver = self._make_driver()
                if not getattr(self._driver, "is_running", True):
                    await nursery.start(self._driver.run)
                if self.fetcher is not None and hasattr(self._driver, "add_vnic_listener"):
                    await self._start_kernel_firewall(nursery)
                for _ in range(self.config.lookup_workers):
                    nursery.start_soon(self._lookup_worker)
                await self._restore()
                await self._create_config_devices()
                finish = getattr(self._driver, "finish_startup", None)
                if finish is not None:  # linux: delete VNIC links no instance re-adopted
                    await finish()
                if self.fetcher is not None:
                    await nursery.start(self.fetcher.run)
                    nursery.start_soon(self._firewall_sweeper)
                addr = self.config.metrics_address
                if addr is not None:
                    try:
                        self.metrics_address = await nursery.start(
                            serve_metrics, self.metrics, *addr
                        )
                    except OSError as exc:
                        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                        raise StartupError(
                            f"metrics listener (config key metrics) {host}:{addr[1]}: "
                            f"{exc.strerror or exc}"
                        ) from exc
                if self.config.control_socket:
                    try:
                        self.control_path = await nursery.start(
                            serve_control, self, self.config.control_socket
                        )
                    except OSError as exc:
                        if not exc.strerror:  # our own message (in use, not a socket)
                            raise StartupError(str(exc)) from exc
                        raise StartupError(
                            f"control socket (config key control_socket) "
                            f"{self.config.control_socket}: {exc.strerror}"
                        ) from exc
                log.info("varpd ready: %d instance(s)", len(self.instances))
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                for inst in list(self.instances.values()):
                    await inst.stop()
            self._nursery = None

    # ------------------------------------------------------------------ firewall

    async def _start_kernel_firewall(self, nursery: trio.Nursery) -> None:
        """Backend linux: nftables enforces the policy; VNIC ports come from the driver."""
        from varpd.firewall.kernel import NftError
        from varpd.firewall.kernel.service import KernelFirewallService

        try:
            self.kernel_firewall = KernelFirewallService()
        except NftError as exc:  # no libnftables and no nft: refuse rather than run open
            raise StartupError(f"the firewall needs nftables on the linux backend: {exc}") from exc
        self._driver.add_vnic_listener(self.kernel_firewall.vnic_event)
        await nursery.start(self.kernel_firewall.run)

    def _apply_policy(self, policy: Policy) -> None:
        """The fetcher's ``apply``: install a whole policy (a full resync every time), then
        every bound VNIC's ``filter`` is its new firewall or None. Never awaits."""
        if self.kernel_firewall is not None:
            self.kernel_firewall.submit(policy)  # applied by its task, in a worker thread
        before = self.firewall.firewalls
        self.firewall.apply(policy)
        after = self.firewall.firewalls
        for mac, fw in before.items():
            if mac not in after:
                retired = self.firewall_retired
                for key, value in fw.counters.items():
                    retired[key] = retired.get(key, 0) + value
                for key, value in fw.conntrack.counters.items():
                    retired[f"conntrack_{key}"] = retired.get(f"conntrack_{key}", 0) + value
        log.info(
            "firewall policy generation %d applied: %d VNIC(s) in policy",
            policy.generation,
            len(after),
        )

    async def _firewall_sweeper(self, interval: float = 10.0) -> None:
        """Forget expired flows now and then (lookups expire them lazily too)."""
        while True:
            await trio.sleep(interval)
            self.firewall.expire()

    def _vnic_firewall(self, entry: VnicEntry) -> dict[str, object] | None:
        fw = self.firewall.get(entry.mac)
        if fw is None:
            return None
        rules = fw.rules
        return {
            "rules": len(rules),
            "rules_in": sum(1 for r in rules if r.direction == "in"),
            "rules_out": sum(1 for r in rules if r.direction == "out"),
            "flows": len(fw.conntrack),
            "ips": list(fw.ips),
        }

    def firewall_status(self) -> dict[str, object]:
        """What ``varpdadm firewall`` shows: the fetcher, the policy, every local VNIC."""
        fetcher = self.fetcher
        status: dict[str, object] = {
            "enabled": fetcher is not None,
            "cn_uuid": self.config.cn_uuid or None,
            "generation": self.firewall.generation,
            "applied": self.firewall.applied,
            "flows_dropped_by_policy": self.firewall.flows_dropped,
        }
        if fetcher is not None:
            fs = fetcher.status()
            status["fetcher"] = {
                "url": fs.get("url"),
                "state": fs.get("state"),
                "last_error": fs.get("last_error"),
                "etag": fs.get("etag"),
                "requests": fs.get("requests", 0),
                "applied": fs.get("applied", 0),
                "not_modified": fs.get("not_modified", 0),
                "errors": fs.get("errors", 0),
            }
            status["state"] = fs.get("state")
            status["last_error"] = fs.get("last_error")
        else:
            status["fetcher"] = None
            status["state"] = "disabled"
            status["last_error"] = None
        rows: list[dict[str, object]] = []
        local: set[bytes] = set()
        kernel = self.kernel_firewall
        for inst in sorted(self.instances.values(), key=lambda i: i.varpd_id):
            for entry in inst.vnics.values():
                local.add(entry.mac)
                fw = self._vnic_firewall(entry)
                vnic = entry.vnic
                mac = format_mac(entry.mac)
                if kernel is not None:  # linux backend: nftables filters, the nft counters count
                    kc = kernel.counters.get(mac)
                    filtered = kc is not None
                    blocked_in = (
                        0
                        if kc is None
                        else kc.get("in_drop_rule", 0) + kc.get("in_drop_default", 0)
                    )
                    blocked_out = 0 if kc is None else kc.get("out_drop_rule", 0)
                else:
                    counters = getattr(vnic, "counters", {}) if vnic is not None else {}
                    filtered = vnic is not None and vnic.filter is not None
                    blocked_in = counters.get("filter_drop_in", 0)
                    blocked_out = counters.get("filter_drop_out", 0)
                rows.append(
                    {
                        "mac": mac,
                        "device": inst.device,
                        "filtered": filtered,
                        "rules": None if fw is None else fw["rules"],
                        "rules_in": None if fw is None else fw["rules_in"],
                        "rules_out": None if fw is None else fw["rules_out"],
                        "flows": None if fw is None else fw["flows"],
                        "blocked_in": blocked_in,
                        "blocked_out": blocked_out,
                    }
                )
        status["vnics"] = rows
        status["kernel"] = None if self.kernel_firewall is None else self.kernel_firewall.status()
        # policy entries for VNICs this varpd does not have (moved away, not added yet)
        status["policy_only"] = sorted(
            format_mac(mac) for mac in self.firewall.firewalls if mac not in local
        )
        return status

    def _update_gauges(self) -> None:
        """The instance gauges are computed at scrape time (`_gauge_functions`): counting here,
        on every change of every instance, made restore quadratic in the instance count."""

    def _gauge_functions(self) -> None:
        def degraded() -> int:
            return sum(1 for i in list(self.instances.values()) if i.summary()["degraded"])

        def active() -> int:
            return sum(1 for i in list(self.instances.values()) if i.state == ACTIVE)

        self.metrics.degraded_instances.set_function(degraded)
        self.metrics.instances.labels(state="active").set_function(active)
        self.metrics.instances.labels(state="created").set_function(
            lambda: len(self.instances) - active()
        )

    # ------------------------------------------------------------------ lookups

    async def _lookup_worker(self) -> None:
        while True:
            req = await self.driver.next_lookup()
            await self.handle_lookup(req)

    async def handle_lookup(self, req: LookupRequest) -> None:
        """Run one lookup to its single outcome; never raises (except Cancelled)."""
        inst = self._by_id.get(req.varpd_id) or self.instances.get(req.device)
        if inst is None or not inst.active or inst.plugin is None:
            self.metrics.lookups.labels(plugin="none", result="no_instance").inc()
            with contextlib.suppress(ShimError):
                self.driver.drop(req.req_id)
            return
        plugin = inst.plugin
        reply = Reply(self, inst, req)
        start = trio.current_time()
        failed = None
        with inst.lookup_scope() as scope:
            scope.deadline = start + self.config.lookup_timeout
            try:
                await plugin.lookup(req, reply)
            except Exception as exc:
                failed = exc
        try:
            if failed is not None:
                if isinstance(failed, ShimError | ReplyError):
                    inst.log.warning("lookup %d: %s", req.req_id, failed)
                else:
                    inst.log.error(
                        "plugin %s raised on lookup %d for %s; dropped",
                        plugin.name,
                        req.req_id,
                        format_mac(req.dst_mac),
                        exc_info=failed,
                    )
                if not reply.done:
                    reply.drop_as("error")
                else:
                    reply.result = "error"
            elif not reply.done:
                if scope.cancelled_caught:
                    result = "timeout" if not inst._stopping else "cancelled"
                    if result == "timeout":
                        inst.log.warning(
                            "lookup %d timed out after %.1fs; dropped",
                            req.req_id,
                            self.config.lookup_timeout,
                        )
                else:
                    result = "no_answer"
                reply.drop_as(result)
        finally:
            self.metrics.lookups.labels(plugin=plugin.name, result=reply.result or "error").inc()
            self.metrics.lookup_seconds.labels(plugin=plugin.name).observe(
                max(0.0, trio.current_time() - start)
            )

    # ------------------------------------------------------------------ persistence

    async def _persist(self, inst: Instance) -> None:
        rec = inst.record()
        try:
            await trio.to_thread.run_sync(self.state.save, rec, limiter=self._io_limiter)
        except OSError as exc:
            raise VarpdError("internal", f"cannot write the state of {inst.device}: {exc}") from exc

    async def _unpersist(self, name: str) -> None:
        try:
            await trio.to_thread.run_sync(self.state.delete, name, limiter=self._io_limiter)
        except OSError as exc:
            log.error("cannot delete the state file of %s: %s", name, exc)

    async def _move_aside(self, file: Path, reason: str) -> None:
        try:
            await trio.to_thread.run_sync(
                self.state.move_aside, file, reason, limiter=self._io_limiter
            )
        except OSError as exc:  # the file stays; the next start tries again
            log.error("cannot move the state file %s aside: %s", file, exc)

    async def _restore(self) -> None:
        try:
            records, bad = await trio.to_thread.run_sync(
                self.state.load_all, limiter=self._io_limiter
            )
        except OSError as exc:
            log.error("cannot read the state folder %s: %s", self.state.path, exc)
            return
        self.moved_aside.extend(bad)
        for rec in records:
            reason = self._restore_refusal(rec)
            if reason is not None:
                file = self.state.file_for(rec.name)
                await self._move_aside(file, reason)
                self.moved_aside.append((str(file), reason))
                continue
            try:
                inst = await self._create(
                    rec.name,
                    rec.vnetid,
                    rec.plugin,
                    rec.mtu,
                    {**rec.props, **rec.device_props},
                    rec.vnics,
                    varpd_id=rec.id,
                )
            except VarpdError as exc:
                file = self.state.file_for(rec.name)
                await self._move_aside(file, exc.message)
                self.moved_aside.append((str(file), exc.message))
                continue
            try:
                await self._activate(inst, stored=rec)
            except VarpdError as exc:
                inst.set_failure(f"restore failed: {exc.message}")
                log.error("instance %s restored but not activated: %s", rec.name, exc.message)
            self.restored.append(rec.name)
            log.info("restored instance %s (id %d)", rec.name, rec.id)

    def _restore_refusal(self, rec: InstanceRecord) -> str | None:
        try:
            cls = PLUGINS[rec.plugin]
        except KeyError:
            return f"unknown search plugin {rec.plugin!r}"
        if int(cls.mode) != rec.mode:
            return f"plugin {rec.plugin} mode changed from {rec.mode} to {int(cls.mode)}"
        if rec.id in self._by_id:
            return f"instance id {rec.id} is already used by {self._by_id[rec.id].device}"
        if rec.name in self.instances:
            return f"device {rec.name} already exists"
        return None

    async def _create_config_devices(self) -> None:
        for dev in self.config.devices:
            if dev.name in self.instances:
                log.info("device %s restored from state; its config entry is not applied", dev.name)
                continue
            await self._create_from_config(dev)

    async def _create_from_config(self, dev: DeviceConfig) -> None:
        vnics = [{"mac": v.mac, "vlan_id": v.vlan_id, "tap": v.tap} for v in dev.vnics]
        try:
            inst = await self._create(
                dev.name,
                dev.vnetid,
                dev.search,
                dev.mtu,
                {**dev.plugin_props, **dev.device_props},
                vnics,
            )
        except VarpdError as exc:
            log.error("config device %s cannot be created: %s", dev.name, exc.message)
            return
        try:
            await self._activate(inst)
        except VarpdError as exc:
            inst.set_failure(f"activation failed: {exc.message}")
            log.error("config device %s created but not activated: %s", dev.name, exc.message)

    # ------------------------------------------------------------------ admin API

    def _get(self, name: object) -> Instance:
        if not isinstance(name, str):
            raise VarpdError("invalid", "name must be a string", "name")
        inst = self.instances.get(name)
        if inst is None:
            raise VarpdError("not_found", f"no overlay device named {name}", "name")
        return inst

    def _allocate_id(self) -> int:
        for _ in range(INSTANCE_ID_MAX):
            candidate = self._next_id
            self._next_id = 1 if self._next_id >= INSTANCE_ID_MAX else self._next_id + 1
            if candidate not in self._by_id:
                return candidate
        raise VarpdError("busy", "no free instance id")

    def _split_props(
        self, inst: Instance, props: dict[str, object]
    ) -> tuple[dict[str, object], dict[str, object]]:
        plugin: dict[str, object] = {}
        device: dict[str, object] = {}
        for key, value in props.items():
            if not isinstance(key, str):
                raise VarpdError("invalid", f"property name {key!r} is not a string")
            if key == "search" or key.startswith(inst.search + "/"):
                plugin[key] = value
            elif "/" in key and key.split("/", 1)[0] in PLUGINS:
                raise VarpdError(
                    "invalid",
                    f"{key} belongs to search plugin {key.split('/', 1)[0]}, not {inst.search}",
                    key,
                )
            else:
                device[key] = value
        return plugin, device

    async def _create(
        self,
        name: str,
        vnetid: int,
        search: str,
        mtu: int | None,
        props: dict[str, object],
        vnics: list[dict[str, Any]],
        *,
        varpd_id: int | None = None,
    ) -> Instance:
        if not isinstance(name, str) or not LINK_NAME.match(name):
            raise VarpdError(
                "invalid",
                f"{name!r} is not a valid link name (letters, digits, "
                "_ . -, starting with a letter, at most 31)",
                "name",
            )
        if name in self.instances:
            raise VarpdError("exists", f"overlay device {name} already exists", "name")
        vnetid = _int_arg(vnetid, "vnetid", 0, VNETID_MAX)
        mtu = MTU_DEFAULT if mtu is None else _int_arg(mtu, "mtu", MTU_MIN, MTU_MAX)
        other = self._by_vnet.get(vnetid)
        if other is not None:
            raise VarpdError(
                "exists", f"vnetid {vnetid} is already used by {other.device}", "vnetid"
            )
        if not isinstance(search, str):
            raise VarpdError("invalid", "search must be a plugin name", "search")
        try:
            plugin_cls: type[Plugin] = PLUGINS[search]
        except KeyError:
            raise VarpdError(
                "invalid",
                f"unknown search plugin {search!r} (available: {', '.join(PLUGINS.available())})",
                "search",
            ) from None
        inst = Instance(
            varpd_id=varpd_id or 0,
            device=name,
            vnet_id=vnetid,
            plugin_cls=plugin_cls,
            driver=self.driver,
            nursery=self.nursery,
            shared=self.shared,
            metrics=self.metrics,
            mtu=mtu,
            on_change=self._update_gauges,
        )
        plugin_raw, device_props = self._split_props(inst, props)
        if "mtu" in device_props:
            inst.mtu = mtu = _int_arg(device_props.pop("mtu"), "mtu", MTU_MIN, MTU_MAX)
        plugin_values = inst.validate_props(plugin_raw)
        vnic_entries = self._validate_vnics(vnics)
        if not inst.varpd_id:
            inst.varpd_id = self._allocate_id()
        # -- everything validated; now change the world, undoing on failure
        try:
            self.driver.create_device(name, vnetid)
        except ShimError as exc:
            raise shim_error(exc, "vnetid" if "vnet" in str(exc) else "name") from None
        try:
            self._set_device_prop(name, "mtu", mtu)
            for key, value in device_props.items():
                self._set_device_prop(name, key, value)
            inst.device_props = dict(device_props)
            for entry in vnic_entries:
                await self._add_vnic(inst, entry)
        except BaseException:
            for added in list(inst.vnics.values()):
                with trio.CancelScope(shield=True):
                    await self._remove_vnic(inst, added)
            with contextlib.suppress(ShimError), trio.CancelScope(shield=True):
                await self.driver.delete_device(name)
            raise
        inst.props.update(plugin_values)
        self.instances[name] = inst
        self._by_id[inst.varpd_id] = inst
        self._by_vnet[inst.vnet_id] = inst
        self._next_id = max(self._next_id, inst.varpd_id + 1)
        self._update_gauges()
        return inst

    def _validate_vnics(self, vnics: list[dict[str, Any]]) -> list[VnicEntry]:
        out: list[VnicEntry] = []
        seen: set[bytes] = set()
        for v in vnics:
            mac = _parse_mac_arg(v.get("mac"))
            if mac in seen:
                raise VarpdError("exists", f"VNIC {format_mac(mac)} is listed twice", "mac")
            seen.add(mac)
            vlan = _int_arg(v.get("vlan_id", 0) or 0, "vlan", 0, 4094)
            tap = v.get("tap") or v.get("ifname") or None  # ifname: the linux backend's word
            if tap is not None and not isinstance(tap, str):
                raise VarpdError("invalid", "tap must be a device name", "tap")
            out.append(VnicEntry(mac, vlan, tap))
        return out

    def _set_device_prop(self, name: str, prop: str, value: object) -> None:
        try:
            self.driver.set_prop(name, prop, value)
        except ShimError as exc:
            raise shim_error(exc, prop, prop) from None

    async def _add_vnic(self, inst: Instance, entry: VnicEntry) -> None:
        add_async = getattr(self.driver, "add_vnic_async", None)
        if add_async is not None:  # linux: a veth pair, created in a worker thread
            try:
                entry.vnic = await add_async(inst.device, entry.mac, entry.vlan, entry.tap)
            except ShimError as exc:
                raise shim_error(exc, "mac", f"VNIC {format_mac(entry.mac)}") from None
            inst.vnics[entry.mac] = entry
            self.firewall.bind(entry.vnic)
            return
        port = None
        if entry.tap is not None:
            backend = getattr(self.driver, "backend", None)
            make = getattr(backend, "tap_port", None)
            if make is not None:
                try:
                    mtu = self.driver.get_props(inst.device).get("mtu")
                    port = make(entry.tap, inst.device, entry.mac, entry.vlan, mtu=mtu)
                except ShimError as exc:
                    raise shim_error(exc, "tap", f"TAP {entry.tap}") from None
        try:
            entry.vnic = self.driver.add_vnic(inst.device, entry.mac, entry.vlan, port)
        except ShimError as exc:
            if port is not None:
                port.detach()  # close the TAP we just made
            raise shim_error(exc, "mac", f"VNIC {format_mac(entry.mac)}") from None
        inst.vnics[entry.mac] = entry
        self.firewall.bind(entry.vnic)

    async def _remove_vnic(self, inst: Instance, entry: VnicEntry) -> None:
        """Best-effort removal (unbinds the firewall first); errors are ignored."""
        if entry.vnic is not None:
            self.firewall.unbind(entry.vnic)
        with contextlib.suppress(ShimError):
            await self._driver_remove_vnic(inst.device, entry.mac)
        inst.vnics.pop(entry.mac, None)

    async def _driver_remove_vnic(self, device: str, mac: bytes) -> None:
        remove_async = getattr(self.driver, "remove_vnic_async", None)
        if remove_async is not None:
            await remove_async(device, mac)
        else:
            self.driver.remove_vnic(device, mac)

    async def _activate(self, inst: Instance, stored: InstanceRecord | None = None) -> None:
        """Activate; ``stored`` is the record restore read (not written again if unchanged:
        one fsync'd write per instance made start-up slow with many instances)."""
        if inst.state == ACTIVE:
            raise VarpdError("exists", f"{inst.device} is already active", "name")
        try:
            dprops = self.driver.get_props(inst.device)
        except ShimError as exc:
            raise shim_error(exc, "name") from None
        if "vxlan/listen_ip" in dprops and dprops["vxlan/listen_ip"] is None:
            raise VarpdError(
                "not_ready",
                f"cannot activate {inst.device}: required property vxlan/listen_ip is not set",
                "vxlan/listen_ip",
            )
        await inst.start()
        steps_done = []
        try:
            if stored is None or inst.record() != stored:
                await self._persist(inst)
                steps_done.append("persist")
            inst.associate()
            steps_done.append("associate")
            if self.driver.status(inst.device).state != "activated":
                try:
                    await self.driver.activate(inst.device)
                except ShimError as exc:
                    raise shim_error(exc, what=f"cannot activate {inst.device}") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                if "associate" in steps_done:
                    with contextlib.suppress(ShimError):
                        self.driver.disassociate(inst.device)
                await inst.stop()
                if "persist" in steps_done:
                    await self._unpersist(inst.device)
            raise
        inst.clear_failure()  # the plugin's own reason, if any, stays
        self._update_gauges()
        inst.log.info("activated (id %d, plugin %s)", inst.varpd_id, inst.search)

    # public, serialized ------------------------------------------------------

    async def create(
        self,
        name: str,
        vnetid: int,
        search: str,
        mtu: int | None = None,
        props: dict[str, object] | None = None,
        vnics: list[dict[str, Any]] | None = None,
    ) -> dict[str, object]:
        async with self._lock:
            inst = await self._create(
                name, vnetid, search, mtu, dict(props or {}), list(vnics or [])
            )
            return inst.detail()

    async def set_props(self, name: str, props: dict[str, object]) -> dict[str, object]:
        async with self._lock:
            inst = self._get(name)
            if not isinstance(props, dict) or not props:
                raise VarpdError("invalid", "no properties given", "props")
            plugin_raw, device_props = self._split_props(inst, props)
            plugin_values = inst.validate_props(plugin_raw)
            if device_props and inst.state == ACTIVE:
                key = next(iter(device_props))
                raise VarpdError(
                    "read_only", f"property {key} cannot be changed while {name} is active", key
                )
            previous = {}
            with contextlib.suppress(ShimError):
                previous = self.driver.get_props(name)
            applied: list[str] = []
            try:
                for key, value in device_props.items():
                    self._set_device_prop(name, key, value)
                    applied.append(key)
                await inst.apply_props(plugin_values)
            except BaseException:
                for key in applied:
                    if previous.get(key) is not None:
                        with contextlib.suppress(ShimError):
                            self.driver.set_prop(name, key, previous[key])
                raise
            for key, value in device_props.items():
                if key == "mtu":
                    inst.mtu = int(value)  # type: ignore[call-overload]
                else:
                    inst.device_props[key] = value
            if inst.state == ACTIVE:
                await self._persist(inst)
            return inst.detail()

    async def activate(self, name: str) -> dict[str, object]:
        async with self._lock:
            inst = self._get(name)
            await self._activate(inst)
            return inst.detail()

    async def delete(self, name: str) -> None:
        async with self._lock:
            inst = self._get(name)
            await inst.stop()
            for entry in list(inst.vnics.values()):
                await self._remove_vnic(inst, entry)
            with contextlib.suppress(ShimError):
                self.driver.disassociate(name)
            try:
                await self.driver.delete_device(name)
            except ShimError as exc:
                log.error("deleting overlay device %s: %s", name, exc)
            await self._unpersist(name)
            del self.instances[name]
            self._by_id.pop(inst.varpd_id, None)
            self._by_vnet.pop(inst.vnet_id, None)
            self._update_gauges()
            log.info("deleted %s", name)

    def list(self) -> list[dict[str, object]]:
        return [
            inst.summary() for inst in sorted(self.instances.values(), key=lambda i: i.varpd_id)
        ]

    def show(self, name: str) -> dict[str, object]:
        inst = self._get(name)
        out = inst.detail()
        out["backend"] = self.config.backend
        out["firewall"] = {
            "enabled": self.fetcher is not None,
            "state": self.fetcher.state if self.fetcher is not None else "disabled",
            "generation": self.firewall.generation,
            # per VNIC: None = not filtered (not in the policy, or no policy yet)
            "vnics": {
                format_mac(mac): self._vnic_firewall(entry) for mac, entry in inst.vnics.items()
            },
        }
        return out

    def info(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "cn_uuid": self.config.cn_uuid,
            "backend": self.config.backend,
            "instances": len(self.instances),
            "lookup_workers": self.config.lookup_workers,
            "plugins": PLUGINS.available(),
            "uptime": round(time.time() - self.started_at, 3),
            "moved_aside": [{"file": f, "reason": r} for f, r in self.moved_aside],
            "firewall": self.fetcher.state if self.fetcher is not None else "disabled",
            "firewall_generation": self.firewall.generation,
        }

    # cache ----------------------------------------------------------------

    def cache_list(self, name: str) -> list[dict[str, object]]:
        self._get(name)
        try:
            return [format_entry(e) for e in self.driver.cache_list(name)]
        except ShimError as exc:
            raise shim_error(exc) from None

    def cache_get(self, name: str, mac: str) -> dict[str, object]:
        self._get(name)
        raw = _parse_mac_arg(mac)
        try:
            entry = self.driver.cache_get(name, raw)
        except ShimError as exc:
            raise shim_error(exc, "mac") from None
        if entry is None:
            raise VarpdError("not_found", f"{format_mac(raw)} is not in the cache of {name}", "mac")
        return format_entry(entry)

    def cache_set(self, name: str, mac: str, dest: str) -> dict[str, object]:
        self._get(name)
        raw = _parse_mac_arg(mac)
        if not isinstance(dest, str):
            raise VarpdError("invalid", "dest must be IP:PORT, [IPv6]:PORT or drop", "dest")
        try:
            point = parse_destination(dest)
        except ValueError as exc:
            raise VarpdError("invalid", str(exc), "dest") from None
        try:
            self.driver.cache_set(name, raw, point, drop=point is None)
            entry = self.driver.cache_get(name, raw)
        except ShimError as exc:
            raise shim_error(exc, "dest") from None
        if entry is None:
            return {"mac": format_mac(raw), "flags": [], "dest": None}
        return format_entry(entry)

    def cache_remove(self, name: str, mac: str) -> None:
        self._get(name)
        raw = _parse_mac_arg(mac)
        try:
            self.driver.cache_remove(name, raw)
        except ShimError as exc:
            raise shim_error(exc, "mac") from None

    def cache_flush(self, name: str) -> None:
        self._get(name)
        try:
            self.driver.cache_flush(name)
        except ShimError as exc:
            raise shim_error(exc) from None

    # vnics ----------------------------------------------------------------

    async def vnic_add(
        self, name: str, mac: str, vlan: int = 0, tap: str | None = None
    ) -> dict[str, object]:
        async with self._lock:
            inst = self._get(name)
            (entry,) = self._validate_vnics([{"mac": mac, "vlan_id": vlan, "tap": tap}])
            if entry.mac in inst.vnics:
                raise VarpdError(
                    "exists", f"VNIC {format_mac(entry.mac)} is already on {name}", "mac"
                )
            await self._add_vnic(inst, entry)
            if inst.state == ACTIVE:
                try:
                    await self._persist(inst)
                except VarpdError:
                    await self._remove_vnic(inst, entry)
                    raise
            out = entry.to_json()
            # the link the orchestrator moves into the tenant: the veth's tenant end (linux)
            # or the TAP (udp); None on the memory backend
            vnic = entry.vnic
            out["ifname"] = getattr(vnic, "tenant_ifname", None) or getattr(
                getattr(vnic, "port", None), "name", None
            )
            out["backend"] = self.config.backend
            return out

    async def vnic_remove(self, name: str, mac: str) -> None:
        async with self._lock:
            inst = self._get(name)
            raw = _parse_mac_arg(mac)
            if raw not in inst.vnics:
                raise VarpdError("not_found", f"no VNIC {format_mac(raw)} on {name}", "mac")
            try:
                await self._driver_remove_vnic(name, raw)
            except ShimError as exc:
                raise shim_error(exc, "mac") from None
            entry = inst.vnics.pop(raw)
            if entry.vnic is not None:
                self.firewall.unbind(entry.vnic)
            if inst.state == ACTIVE:
                await self._persist(inst)

    def vnic_list(self, name: str) -> list[dict[str, object]]:
        return [v.to_json() for v in self._get(name).vnics.values()]

    def vnic(self, name: str, mac: bytes | str) -> Any:
        """The driver's Vnic object (demo/tests reach the memory port through it)."""
        inst = self._get(name)
        raw = mac if isinstance(mac, bytes) else _parse_mac_arg(mac)
        entry = inst.vnics.get(raw)
        if entry is None:
            raise VarpdError("not_found", f"no VNIC {format_mac(raw)} on {name}", "mac")
        return entry.vnic
