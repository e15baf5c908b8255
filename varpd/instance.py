"""Instances: one per overlay device, binding the device to a search plugin (spec §3.2).

An `Instance` is created (plugin must exist), given properties, then activated:
``plugin.start()`` → persist → associate (POINT: with ``plugin.default_point()``) → activate
the device in the driver. Any failure undoes the steps already taken, in reverse, and leaves
the instance created-but-inactive. ``stop()`` cancels the instance's in-flight lookups and
stops the plugin; destroy is the daemon's (``Varpd.delete``): ``stop()``, then the VNICs and
the device go and the state file is deleted.

Properties: the explicitly set plugin values live in ``props`` (validated by the plugin's
`PropSpec`s); defaults are filled in by the plugin. ``search`` is a read-only pseudo-property
(the plugin name). Before activation any property may be set; after activation only
``live`` properties — the plugin is updated first, POINT devices are re-associated, and the
new values are persisted (our fix of illumos quirk 9.7).

An instance is also the `PluginHost` its plugin sees: device, vnet_id, varpd_id, driver,
nursery, shared, metrics, log, degrade()/restore().

Every lookup the worker pool runs for this instance is registered in ``_inflight`` as a cancel
scope; destroy cancels them all before ``plugin.stop()``, so a plugin is never called after
stop (libvarpd's guarantee).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from protocol.addr import format_mac
from varpd.persist import InstanceRecord
from varpd.plugins.base import Plugin, PluginNotReady, PropError
from varpd.shim.types import ShimError, TargetMode

if TYPE_CHECKING:
    from varpd.metrics import VarpdMetrics

INSTANCE_ID_MAX = 2**31 - 1
CREATED, ACTIVE = "created", "active"
SHIM_CODES = {
    "ENOENT": "not_found",
    "EEXIST": "exists",
    "EBUSY": "busy",
    "ENOTSUP": "unsupported",
    "EPERM": "read_only",
    "ENXIO": "not_ready",
    "EAGAIN": "not_ready",
    "EADDRINUSE": "in_use",
    "EINVAL": "invalid",
}


class VarpdError(Exception):
    """An operation refused; carried to varpdadm as ``{code, message, field}``."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def shim_error(exc: ShimError, field: str | None = None, what: str = "") -> VarpdError:
    code = SHIM_CODES.get(getattr(exc, "code", "EINVAL"), "invalid")
    message = f"{what}: {exc}" if what else str(exc)
    return VarpdError(code, message, field)


@dataclass
class VnicEntry:
    mac: bytes
    vlan: int = 0
    tap: str | None = None
    vnic: Any = None  # the driver's Vnic object

    def to_json(self) -> dict[str, object]:
        return {"mac": format_mac(self.mac), "vlan_id": self.vlan, "tap": self.tap}


