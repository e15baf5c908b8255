"""TAP devices: the tenant side of a VNIC on the udp backend.

Theory of operation
-------------------
A TAP device is an Ethernet link whose "wire" is a file descriptor: every frame the kernel
transmits on the link can be ``read()`` from the fd (one frame per read), and every frame
``write()``-n to the fd is received by the kernel as if it had arrived on the link. So for a
VNIC the TAP link *is the guest's NIC*: the tenant's IP stack sends on it (we read the frame and
hand it to the overlay) and receives on it (we write what the overlay delivers).

``open_tap(name)`` opens ``/dev/net/tun`` and attaches it with ``TUNSETIFF`` (``IFF_TAP |
IFF_NO_PI``: bare Ethernet frames, no packet-info prefix), non-blocking. ``configure`` then
sets the link's MAC (the VNIC's MAC: the guest's address), optionally its MTU, and brings it
up, with the classic ``SIOCSIF*`` ioctls on a socket of the current network namespace.

The fd keeps working when the link moves: ``ip link set TAP netns TENANT`` moves the link
(not the fd) into the tenant namespace, where it comes up down and unaddressed; the process
holding the fd (varpd, in the compute node's namespace) keeps reading and writing it. While
varpd runs the link is not persistent: closing the fd (``close``: VNIC removed) deletes it,
wherever it is. Deleting the link (or its namespace) under us makes reads fail with
``EBADFD``; the reader then stops for good and counts it (``read_errors``).

Restart keeps tenants plugged in: when varpd stops, ``release`` marks each TAP persistent
(``TUNSETPERSIST``) before closing its fd, so the link stays where it is (in the tenant's
namespace, with its addresses and routes), only without carrier. On the next start
``attach_tap`` finds it again: in varpd's own namespace by name, else in the named namespaces
(``/run/netns/*``, the ``ip netns`` ones) as a link of that name carrying the VNIC's MAC, opens
``/dev/net/tun`` inside that namespace (``setns`` of the calling thread, switched back at
once) and attaches to the existing link with ``TUNSETIFF``; then it clears the persistent
flag again. A TAP found in a tenant namespace is not reconfigured (the tenant owns it). A TAP
moved into an unnamed namespace (a container's) cannot be found: a new one is created in
varpd's namespace, and the orphan stays until deleted (``ip link del``).

``TapPort`` is the ``VnicPort`` over such an fd (or any fd with datagram semantics: the
benchmark uses a ``socketpair(AF_UNIX, SOCK_DGRAM)`` in its place):

- ``attach(transmit)`` starts a reader task in the backend's nursery: wait until the fd is
  readable (``trio.lowlevel.wait_readable``), then *drain* it -- ``read`` until
  ``BlockingIOError`` or ``BATCH`` frames -- calling ``transmit(frame)`` for each frame. One
  wakeup per batch instead of one await per frame is what makes a Python data path usable
  (about 4x in the encap direction, spec/vnic-api-and-peers.md §3).
- ``deliver(frame)`` writes without blocking; a full queue (``EAGAIN``) or an error (link
  down: ``EIO``) drops the frame and returns False (the driver counts it on the VNIC).
- ``detach()`` stops the reader and closes the fd (the TAP link goes away); ``release()``
  (varpd stopping) keeps the link (see above).

Everything runs in the trio thread; ``transmit`` is synchronous and never awaits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio

from .backend import FrameSink
from .types import ShimError

log = logging.getLogger("varpd.shim.tap")

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
SIOCGIFHWADDR = 0x8927
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
SIOCGIFINDEX = 0x8933
IFF_UP = 0x1
ARPHRD_ETHER = 1
IFNAMSIZ = 16
IFREQ_SIZE = 40

BATCH = 256  # frames read per wakeup before yielding to other tasks
MAX_FRAME = 65536

TAP_COUNTERS = (
    "rx_frames",  # read from the fd (guest -> overlay)
    "tx_frames",  # written to the fd (overlay -> guest)
    "tx_drop_full",  # EAGAIN on write
    "tx_drop_error",  # other write errors (link down, gone)
    "read_errors",
    "transmit_errors",  # the transmit callback raised (a bug; logged)
)


class TapError(ShimError):
    """Opening or configuring a TAP failed; ``code`` is the errno name (EBUSY, EPERM, ...)."""

    code = "EINVAL"

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        if err is not None and err in errno.errorcode:
            self.code = errno.errorcode[err]


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise TapError(f"invalid interface name {name!r}: 1..15 bytes", errno.EINVAL)
    return struct.pack(f"{IFNAMSIZ}s", raw) + payload.ljust(IFREQ_SIZE - IFNAMSIZ, b"\0")


def open_tap(name: str) -> tuple[int, str]:
    """Create (or attach to) TAP ``name``; returns (non-blocking fd, actual name)."""
    req = _ifreq(name, struct.pack("H", IFF_TAP | IFF_NO_PI))
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TapError(f"cannot open {TUN_DEVICE}: {exc.strerror}", exc.errno) from None
    try:
        got = fcntl.ioctl(fd, TUNSETIFF, req)
    except OSError as exc:
        os.close(fd)
        raise TapError(f"cannot create TAP {name!r}: {exc.strerror}", exc.errno) from None
    actual = got[:IFNAMSIZ].split(b"\0", 1)[0].decode()
    return fd, actual


def set_persist(fd: int, persist: bool) -> bool:
    """TUNSETPERSIST on a TAP fd; False when ``fd`` is not a TAP (or the kernel refused)."""
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1 if persist else 0)
    except OSError:
        return False
    return True


_libc: Any = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(path: str) -> Iterator[None]:
    """The calling thread inside the network namespace file ``path``; always switched back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def _link_mac(name: str) -> bytes | None:
    """The MAC of link ``name`` in the calling thread's namespace, None if there is none."""
    try:
        got = _ioctl(SIOCGIFHWADDR, _ifreq(name))
    except (OSError, TapError):
        return None
    return got[IFNAMSIZ + 2 : IFNAMSIZ + 8]


