"""Netlink for the linux backend: request/response calls in a worker thread, neighbour
notifications on a non-blocking socket in the trio thread, and AF_PACKET frame delivery.

- `Netlink` owns one pyroute2 ``IPRoute`` (blocking: pyroute2 0.9 runs a private asyncio
  loop per object). Every call goes through ``await nl.call(fn, *args)``, i.e.
  ``trio.to_thread.run_sync(fn, ipr, *args, limiter=CapacityLimiter(1))``: one call at a
  time, in order, never on the trio thread. ``NetlinkError`` comes back as `KernelError`
  carrying the errno and the kernel's message.
- `NeighEvents` is a raw ``AF_NETLINK``/``NETLINK_ROUTE`` socket bound to ``RTMGRP_NEIGH``,
  non-blocking, read with ``trio.lowlevel.wait_readable`` and parsed with pyroute2's
  ``MarshalRtnl``. It carries the vxlan misses (``RTM_GETNEIGH``) and every fdb/neighbour
  change (``RTM_NEWNEIGH``/``RTM_DELNEIGH``), from which the driver keeps its mirror of the
  kernel tables. A receive-buffer overflow (ENOBUFS) is counted and reported to the caller
  as ``None`` so it can resynchronise with a dump.
- `classify` turns one message into what the driver acts on (see its docstring).
- `PacketSender`: a non-blocking ``AF_PACKET`` socket; ``send(ifname, frame)`` transmits a
  frame out of a link (used to hand gratuitous ARPs / NAs to the tenant through the host end
  of its veth, and DHCP redirects into the vxlan device).

Lifecycle: ``open`` in ``LinuxDriver.run``, ``close`` when it ends. Nothing here blocks the
trio thread.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, TypeVar

import trio

from varpd.shim.types import ShimError

T = TypeVar("T")

# pyroute2 logs every message at DEBUG; varpd's own lines say what happened
logging.getLogger("pyroute2").setLevel(logging.WARNING)

RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTMGRP_NEIGH = 0x4
AF_BRIDGE = 7
NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NTF_SELF = 0x02
NTF_MASTER = 0x04
ZERO_MAC_TEXT = "00:00:00:00:00:00"
RCVBUF = 4 << 20


class KernelError(ShimError):
    """A netlink request failed; ``code`` is the errno name, the message the kernel's."""

    code = "EIO"

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.err = err
        if err is not None and err in errno.errorcode:
            self.code = errno.errorcode[err]


def kernel_message(exc: BaseException) -> tuple[int | None, str]:
    """(errno, text) of a pyroute2 NetlinkError or an OSError."""
    code = getattr(exc, "code", None)
    if code is None:
        code = getattr(exc, "errno", None)
    text = getattr(exc, "extra_message", None) or (
        os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
    )
    return code, str(text)


