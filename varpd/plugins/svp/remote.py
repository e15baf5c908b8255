"""A remote: one SVP service (hostname, port) as seen by one underlay IP, shared by instances.

All svp instances of a daemon with the same (``svp/host``, ``svp/port``, ``svp/underlay_ip``)
share one `Remote`, found in ``host.shared`` under `remote_key`. Instances attach by vnet id
(two instances of one vnet on one remote are refused). The remote owns, inside one cancel scope
running in the daemon's nursery:

- the resolver loop: ``getaddrinfo(hostname)`` at start and every ``resolve_interval`` (30 s);
  one `Connection` per address; a connection whose address left DNS winds down. Transient
  resolver errors (EAI_AGAIN/MEMORY/SYSTEM) are retried after ``dns_retry``; lasting ones,
  or an empty answer, degrade the remote with "failed to resolve or find entries for hostname
  <h>" (existing connections are kept).
- the log poller (`varpd.plugins.svp.shootdown.LogPoller`).

Degrading (spec §4.6): DNS_FAIL outranks REMOTE_FAIL ("cannot reach any remote peers", set
when every connection is degraded). The most severe message is pushed to every attached
instance with ``host.degrade(msg)``; ``host.restore()`` when none is left. An instance that
attaches while the remote is degraded is told at once.

Queries (`query`): pick an ACTIVE connection round-robin. When none is active, wait up to
``connect_wait`` (5 s) for one instead of failing at once (illumos fails at once). When the
connection is reset under a query, retry it on whichever connection is active next, at most
``retries`` (2) more times (illumos fails every query in flight). So a lookup costs at most
about ``(retries + 1) * (connect_wait + query_timeout)`` in the worst case, and usually a
round trip.
"""

from __future__ import annotations

import logging
import math
import socket
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from typing import Any

import trio
from prometheus_client import Counter

from protocol.addr import V4_MAPPED_PREFIX, ip_to_wire
from protocol.svp import (
    LogAck,
    LogRemove,
    LogRemoveAck,
    LogRequest,
    Message,
    Status,
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
    VL3Type,
)
from protocol.svp_ext import CAP_LOG_WAIT, LogWait
from varpd.plugins.svp.conn import (
    BACKOFF_TABLE,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_QUERY_TIMEOUT,
    DEGRADE_AFTER,
    Connection,
    ConnectionLost,
    ConnState,
    IPAddress,
    NoConnection,
    Opener,
    QueryFailed,
    SvpError,
)

log = logging.getLogger("varpd.plugins.svp")

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

DNS_FAIL_MESSAGE = "failed to resolve or find entries for hostname {host}"
REMOTE_FAIL_MESSAGE = "cannot reach any remote peers"

_TRANSIENT_EAI = frozenset(
    getattr(socket, name)
    for name in ("EAI_AGAIN", "EAI_MEMORY", "EAI_SYSTEM")
    if hasattr(socket, name)
)
# After this many transient failures in a row the resolver is considered failed as well.
_TRANSIENT_LIMIT = 5


@dataclass(frozen=True)
class SvpOptions:
    """Tunables of the svp client (not properties: illumos' property set is kept as is).

    The daemon may set ``host.shared["svp:options"]`` to an `SvpOptions` (or a dict of its
    fields); a plugin constructed with ``options=`` uses those instead.
    """

    query_timeout: float = DEFAULT_QUERY_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    connect_wait: float = 5.0
    retries: int = 2
    log_interval: float = 0.25
    log_count: int = 1024
    resolve_interval: float = 30.0
    dns_retry: float = 1.0
    backoff: tuple[float, ...] = BACKOFF_TABLE
    degrade_after: int = DEGRADE_AFTER
    version: int = 1
    #: wait for shootdowns with LOG_WAIT when the server offers it (protocol.svp_ext);
    #: False: never send the HELLO probe, poll LOG_REQ every ``log_interval`` as before
    log_wait: bool = True
    #: how long each LOG_WAIT may be held (the server may grant less)
    log_wait_time: float = 55.0
    #: each backoff wait is drawn from [(1 - jitter) * wait, wait]
    backoff_jitter: float = 0.5
    #: a healthy connection that was reset reconnects after U(0, spread) s (not at once), so
    #: a restarted portolan does not get every node's connect in the same instant
    reconnect_spread: float = 0.5
    opener: Opener | None = None
    resolver: Resolver | None = None

    @classmethod
    def coerce(cls, value: object) -> SvpOptions:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"svp options must be SvpOptions or a dict, not {type(value).__name__}")


