"""Portolan's data model: frozen dataclasses for what the store holds.

Conventions: MACs are 6 raw bytes in memory (integers in the store, text in JSON); IPs are
canonical text (``str(ipaddress.ip_address(x))``: dotted quad for IPv4, compressed IPv6);
``version`` is the value of the global change counter when the object was last changed.
``to_json()`` gives the API shape (CONVENTIONS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol import svp
from protocol.addr import format_mac, ip_to_wire

# SVP log entry types (spec/svp.md §4.1) as the plain ints the store keeps, and their sizes on
# the wire (protocol.svp is the one place that knows them).
LOG_VL2 = int(svp.LogType.VL2)
LOG_VL3 = int(svp.LogType.VL3)
LOG_ROUTE = int(svp.LogType.ROUTE)
LOG_ENTRY_SIZES: dict[int, int] = {int(t): n for t, n in svp.LOG_ENTRY_SIZE.items()}
LOG_STATUS_SIZE = 4  # the status word that opens a LOG_ACK body
DEFAULT_UL_PORT = 4789


@dataclass(frozen=True, slots=True)
class ComputeNode:
    uuid: str
    ip: str
    port: int = DEFAULT_UL_PORT
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "ip": self.ip, "port": self.port, "version": self.version}


@dataclass(frozen=True, slots=True)
class Network:
    uuid: str
    name: str
    owner_uuid: str
    vnet_id: int
    vlan_id: int
    subnet: str
    gateway: str | None
    provision_start: str
    provision_end: str
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "owner_uuid": self.owner_uuid,
            "vnet_id": self.vnet_id,
            "vlan_id": self.vlan_id,
            "subnet": self.subnet,
            "gateway": self.gateway,
            "provision_start": self.provision_start,
            "provision_end": self.provision_end,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class Vnic:
    mac: bytes
    ip: str
    vnet_id: int
    vlan_id: int
    cn_uuid: str
    network_uuid: str | None = None
    belongs_to_uuid: str | None = None
    owner_uuid: str | None = None
    # A dict for convenience; treat it as read-only (the dataclass is frozen, its tags are not).
    tags: dict[str, Any] = field(default_factory=dict)
    firewall_enabled: bool = False
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "mac": format_mac(self.mac),
            "ip": self.ip,
            "vnet_id": self.vnet_id,
            "vlan_id": self.vlan_id,
            "network_uuid": self.network_uuid,
            "cn_uuid": self.cn_uuid,
            "belongs_to_uuid": self.belongs_to_uuid,
            "owner_uuid": self.owner_uuid,
            "tags": dict(self.tags),
            "firewall_enabled": self.firewall_enabled,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class Route:
    """A fabric route (spec/svp.md §8 ``portolan_vnet_routes``) for SVP v2 ROUTE_REQ.

    Key: (vnet_id, vlan_id, subnet, r_subnet). ``r_send_mac`` is the router MAC the source
    uses. The remote underlay answer is found by a VL3 lookup of the destination IP in
    ``r_vnet_id`` in this portolan's index; when that misses and ``r_ul_ip`` is set (a remote DC
    gateway), ROUTE_ACK answers ``r_ul_ip``/``r_ul_port`` and ``r_dst_mac`` (zeros if unset).
    """

    vnet_id: int
    vlan_id: int
    subnet: str
    r_dc_id: int
    r_vnet_id: int
    r_vlan_id: int
    r_subnet: str
    r_send_mac: bytes
    r_ul_ip: str | None = None
    r_ul_port: int = DEFAULT_UL_PORT
    r_dst_mac: bytes | None = None
    net_uuid: str | None = None
    r_net_uuid: str | None = None
    version: int = 0

    @property
    def key(self) -> tuple[int, int, str, str]:
        return (self.vnet_id, self.vlan_id, self.subnet, self.r_subnet)

    def to_json(self) -> dict[str, Any]:
        return {
            "vnet_id": self.vnet_id,
            "vlan_id": self.vlan_id,
            "subnet": self.subnet,
            "r_dc_id": self.r_dc_id,
            "r_vnet_id": self.r_vnet_id,
            "r_vlan_id": self.r_vlan_id,
            "r_subnet": self.r_subnet,
            "r_send_mac": format_mac(self.r_send_mac),
            "r_ul_ip": self.r_ul_ip,
            "r_ul_port": self.r_ul_port,
            "r_dst_mac": format_mac(self.r_dst_mac) if self.r_dst_mac is not None else None,
            "net_uuid": self.net_uuid,
            "r_net_uuid": self.r_net_uuid,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class RouteAnswer:
    """What ROUTE_ACK carries (prefix lengths in IPv4 terms for IPv4 subnets, spec §5)."""

    dc_id: int
    vnet_id: int
    vlan: int
    port: int
    addr: bytes
    src_mac: bytes
    dst_mac: bytes
    src_prefixlen: int
    dst_prefixlen: int


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One shootdown log row: an SVP log entry queued for one CN.

    ``id`` is 16 random bytes (a UUIDv4; the entry id on the wire). ``seq`` orders a CN's rows
    oldest first (assigned by the store on insert; 0 before). VL2 uses mac+vnet_id; VL3 uses
    ip+vlan+vnet_id; ROUTE uses the ``src_*``/``dst_*``/``dc_id`` fields (prefix lengths already
    in the log entry's IPv6 terms).
    """

    id: bytes
    cn_uuid: str
    type: int
    vnet_id: int = 0
    mac: bytes | None = None
    ip: str | None = None
    vlan: int = 0
    version: int = 0
    seq: int = 0
    src_vnet_id: int = 0
    dst_vnet_id: int = 0
    dc_id: int = 0
    src_ip: str | None = None
    dst_ip: str | None = None
    src_vlan: int = 0
    dst_vlan: int = 0
    src_prefixlen: int = 0
    dst_prefixlen: int = 0

    @property
    def size(self) -> int:
        return LOG_ENTRY_SIZES[self.type]

    def to_entry(self) -> svp.LogEntry:
        """The protocol.svp log entry object for this row."""
        if self.type == LOG_VL2:
            assert self.mac is not None
            return svp.LogVL2Entry(entry_id=self.id, mac=self.mac, vnet_id=self.vnet_id)
        if self.type == LOG_VL3:
            assert self.ip is not None
            return svp.LogVL3Entry(
                entry_id=self.id, ip=ip_to_wire(self.ip), vlan=self.vlan, vnet_id=self.vnet_id
            )
        if self.type == LOG_ROUTE:
            assert self.src_ip is not None and self.dst_ip is not None
            return svp.LogRouteEntry(
                entry_id=self.id,
                src_vnet_id=self.src_vnet_id,
                dst_vnet_id=self.dst_vnet_id,
                dc_id=self.dc_id,
                src_ip=ip_to_wire(self.src_ip),
                dst_ip=ip_to_wire(self.dst_ip),
                src_vlan=self.src_vlan,
                dst_vlan=self.dst_vlan,
                src_prefixlen=self.src_prefixlen,
                dst_prefixlen=self.dst_prefixlen,
            )
        raise ValueError(f"unknown log entry type {self.type}")


@dataclass(frozen=True, slots=True)
class Rule:
    """A firewall rule row (the rules engine is someone else's; the table exists already)."""

    uuid: str
    rule: str
    owner_uuid: str | None = None
    is_global: bool = False
    enabled: bool = True
    description: str | None = None
    log: bool = False
    version: int = 0
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "rule": self.rule,
            "owner_uuid": self.owner_uuid,
            "global": self.is_global,
            "enabled": self.enabled,
            "description": self.description,
            "log": self.log,
            "version": self.version,
            "created": self.created,
        }


__all__ = [
    "DEFAULT_UL_PORT",
    "LOG_ENTRY_SIZES",
    "LOG_ROUTE",
    "LOG_STATUS_SIZE",
    "LOG_VL2",
    "LOG_VL3",
    "ComputeNode",
    "LogRecord",
    "Network",
    "Route",
    "RouteAnswer",
    "Rule",
    "Vnic",
]
