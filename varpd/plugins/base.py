"""The contract between varpd and its search plugins.

A plugin answers "where do I send this frame?" for one overlay device. varpd creates one
plugin object per activated instance, hands it a `PluginHost` (what the daemon lends it: the
driver, a nursery for background tasks, a shared registry, metrics, degrade/restore), and its
validated property values. Lifecycle, mirroring libvarpd's provider guarantees:

    __init__(host, values) -> start() -> [lookup/arp/dhcp/default_point/update]* -> stop()

- ``start`` raises `PluginNotReady(prop)` when a required property is unset, or `PropError`
  when a value is unusable (e.g. an invalid files/config). No other method is called before
  ``start`` returned or after ``stop`` was entered; calls may be concurrent.
- ``lookup(req, reply)`` gives exactly one outcome per request through `LookupReply`:
  ``respond(point)``, ``drop()``, or one of the proxies (``await reply.proxy_arp()`` etc.,
  which use the plugin's ``arp()``/``dhcp()`` answers, inject or resend, and drop the request).
  Returning without an outcome drops the request. An exception drops it too and is counted.
  A second outcome raises `ReplyError` (a plugin bug).
- Properties are declared as `PropSpec`s. ``PropSpec.validate`` turns operator text (from
  varpdadm) or TOML values into the canonical stored value (str for string/ip/mac, int for
  uint). Values must stay msgpack-friendly: they are persisted as they are.
- ``live=True`` on a PropSpec means the property may change while the instance is active;
  varpd then validates the whole new value set, calls ``await plugin.update(values)`` (which
  may refuse with `PropError`, leaving the old values in force) and persists. Properties without
  ``live`` are refused after activation ("read-only while active"). This is our fix of illumos
  quirk 9.7 (changes after activation were silently not persisted).
- POINT plugins implement ``default_point()``; varpd associates the device with it at
  activation and re-associates after a live update.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from protocol.addr import format_mac, parse_mac

if TYPE_CHECKING:
    import trio

    from varpd.metrics import VarpdMetrics
    from varpd.shim.types import LookupRequest, Point, TargetMode

PropType = Literal["string", "uint", "ip", "mac"]

UINT_MAX = 2**64 - 1


class PluginError(Exception):
    """Base of the errors a plugin raises towards varpd."""


class PropError(PluginError, ValueError):
    """A property value is unusable; ``prop`` names the property."""

    def __init__(self, prop: str, message: str) -> None:
        super().__init__(f"{prop}: {message}")
        self.prop = prop
        self.message = message


class PluginNotReady(PluginError):
    """``start`` cannot proceed: the required property ``prop`` is unset (illumos EAGAIN)."""

    def __init__(self, prop: str, message: str | None = None) -> None:
        self.prop = prop
        self.message = message or f"required property {prop} is not set"
        super().__init__(self.message)


class ReplyError(RuntimeError):
    """A plugin tried to give a second outcome for one lookup request."""


def check_underlay_ip(ip: IPv4Address | IPv6Address, *, allow_multicast: bool = True) -> str | None:
    """Why ``ip`` cannot be an underlay destination, or None. Spec §1.2/§6 rules."""
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            ip4 = ip.ipv4_mapped
            if ip4 == IPv4Address(0):
                return "the IPv4-mapped unspecified address is not a destination"
            if ip4.is_multicast and not allow_multicast:
                return "multicast addresses are not allowed"
            return None
        if ip == IPv6Address(0):
            return "the unspecified address is not a destination"
        packed = ip.packed
        if packed[:12] == b"\x00" * 12 and ip != IPv6Address(1):
            return "IPv4-compatible IPv6 addresses are not allowed"
        if packed[:2] == b"\x20\x02":
            return "6to4 addresses are not allowed"
        if ip.is_multicast and not allow_multicast:
            return "multicast addresses are not allowed"
        return None
    if ip == IPv4Address(0):
        return "the unspecified address is not a destination"
    if ip.is_multicast and not allow_multicast:
        return "multicast addresses are not allowed"
    return None


@dataclass(frozen=True)
class PropSpec:
    """One search-plugin property.

    ``type``: "string" | "uint" | "ip" | "mac". ``default`` counts as set for ``required``.
    ``min``/``max`` bound a uint; ``allow_multicast`` applies to ip; ``absolute_path`` to string.
    ``live``: may change after activation (see module docstring).
    """

    name: str
    type: PropType
    required: bool = False
    default: Any = None
    min: int | None = None
    max: int | None = None
    live: bool = False
    allow_multicast: bool = True
    absolute_path: bool = False
    description: str = ""

    def validate(self, value: object) -> object:
        """Canonical stored value for ``value`` (text or typed), or `PropError`."""
        if self.type == "uint":
            return self._uint(value)
        if self.type == "ip":
            return self._ip(value)
        if self.type == "mac":
            try:
                return format_mac(parse_mac(str(value) if not isinstance(value, str) else value))
            except ValueError as exc:
                raise PropError(self.name, str(exc)) from None
        if not isinstance(value, str):
            raise PropError(self.name, f"expected a string, got {value!r}")
        if len(value.encode()) > 255:
            raise PropError(self.name, "value longer than 255 bytes")
        if self.absolute_path and not value.startswith("/"):
            raise PropError(self.name, f"{value!r} is not an absolute path")
        if not value:
            raise PropError(self.name, "value must not be empty")
        return value

    def _uint(self, value: object) -> int:
        if isinstance(value, bool):
            raise PropError(self.name, f"expected an unsigned integer, got {value!r}")
        if isinstance(value, int):
            n = value
        elif isinstance(value, str) and value.strip().isdecimal():
            n = int(value.strip())
        else:
            raise PropError(self.name, f"expected an unsigned integer, got {value!r}")
        lo = 0 if self.min is None else self.min
        hi = UINT_MAX if self.max is None else self.max
        if not lo <= n <= hi:
            raise PropError(self.name, f"{n} is out of range {lo}..{hi}")
        return n

    def _ip(self, value: object) -> str:
        if isinstance(value, IPv4Address | IPv6Address):
            ip: IPv4Address | IPv6Address = value
        elif isinstance(value, str):
            try:
                ip = ipaddress.ip_address(value.strip().strip("[]"))
            except ValueError:
                raise PropError(self.name, f"{value!r} is not an IP address") from None
        else:
            raise PropError(self.name, f"expected an IP address, got {value!r}")
        why = check_underlay_ip(ip, allow_multicast=self.allow_multicast)
        if why:
            raise PropError(self.name, f"{ip}: {why}")
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return str(ip)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "default": self.default,
            "live": self.live,
            "description": self.description,
        }


class PluginHost(Protocol):
    """What varpd lends a plugin instance (implemented by `varpd.instance.Instance`)."""

    device: str
    vnet_id: int
    varpd_id: int
    driver: Any  # varpd.shim.OverlayDriver: cache_set / cache_remove / inject / resend
    nursery: trio.Nursery  # daemon-lifetime nursery for background tasks
    shared: dict[str, Any]  # daemon-scoped registry (e.g. svp remotes shared per key)
    metrics: VarpdMetrics
    log: logging.Logger

    def degrade(self, reason: str) -> None: ...
    def restore(self) -> None: ...


class LookupReply(Protocol):
    """The single outcome of one lookup request (implemented in `varpd.daemon`)."""

    @property
    def done(self) -> bool: ...
    def respond(self, point: Point) -> None: ...
    def drop(self) -> None: ...
    async def proxy_arp(self) -> None: ...
    async def proxy_ndp(self) -> None: ...
    async def proxy_dhcp(self) -> None: ...


class Plugin:
    """Base class of search plugins; subclasses set ``name``, ``mode`` and ``props``."""

    name: ClassVar[str]
    mode: ClassVar[TargetMode]
    props: ClassVar[tuple[PropSpec, ...]] = ()

    def __init__(self, host: PluginHost, values: dict[str, object]) -> None:
        self.host = host
        self.values = dict(values)

    @classmethod
    def prop_spec(cls, name: str) -> PropSpec | None:
        for spec in cls.props:
            if spec.name == name:
                return spec
        return None

    @classmethod
    def effective_values(cls, values: dict[str, object]) -> dict[str, object]:
        """``values`` with defaults filled in for unset properties."""
        out = dict(values)
        for spec in cls.props:
            if spec.name not in out and spec.default is not None:
                out[spec.name] = spec.default
        return out

    def require(self, prop: str) -> object:
        """The value of ``prop`` (default included), or `PluginNotReady`."""
        value = self.effective_values(self.values).get(prop)
        if value is None:
            raise PluginNotReady(prop)
        return value

    async def start(self) -> None:
        for spec in self.props:
            if spec.required:
                self.require(spec.name)

    async def stop(self) -> None:
        return None

    async def update(self, values: dict[str, object]) -> None:
        """Live property change while active; raise `PropError` to refuse (nothing changes)."""
        self.values = dict(values)

    def default_point(self) -> Point:
        raise NotImplementedError(f"{self.name} is not a POINT plugin")

    async def lookup(self, req: LookupRequest, reply: LookupReply) -> None:
        reply.drop()

    async def arp(self, ip: IPv4Address | IPv6Address) -> bytes | None:
        return None

    async def dhcp(self, req: LookupRequest) -> bytes | None:
        return None

    def status(self) -> dict[str, object]:
        """Extra plugin state for ``varpdadm show`` (msgpack-friendly)."""
        return {}
