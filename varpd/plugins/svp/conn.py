"""One TCP connection from varpd to one SVP server address: state machine and query pipeline.

States (spec/varpd-overlay.md §4.3)::

    INITIAL --connect--> CONNECTING --ok--> ACTIVE --reset--> INITIAL (healthy) / BACKOFF
                             |                 |
                             +--fail--> BACKOFF (1, 2, 4, 8, 16, 32, 32... s) --> CONNECTING
                             +--socket unusable--> ERROR (degraded, retry after 32 s)
    ACTIVE --address left DNS--> WINDDOWN (no new queries) --last reply--> CLOSED

- A failed connect, or a connection reset before it answered a single query, is a failure:
  the counter ``failures`` grows and the next attempt waits ``backoff[min(n, 6) - 1]``. After
  more than ``degrade_after`` (6) consecutive failures the connection is *degraded*. A
  connection that answered at least one query is reconnected at once after a reset, with the
  counter back at 0 (illumos resets the counter on INITIAL; we also back off from a server
  that accepts and drops us straight away). Becoming ACTIVE clears the degraded mark.
- Restart storms (issue 17): with ``backoff_jitter`` j each backoff wait is drawn from
  [(1 - j) * wait, wait], and with ``reconnect_spread`` s a connection that had answered
  reconnects after U(0, s) instead of at once, so the nodes of a restarted portolan do not
  all knock in the same instant (both 0 here by default; `SvpOptions` sets 0.5 and 0.5).
- Extension probe (``probe_ext``, protocol.svp_ext): each session sends HELLO (a PING with a
  body) first; ``caps`` is None until it is answered, then what the server granted (0 for a
  plain PONG). A session reset while the HELLO is unanswered marks the address
  ``ext_refused``: it is reconnected as usual and never probed again. PONG replies may carry
  0 or 16..256 body bytes; a LOG_WAIT's reply is a LOG_ACK, given ``wait_ms`` more time.
- Queries are pipelined: ``query()`` takes a request message (its ``id`` is ignored),
  gives it a fresh id from a per-connection counter in 1..2^31-1, queues the frame for the
  writer task and waits for the reply with that id. Replies may come in any order.
- Reply validation (spec/svp.md §6.4), any failure resets the connection: the version equals
  the one we send, the op is an ack op, the id is outstanding and the op is the ack of that
  query's request, the size is exactly 20 / 28 / 4 for VL2_ACK / VL3_ACK / LOG_RM_ACK and
  4..count + 4 for LOG_ACK (sdc-portolan leaves the status word out of ``count``), and the
  CRC matches. The header is checked before any body byte is
  awaited, so a hostile size cannot make us buffer. A LOG_ACK whose entries cannot be parsed
  (the frame itself being sound) fails only that query (`QueryFailed`), as illumos rejects
  only that reply.
- A query with no reply after ``query_timeout`` (30 s) resets the connection.
- A reset fails every query in flight with `ConnectionLost`; the `Remote` retries them on
  another (or the re-established) connection. Queries are never left dangling: a caller that
  is cancelled leaves its id outstanding so the late reply is still recognised and dropped.
- The writer is a task of its own, so a caller cancelled in the middle of a write can never
  leave half a frame on the stream.

Everything here runs in the task calling `Connection.run` (owned by the remote's nursery);
``on_change`` is called synchronously on every state or degraded change.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address

import trio

from protocol.svp import (
    MIN_BODY_SIZE,
    REPLY_OP,
    BadLogEntry,
    LogRequest,
    Message,
    Op,
    ProtocolError,
    decode_frame,
)
from protocol.svp_ext import (
    CAP_LOG_WAIT,
    HELLO_PONG_OPS,
    HELLO_SIZE,
    OP_LOG_WAIT,
    Hello,
    HelloAck,
    LogWait,
)

log = logging.getLogger("varpd.plugins.svp")

IPAddress = IPv4Address | IPv6Address
Opener = Callable[[IPAddress, int], Awaitable[trio.abc.Stream]]

#: Waits between consecutive failed connection attempts (spec §4.3); the last one repeats.
BACKOFF_TABLE: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
#: A connection is degraded once it failed more than this many times in a row.
DEGRADE_AFTER = 6
DEFAULT_QUERY_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
MAX_ID = 2**31 - 1

_HDR = struct.Struct(">HHII")
# Ack op -> exact body size (None: LOG_ACK, bounded by the request's count instead).
_ACK_SIZES: dict[int, int | None] = {
    Op.VL2_ACK: MIN_BODY_SIZE[Op.VL2_ACK],
    Op.VL3_ACK: MIN_BODY_SIZE[Op.VL3_ACK],
    Op.LOG_ACK: None,
    Op.LOG_RM_ACK: MIN_BODY_SIZE[Op.LOG_RM_ACK],
    Op.PONG: None,  # HELLO's reply: empty (no extension) or a HELLO body (svp_ext)
}
# The reply op of each request op, with the extension's LOG_WAIT (answered by a LOG_ACK).
_REPLY_OP: dict[int, int] = {**REPLY_OP, OP_LOG_WAIT: Op.LOG_ACK}
#: Largest PONG body we accept (a HELLO reply from a later extension version may be longer).
MAX_PONG_BODY = 256
# errnos after which retrying soon is pointless: the host itself cannot make sockets.
_LOCAL_ERRNOS = frozenset(
    {errno.EAFNOSUPPORT, errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)


class ConnState(enum.Enum):
    INITIAL = "INITIAL"
    CONNECTING = "CONNECTING"
    BACKOFF = "BACKOFF"
    ACTIVE = "ACTIVE"
    WINDDOWN = "WINDDOWN"
    ERROR = "ERROR"
    CLOSED = "CLOSED"


class SvpError(Exception):
    """A query got no usable reply."""


class ConnectionLost(SvpError):
    """The connection carrying the query was reset (or was not active); worth a retry."""


class NoConnection(SvpError):
    """No connection to any server address became active in time."""


class QueryFailed(SvpError):
    """The server's reply to this query could not be used (not worth retrying)."""


