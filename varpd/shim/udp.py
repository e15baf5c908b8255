"""The udp backend: the shim's underlay on real UDP sockets, its VNICs on TAP devices.

Theory of operation
-------------------
``UdpBackend`` implements ``varpd.shim.backend.Backend`` with the host's network stack:

- **Receive (the mux).** ``bind(listen, receiver)`` opens one UDP socket bound to the listen
  ip:port (the ``vxlan/listen_ip`` / ``listen_port`` of the devices sharing that mux). IPv4
  listen addresses arrive v4-mapped (``::ffff:a.b.c.d``) and are unmapped to an ``AF_INET``
  socket; IPv6 uses ``AF_INET6``. A receive task per socket waits until it is readable and then
  drains it -- ``recvfrom`` until ``BlockingIOError`` or ``BATCH`` datagrams -- calling
  ``receiver(payload, outer_source)`` for each. The outer source ``Point`` (the spoof check
  needs its IP) is interned per sender address so the hot path builds no objects.
- **Send (a pool).** Each listen address also gets ``pool_size`` sockets (default 8, as
  CONVENTIONS says) bound to the listen IP with kernel-chosen ports. ``send`` picks one by the
  inner flow hash, so one inner flow always leaves from the same outer source port (no
  reordering) and different flows spread over ``pool_size`` ports (ECMP / RSS entropy on the
  underlay, the job RFC 7348 gives the source port). ``send`` is a non-blocking ``sendto``:
  ``EAGAIN`` or any error drops the datagram and returns False (the driver counts
  ``tx_drop_backend``); errors are counted here and logged at a bounded rate. A datagram to a
  family the listen socket cannot reach (IPv6 peer of an IPv4 listen address) is dropped.
- **VNICs.** ``tap_port(tap, device, mac, vlan, mtu=None)`` creates TAP ``tap`` in the current
  network namespace (``varpd.shim.tap``), sets its MAC to the VNIC's MAC (and the MTU when
  given), brings it up and returns a ``TapPort``. ``vnic_port`` (a VNIC added without a port)
  does the same with the name ``vn<12 hex digits of the MAC>``.

Nothing here blocks: every socket and TAP fd is non-blocking, and the only awaits are
``wait_readable`` in the receive and TAP reader tasks, which live in the nursery of ``run()``.
``bind`` and ``tap_port`` need ``run()`` to be running (``NotRunning`` otherwise for ``bind``;
TAP readers created earlier start when it does). When ``run()`` ends every socket and TAP fd
is closed; the TAP links are kept (persistent) so that stopping varpd does not cut tenants
off, and ``tap_port`` re-attaches to them on the next start, in whichever named namespace they
were moved to (``varpd.shim.tap``). Removing a VNIC still deletes its TAP. Errors on a socket
or fd are counted and logged, never raised into the driver.

TAPs and namespaces (the flow the end-to-end test uses, and an orchestrator would)
---------------------------------------------------------------------------------
varpd runs in the compute node's network namespace (the one holding the underlay address)
and creates the TAP there, named by the VNIC's ``tap`` key (config ``[[device.vnic]]`` or
``varpdadm vnic add NAME MAC --tap TAP``). The orchestrator then moves the link into the
tenant's namespace and configures the guest side there::

    ip link set vn0 netns tenant0
    ip -n tenant0 link set vn0 mtu 1400 up         # MAC already = VNIC MAC
    ip -n tenant0 addr add 192.168.0.1/24 dev vn0

The fd stays with varpd and keeps working across the move; no bridge or veth is needed. A
migration adds the VNIC on the new node with a new TAP, moves that TAP into the same tenant
namespace (the old one is taken down first: two links with the same MAC must not both be up),
updates the VNIC in portolan, then removes the VNIC on the old node, which closes the old
TAP's fd and deletes the old link.

Kernel VXLAN peers: a Linux ``vxlan`` device on a veth sends inner frames with partial
checksums while TX checksum offload is on; turn it off (``ethtool -K vx0 tx off``) on peers
whose traffic reaches a TAP (spec/vnic-api-and-peers.md §3).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from protocol.addr import V4_MAPPED_PREFIX

from .backend import DatagramReceiver
from .tap import TapFinder, TapPort, attach_tap, configure
from .types import AddressInUse, NotRunning, Point, ShimError

log = logging.getLogger("varpd.shim.udp")

DEFAULT_POOL_SIZE = 8
BATCH = 256  # datagrams drained per wakeup before other tasks get a turn
RCVBUF = 4 << 20
SNDBUF = 1 << 20
MAX_DATAGRAM = 65535
_SOURCE_CACHE_MAX = 65536

BACKEND_COUNTERS = (
    "rx_datagrams",
    "rx_errors",  # recvfrom failed (other than EAGAIN)
    "rx_receiver_errors",  # the receiver raised (a bug; logged)
    "tx_datagrams",
    "tx_drop_full",  # EAGAIN on sendto
    "tx_errors",  # other sendto errors (no route, unreachable, ...)
    "tx_drop_family",  # destination of a family the listen socket cannot reach
    "tx_no_listener",  # send from an address that is not bound
)


class UnderlayError(ShimError):
    """A socket operation failed; ``code`` is the errno name."""

    code = "EINVAL"

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        if err is not None and err in errno.errorcode:
            self.code = errno.errorcode[err]


def _every_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


def sockaddr_of(point: Point, family: int) -> tuple[Any, ...] | None:
    """The ``sendto`` address of ``point`` for a socket of ``family`` (None: unreachable)."""
    if point.ip.startswith(V4_MAPPED_PREFIX):
        v4 = socket.inet_ntop(socket.AF_INET, point.ip[12:])
        if family == socket.AF_INET:
            return (v4, point.port)
        return (f"::ffff:{v4}", point.port, 0, 0)
    if family == socket.AF_INET:
        return None
    return (socket.inet_ntop(socket.AF_INET6, point.ip), point.port, 0, 0)


@dataclass(eq=False)
class _Listener:
    listen: Point
    family: int
    sock: socket.socket
    pool: list[socket.socket]
    receiver: DatagramReceiver
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dests: dict[Point, tuple[Any, ...] | None] = field(default_factory=dict)
    closed: bool = False
    last_dst: Point | None = None
    last_addr: tuple[Any, ...] | None = None

    def close(self) -> None:
        self.closed = True
        self.scope.cancel()
        for s in (self.sock, *self.pool):
            try:
                trio.lowlevel.notify_closing(s)
            except RuntimeError:
                pass
            s.close()


class UdpBackend:
    """Real UDP sockets and TAP devices; implements ``Backend`` (see the module docstring)."""

    def __init__(
        self, *, pool_size: int = DEFAULT_POOL_SIZE, rcvbuf: int = RCVBUF, sndbuf: int = SNDBUF
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.pool_size = pool_size
        self.rcvbuf = rcvbuf
        self.sndbuf = sndbuf
        self.counters: dict[str, int] = dict.fromkeys(BACKEND_COUNTERS, 0)
        self._listeners: dict[Point, _Listener] = {}
        self._last: _Listener | None = None  # the listener of the previous send
        self._sources: dict[Any, Point] = {}
        self._ports: list[TapPort] = []
        self._tap_finder = TapFinder()  # TAPs a previous varpd left in named namespaces
        self._nursery: trio.Nursery | None = None
        self._waiting: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    # ------------------------------------------------------------------ lifetime

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the receive loops and TAP readers; closes every socket and TAP at the end."""
        if self._nursery is not None:
            raise RuntimeError("UdpBackend.run() is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for fn, args in self._waiting:
                    nursery.start_soon(fn, *args)
                self._waiting.clear()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for listener in self._listeners.values():
                listener.close()
            self._listeners.clear()
            self._last = None
            for port in self._ports:
                port.release()  # TAP links stay (tenants keep their interface)
            self._ports.clear()

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None:
            self._waiting.append((fn, args))
        else:
            self._nursery.start_soon(fn, *args)

    # ------------------------------------------------------------------ underlay

    def _socket(self, family: int, address: tuple[Any, ...], rcvbuf: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
        return sock

    async def bind(self, listen: Point, receiver: DatagramReceiver) -> None:
        if self._nursery is None:
            raise NotRunning("the udp backend is not running (start the driver first)")
        if listen in self._listeners:
            raise AddressInUse(f"underlay address {listen} is already bound")
        family = socket.AF_INET if listen.ip.startswith(V4_MAPPED_PREFIX) else socket.AF_INET6
        address = sockaddr_of(listen, family)
        assert address is not None
        try:
            sock = self._socket(family, address, self.rcvbuf)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(f"underlay address {listen} is in use") from None
            raise UnderlayError(f"cannot bind {listen}: {exc.strerror}", exc.errno) from None
        pool: list[socket.socket] = []
        try:
            for _ in range(self.pool_size):
                pool.append(self._socket(family, (address[0], 0, *address[2:]), 4096))
        except OSError as exc:
            for s in (sock, *pool):
                s.close()
            raise UnderlayError(
                f"cannot open send sockets on {listen}: {exc.strerror}", exc.errno
            ) from None
        listener = _Listener(listen, family, sock, pool, receiver)
        self._listeners[listen] = listener
        self._nursery.start_soon(self._receive_loop, listener)
        log.debug("bound %s with %d send sockets", listen, len(pool))

    async def unbind(self, listen: Point) -> None:
        listener = self._listeners.pop(listen, None)
        if listener is not None:
            listener.close()
            if self._last is listener:
                self._last = None
        await trio.lowlevel.checkpoint()

    def bound(self) -> list[Point]:
        return list(self._listeners)

    def source_ports(self, listen: Point) -> list[int]:
        """The outer source ports of ``listen``'s send pool (tests, diagnostics)."""
        return [s.getsockname()[1] for s in self._listeners[listen].pool]

    def listen_address(self, listen: Point) -> tuple[Any, ...]:
        """The receive socket's bound address (resolves a listen port of 0)."""
        return self._listeners[listen].sock.getsockname()

    def _source(self, addr: tuple[Any, ...]) -> Point:
        if len(self._sources) >= _SOURCE_CACHE_MAX:
            self._sources.clear()
        if len(addr) == 2:
            ip = V4_MAPPED_PREFIX + socket.inet_aton(addr[0])
        else:
            ip = socket.inet_pton(socket.AF_INET6, addr[0].split("%", 1)[0])
        point = self._sources[addr] = Point(ip, addr[1])
        return point

    async def _receive_loop(self, listener: _Listener) -> None:
        counters = self.counters
        sources = self._sources
        sock = listener.sock
        recvfrom = sock.recvfrom
        receiver = listener.receiver
        with listener.scope:
            while not listener.closed:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except (trio.ClosedResourceError, OSError, ValueError):
                    return
                n = 0
                while n < BATCH:
                    try:
                        payload, addr = recvfrom(MAX_DATAGRAM)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if listener.closed:
                            return
                        counters["rx_errors"] += 1
                        if _every_power_of_two(counters["rx_errors"]):
                            log.warning("receive on %s failed: %s", listener.listen, exc)
                        break
                    n += 1
                    source = sources.get(addr)
                    if source is None:
                        source = self._source(addr)
                    try:
                        receiver(payload, source)
                    except Exception:
                        counters["rx_receiver_errors"] += 1
                        if _every_power_of_two(counters["rx_receiver_errors"]):
                            log.exception("the receiver of %s raised", listener.listen)
                counters["rx_datagrams"] += n

    def send(self, src: Point, dst: Point, payload: bytes, flow_hash: int) -> bool:
        # Hot path. The driver passes the same Point objects frame after frame (its target or
        # cache entry, its mux's listen point), so identity checks skip the dataclass hashing.
        listener = self._last
        if listener is None or src is not listener.listen:
            listener = self._listeners.get(src)
            if listener is None:
                self.counters["tx_no_listener"] += 1
                return False
            self._last = listener
        if dst is listener.last_dst:
            addr = listener.last_addr
        else:
            dests = listener.dests
            try:
                addr = dests[dst]
            except KeyError:
                if len(dests) >= _SOURCE_CACHE_MAX:
                    dests.clear()
                addr = dests[dst] = sockaddr_of(dst, listener.family)
            listener.last_dst, listener.last_addr = dst, addr
        if addr is None:
            self.counters["tx_drop_family"] += 1
            return False
        pool = listener.pool
        try:
            pool[(flow_hash ^ (flow_hash >> 16)) % len(pool)].sendto(payload, addr)
        except BlockingIOError:
            self.counters["tx_drop_full"] += 1
            return False
        except OSError as exc:
            self.counters["tx_errors"] += 1
            if _every_power_of_two(self.counters["tx_errors"]):
                log.warning("send from %s to %s failed: %s", src, dst, exc)
            return False
        self.counters["tx_datagrams"] += 1
        return True

    # ------------------------------------------------------------------ VNIC ports

    def tap_port(
        self, tap: str, device: str, mac: bytes, vlan: int, mtu: int | None = None
    ) -> TapPort:
        """TAP ``tap`` with the VNIC's MAC, up: created here, or re-attached where a previous
        varpd left it (not reconfigured if a tenant namespace has it); reader starts on attach."""
        fd, name, netns = attach_tap(tap, mac, self._tap_finder)
        if netns is None:
            try:
                configure(name, mac=mac, mtu=mtu, up=True)
            except BaseException:
                os.close(fd)
                raise
        self._ports = [p for p in self._ports if not p.closed]
        port = TapPort(fd, name, self._spawn, is_tap=True)
        self._ports.append(port)
        log.info("TAP %s for VNIC %s on %s (vlan %d)", name, mac.hex(":"), device, vlan)
        return port

    def fd_port(self, fd: int, name: str = "fd") -> TapPort:
        """A port over any datagram fd (a socketpair end in the benchmark); owns ``fd``."""
        port = TapPort(fd, name, self._spawn)
        self._ports.append(port)
        return port

    def vnic_port(self, device: str, mac: bytes, vlan: int) -> TapPort:
        return self.tap_port("vn" + mac.hex(), device, mac, vlan)
