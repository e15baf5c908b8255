"""Fast fdb and neighbour writes: rtnetlink requests sent from the trio thread, acks read later.

Why: a pyroute2 0.9 call (``ipr.fdb(...)``/``ipr.neigh(...)``) costs about 0.4-0.7 ms of
Python in a worker thread, holding the GIL while varpd's trio thread is answering the next
miss; two of them sat on the path of every first packet (the tenant hears its ARP answer
only after the MAC's fdb entry is written). The kernel handles an rtnetlink request inside
the ``send`` that carries it, so a request written on a non-blocking ``NETLINK_ROUTE``
socket is in force when ``send`` returns (tens of microseconds), on the caller's thread, in
call order. That is what `NeighWriter` does for the hot writes: fdb replace/delete and
neighbour replace/delete on a vxlan device.

Messages (``linux/neighbour.h``): ``nlmsghdr`` + ``ndmsg {family, ifindex, state, flags}`` +
attributes ``NDA_DST`` (the IPv4/IPv6 address: the remote for an fdb entry, the neighbour's
address otherwise), ``NDA_LLADDR`` (the MAC), ``NDA_PORT`` (fdb, big-endian u16). fdb entries
are family ``AF_BRIDGE`` with ``NTF_SELF`` (the vxlan device's own table, not the bridge's),
state ``NUD_PERMANENT``; replace is ``NLM_F_CREATE | NLM_F_REPLACE``.

Every request asks for an ack (``NLM_F_ACK``). `run` reads the acks as they come
(``wait_readable``), matches them by sequence number and reports failures through the
``on_error(what, message)`` callback (a delete of what is already gone, ENOENT, is not a
failure). A send that fails at once (ENOBUFS, ...) is reported the same way. Acks the
kernel could not queue (a full receive buffer: ENOBUFS on ``recv``) are counted in
``lost_acks`` and their requests forgotten; the writes themselves were done.

Lifecycle: ``NeighWriter()`` opens the socket; `run` in the driver's nursery; ``close``.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Callable
from ipaddress import ip_address

import trio

NETLINK_ROUTE = 0
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_CREATE = 0x100, 0x400
NDA_DST, NDA_LLADDR, NDA_PORT = 1, 2, 6
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
AF_BRIDGE = 7
RCVBUF = 4 << 20
_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
_ERR = struct.Struct("=i")
#: requests awaiting an ack beyond this are forgotten (acks lost): memory stays bounded
MAX_PENDING = 65536


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _mac(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return raw


class NeighWriter:
    """See the module docstring."""

    def __init__(self, on_error: Callable[[str, str], None]) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_ROUTE
        )
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock.bind((0, 0))
        self.on_error = on_error
        self._seq = itertools.count(1)
        self.pending: dict[int, tuple[str, bool]] = {}
        self.sent = 0
        self.failed = 0
        self.lost_acks = 0

    # ------------------------------------------------------------------ requests

    def _send(self, what: str, kind: int, flags: int, body: bytes, *, absent_ok: bool) -> None:
        seq = next(self._seq)
        msg = _HDR.pack(_HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0)
        if len(self.pending) >= MAX_PENDING:
            self.lost_acks += len(self.pending)
            self.pending.clear()
        try:
            self.sock.send(msg + body)
        except OSError as exc:
            self.failed += 1
            self.on_error(what, os.strerror(exc.errno or errno.EIO))
            return
        self.sent += 1
        self.pending[seq] = (what, absent_ok)

    def fdb_replace(
        self, what: str, ifindex: int, mac: str, dst: str | None, port: int | None
    ) -> None:
        """A permanent fdb entry ``mac -> dst:port`` (``dst`` None: the unspecified remote,
        which the vxlan device treats as "drop")."""
        addr = ip_address(dst if dst is not None else "0.0.0.0")
        attrs = _attr(NDA_LLADDR, _mac(mac)) + _attr(NDA_DST, addr.packed)
        if dst is not None and port is not None:
            attrs += _attr(NDA_PORT, struct.pack("!H", port))
        body = _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, NUD_PERMANENT, NTF_SELF, 0) + attrs
        self._send(what, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body, absent_ok=False)

    def fdb_delete(self, what: str, ifindex: int, mac: str) -> None:
        body = _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, 0, NTF_SELF, 0) + _attr(NDA_LLADDR, _mac(mac))
        self._send(what, RTM_DELNEIGH, 0, body, absent_ok=True)

    def neigh_replace(self, what: str, ifindex: int, ip: str, mac: str) -> None:
        addr = ip_address(ip)
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        attrs = _attr(NDA_DST, addr.packed) + _attr(NDA_LLADDR, _mac(mac))
        body = _NDMSG.pack(family, 0, 0, ifindex, NUD_PERMANENT, 0, 0) + attrs
        self._send(what, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body, absent_ok=False)

    def neigh_delete(self, what: str, ifindex: int, ip: str) -> None:
        addr = ip_address(ip)
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        body = _NDMSG.pack(family, 0, 0, ifindex, 0, 0, 0) + _attr(NDA_DST, addr.packed)
        self._send(what, RTM_DELNEIGH, 0, body, absent_ok=True)

    # ------------------------------------------------------------------ acks

    def take_acks(self, data: bytes) -> None:
        """Match the acks in one datagram to their requests; report the failures."""
        pos = 0
        while pos + _HDR.size <= len(data):
            length, kind, _flags, seq, _pid = _HDR.unpack_from(data, pos)
            if length < _HDR.size:
                break
            if kind == NLMSG_ERROR and pos + _HDR.size + _ERR.size <= len(data):
                (code,) = _ERR.unpack_from(data, pos + _HDR.size)
                entry = self.pending.pop(seq, None)
                if entry is not None and code < 0:
                    what, absent_ok = entry
                    if not (absent_ok and -code == errno.ENOENT):
                        self.failed += 1
                        self.on_error(what, os.strerror(-code))
            pos += (length + 3) & ~3

    async def run(self) -> None:
        """Read acks until the socket is closed."""
        while True:
            try:
                await trio.lowlevel.wait_readable(self.sock)
            except (trio.ClosedResourceError, OSError):
                return
            while True:
                try:
                    data = self.sock.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:  # acks dropped; the writes were done
                        self.lost_acks += len(self.pending)
                        self.pending.clear()
                        continue
                    return
                self.take_acks(data)

    def close(self) -> None:
        self.sock.close()
