"""A scripted SVP server and a fake varpd host, for testing the svp plugin without portolan.

`ScriptServer` is a real trio TCP server on loopback. By default it answers like a small,
correct portolan from its tables (``vl2``, ``vl3``, ``log``). Tests change its behaviour
per request with `Step`s queued in ``server.script`` (any op) or ``server.script_for[op]``
(that op only, taken first), and per accepted connection with ``server.on_accept``:

- ``answer()``: the normal reply (optionally rewritten: ``answer(lambda req, frame: ...)``);
- ``defer()``: hold this reply and send it after the next answered one (out of order);
- ``stall()``: never answer; ``reset()``: abort the connection (RST); ``close()``: FIN;
- ``send(bytes)``: send these bytes instead of the reply.

PINGs (the svp client's extension probe is a PING with a body, protocol/svp_ext.py) are
answered with a plain PONG, as a v1 server does, outside the script: they are recorded in
``server.pings``, not in ``requests``, and take no `Step`. ``server.ping_act = Act.CLOSE`` (or
RESET) makes the server drop the connection on a PING instead.

Frame surgery helpers (`reframe`, `bad_crc`) build wrong versions, sizes, ops and CRCs.
`FakeHost`/`FakeDriver`/`FakeReply` record what the plugin does with the kernel side.
"""

from __future__ import annotations

import enum
import logging
import socket
import struct
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from protocol.svp import (
    Decoder,
    LogAck,
    LogRemove,
    LogRemoveAck,
    LogRequest,
    Message,
    Op,
    Ping,
    Pong,
    ProtocolError,
    Status,
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
    encoded_size,
)

ZERO16 = b"\x00" * 16


class Act(enum.Enum):
    ANSWER = "answer"
    DEFER = "defer"
    STALL = "stall"
    RESET = "reset"
    CLOSE = "close"


Rewrite = Callable[[Message, bytes], bytes]


@dataclass(frozen=True)
class Step:
    act: Act = Act.ANSWER
    rewrite: Rewrite | None = None
    delay: float = 0.0


def answer(rewrite: Rewrite | None = None, *, delay: float = 0.0) -> Step:
    return Step(Act.ANSWER, rewrite, delay)


def defer() -> Step:
    return Step(Act.DEFER)


def stall() -> Step:
    return Step(Act.STALL)


def reset() -> Step:
    return Step(Act.RESET)


def close() -> Step:
    return Step(Act.CLOSE)


def send(data: bytes) -> Step:
    return Step(Act.ANSWER, lambda _req, _frame: data)


def reframe(
    frame: bytes,
    *,
    version: int | None = None,
    op: int | None = None,
    id: int | None = None,
    body: bytes | None = None,
    crc: int | None = None,
) -> bytes:
    """``frame`` with header fields or body replaced; size and CRC recomputed unless ``crc``."""
    v, o, _size, i, _crc = struct.unpack_from(">HHIII", frame)
    body = frame[16:] if body is None else body
    head = struct.pack(
        ">HHII",
        v if version is None else version,
        o if op is None else op,
        len(body),
        i if id is None else id,
    )
    if crc is None:
        crc = zlib.crc32(head + b"\x00" * 4 + body)
    return head + struct.pack(">I", crc) + body


def bad_crc(frame: bytes) -> bytes:
    crc = struct.unpack_from(">I", frame, 12)[0]
    return reframe(frame, crc=crc ^ 0xDEADBEEF)


def refused_port() -> int:
    """A loopback TCP port nobody listens on (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _abort(stream: trio.SocketStream) -> None:
    """Close with RST (SO_LINGER 0)."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    await trio.aclose_forcefully(stream)