async def open_tcp(addr: IPAddress, port: int) -> trio.abc.Stream:
    """Connect to ``addr:port`` over TCP (the default opener)."""
    family = socket.AF_INET if isinstance(addr, IPv4Address) else socket.AF_INET6
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((str(addr), port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@dataclass(eq=False)
class _Pending:
    id: int
    op: int  # the ack op we expect
    limit: int  # LOG_ACK: largest acceptable body
    deadline: float
    done: trio.Event = field(default_factory=trio.Event)
    reply: Message | None = None
    error: SvpError | None = None


class Connection:
    """One server address. Create, then run `run` in a nursery; `query` while ACTIVE."""

    def __init__(
        self,
        addr: IPAddress,
        port: int,
        *,
        on_change: Callable[[Connection], None] | None = None,
        opener: Opener | None = None,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        backoff: tuple[float, ...] = BACKOFF_TABLE,
        degrade_after: int = DEGRADE_AFTER,
        version: int = 1,
        probe_ext: bool = False,
        backoff_jitter: float = 0.0,
        reconnect_spread: float = 0.0,
    ) -> None:
        if not backoff:
            raise ValueError("the backoff table must not be empty")
        self.addr = addr
        self.port = port
        self.state = ConnState.INITIAL
        self.failures = 0
        self.degraded = False
        self.last_error: str | None = None
        self.resets = 0
        self._on_change = on_change
        self._opener = opener
        self._query_timeout = query_timeout
        self._connect_timeout = connect_timeout
        self._backoff = tuple(backoff)
        self._degrade_after = degrade_after
        self._version = version
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._closing = False
        self._run_scope: trio.CancelScope | None = None
        self._session: trio.CancelScope | None = None
        self._outq: trio.MemorySendChannel[bytes] | None = None
        self._reset_reason: str | None = None
        self._answered = False
        self._wake = trio.Event()
        # The extension (protocol.svp_ext): ``caps`` is what the server granted on the current
        # session (None until the HELLO is answered; 0 without the extension). A server that
        # dropped the connection over our HELLO is not asked again (``ext_refused``).
        self._probe_ext = probe_ext
        self.caps: int | None = None if probe_ext else 0
        self.max_wait = 0.0
        self.ext_refused = False
        self._hello_in_flight = False
        self._backoff_jitter = min(max(backoff_jitter, 0.0), 1.0)
        self._reconnect_spread = max(reconnect_spread, 0.0)
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"<svp Connection {self.label} {self.state.value}>"

    @property
    def label(self) -> str:
        host = f"[{self.addr}]" if isinstance(self.addr, IPv6Address) else str(self.addr)
        return f"{host}:{self.port}"

    @property
    def usable(self) -> bool:
        """True when `query` would accept a new query."""
        return (
            self.state is ConnState.ACTIVE
            and self._outq is not None
            and self._reset_reason is None
            and not self._closing
        )

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect with backoff, until `wind_down`/`close` or cancellation."""
        try:
            with trio.CancelScope() as self._run_scope:
                task_status.started()
                while not self._closing:
                    self._set_state(ConnState.CONNECTING)
                    try:
                        with trio.fail_after(self._connect_timeout):
                            stream = await self._open()
                    except trio.TooSlowError:
                        await self._failed(f"connect timed out after {self._connect_timeout:g} s")
                        continue
                    except OSError as exc:
                        if exc.errno in _LOCAL_ERRNOS:
                            await self._broken(f"cannot create a socket: {exc}")
                        else:
                            await self._failed(f"connect failed: {exc.strerror or exc}")
                        continue
                    except Exception as exc:  # never let one address take the daemon down
                        log.exception("svp %s: unexpected error while connecting", self.label)
                        await self._broken(f"cannot connect: {exc!r}")
                        continue
                    answered = await self._serve(stream)
                    if self._closing:
                        break
                    if answered:
                        self.failures = 0
                        self._set_state(ConnState.INITIAL)
                        if self._reconnect_spread:
                            # Every node loses its connection at once when the server
                            # restarts: spread the first reconnect wave.
                            await trio.sleep(self._random.uniform(0, self._reconnect_spread))
                    else:
                        await self._failed(self.last_error or "connection reset")
        finally:
            self._fail_all(ConnectionLost(f"connection to {self.label} closed"))
            self._set_state(ConnState.CLOSED)

    def wind_down(self) -> None:
        """Stop taking queries; close once those in flight are answered (or at once if none)."""
        self._closing = True
        if self.state is ConnState.ACTIVE and self._pending:
            self._set_state(ConnState.WINDDOWN)
        elif self.state is not ConnState.CLOSED:
            self.close()

    def close(self) -> None:
        """Close now: queries in flight fail with `ConnectionLost` (not retried here)."""
        self._closing = True
        if self._run_scope is not None:
            self._run_scope.cancel()
        else:
            self._set_state(ConnState.CLOSED)

    async def _open(self) -> trio.abc.Stream:
        opener = self._opener if self._opener is not None else open_tcp
        return await opener(self.addr, self.port)

    async def _failed(self, reason: str) -> None:
        self.last_error = reason
        self.failures += 1
        if self.failures > self._degrade_after:
            self.degraded = True
        wait = self._backoff[min(self.failures, len(self._backoff)) - 1]
        if self._backoff_jitter:
            # uniform in [(1 - jitter) * wait, wait]: nodes that failed together drift apart
            wait *= 1.0 - self._backoff_jitter * self._random.random()
        log.info(
            "svp %s: %s; attempt %d failed, retrying in %g s",
            self.label,
            reason,
            self.failures,
            wait,
        )
        self._set_state(ConnState.BACKOFF)
        await trio.sleep(wait)

    async def _broken(self, reason: str) -> None:
        self.last_error = reason
        self.failures += 1
        self.degraded = True
        log.warning("svp %s: %s", self.label, reason)
        self._set_state(ConnState.ERROR)
        await trio.sleep(self._backoff[-1])

    def _set_state(self, state: ConnState) -> None:
        changed = state is not self.state
        self.state = state
        if state is ConnState.ACTIVE and self.degraded:
            self.degraded = False
            changed = True
        if self._on_change is not None and (changed or state is ConnState.BACKOFF):
            self._on_change(self)

    # ---------------------------------------------------------------- active session

    async def _serve(self, stream: trio.abc.Stream) -> bool:
        """Run one established connection until reset; True if it answered anything."""
        send, receive = trio.open_memory_channel[bytes](math.inf)
        self._outq = send
        self._reset_reason = None
        self._answered = False
        probe = self._probe_ext and not self.ext_refused
        self.caps = None if probe else 0
        self.max_wait = 0.0
        self._set_state(ConnState.ACTIVE)
        try:
            async with trio.open_nursery() as nursery:
                self._session = nursery.cancel_scope
                nursery.start_soon(self._writer, stream, receive)
                nursery.start_soon(self._reader, stream)
                nursery.start_soon(self._watchdog)
                if probe:
                    nursery.start_soon(self._hello)
        finally:
            if self._hello_in_flight and not self._closing:
                # The server dropped us while our HELLO was unanswered: an SVP server that
                # does not take a PING with a body. Never probe it again (it is reconnected
                # as after any reset) and poll its log the v1 way.
                self.ext_refused = True
                log.info("svp %s: no answer to the extension probe; not probing again", self.label)
            self._hello_in_flight = False
            self.caps = 0
            self._session = None
            self._outq = None
            send.close()
            await trio.aclose_forcefully(stream)
            reason = self._reset_reason or "connection closed"
            self._fail_all(ConnectionLost(f"connection to {self.label} reset: {reason}"))
        return self._answered

    def _reset(self, reason: str) -> None:
        """Tear the session down (first reason wins); the run loop decides what follows."""
        if self._reset_reason is not None:
            return
        self._reset_reason = reason
        if not self._closing:
            self.resets += 1
            self.last_error = reason
            log.warning("svp %s: resetting connection: %s", self.label, reason)
        if self._session is not None:
            self._session.cancel()

    def _fail_all(self, error: SvpError) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.error = error
            p.done.set()

    async def _writer(
        self, stream: trio.abc.Stream, frames: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        try:
            async for frame in frames:
                await stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._reset(f"write failed: {exc}")

    async def _reader(self, stream: trio.abc.Stream) -> None:
        buf = bytearray()
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._reset(f"read failed: {exc}")
                return
            if not data:
                self._reset("server closed the connection")
                return
            buf += data
            while len(buf) >= 16:
                version, op, size, qid = _HDR.unpack_from(buf, 0)
                problem = self._check_header(version, op, size, qid)
                if problem is not None:
                    self._reset(problem)
                    return
                if len(buf) < 16 + size:
                    break
                frame = bytes(buf[: 16 + size])
                del buf[: 16 + size]
                if not self._deliver(frame, qid):
                    return

    def _check_header(self, version: int, op: int, size: int, qid: int) -> str | None:
        """Why a reply header is unacceptable, or None."""
        if version != self._version:
            return f"reply has version {version}, we speak {self._version}"
        if op not in _ACK_SIZES:
            try:
                name = Op(op).name
            except ValueError:
                name = f"{op:#x}"
            return f"unexpected op {name} from the server"
        pending = self._pending.get(qid)
        if pending is None:
            return f"reply id {qid} matches no outstanding query"
        if pending.op != op:
            return f"reply id {qid} is {Op(op).name}, expected {Op(pending.op).name}"
        want = _ACK_SIZES[op]
        if want is not None and size != want:
            return f"{Op(op).name} body of {size} bytes, expected {want}"
        if op == Op.PONG:
            if size != 0 and not HELLO_SIZE <= size <= MAX_PONG_BODY:
                return f"PONG body of {size} bytes (want 0 or {HELLO_SIZE}..{MAX_PONG_BODY})"
            return None
        if want is None and not 4 <= size <= pending.limit:
            return f"LOG_ACK body of {size} bytes outside 4..{pending.limit}"
        return None

    def _deliver(self, frame: bytes, qid: int) -> bool:
        """Decode and hand over one validated frame; False if the connection was reset."""
        pending = self._pending[qid]
        try:
            msg = decode_frame(frame, versions=frozenset({self._version}), extra_ops=HELLO_PONG_OPS)
        except BadLogEntry as exc:
            del self._pending[qid]
            pending.error = QueryFailed(f"unusable LOG_ACK from {self.label}: {exc}")
            pending.done.set()
            self._answered = True
        except ProtocolError as exc:
            self._reset(f"bad reply ({exc.kind}): {exc}")
            return False
        else:
            del self._pending[qid]
            pending.reply = msg
            pending.done.set()
            self._answered = True
        if self.state is ConnState.WINDDOWN and not self._pending:
            self._reset("wound down")
            return False
        return True

    async def _watchdog(self) -> None:
        while True:
            if not self._pending:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            earliest = min(p.deadline for p in self._pending.values())
            if trio.current_time() >= earliest:
                self._reset(f"no reply within {self._query_timeout:g} s")
                return
            await trio.sleep_until(earliest)

    async def _hello(self) -> None:
        """Ask for the extension once per session (protocol.svp_ext); see ``caps``."""
        self._hello_in_flight = True
        try:
            reply = await self.query(Hello(0, CAP_LOG_WAIT))
        except ConnectionLost:
            return  # still "in flight": _serve's cleanup decides what the loss means
        except SvpError as exc:
            log.info("svp %s: extension probe failed: %s", self.label, exc)
            reply = None
        self._hello_in_flight = False
        if isinstance(reply, HelloAck):
            self.caps = reply.caps & CAP_LOG_WAIT
            self.max_wait = reply.max_wait_ms / 1000.0
            log.info(
                "svp %s: server offers the extension (caps %#x, waits up to %g s)",
                self.label,
                reply.caps,
                self.max_wait,
            )
        else:
            self.caps = 0  # a plain PONG: a server without the extension
        if self._on_change is not None:
            self._on_change(self)

    # ---------------------------------------------------------------- queries

    def _alloc_id(self) -> int:
        while True:
            qid = self._next_id
            self._next_id = 1 if qid >= MAX_ID else qid + 1
            if qid not in self._pending:
                return qid

    async def query(self, request: Message) -> Message:
        """Send ``request`` (any id) and return the validated reply.

        Raises `ConnectionLost` when the connection is not ACTIVE or is reset before the reply
        arrives, `QueryFailed` when the reply is sound but unusable.
        """
        if not self.usable or self._outq is None:
            raise ConnectionLost(f"connection to {self.label} is {self.state.value}")
        qid = self._alloc_id()
        request = replace(request, id=qid, version=self._version)  # type: ignore[type-var]
        frame = request.encode()
        expect = _REPLY_OP[request.OP]
        # + 4: sdc-portolan counts only the records against ``count``, not the status word
        # (32 queued VL2 records answer count 1024 with a 1028-byte body); be liberal.
        limit = request.count + 4 if isinstance(request, LogRequest | LogWait) else 0
        timeout = self._query_timeout
        if isinstance(request, LogWait):
            timeout += request.wait_ms / 1000.0  # the server may hold it that long
        pending = _Pending(qid, expect, limit, trio.current_time() + timeout)
        self._pending[qid] = pending
        self._wake.set()
        self._outq.send_nowait(frame)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply
