"""The changes feed's record format and the PostgreSQL LISTEN connection.

Theory of operation
-------------------
Every committed write on a PostgreSQL store leaves two traces, both inside its own
transaction (so both exist exactly when the change does):

- a row ``changes(version, payload)`` whose payload (``encode_change``) names the keys the
  change touched, compact JSON: ``{"c": [cn uuid, ...], "v": [[mac_int, vnet_id, ip], ...],
  "r": [[vnet_id, vlan_id, subnet, r_subnet], ...], "o": origin}``, ``origin`` naming the
  store object (so the instance) that wrote it. VNIC entries list the previous *and* the
  new (mac, vnet, ip) of every VNIC written, so a reader can take old VL3 keys out of its index
  (the index keeps no MAC -> IP map). A change touching more than ``MAX_KEYS`` keys (a big
  ``portolan load``) is recorded as ``{"reload": 1}``: readers rebuild their index in full.
- ``NOTIFY portolan_changes, '<version>'``, which PostgreSQL delivers to every listener when
  (and only if) the transaction commits.

The notification is only a wake-up call: a reader never trusts its payload for content, it
reads ``changes`` rows after its cursor and then the *current* rows of the keys they name
(``portolan.coherence``). That makes re-reading idempotent and order-insensitive, and a missed
or coalesced notification harmless as long as one more arrives or the reader catches up on
reconnect.

The listener: psycopg's async API is asyncio-only, so ``listen`` runs a blocking loop in one
worker thread (``trio.to_thread.run_sync(..., abandon_on_cancel=True)``): connect, ``LISTEN``,
then ``conn.notifies(timeout=poll)`` in a loop, pinging the server when idle so a dead peer is
noticed; each event is handed to trio with ``trio.from_thread.run_sync``. When the connection
is lost the thread ends, ``listen`` reports ``lost``, waits (exponential backoff from 0.1 s, at
most 1 s while the server's host answers TCP, at most 5 s while attempts time out) and connects
again, reporting ``connected``. A hung server (its ping unanswered for 2 s) counts as lost. A consumer must treat every ``connected``
after a ``lost`` as "notifications may have been missed".

Lifecycle: ``listen`` runs until cancelled; on cancellation the worker thread is abandoned and
stops by itself within ``poll`` seconds (a ``threading.Event`` tells it to).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import trio

from protocol.addr import mac_to_int

from ..errors import StoreUnavailable

log = logging.getLogger("portolan.store.notify")

CHANNEL = "portolan_changes"
MAX_KEYS = 2000
RELOAD_PAYLOAD = '{"reload":1}'
#: a failed LISTEN attempt quicker than this (seconds) was answered by the server's host
FAST_FAILURE = 1.0

# -- the feed record ------------------------------------------------------------------------


def encode_change(change: Any, origin: str = "") -> str:
    """The ``changes.payload`` of one committed change (see the module docstring).

    ``change`` is an ``IndexChange``, or any change object with a ``version`` (e.g. the
    firewall's rule changes): fields it lacks count as empty, so a change that touches no
    index key is still recorded (``{}``) and still wakes the other instances' hooks.
    """
    cns = {c.uuid for c in getattr(change, "cns_put", ())}
    cns |= set(getattr(change, "cns_removed", ()))
    vnics = {
        (mac_to_int(v.mac), v.vnet_id, v.ip)
        for v in (*getattr(change, "vnics_put", ()), *getattr(change, "vnics_removed", ()))
    }
    routes = {tuple(r.key) for r in getattr(change, "routes_put", ())}
    routes |= {tuple(k) for k in getattr(change, "routes_removed", ())}
    doc: dict[str, Any] = {"o": origin} if origin else {}
    if len(cns) + len(vnics) + len(routes) > MAX_KEYS:
        doc["reload"] = 1
        return json.dumps(doc, separators=(",", ":"))
    if cns:
        doc["c"] = sorted(cns)
    if vnics:
        doc["v"] = [list(t) for t in sorted(vnics)]
    if routes:
        doc["r"] = [list(t) for t in sorted(routes)]
    return json.dumps(doc, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class ChangeKeys:
    """The keys named by one or more feed records (``merge``)."""

    reload: bool = False
    origins: frozenset[str] = field(default_factory=frozenset)
    cns: frozenset[str] = field(default_factory=frozenset)
    vnics: frozenset[tuple[int, int, str]] = field(default_factory=frozenset)
    routes: frozenset[tuple[int, int, str, str]] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return self.reload or bool(self.cns or self.vnics or self.routes)


def decode_change(payload: str) -> ChangeKeys:
    """Parse a payload written by ``encode_change``; anything unreadable asks for a reload."""
    try:
        doc = json.loads(payload)
        if not isinstance(doc, dict):
            return ChangeKeys(reload=True)
        origins = frozenset([str(doc.get("o", ""))])
        if doc.get("reload"):
            return ChangeKeys(reload=True, origins=origins)
        return ChangeKeys(
            origins=origins,
            cns=frozenset(str(u) for u in doc.get("c", ())),
            vnics=frozenset((int(m), int(n), str(ip)) for m, n, ip in doc.get("v", ())),
            routes=frozenset((int(a), int(b), str(c), str(d)) for a, b, c, d in doc.get("r", ())),
        )
    except (ValueError, TypeError):
        log.warning("unreadable changes payload %r: reloading the index", payload[:200])
        return ChangeKeys(reload=True)


def merge(keys: Iterable[ChangeKeys]) -> ChangeKeys:
    origins: set[str] = set()
    cns: set[str] = set()
    vnics: set[tuple[int, int, str]] = set()
    routes: set[tuple[int, int, str, str]] = set()
    for k in keys:
        origins |= k.origins
        if k.reload:
            return ChangeKeys(reload=True, origins=frozenset(origins))
        cns |= k.cns
        vnics |= k.vnics
        routes |= k.routes
    return ChangeKeys(
        False, frozenset(origins), frozenset(cns), frozenset(vnics), frozenset(routes)
    )


# -- the listener -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenerEvent:
    """``connected`` (LISTEN is active), ``notify`` (payload = the version), ``lost`` (error)."""

    kind: Literal["connected", "notify", "lost"]
    payload: str = ""


def listen_blocking(
    url: str,
    deliver: Callable[[ListenerEvent], None],
    stop: threading.Event,
    *,
    channel: str = CHANNEL,
    poll: float = 0.5,
    ping_every: float = 5.0,
    connect_timeout: int = 2,
) -> None:
    """Connect, LISTEN and hand every notification to ``deliver`` until ``stop`` is set.

    Blocking; runs in a worker thread. Raises ``StoreUnavailable`` when the connection cannot
    be made or is lost.
    """
    import psycopg

    from .postgres import STATEMENT_WAIT, TCP_USER_TIMEOUT_MS, BoundedConnection, unreachable

    try:
        conn = BoundedConnection.connect(
            url,
            autocommit=True,
            connect_timeout=connect_timeout,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            tcp_user_timeout=TCP_USER_TIMEOUT_MS,
            application_name="portolan-listen",
        )
    except psycopg.Error as exc:
        raise unreachable(exc, url) from exc
    # LISTEN and the idle ping get an answer within STATEMENT_WAIT or the server counts as hung
    # (notifies() keeps its own shorter poll timeout).
    conn.wait_limit = STATEMENT_WAIT
    try:
        conn.execute(f'LISTEN "{channel}"')
        deliver(ListenerEvent("connected"))
        last_traffic = time.monotonic()
        while not stop.is_set():
            for note in conn.notifies(timeout=poll):
                deliver(ListenerEvent("notify", note.payload))
                last_traffic = time.monotonic()
                if stop.is_set():
                    return
            if time.monotonic() - last_traffic >= ping_every:
                conn.execute("SELECT 1")
                last_traffic = time.monotonic()
    except psycopg.Error as exc:
        raise unreachable(exc, url) from exc
    finally:
        try:
            conn.close()
        except Exception:
            pass


async def listen(
    url: str,
    send: trio.MemorySendChannel[ListenerEvent],
    *,
    channel: str = CHANNEL,
    backoff_initial: float = 0.1,
    backoff_max: float = 5.0,
    backoff_answered: float = 1.0,
    poll: float = 0.5,
) -> None:
    """Keep a LISTEN connection open forever, reporting events on ``send``.

    Reconnect delays double from ``backoff_initial``; they stop at ``backoff_answered`` while
    the failures come back fast (the server answers TCP: connection refused, "starting up",
    "shutting down"), since retrying costs it nothing and a restarted server must be noticed
    within about a second; only attempts that time out (nothing answers) grow the delay to
    ``backoff_max``.

    Events that do not fit in ``send``'s buffer are dropped (a ``notify`` only means "catch
    up", and the consumer catches up on anything queued before it); ``connected``/``lost``
    are always delivered.
    """
    token = trio.lowlevel.current_trio_token()
    limiter = trio.CapacityLimiter(1)
    delay = backoff_initial

    def put(ev: ListenerEvent) -> None:
        nonlocal delay
        if ev.kind == "connected":
            delay = backoff_initial
        try:
            send.send_nowait(ev)
        except trio.WouldBlock:
            if ev.kind != "notify":
                raise
            # dropped: the notifications already queued make the consumer catch up

    while True:
        stop = threading.Event()

        def deliver(ev: ListenerEvent, stop: threading.Event = stop) -> None:
            try:
                trio.from_thread.run_sync(put, ev, trio_token=token)
            except BaseException:  # the run is over, or we were abandoned: stop quietly
                stop.set()

        error = "connection closed"
        started = trio.current_time()
        try:
            await trio.to_thread.run_sync(
                partial(listen_blocking, url, deliver, stop, channel=channel, poll=poll),
                abandon_on_cancel=True,
                limiter=limiter,
            )
        except StoreUnavailable as exc:
            error = exc.message
        finally:
            stop.set()
        log.warning("LISTEN %s: %s; reconnecting in %.1fs", channel, error, delay)
        await send.send(ListenerEvent("lost", error))
        await trio.sleep(delay)
        answered = trio.current_time() - started < FAST_FAILURE
        cap = min(backoff_answered, backoff_max) if answered else backoff_max
        delay = min(delay * 2, cap) if math.isfinite(delay) else cap


__all__ = [
    "CHANNEL",
    "MAX_KEYS",
    "ChangeKeys",
    "ListenerEvent",
    "decode_change",
    "encode_change",
    "listen",
    "listen_blocking",
    "merge",
]
