"""Value types and errors of the overlay driver model (names follow spec/varpd-overlay.md §2)."""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from ipaddress import IPv4Address, IPv6Address
from typing import ClassVar, Protocol

from protocol.addr import format_mac, ip_from_wire, ip_to_wire


class TargetMode(IntEnum):
    NONE = 0
    POINT = 1
    DYNAMIC = 2


class DstType(IntEnum):
    UNICAST = 0
    MULTICAST = 1
    BROADCAST = 2


class Direction(IntEnum):
    IN = 1  # towards the guest
    OUT = 2  # from the guest


class CacheFlag(IntFlag):
    PENDING = 0x1
    VALID = 0x2
    DROP = 0x4


# Plain ints for the hot path (IntFlag arithmetic is slow); equal to the CacheFlag members.
PENDING = int(CacheFlag.PENDING)
VALID = int(CacheFlag.VALID)
DROP = int(CacheFlag.DROP)


@dataclass(frozen=True, slots=True)
class Point:
    """An underlay destination: 16-byte IP (IPv4 as v4-mapped) and UDP port."""

    ip: bytes
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.ip, bytes) or len(self.ip) != 16:
            raise InvalidArgument(
                f"a point's IP must be 16 bytes (IPv4 as ::ffff:a.b.c.d), got {self.ip!r}"
            )
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"a point's port must be 0..65535, got {self.port}")

    @classmethod
    def of(cls, ip: str | IPv4Address | IPv6Address | bytes, port: int) -> Point:
        """Build a point from text, an ipaddress object or 16 wire bytes."""
        return cls(ip if isinstance(ip, bytes) else ip_to_wire(ip), port)

    @property
    def address(self) -> IPv4Address | IPv6Address:
        return ip_from_wire(self.ip)

    def __str__(self) -> str:
        addr = self.address
        return f"[{addr}]:{self.port}" if isinstance(addr, IPv6Address) else f"{addr}:{self.port}"


@dataclass(frozen=True, slots=True)
class LookupRequest:
    """One miss handed to varpd (overlay_targ_lookup_t), plus the head frame's bytes."""

    req_id: int
    device: str
    varpd_id: int
    vnet_id: int
    hdr_size: int
    pkt_size: int
    src_mac: bytes
    dst_mac: bytes
    dst_type: DstType
    sap: int
    vlan: int
    frame: bytes


@dataclass(frozen=True, slots=True)
class CacheEntry:
    mac: bytes
    flags: int  # CacheFlag bits: PENDING=1, VALID=2, DROP=4
    point: Point | None

    def __str__(self) -> str:
        target = "drop" if self.flags & DROP else str(self.point)
        return f"{format_mac(self.mac)} -> {target}"


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    name: str
    state: str  # "created" | "activated"
    associated: bool
    varpd_id: int | None
    mode: TargetMode
    degraded: bool
    message: str
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """OK/DEGRADED as `dladm show-overlay -f` prints it (ONLINE/DEGRADED)."""
        return "DEGRADED" if self.degraded else "ONLINE"


class FrameFilter(Protocol):
    """The firewall hook on a VNIC: return False to drop the frame."""

    def check(self, frame: bytes, direction: Direction) -> bool: ...


# --------------------------------------------------------------------------- errors


class ShimError(Exception):
    """Base of the driver's errors: ``code`` is the errno name illumos would return."""

    code: ClassVar[str] = "EINVAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def errno(self) -> int:
        return getattr(_errno, self.code)


class InvalidArgument(ShimError):
    code = "EINVAL"


class UnknownRequest(InvalidArgument):
    """respond/drop with a req_id that is not outstanding."""


class NoSuchDevice(ShimError):
    code = "ENOENT"


class NoSuchEntry(ShimError):
    code = "ENOENT"


class NoSuchProperty(ShimError):
    code = "ENOENT"


class NoSuchEncap(ShimError):
    code = "ENOENT"


class AlreadyExists(ShimError):
    code = "EEXIST"


class DeviceBusy(ShimError):
    code = "EBUSY"


class NotAssociated(ShimError):
    code = "ENXIO"


class NotSupported(ShimError):
    code = "ENOTSUP"


class ReadOnlyProperty(ShimError):
    code = "EPERM"


class AddressInUse(ShimError):
    code = "EADDRINUSE"


class NotRunning(ShimError):
    code = "EAGAIN"