async def resolve_host(hostname: str, port: int) -> list[IPAddress]:
    """Every IPv4/IPv6 address of ``hostname``, in resolver order, without duplicates."""
    infos = await trio.socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    out: dict[IPAddress, None] = {}
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        addr = ip_address(str(sockaddr[0]).split("%", 1)[0])
        if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        out[addr] = None
    return list(out)


def remote_key(hostname: str, port: int, underlay_ip: str) -> str:
    return f"svp:remote:{hostname}:{port}:{underlay_ip}"


# --------------------------------------------------------------------------- metrics

_QUERY_COUNTERS: weakref.WeakKeyDictionary[Any, Counter] = weakref.WeakKeyDictionary()


class SvpMetrics:
    """The svp plugin's view of ``host.metrics``; every method is a no-op without it."""

    def __init__(self, metrics: Any) -> None:
        self._metrics = metrics
        self._conns = getattr(metrics, "svp_connections", None)
        self._shootdowns = getattr(metrics, "svp_shootdowns", None)
        self._queries: Counter | None = None
        registry = getattr(metrics, "registry", None)
        if registry is not None:
            try:
                counter = _QUERY_COUNTERS.get(registry)
                if counter is None:
                    counter = Counter(
                        "varpd_svp_queries",
                        "SVP queries sent by the svp plugin, by op and result",
                        ["op", "result"],
                        registry=registry,
                    )
                    _QUERY_COUNTERS[registry] = counter
                self._queries = counter
            except Exception as exc:  # never let metrics break lookups
                log.debug("svp query counter unavailable: %s", exc)

    def connections(self, remote: str, counts: dict[str, int]) -> None:
        if self._conns is None:
            return
        for state in ConnState:
            if state is ConnState.CLOSED:
                continue
            self._conns.labels(remote=remote, state=state.value).set(counts.get(state.value, 0))

    def forget(self, remote: str) -> None:
        self.connections(remote, {})

    def shootdown(self, kind: str) -> None:
        if self._shootdowns is not None:
            self._shootdowns.labels(type=kind).inc()

    def query(self, op: str, result: str) -> None:
        if self._queries is not None:
            self._queries.labels(op=op, result=result).inc()


_OP_LABEL = {VL2Request: "vl2", VL3Request: "vl3", LogRequest: "log", LogRemove: "log_rm"}


def _result_label(reply: Message) -> str:
    status = getattr(reply, "status", 0)
    if status == Status.OK:
        return "ok"
    if status == Status.NOTFOUND:
        return "notfound"
    return "fatal"


# --------------------------------------------------------------------------- the remote


