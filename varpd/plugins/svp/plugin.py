"""`SvpPlugin`: the svp search plugin (DYNAMIC mode), one object per overlay device."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv6Address
from typing import Any, ClassVar

from protocol.addr import UNSPECIFIED, format_mac, ip_to_wire
from protocol.ethernet import ETH_P_ARP, ETH_P_IPV6
from protocol.svp import Status
from varpd.plugins.base import Plugin, PluginHost, PropError, PropSpec
from varpd.plugins.svp.conn import SvpError
from varpd.plugins.svp.remote import Remote, SvpOptions, remote_key
from varpd.shim.types import DstType, LookupRequest, Point, TargetMode

log = logging.getLogger("varpd.plugins.svp")

DEFAULT_PORT = 1296
DEFAULT_UNDERLAY_PORT = 1339
OPTIONS_KEY = "svp:options"


class SvpPlugin(Plugin):
    """Answers misses from a portolan (SVP) server; applies its shootdown log."""

    name: ClassVar[str] = "svp"
    mode: ClassVar[TargetMode] = TargetMode.DYNAMIC
    props: ClassVar[tuple[PropSpec, ...]] = (
        PropSpec(
            "svp/host",
            "string",
            required=True,
            description="hostname or IP of the SVP (portolan) service",
        ),
        PropSpec(
            "svp/port",
            "uint",
            required=True,
            default=DEFAULT_PORT,
            min=1,
            max=65535,
            description="TCP port of the SVP service",
        ),
        PropSpec(
            "svp/underlay_ip",
            "ip",
            required=True,
            allow_multicast=False,
            description="this node's underlay IP (identifies it in log requests)",
        ),
        PropSpec(
            "svp/underlay_port",
            "uint",
            required=True,
            default=DEFAULT_UNDERLAY_PORT,
            min=1,
            max=65535,
            description="this node's underlay UDP port",
        ),
    )

    def __init__(
        self,
        host: PluginHost,
        values: dict[str, object],
        *,
        options: SvpOptions | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(host, values)
        if options is None:
            shared = getattr(host, "shared", None)
            options = shared.get(OPTIONS_KEY) if isinstance(shared, dict) else None
        self.options = SvpOptions.coerce(options)
        self.remote: Remote | None = None
        self._key: str | None = None
        self.log = getattr(host, "log", None) or log

    # ---------------------------------------------------------------- lifecycle

    def _value(self, prop: str) -> Any:
        spec = self.prop_spec(prop)
        assert spec is not None
        raw = self.require(prop)  # PluginNotReady when unset
        try:
            return spec.validate(raw)
        except PropError:
            raise
        except ValueError as exc:
            raise PropError(prop, str(exc)) from None

    async def start(self) -> None:
        await super().start()
        hostname: str = self._value("svp/host")
        port: int = self._value("svp/port")
        underlay_ip: str = self._value("svp/underlay_ip")
        self._value("svp/underlay_port")
        key = remote_key(hostname, port, underlay_ip)
        shared: dict[str, Any] = self.host.shared
        remote = shared.get(key)
        if remote is None:
            remote = Remote(
                hostname,
                port,
                underlay_ip,
                self.options,
                metrics=getattr(self.host, "metrics", None),
            )
            shared[key] = remote
            remote.attach(self.host)
            try:
                await self.host.nursery.start(remote.run)
            except BaseException:
                shared.pop(key, None)
                raise
        else:
            remote.attach(self.host)
        self.remote = remote
        self._key = key

    async def stop(self) -> None:
        remote, self.remote = self.remote, None
        if remote is None:
            return
        if remote.detach(self.host):
            if self.host.shared.get(self._key) is remote:
                del self.host.shared[self._key]
            await remote.aclose()

    # ---------------------------------------------------------------- lookups

    async def lookup(self, req: LookupRequest, reply: Any) -> None:
        dst = req.dst_mac
        if req.sap == ETH_P_ARP:
            await reply.proxy_arp()
            return
        if dst[0] == 0x33 and dst[1] == 0x33:
            if req.sap == ETH_P_IPV6:
                await reply.proxy_ndp()
            else:
                reply.drop()
            return
        if req.dst_type != DstType.UNICAST or dst[0] & 0x01:
            reply.drop()
            return
        remote = self.remote
        if remote is None:
            reply.drop()
            return
        try:
            ack = await remote.vl2(dst, self.host.vnet_id)
        except SvpError as exc:
            self.log.debug("svp: VL2 lookup of %s failed: %s", format_mac(dst), exc)
            reply.drop()
            return
        if ack.status != Status.OK or ack.addr == UNSPECIFIED:
            reply.drop()
            return
        reply.respond(Point(ack.addr, ack.port))

    async def arp(self, ip: IPv4Address | IPv6Address) -> bytes | None:
        """VL3 lookup for the ARP/NDP proxies; on success the VL2 mapping is cached first."""
        remote = self.remote
        if remote is None:
            return None
        try:
            ack = await remote.vl3(ip_to_wire(ip), self.host.vnet_id)
        except SvpError as exc:
            self.log.debug("svp: VL3 lookup of %s failed: %s", ip, exc)
            return None
        if ack.status != Status.OK:
            return None
        if ack.addr != UNSPECIFIED:
            self.host.driver.cache_set(self.host.device, ack.mac, Point(ack.addr, ack.port))
        return ack.mac

    def status(self) -> dict[str, object]:
        return self.remote.status() if self.remote is not None else {}
