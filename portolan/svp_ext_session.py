"""The server half of portolan's SVP extension (`protocol.svp_ext`): HELLO and held LOG_WAITs.

Theory of operation
-------------------
`LogWaitHub` (one per `SvpServer`) subscribes to the Directory (``Directory.subscribe``: called
under the write lock after every committed change, after a reload, and when another portolan's
change is folded in; these are the same moments the Directory forgets which logs it read
empty, so a log row never lands without a wake-up). It keeps one `trio.Event`
that is set and replaced on every such change. A held LOG_WAIT takes the current event
*before* it reads the log, so a row written while the read is in flight still wakes it.
LOG_RM is not a change (``remove_log`` reports none), so acknowledging entries wakes nobody.
A change wakes every held request; each re-reads its own CN's log (the Directory answers an
unchanged empty log from memory) and only those with entries answer.

`ExtSession` (one per connection, created by the connection loop) holds what the extension
needs per connection:

- the decoder hook: PING frames are parsed with `protocol.svp_ext.HELLO_PING_OPS`, so a PING
  carrying the magic is a `Hello`; any other PING is the plain PING it always was;
- ``Hello`` -> ``HelloAck`` granting ``CAP_LOG_WAIT`` (when the server holds LOG_WAITs at all:
  ``max_wait > 0`` and the Directory can be subscribed to); granting it enables op LOG_WAIT on
  this connection's decoder. Before that LOG_WAIT is an unknown op, as for every v1 client;
- ``LogWait``: started as a task in the connection's nursery, so the connection keeps reading
  and answering while it is held. The task loops: take the hub's event; build the LOG_REQ
  answer exactly as for a LOG_REQ (``answer_log``: the same CN check, budget and FATAL rules);
  send it if it carries entries, is not OK, or the wait (``min(wait_ms, max_wait)``) is over;
  else wait for the event or the deadline. At most ``max_held`` LOG_WAITs are held per
  connection; beyond that one is answered at once (a LOG_REQ), so a client cannot grow tasks.
- ``send_all``: the loop's and the held tasks' writes go through it. While no LOG_WAIT is
  held it is the stream's own ``send_all`` (the hot path pays nothing); otherwise writes take
  a FIFO lock, so frames are never interleaved.

`LogBatcher` (one per `SvpServer`) is what makes the wake-up of a thousand held requests and
the thousand LOG_RMs that follow cheap: requests that arrive while a store operation is in
flight are served together by the next one (group commit). ``fetch`` reads the pending log
of many CNs in one read transaction (``Directory.read``; the same rules as
``Directory.fetch_log``: oldest first, as many as fit the LOG_ACK body, no ROUTE entries for
version 1); ``remove`` deletes the ids of many LOG_RMs in one write transaction
(``Directory.remove_log``), and each LOG_RM is answered once its ids are gone. One operation
of each kind is in flight at a time; its leader (the first caller of a batch) runs it shielded
from cancellation, so the callers that joined it are always answered.

Lifecycle: the session lives inside the connection's nursery; when the connection loop ends
the nursery is cancelled and every held LOG_WAIT ends without a reply. Nothing here raises
into the connection: a held task that fails logs, counts ``internal`` and ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from portolan.model import LOG_ENTRY_SIZES, LOG_STATUS_SIZE
from protocol.svp import Decoder, LogAck, LogRequest
from protocol.svp_ext import (
    CAP_LOG_WAIT,
    HELLO_PING_OPS,
    LOG_WAIT_OPS,
    Hello,
    HelloAck,
    LogWait,
)

log = logging.getLogger("portolan.svp")

#: Longest hold the server grants a LOG_WAIT, seconds (announced in the HELLO reply).
DEFAULT_MAX_LOG_WAIT = 60.0
#: LOG_WAITs held at once on one connection; more are answered at once.
DEFAULT_MAX_HELD = 4

_OK = bytes(4)
#: a LOG_ACK body that holds one entry: status word + the smallest entry
_SMALLEST_ACK = LOG_STATUS_SIZE + min(LOG_ENTRY_SIZES.values())


class LogWaitHub:
    """One event, set and replaced whenever the Directory may have written log rows."""

    def __init__(self, directory: Any) -> None:
        self._event = trio.Event()
        self.wakeups = 0
        self.held = 0  # LOG_WAITs held right now, all connections
        subscribe = getattr(directory, "subscribe", None)
        self.available = callable(subscribe)
        self._unsubscribe: Callable[[], None] | None = None
        if self.available:
            self._unsubscribe = subscribe(self._changed)  # type: ignore[misc]

    def _changed(self, change: Any) -> None:
        self.wakeups += 1
        event, self._event = self._event, trio.Event()
        event.set()

    def event(self) -> trio.Event:
        """The event the next change sets (take it before reading the log)."""
        return self._event

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


class _Batch:
    __slots__ = ("done", "error", "items", "result")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class LogBatcher:
    """Group commit for log reads and LOG_RM deletes; see the module docstring."""

    def __init__(self, directory: Any) -> None:
        self._directory = directory
        self._open: dict[str, _Batch | None] = {"fetch": None, "remove": None}
        self._locks = {"fetch": trio.Lock(), "remove": trio.Lock()}
        self.operations = {"fetch": 0, "remove": 0}
        self.batched = hasattr(directory, "fetch_logs")

    async def _join(
        self, kind: str, items: list[Any], run: Callable[[list[Any]], Awaitable[Any]]
    ) -> Any:
        batch = self._open[kind]
        leader = batch is None
        if batch is None:
            batch = self._open[kind] = _Batch()
        batch.items.extend(items)
        if leader:
            with trio.CancelScope(shield=True):  # the followers wait for this batch
                async with self._locks[kind]:
                    if self._open[kind] is batch:
                        self._open[kind] = None  # later callers start the next batch
                    self.operations[kind] += 1
                    try:
                        batch.result = await run(batch.items)
                    except Exception as exc:
                        batch.error = exc
                    finally:
                        batch.done.set()
        else:
            await batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch.result

    async def fetch(self, cn_uuid: str, budget: int, version: int) -> list[Any]:
        """``Directory.fetch_log(cn_uuid, budget, version)``, batched with concurrent calls."""
        if not self.batched:
            return await self._directory.fetch_log(cn_uuid, budget, version)
        key = (cn_uuid, budget, version)
        found = await self._join("fetch", [key], self._read_many)
        return found[key]

    async def _read_many(self, keys: list[tuple[str, int, int]]) -> dict[Any, list[Any]]:
        return await self._directory.fetch_logs(keys)

    async def remove(self, ids: tuple[bytes, ...] | list[bytes]) -> None:
        """``Directory.remove_log(ids)``, in one transaction with concurrent calls."""
        await self._join("remove", list(ids), self._remove_many)

    async def _remove_many(self, ids: list[bytes]) -> None:
        await self._directory.remove_log(list(dict.fromkeys(ids)))


class ExtSession:
    """One connection's view of the extension; see the module docstring."""

    def __init__(
        self,
        hub: LogWaitHub,
        stream: trio.abc.SendStream,
        nursery: trio.Nursery,
        answer_log: Callable[[LogRequest, str | None], Awaitable[bytes]],
        *,
        batcher: LogBatcher | None = None,
        cns_for_ip: Callable[[bytes], list[str]] | None = None,
        metrics: Any = None,
        max_wait: float = DEFAULT_MAX_LOG_WAIT,
        max_held: int = DEFAULT_MAX_HELD,
    ) -> None:
        self._hub = hub
        self._stream = stream
        self._nursery = nursery
        self._answer_log = answer_log
        self._batcher = batcher
        self._cns_for_ip = cns_for_ip
        self._metrics = metrics
        self._max_wait = max_wait
        self._max_held = max_held
        self._decoder: Decoder | None = None
        self._lock = trio.StrictFIFOLock()
        self.held = 0
        self.caps = 0

    # ------------------------------------------------------------------ hooks for the loop

    def attach(self, decoder: Decoder) -> None:
        """Let ``decoder`` read HELLO (a PING with the magic body)."""
        self._decoder = decoder
        decoder.extend(HELLO_PING_OPS)

    def handlers(self, base: dict[type, Any]) -> dict[type, Any]:
        """``base`` (the server's sync handlers) plus this connection's HELLO and LOG_WAIT."""
        return {**base, Hello: self.hello, LogWait: self.log_wait}

    async def send_all(self, data: bytes) -> None:
        if not self.held and not self._lock.locked():
            await self._stream.send_all(data)
            return
        async with self._lock:
            await self._stream.send_all(data)

    # ------------------------------------------------------------------ requests

    def _count(self, op: str, status: str) -> None:
        if self._metrics is not None:
            self._metrics.svp_requests[(op, status)] += 1

    def hello(self, msg: Hello) -> bytes:
        granted = 0
        if msg.caps & CAP_LOG_WAIT and self._hub.available and self._max_wait > 0:
            granted |= CAP_LOG_WAIT
        if granted & CAP_LOG_WAIT and not self.caps & CAP_LOG_WAIT and self._decoder is not None:
            self._decoder.extend(LOG_WAIT_OPS)
        self.caps |= granted
        self._count("hello", "ok")
        max_wait_ms = int(self._max_wait * 1000) if granted & CAP_LOG_WAIT else 0
        return HelloAck(msg.id, granted, max_wait_ms, msg.version).encode()

    def log_wait(self, msg: LogWait) -> None:
        """Start the held request; its reply is sent by its own task (no reply here)."""
        wait = min(msg.wait_ms / 1000.0, self._max_wait)
        if self.held >= self._max_held:
            wait = 0.0
        self.held += 1
        self._hub.held += 1
        self._nursery.start_soon(self._serve_held, msg, wait)
        return None

    async def _serve_held(self, msg: LogWait, wait: float) -> None:
        request = LogRequest(msg.id, msg.count, msg.ip, msg.version)
        deadline = trio.current_time() + wait
        try:
            cns = self._cns_for_ip(msg.ip) if self._cns_for_ip is not None else []
            batcher = self._batcher
            if batcher is None or len(cns) != 1 or msg.count < _SMALLEST_ACK:
                # the LOG_REQ path names what is wrong (FATAL, or nothing fits): answer at once
                reply = await self._answer_log(request, None)
            else:
                while True:
                    event = self._hub.event()  # before the read: a row written meanwhile wakes us
                    try:
                        entries = await batcher.fetch(cns[0], msg.count, msg.version)
                    except Exception:
                        reply = await self._answer_log(request, None)  # the store: FATAL, logged
                        break
                    if entries or trio.current_time() >= deadline:
                        reply = LogAck(msg.id, 0, tuple(entries), msg.version).encode()
                        break
                    with trio.move_on_at(deadline):
                        await event.wait()
            status = "ok" if reply[16:20] == _OK else "fatal"
            self._count("log_wait", status if len(reply) > 20 or status == "fatal" else "empty")
            await self.send_all(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass  # the connection is going away; its loop reports that
        except Exception:
            log.exception("SVP LOG_WAIT %d: internal error", msg.id)
            if self._metrics is not None:
                self._metrics.svp_protocol_errors["internal"] += 1
        finally:
            self.held -= 1
            self._hub.held -= 1


__all__ = [
    "DEFAULT_MAX_HELD",
    "DEFAULT_MAX_LOG_WAIT",
    "ExtSession",
    "LogBatcher",
    "LogWaitHub",
]