class Netlink:
    """One IPRoute used from a single worker thread at a time (see the module docstring)."""

    def __init__(self) -> None:
        self._ipr: Any = None
        self._limiter = trio.CapacityLimiter(1)
        self.calls = 0

    async def open(self) -> None:
        from pyroute2 import IPRoute

        logging.getLogger("pyroute2").setLevel(logging.WARNING)
        self._ipr = await trio.to_thread.run_sync(IPRoute, limiter=self._limiter)

    async def close(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            await trio.to_thread.run_sync(ipr.close, limiter=self._limiter)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(ipr, *args)`` in the worker thread; errors as `KernelError`."""
        if self._ipr is None:
            raise KernelError("netlink is not open (the linux driver is not running)")
        self.calls += 1
        try:
            return await trio.to_thread.run_sync(fn, self._ipr, *args, limiter=self._limiter)
        except KernelError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "NetlinkError" or isinstance(exc, OSError):
                code, text = kernel_message(exc)
                raise KernelError(text, code) from None
            raise


class NeighEvents:
    """The RTMGRP_NEIGH notification socket (non-blocking, read in the trio thread)."""

    def __init__(self) -> None:
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((0, RTMGRP_NEIGH))
        except BaseException:
            self.sock.close()
            raise
        self._marshal = MarshalRtnl()
        self.overflows = 0
        self.errors = 0

    async def receive(self, batch: int = 64) -> list[Any] | None:
        """The next messages (waits for at least one datagram); None after an overflow."""
        await trio.lowlevel.wait_readable(self.sock)
        out: list[Any] = []
        for _ in range(batch):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    return None
                self.errors += 1
                break
            try:
                out.extend(self._marshal.parse(data))
            except Exception:
                self.errors += 1
        return out

    def close(self) -> None:
        try:
            trio.lowlevel.notify_closing(self.sock)
        except RuntimeError:
            pass
        self.sock.close()


@dataclass(frozen=True)
class NeighEvent:
    """One classified neighbour message.

    ``kind``: "l2miss" (``mac``), "l3miss" (``ip``), "fdb" (``mac``; ``dst``/``port`` or
    ``dst`` None for an entry without a remote = drop; ``deleted``), "neigh" (``ip``, ``mac``,
    ``deleted``).
    """

    kind: str
    ifindex: int
    mac: bytes | None = None
    ip: str | None = None
    dst: str | None = None
    port: int | None = None
    deleted: bool = False
    permanent: bool = False


def _mac(text: object) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        raw = bytes.fromhex(text.replace(":", ""))
    except ValueError:
        return None
    return raw if len(raw) == 6 else None


def classify(msg: Any) -> NeighEvent | None:
    """What one rtnetlink neighbour message means to the driver (None: not for us).

    RTM_GETNEIGH from a vxlan device is a miss: an L3 miss carries NDA_DST (the IP a tenant
    asked for) and no or an all-zero NDA_LLADDR; an L2 miss carries the unknown MAC in
    NDA_LLADDR. The family is not used to tell them apart (it varies, spec §3). New/deleted
    entries of family AF_BRIDGE without NTF_MASTER are the vxlan's own fdb; those of
    AF_INET/AF_INET6 are neighbour entries.
    """
    try:
        mtype = msg["header"]["type"]
        ifindex = int(msg["ifindex"])
        family = msg["family"]
        state = int(msg.get("state") or 0)
        flags = int(msg.get("flags") or 0)
        dst = msg.get_attr("NDA_DST")
        lladdr = _mac(msg.get_attr("NDA_LLADDR"))
    except Exception:
        return None
    if mtype == RTM_GETNEIGH:
        if dst and (lladdr is None or lladdr == bytes(6)):
            try:
                ip = str(ip_address(dst))
            except ValueError:
                return None
            return NeighEvent("l3miss", ifindex, ip=ip)
        if lladdr is not None and lladdr != bytes(6):
            return NeighEvent("l2miss", ifindex, mac=lladdr)
        return None
    if mtype not in (RTM_NEWNEIGH, RTM_DELNEIGH):
        return None
    deleted = mtype == RTM_DELNEIGH
    permanent = bool(state & NUD_PERMANENT)
    if family == AF_BRIDGE:
        if flags & NTF_MASTER or msg.get_attr("NDA_MASTER") is not None or lladdr is None:
            return None
        port = msg.get_attr("NDA_PORT")
        remote = str(dst) if dst else None
        if remote is not None and ip_address(remote).is_unspecified:
            remote = None  # no remote: the vxlan device drops frames to this MAC
        return NeighEvent(
            "fdb",
            ifindex,
            mac=lladdr,
            dst=remote,
            port=int(port) if port else None,
            deleted=deleted,
            permanent=permanent,
        )
    if family in (socket.AF_INET, socket.AF_INET6) and dst:
        return NeighEvent(
            "neigh", ifindex, ip=str(dst), mac=lladdr, deleted=deleted, permanent=permanent
        )
    return None


class PacketSender:
    """Transmit raw frames out of a named link (AF_PACKET, non-blocking)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.setblocking(False)
        self.sent = 0
        self.errors = 0

    def send(self, ifname: str, frame: bytes) -> bool:
        try:
            self.sock.sendto(frame, (ifname, 0))
        except OSError:
            self.errors += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self.sock.close()