class Instance:
    """One varpd instance; also the `PluginHost` of its plugin."""

    def __init__(
        self,
        *,
        varpd_id: int,
        device: str,
        vnet_id: int,
        plugin_cls: type[Plugin],
        driver: Any,
        nursery: trio.Nursery,
        shared: dict[str, Any],
        metrics: VarpdMetrics,
        mtu: int,
        device_props: dict[str, object] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.varpd_id = varpd_id
        self.device = device
        self.vnet_id = vnet_id
        self.plugin_cls = plugin_cls
        self.driver = driver
        self.nursery = nursery
        self.shared = shared
        self.metrics = metrics
        self.log = logging.getLogger(f"varpd.instance.{device}")
        self.mtu = mtu
        self.device_props: dict[str, object] = dict(device_props or {})
        self.props: dict[str, object] = {}
        self.vnics: dict[bytes, VnicEntry] = {}
        self.state = CREATED
        self.plugin: Plugin | None = None
        self.degraded_reason: str | None = None  # the plugin's (PluginHost.degrade)
        self.failure: str | None = None  # the daemon's (activation / restore failed)
        self._stopping = False
        self._inflight: set[trio.CancelScope] = set()
        self._on_change = on_change or (lambda: None)

    # ------------------------------------------------------------------ identity

    @property
    def name(self) -> str:
        return self.device

    @property
    def search(self) -> str:
        return self.plugin_cls.name

    @property
    def mode(self) -> TargetMode:
        return self.plugin_cls.mode

    @property
    def active(self) -> bool:
        return self.state == ACTIVE and not self._stopping

    # ------------------------------------------------------------------ PluginHost

    def degrade(self, reason: str) -> None:
        """The plugin reports a problem. Remembered even when the driver cannot take it yet
        (before ``associate``): `associate` applies it then."""
        reason = reason[:255]
        self.degraded_reason = reason
        self._push_status()
        self.log.warning("degraded: %s", reason)
        self._on_change()

    def restore(self) -> None:
        if self.degraded_reason is None:
            return
        self.degraded_reason = None
        self._push_status()
        self.log.info("restored")
        self._on_change()

    # the daemon's own reason (activation/restore failed), kept apart from the plugin's so
    # that a successful activation clears only what the daemon set

    @property
    def reason(self) -> str | None:
        """What the device's degraded message should say (the daemon's reason wins)."""
        return self.failure or self.degraded_reason

    def set_failure(self, reason: str) -> None:
        self.failure = reason[:255]
        self._push_status()
        self.log.warning("degraded: %s", self.failure)
        self._on_change()

    def clear_failure(self) -> None:
        if self.failure is None:
            return
        self.failure = None
        self._push_status()
        self._on_change()

    def _push_status(self) -> bool:
        """Mirror `reason` into the driver; False when the driver refused (e.g. ENXIO before
        association, as illumos' OVERLAY_TARG_DEGRADE does)."""
        reason = self.reason
        try:
            if reason is None:
                self.driver.restore(self.device)
            else:
                self.driver.degrade(self.device, reason)
        except ShimError as exc:
            self.log.debug("driver status not updated yet: %s", exc)
            return False
        return True

    # ------------------------------------------------------------------ properties

    def validate_props(self, raw: dict[str, object]) -> dict[str, object]:
        """Validate search-plugin properties; refuse unknown, ``search`` and, when active,
        non-live ones. Returns the canonical values; changes nothing."""
        out: dict[str, object] = {}
        for key, value in raw.items():
            if key == "search":
                raise VarpdError("read_only", "property search is read-only", "search")
            spec = self.plugin_cls.prop_spec(key)
            if spec is None:
                raise VarpdError(
                    "invalid", f"search plugin {self.search} has no property {key}", key
                )
            try:
                out[key] = spec.validate(value)
            except PropError as exc:
                raise VarpdError("invalid", str(exc), key) from None
            if self.state == ACTIVE and not spec.live:
                raise VarpdError(
                    "read_only",
                    f"property {key} cannot be changed while {self.device} is active",
                    key,
                )
        return out

    async def apply_props(self, values: dict[str, object]) -> None:
        """Apply validated values; when active, update the plugin (may refuse) first."""
        if not values:
            return
        if self.state != ACTIVE:
            self.props.update(values)
            return
        assert self.plugin is not None
        new = {**self.props, **values}
        try:
            await self.plugin.update(new)
        except PropError as exc:
            raise VarpdError("invalid", str(exc), exc.prop) from None
        except PluginNotReady as exc:
            raise VarpdError("not_ready", exc.message, exc.prop) from None
        self.props = new
        if self.mode == TargetMode.POINT:
            point = self.plugin.default_point()
            try:
                self.driver.disassociate(self.device)
                self.driver.associate(self.device, self.varpd_id, TargetMode.POINT, point)
            except ShimError as exc:
                raise shim_error(exc, what="re-association failed") from None

    def prop_table(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = [
            {
                "name": "search",
                "value": self.search,
                "default": None,
                "type": "string",
                "perm": "r-",
                "required": False,
                "live": False,
            }
        ]
        for spec in self.plugin_cls.props:
            rows.append(
                {
                    "name": spec.name,
                    "value": self.props.get(spec.name),
                    "default": spec.default,
                    "type": spec.type,
                    "perm": "rw" if (self.state != ACTIVE or spec.live) else "r-",
                    "required": spec.required,
                    "live": spec.live,
                }
            )
        return rows

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Plugin:
        """Create and start the plugin; errors become `VarpdError` naming the property."""
        plugin = self.plugin_cls(self, dict(self.props))
        try:
            await plugin.start()
        except PluginNotReady as exc:
            raise VarpdError("not_ready", exc.message, exc.prop) from None
        except PropError as exc:
            raise VarpdError("invalid", str(exc), exc.prop) from None
        except Exception as exc:
            self.log.exception("plugin %s failed to start", self.search)
            raise VarpdError(
                "plugin_error", f"plugin {self.search} failed to start: {exc}"
            ) from exc
        self.plugin = plugin
        self._stopping = False
        self.state = ACTIVE
        return plugin

    def associate(self) -> None:
        assert self.plugin is not None
        point = self.plugin.default_point() if self.mode == TargetMode.POINT else None
        try:
            with contextlib.suppress(ShimError):
                if self.driver.status(self.device).associated:
                    self.driver.disassociate(self.device)
            self.driver.associate(self.device, self.varpd_id, self.mode, point)
        except ShimError as exc:
            raise shim_error(exc, what=f"cannot associate {self.device}") from None
        # A plugin may have degraded the instance during start, before the device had a
        # varpd: the driver may have refused it then, so apply the reason now.
        if self.reason is not None:
            self._push_status()

    async def stop(self) -> None:
        """Cancel in-flight lookups, then stop the plugin (idempotent)."""
        self._stopping = True
        for scope in list(self._inflight):
            scope.cancel()
        plugin, self.plugin = self.plugin, None
        self.state = CREATED
        if plugin is not None:
            try:
                await plugin.stop()
            except Exception:
                self.log.exception("plugin %s failed to stop cleanly", self.search)
            if self.degraded_reason is not None:
                # a stopped plugin's complaint is stale; a new start reports afresh
                self.degraded_reason = None
                self._push_status()
                self._on_change()

    @contextlib.contextmanager
    def lookup_scope(self) -> Iterator[trio.CancelScope]:
        """Track one lookup; destroy cancels it."""
        with trio.CancelScope() as scope:
            self._inflight.add(scope)
            try:
                yield scope
            finally:
                self._inflight.discard(scope)

    # ------------------------------------------------------------------ views

    def record(self) -> InstanceRecord:
        return InstanceRecord(
            id=self.varpd_id,
            name=self.device,
            vnetid=self.vnet_id,
            mtu=self.mtu,
            plugin=self.search,
            mode=int(self.mode),
            props=dict(self.props),
            device_props=dict(self.device_props),
            vnics=[v.to_json() for v in self.vnics.values()],
        )

    def summary(self) -> dict[str, object]:
        status = self._driver_status()
        degraded = self.reason is not None or bool(status and status.degraded)
        reason = self.reason or (status.message if status and status.degraded else None)
        return {
            "name": self.device,
            "id": self.varpd_id,
            "vnetid": self.vnet_id,
            "search": self.search,
            "mode": self.mode.name.lower(),
            "state": self.state,
            "mtu": self.mtu,
            "degraded": degraded,
            "reason": reason,
            "vnics": len(self.vnics),
        }

    def _driver_status(self) -> Any:
        try:
            return self.driver.status(self.device)
        except ShimError:
            return None

    def detail(self) -> dict[str, object]:
        out = self.summary()
        out["props"] = self.prop_table()
        try:
            out["device_props"] = {k: v for k, v in self.driver.get_props(self.device).items()}
        except ShimError:
            out["device_props"] = dict(self.device_props)
        status = self._driver_status()
        if status is not None:
            out["device"] = {
                "state": status.state,
                "associated": status.associated,
                "status": "DEGRADED" if status.degraded else "ONLINE",
                "message": status.message,
                "counters": dict(status.counters),
            }
        out["vnic_list"] = [v.to_json() for v in self.vnics.values()]
        out["plugin"] = self.plugin.status() if self.plugin is not None else {}
        return out