class ScriptServer:
    def __init__(self) -> None:
        self.vl2: dict[tuple[bytes, int], tuple[int, bytes]] = {}
        self.vl3: dict[tuple[bytes, int], tuple[bytes, int, bytes]] = {}
        self.log: list[Any] = []
        self.removed: list[tuple[bytes, ...]] = []
        self.requests: list[tuple[int, Message]] = []
        self.request_times: list[float] = []
        self.accept_times: list[float] = []
        self.accepted_on: list[str] = []
        self.pings: list[tuple[int, Ping]] = []
        self.ping_act = Act.ANSWER
        self.on_accept: deque[Step] = deque()
        self.script: deque[Step] = deque()
        self.script_for: dict[int, deque[Step]] = {}
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self._streams: list[trio.SocketStream] = []

    # ------------------------------------------------------------ lifecycle

    async def start(self, nursery: trio.Nursery, host: str = "127.0.0.1", port: int = 0) -> int:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(self._serve, listeners)
        return self.port

    async def _serve(self, listeners: list[trio.SocketListener]) -> None:
        with trio.CancelScope() as self._scope:
            await trio.serve_listeners(self._handle, listeners)

    async def stop(self) -> None:
        """Stop listening and abort every open connection."""
        if self._scope is not None:
            self._scope.cancel()
        for stream in self._streams:
            await _abort(stream)
        self._streams.clear()

    def ops(self, op: int | None = None) -> list[Message]:
        return [m for _, m in self.requests if op is None or op == m.OP]

    # ------------------------------------------------------------ behaviour

    def reply_for(self, req: Message) -> Message | None:
        if isinstance(req, VL2Request):
            found = self.vl2.get((req.mac, req.vnet_id))
            if found is None:
                return VL2Ack(req.id, Status.NOTFOUND, 0, ZERO16, req.version)
            return VL2Ack(req.id, Status.OK, found[0], found[1], req.version)
        if isinstance(req, VL3Request):
            hit = self.vl3.get((req.ip, req.vnet_id))
            if hit is None:
                return VL3Ack(req.id, Status.NOTFOUND, b"\x00" * 6, 0, ZERO16, req.version)
            return VL3Ack(req.id, Status.OK, hit[0], hit[1], hit[2], req.version)
        if isinstance(req, LogRequest):
            out, used = [], 4
            for entry in self.log:
                if used + encoded_size(entry) > req.count:
                    break
                out.append(entry)
                used += encoded_size(entry)
            return LogAck(req.id, Status.OK, tuple(out), req.version)
        if isinstance(req, LogRemove):
            self.removed.append(req.ids)
            gone = set(req.ids)
            self.log = [e for e in self.log if e.entry_id not in gone]
            return LogRemoveAck(req.id, Status.OK, req.version)
        return None

    def _next_step(self, req: Message) -> Step:
        queue = self.script_for.get(req.OP)
        if queue:
            return queue.popleft()
        if self.script:
            return self.script.popleft()
        return Step()

    async def _handle(self, stream: trio.SocketStream) -> None:
        index = len(self.accept_times)
        self.accept_times.append(trio.current_time())
        try:
            self.accepted_on.append(stream.socket.getsockname()[0])
        except OSError:
            self.accepted_on.append("?")
        first = self.on_accept.popleft() if self.on_accept else Step()
        if first.act is Act.RESET:
            await _abort(stream)
            return
        if first.act is Act.CLOSE:
            await stream.aclose()
            return
        self._streams.append(stream)
        decoder = Decoder()
        held: list[bytes] = []
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                decoder.receive_data(data)
                for req in decoder:
                    if isinstance(req, Ping):
                        self.pings.append((index, req))
                        if self.ping_act is Act.RESET:
                            await _abort(stream)
                            return
                        if self.ping_act is Act.CLOSE:
                            await stream.aclose()
                            return
                        await stream.send_all(Pong(req.id, req.version).encode())
                        continue
                    self.requests.append((index, req))
                    self.request_times.append(trio.current_time())
                    step = self._next_step(req)
                    if step.delay:
                        await trio.sleep(step.delay)
                    reply = self.reply_for(req)
                    frame = reply.encode() if reply is not None else b""
                    if step.rewrite is not None:
                        frame = step.rewrite(req, frame)
                    if step.act is Act.ANSWER:
                        await stream.send_all(frame + b"".join(held))
                        held.clear()
                    elif step.act is Act.DEFER:
                        held.append(frame)
                    elif step.act is Act.RESET:
                        await _abort(stream)
                        return
                    elif step.act is Act.CLOSE:
                        await stream.aclose()
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ProtocolError):
            return
        finally:
            if stream in self._streams:
                self._streams.remove(stream)
            await trio.aclose_forcefully(stream)


# ---------------------------------------------------------------- fake varpd side


class FakeDriver:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.cache: dict[tuple[str, bytes], Any] = {}

    def cache_set(self, device: str, mac: bytes, point: Any, drop: bool = False) -> None:
        self.calls.append(("cache_set", device, mac, point))
        self.cache[(device, mac)] = point

    def cache_remove(self, device: str, mac: bytes) -> None:
        self.calls.append(("cache_remove", device, mac))
        self.cache.pop((device, mac), None)

    def inject(self, device: str, frame: bytes) -> None:
        self.calls.append(("inject", device, frame))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]


@dataclass(eq=False)
class FakeHost:
    nursery: trio.Nursery
    vnet_id: int = 12340
    device: str = "overlay0"
    varpd_id: int = 1
    shared: dict[str, Any] = field(default_factory=dict)
    driver: FakeDriver = field(default_factory=FakeDriver)
    metrics: Any = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("test.svp"))
    events: list[tuple[str, str | None]] = field(default_factory=list)

    def degrade(self, reason: str) -> None:
        self.events.append(("degrade", reason))

    def restore(self) -> None:
        self.events.append(("restore", None))

    @property
    def degraded(self) -> str | None:
        """The message currently in force, or None."""
        state = None
        for kind, message in self.events:
            state = message if kind == "degrade" else None
        return state


class FakeReply:
    def __init__(self) -> None:
        self.outcomes: list[tuple[str, Any]] = []

    @property
    def done(self) -> bool:
        return bool(self.outcomes)

    def respond(self, point: Any) -> None:
        self.outcomes.append(("respond", point))

    def drop(self) -> None:
        self.outcomes.append(("drop", None))

    async def proxy_arp(self) -> None:
        self.outcomes.append(("proxy_arp", None))

    async def proxy_ndp(self) -> None:
        self.outcomes.append(("proxy_ndp", None))

    async def proxy_dhcp(self) -> None:
        self.outcomes.append(("proxy_dhcp", None))


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 60.0, step: float = 0.01
) -> None:
    """Poll ``predicate`` (in trio time, so instant under the autojump clock)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


__all__ = [
    "Act",
    "FakeDriver",
    "FakeHost",
    "FakeReply",
    "Op",
    "ScriptServer",
    "Step",
    "answer",
    "bad_crc",
    "close",
    "defer",
    "reframe",
    "refused_port",
    "reset",
    "send",
    "stall",
    "wait_until",
]