class TapFinder:
    """Where links are, by name, in the named namespaces (``/run/netns/*``).

    One scan lists every namespace's link names (one ``setns`` per namespace); lookups then
    check only the candidates' MACs. The scan is reused for `MAX_AGE` seconds, so restoring
    many VNICs costs one scan, not one per VNIC per namespace.
    """

    MAX_AGE = 10.0

    def __init__(self, folder: str = NETNS_DIR) -> None:
        self.folder = folder
        self._where: dict[str, list[str]] = {}
        self._when: float | None = None

    def _scan(self) -> None:
        self._where = {}
        self._when = time.monotonic()
        try:
            entries = sorted(os.listdir(self.folder))
        except OSError:
            return
        for entry in entries:
            path = os.path.join(self.folder, entry)
            try:
                with in_netns(path):
                    names = [n for _, n in socket.if_nameindex()]
            except OSError:
                continue
            for n in names:
                self._where.setdefault(n, []).append(path)

    def find(self, name: str, mac: bytes) -> str | None:
        """The namespace file holding link ``name`` with ``mac``, or None."""
        if self._when is None or time.monotonic() - self._when > self.MAX_AGE:
            self._scan()
        for path in self._where.get(name, ()):
            try:
                with in_netns(path):
                    if _link_mac(name) == mac:
                        return path
            except OSError:
                continue
        return None


def attach_tap(
    name: str, mac: bytes, finder: TapFinder | None = None
) -> tuple[int, str, str | None]:
    """(fd, name, namespace path or None): TAP ``name`` for the VNIC ``mac``, re-attached
    where a previous varpd left it (see the module docstring) or created here."""
    where = None
    if _link_mac(name) is None:
        where = (finder or TapFinder()).find(name, mac)
    if where is None:
        fd, actual = open_tap(name)
    else:
        try:
            with in_netns(where):
                fd, actual = open_tap(name)
        except TapError:
            raise
        except OSError as exc:
            raise TapError(f"cannot enter {where} for TAP {name!r}: {exc}", exc.errno) from None
        log.info("TAP %s re-attached in namespace %s", actual, where)
    set_persist(fd, False)  # the link lives with the fd again while varpd runs
    return fd, actual, where


def _ioctl(request: int, ifreq: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return fcntl.ioctl(s.fileno(), request, ifreq)


def configure(
    name: str, *, mac: bytes | None = None, mtu: int | None = None, up: bool = True
) -> None:
    """Set the link's MAC / MTU and bring it up (in the caller's network namespace)."""
    try:
        if mac is not None:
            _ioctl(SIOCSIFHWADDR, _ifreq(name, struct.pack("H", ARPHRD_ETHER) + mac))
        if mtu is not None:
            _ioctl(SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)))
        if up:
            flags = struct.unpack_from("H", _ioctl(SIOCGIFFLAGS, _ifreq(name)), IFNAMSIZ)[0]
            _ioctl(SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))
    except OSError as exc:
        raise TapError(f"cannot configure {name!r}: {exc.strerror}", exc.errno) from None


def ifindex(name: str) -> int:
    return struct.unpack_from("i", _ioctl(SIOCGIFINDEX, _ifreq(name)), IFNAMSIZ)[0]


class TapPort:
    """A ``VnicPort`` over a TAP fd (or any datagram fd); see the module docstring.

    ``spawn`` starts a task for the port's lifetime (the backend's nursery ``start_soon``).
    The port owns ``fd`` and closes it on ``detach``/``close``.
    """

    def __init__(
        self, fd: int, name: str, spawn: Callable[..., Any], *, is_tap: bool = False
    ) -> None:
        self.fd = fd
        self.name = name
        self.is_tap = is_tap
        self._spawn = spawn
        self._transmit: FrameSink | None = None
        self._scope: trio.CancelScope | None = None
        self.closed = False
        self.counters: dict[str, int] = dict.fromkeys(TAP_COUNTERS, 0)

    def __repr__(self) -> str:
        return f"<TapPort {self.name} fd={self.fd}>"

    # VnicPort ------------------------------------------------------------------------

    def attach(self, transmit: FrameSink) -> None:
        if self.closed:
            raise TapError(f"TAP {self.name} is closed", errno.EBADF)
        self._transmit = transmit
        if self._scope is None:
            self._scope = trio.CancelScope()
            self._spawn(self._reader, self._scope)

    def detach(self) -> None:
        self._transmit = None
        self.close()

    def deliver(self, frame: bytes) -> bool:
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            self.counters["tx_drop_full"] += 1
            return False
        except OSError as exc:
            self.counters["tx_drop_error"] += 1
            if self.counters["tx_drop_error"] in (1, 1000, 1000000):
                log.warning("TAP %s: write failed: %s (dropping)", self.name, exc.strerror)
            return False
        self.counters["tx_frames"] += 1
        return True

    # lifetime ------------------------------------------------------------------------

    def release(self) -> None:
        """varpd is stopping: keep the TAP link (persistent), then close the fd."""
        if not self.closed and self.is_tap and set_persist(self.fd, True):
            log.info("TAP %s kept for the next varpd", self.name)
        self.close()

    def close(self) -> None:
        """Stop the reader and close the fd (idempotent); the TAP link goes away."""
        if self.closed:
            return
        self.closed = True
        if self._scope is not None:
            self._scope.cancel()
        try:
            trio.lowlevel.notify_closing(self.fd)
        except RuntimeError:  # not in a trio run (backend already stopped)
            pass
        os.close(self.fd)

    async def _reader(self, scope: trio.CancelScope) -> None:
        with scope:
            fd = self.fd
            read = os.read
            counters = self.counters
            while not self.closed:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (trio.ClosedResourceError, OSError, ValueError):
                    return
                if self.closed:
                    return
                n = 0
                while n < BATCH:
                    try:
                        frame = read(fd, MAX_FRAME)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        counters["read_errors"] += 1
                        if exc.errno in (errno.EBADFD, errno.EBADF, errno.ENODEV):
                            log.warning("TAP %s is gone (%s): reader stopped", self.name, exc)
                            return
                        log.warning("TAP %s: read failed: %s", self.name, exc)
                        await trio.sleep(0.1)  # an error that persists must not spin
                        break
                    if not frame:  # EOF: only a datagram socket (bench) does this
                        return
                    n += 1
                    transmit = self._transmit
                    if transmit is None:
                        continue
                    try:
                        transmit(frame)
                    except Exception:
                        counters["transmit_errors"] += 1
                        log.exception("TAP %s: transmit raised; frame dropped", self.name)
                counters["rx_frames"] += n