class Remote:
    """The shared client side of one SVP service; see the module docstring."""

    def __init__(
        self,
        hostname: str,
        port: int,
        underlay_ip: str,
        options: SvpOptions | None = None,
        *,
        metrics: Any = None,
    ) -> None:
        self.hostname = hostname
        self.port = port
        self.underlay_ip = underlay_ip
        self.underlay_ip16 = ip_to_wire(underlay_ip)
        self.options = options or SvpOptions()
        self.metrics = SvpMetrics(metrics)
        self.label = f"{hostname}:{port}"
        self.hosts: dict[int, Any] = {}  # vnet_id -> PluginHost
        self.conns: dict[IPAddress, Connection] = {}
        self.winding: set[Connection] = set()
        self.addresses: list[IPAddress] = []
        self.dns_failed = False
        self.remote_failed = False
        self._message: str | None = None
        self._changed = trio.Event()
        self._rr = 0
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._finished = trio.Event()
        self._resolved = trio.Event()
        self._transient = 0

    def __repr__(self) -> str:
        return f"<svp Remote {self.label} underlay {self.underlay_ip}>"

    # ---------------------------------------------------------------- instances

    def attach(self, host: Any) -> None:
        vnet_id = host.vnet_id
        if vnet_id in self.hosts and self.hosts[vnet_id] is not host:
            raise ValueError(
                f"vnet {vnet_id} already has an svp instance on {self.label} "
                f"(underlay {self.underlay_ip})"
            )
        self.hosts[vnet_id] = host
        if self._message is not None:
            host.degrade(self._message)

    def detach(self, host: Any) -> bool:
        """Forget ``host``; True when no instance is left."""
        if self.hosts.get(host.vnet_id) is host:
            del self.hosts[host.vnet_id]
        return not self.hosts

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resolve, connect and poll the log until `aclose` (or cancellation)."""
        from varpd.plugins.svp.shootdown import LogPoller

        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._resolve_loop)
                    nursery.start_soon(LogPoller(self).run)
                    task_status.started()
        finally:
            self._nursery = None
            for conn in [*self.conns.values(), *self.winding]:
                conn.close()
            self.metrics.forget(self.label)
            self._finished.set()

    async def aclose(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            await self._finished.wait()

    # ---------------------------------------------------------------- DNS

    async def _resolve(self) -> list[IPAddress]:
        resolver = self.options.resolver
        if resolver is None:
            resolver = resolve_host  # looked up at call time, so tests can monkeypatch it
        return await resolver(self.hostname, self.port)

    async def _resolve_loop(self) -> None:
        while True:
            wait = self.options.resolve_interval
            try:
                addrs = await self._resolve()
            except (socket.gaierror, OSError) as exc:
                code = exc.errno if isinstance(exc, socket.gaierror) else None
                if code in _TRANSIENT_EAI and self._transient < _TRANSIENT_LIMIT:
                    self._transient += 1
                    log.info("svp %s: resolver busy (%s), retrying", self.label, exc)
                    wait = self.options.dns_retry
                else:
                    log.warning("svp %s: cannot resolve %s: %s", self.label, self.hostname, exc)
                    self._set_dns_failed(True)
            except Exception as exc:  # e.g. UnicodeError for a name IDNA cannot encode
                log.warning("svp %s: cannot resolve %r: %r", self.label, self.hostname, exc)
                self._set_dns_failed(True)
            else:
                self._transient = 0
                if not addrs:
                    log.warning("svp %s: %s has no addresses", self.label, self.hostname)
                    self._set_dns_failed(True)
                else:
                    self._set_dns_failed(False)
                    self._apply_addresses(addrs)
            self._resolved.set()
            await trio.sleep(wait)

    def _apply_addresses(self, addrs: list[IPAddress]) -> None:
        self.addresses = list(addrs)
        wanted = set(addrs)
        for addr in list(self.conns):
            if addr not in wanted:
                conn = self.conns.pop(addr)
                log.info("svp %s: %s left DNS, winding down", self.label, conn.label)
                self.winding.add(conn)
                conn.wind_down()
        for addr in addrs:
            if addr not in self.conns:
                conn = self._new_connection(addr)
                self.conns[addr] = conn
                assert self._nursery is not None
                self._nursery.start_soon(self._run_connection, conn)
        self._update()

    def _new_connection(self, addr: IPAddress) -> Connection:
        o = self.options
        return Connection(
            addr,
            self.port,
            on_change=self._on_conn_change,
            opener=o.opener,
            query_timeout=o.query_timeout,
            connect_timeout=o.connect_timeout,
            backoff=o.backoff,
            degrade_after=o.degrade_after,
            version=o.version,
            probe_ext=o.log_wait,
            backoff_jitter=o.backoff_jitter,
            reconnect_spread=o.reconnect_spread,
        )

    async def _run_connection(self, conn: Connection) -> None:
        try:
            await conn.run()
        finally:
            self.winding.discard(conn)
            if self.conns.get(conn.addr) is conn:
                del self.conns[conn.addr]
            self._update()

    # ---------------------------------------------------------------- degrade

    def _on_conn_change(self, conn: Connection) -> None:
        self._update()

    def _set_dns_failed(self, failed: bool) -> None:
        if failed != self.dns_failed:
            self.dns_failed = failed
            self._update()

    def _update(self) -> None:
        conns = list(self.conns.values())
        if conns and all(c.degraded for c in conns):
            self.remote_failed = True
        elif any(c.state is ConnState.ACTIVE for c in conns) or not conns:
            self.remote_failed = False
        if self.dns_failed:
            message: str | None = DNS_FAIL_MESSAGE.format(host=self.hostname)
        elif self.remote_failed:
            message = REMOTE_FAIL_MESSAGE
        else:
            message = None
        if message != self._message:
            self._message = message
            for host in list(self.hosts.values()):
                try:
                    if message is None:
                        host.restore()
                    else:
                        host.degrade(message)
                except Exception as exc:  # an instance going away must not stop the others
                    log.warning("svp %s: cannot update %s: %s", self.label, host, exc)
        counts: dict[str, int] = {}
        for conn in [*conns, *self.winding]:
            counts[conn.state.value] = counts.get(conn.state.value, 0) + 1
        self.metrics.connections(self.label, counts)
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_changed(self, deadline: float = math.inf) -> None:
        """Return when the connection set next changes state, or at ``deadline``."""
        changed = self._changed
        with trio.move_on_at(deadline):
            await changed.wait()

    @property
    def degrade_message(self) -> str | None:
        return self._message

    # ---------------------------------------------------------------- queries

    def _pick(self) -> Connection | None:
        active = [c for c in self.conns.values() if c.usable]
        if not active:
            return None
        self._rr = (self._rr + 1) % len(active)
        return active[self._rr]

    async def wait_active(self, timeout: float = math.inf) -> Connection:
        """An ACTIVE connection, waiting up to ``timeout`` s; `NoConnection` otherwise."""
        deadline = trio.current_time() + timeout
        while True:
            conn = self._pick()
            if conn is not None:
                return conn
            if trio.current_time() >= deadline:
                raise NoConnection(f"no connection to {self.label} is up")
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()

    async def query(self, request: Message) -> Message:
        """Send ``request`` on an active connection and return its reply (see docstring).

        Raises `NoConnection`, `ConnectionLost` (retries exhausted) or `QueryFailed`.
        """
        op = _OP_LABEL.get(type(request), "other")
        attempt = 0
        while True:
            try:
                conn = await self.wait_active(self.options.connect_wait)
            except NoConnection:
                self.metrics.query(op, "no_connection")
                raise
            try:
                reply = await conn.query(request)
            except ConnectionLost:
                attempt += 1
                if attempt > self.options.retries:
                    self.metrics.query(op, "lost")
                    raise
                log.debug("svp %s: retrying %s (attempt %d)", self.label, op, attempt + 1)
                continue
            except QueryFailed:
                self.metrics.query(op, "bad_reply")
                raise
            self.metrics.query(op, _result_label(reply))
            return reply

    async def vl2(self, mac: bytes, vnet_id: int) -> VL2Ack:
        reply = await self.query(VL2Request(0, mac, vnet_id))
        assert isinstance(reply, VL2Ack)
        return reply

    async def vl3(self, ip16: bytes, vnet_id: int) -> VL3Ack:
        ip_type = VL3Type.IP if ip16[:12] == V4_MAPPED_PREFIX else VL3Type.IPV6
        reply = await self.query(VL3Request(0, ip16, int(ip_type), vnet_id))
        assert isinstance(reply, VL3Ack)
        return reply

    async def log_request(self, count: int) -> LogAck:
        reply = await self.query(LogRequest(0, count, self.underlay_ip16))
        assert isinstance(reply, LogAck)
        return reply

    def wait_connection(self) -> Connection | None:
        """A usable connection whose server granted LOG_WAIT, or None."""
        for conn in self.conns.values():
            if conn.usable and conn.caps is not None and conn.caps & CAP_LOG_WAIT:
                return conn
        return None

    def probing(self) -> bool:
        """True while a usable connection has not had its extension probe answered."""
        return any(c.usable and c.caps is None for c in self.conns.values())

    async def log_wait(self, conn: Connection, count: int, wait: float) -> LogAck:
        """LOG_WAIT on ``conn`` (which granted it); no retry elsewhere: the poller decides."""
        wait_ms = max(0, min(int(wait * 1000), int(conn.max_wait * 1000) or int(wait * 1000)))
        try:
            reply = await conn.query(LogWait(0, count, self.underlay_ip16, wait_ms))
        except ConnectionLost:
            self.metrics.query("log_wait", "lost")
            raise
        except QueryFailed:
            self.metrics.query("log_wait", "bad_reply")
            raise
        self.metrics.query("log_wait", _result_label(reply))
        assert isinstance(reply, LogAck)
        return reply

    async def log_remove(self, ids: tuple[bytes, ...]) -> LogRemoveAck:
        reply = await self.query(LogRemove(0, ids))
        assert isinstance(reply, LogRemoveAck)
        return reply

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, object]:
        """A msgpack-friendly summary for ``varpdadm show``."""
        return {
            "remote": self.label,
            "underlay_ip": self.underlay_ip,
            "addresses": [str(a) for a in self.addresses],
            "degraded": self._message,
            "connections": [
                {
                    "address": c.label,
                    "state": c.state.value,
                    "failures": c.failures,
                    "degraded": c.degraded,
                    "outstanding": c.outstanding,
                    "last_error": c.last_error,
                }
                for c in [*self.conns.values(), *self.winding]
            ],
        }


__all__ = [
    "DNS_FAIL_MESSAGE",
    "REMOTE_FAIL_MESSAGE",
    "ConnectionLost",
    "NoConnection",
    "QueryFailed",
    "Remote",
    "Resolver",
    "SvpError",
    "SvpMetrics",
    "SvpOptions",
    "remote_key",
    "resolve_host",
]
