"""The control socket: a Unix stream socket speaking `protocol.control` frames.

One task per connection reads requests in order and answers each before reading the next
(varpdadm sends one request per connection; a client may pipeline). Ops and their args:

    ping                                   -> daemon info
    list                                   -> [instance summary]
    show        {name}                     -> instance detail (props, device status, VNICs)
    create      {name, vnetid, search, mtu?, props?}
    set         {name, props}
    activate    {name}
    delete      {name}
    cache_list  {name}          cache_get {name, mac}          cache_set {name, mac, dest}
    cache_rm    {name, mac}     cache_flush {name}
    vnic_add    {name, mac, vlan?, tap?}   vnic_rm {name, mac}   vnic_list {name}
    plugins                                -> {name: [prop specs]}
    firewall                               -> fetcher state, policy generation, per-VNIC rules

Errors are replies ``{ok: false, error: {code, message, field}}`` with codes ``bad_request``,
``not_found``, ``exists``, ``invalid``, ``read_only``, ``not_ready``, ``busy``, ``in_use``,
``unsupported``, ``plugin_error``, ``internal``. A frame that is not a control message closes
the connection. The socket file is created mode 0660 (its folder 0755 if varpd makes it); a
stale file is replaced, a live one (another varpd answers on it) is refused.

Bounds: at most `MAX_CONNECTIONS` connections are served at once (one more is accepted and
closed straight away), and a connection that has not delivered a whole request within
`IDLE_TIMEOUT` seconds of opening or of its previous reply is closed. With the decoder's 1 MiB
frame limit, that bounds what clients can make varpd hold (64 MiB) and for how long (30 s).
Closed connections are counted in ``varpd_control_connections_closed{reason}`` (``limit``,
``idle``, ``protocol``) and logged at most once a minute per reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from protocol.control import (
    ControlProtocolError,
    Decoder,
    ErrorInfo,
    Reply,
    Request,
    encode_reply,
)
from varpd.instance import VarpdError
from varpd.plugins import PLUGINS

if TYPE_CHECKING:
    from varpd.daemon import Varpd

log = logging.getLogger("varpd.control")

MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 30.0
_LOG_EVERY = 60.0

Handler = Callable[["Varpd", dict[str, Any]], Awaitable[Any]]


def _arg(
    args: dict[str, Any],
    key: str,
    kind: type | tuple[type, ...] = str,
    required: bool = True,
    default: Any = None,
) -> Any:
    if key not in args or args[key] is None:
        if required:
            raise VarpdError("bad_request", f"argument {key!r} is required", key)
        return default
    value = args[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise VarpdError("bad_request", f"argument {key!r} has the wrong type", key)
    return value


async def _ping(v: Varpd, a: dict[str, Any]) -> Any:
    return v.info()


async def _list(v: Varpd, a: dict[str, Any]) -> Any:
    return v.list()


async def _show(v: Varpd, a: dict[str, Any]) -> Any:
    return v.show(_arg(a, "name"))


async def _create(v: Varpd, a: dict[str, Any]) -> Any:
    return await v.create(
        _arg(a, "name"),
        _arg(a, "vnetid", (int, str)),
        _arg(a, "search"),
        _arg(a, "mtu", (int, str), required=False),
        _arg(a, "props", dict, False, {}),
    )


async def _set(v: Varpd, a: dict[str, Any]) -> Any:
    return await v.set_props(_arg(a, "name"), _arg(a, "props", dict))


async def _activate(v: Varpd, a: dict[str, Any]) -> Any:
    return await v.activate(_arg(a, "name"))


async def _delete(v: Varpd, a: dict[str, Any]) -> Any:
    await v.delete(_arg(a, "name"))
    return None


async def _cache_list(v: Varpd, a: dict[str, Any]) -> Any:
    return v.cache_list(_arg(a, "name"))


async def _cache_get(v: Varpd, a: dict[str, Any]) -> Any:
    return v.cache_get(_arg(a, "name"), _arg(a, "mac"))


async def _cache_set(v: Varpd, a: dict[str, Any]) -> Any:
    return v.cache_set(_arg(a, "name"), _arg(a, "mac"), _arg(a, "dest"))


async def _cache_rm(v: Varpd, a: dict[str, Any]) -> Any:
    v.cache_remove(_arg(a, "name"), _arg(a, "mac"))
    return None


async def _cache_flush(v: Varpd, a: dict[str, Any]) -> Any:
    v.cache_flush(_arg(a, "name"))
    return None


async def _vnic_add(v: Varpd, a: dict[str, Any]) -> Any:
    return await v.vnic_add(
        _arg(a, "name"),
        _arg(a, "mac"),
        _arg(a, "vlan", (int, str), False, 0),
        _arg(a, "tap", str, False),
    )


async def _vnic_rm(v: Varpd, a: dict[str, Any]) -> Any:
    await v.vnic_remove(_arg(a, "name"), _arg(a, "mac"))
    return None


async def _vnic_list(v: Varpd, a: dict[str, Any]) -> Any:
    return v.vnic_list(_arg(a, "name"))


async def _plugins(v: Varpd, a: dict[str, Any]) -> Any:
    out = {}
    for name in PLUGINS.available():
        cls = PLUGINS[name]
        out[name] = {"mode": cls.mode.name.lower(), "props": [s.describe() for s in cls.props]}
    return out


async def _firewall(v: Varpd, a: dict[str, Any]) -> Any:
    if v.kernel_firewall is not None:
        try:
            await v.kernel_firewall.read_now()
        except Exception as exc:  # noqa: BLE001 - the last counters read are still shown
            log.warning("kernel firewall counters: %s", exc)
    return v.firewall_status()


OPS: dict[str, Handler] = {
    "ping": _ping,
    "list": _list,
    "show": _show,
    "create": _create,
    "set": _set,
    "activate": _activate,
    "delete": _delete,
    "cache_list": _cache_list,
    "cache_get": _cache_get,
    "cache_set": _cache_set,
    "cache_rm": _cache_rm,
    "cache_flush": _cache_flush,
    "vnic_add": _vnic_add,
    "vnic_rm": _vnic_rm,
    "vnic_list": _vnic_list,
    "plugins": _plugins,
    "firewall": _firewall,
}


async def dispatch(varpd: Varpd, req: Request) -> Reply:
    """Run one request; every failure becomes an error reply."""
    handler = OPS.get(req.op)
    if handler is None:
        return Reply(req.id, False, error=ErrorInfo("bad_request", f"unknown op {req.op!r}"))
    try:
        result = await handler(varpd, req.args)
    except VarpdError as exc:
        return Reply(req.id, False, error=ErrorInfo(exc.code, exc.message, exc.field))
    except Exception as exc:
        log.exception("control op %s failed", req.op)
        return Reply(req.id, False, error=ErrorInfo("internal", f"internal error: {exc}"))
    return Reply(req.id, True, result)


class _Closures:
    """Counts connections varpd closed on its own (metric + rate-limited log line)."""

    def __init__(self, varpd: Varpd) -> None:
        self.counts: dict[str, int] = {}
        self._logged: dict[str, float] = {}
        metrics = getattr(varpd, "metrics", None)
        self._counter: Any = None
        if metrics is not None:
            self._counter = getattr(metrics, "control_closed", None)
            if self._counter is None:
                from prometheus_client import Counter

                self._counter = Counter(
                    "varpd_control_connections_closed",
                    "Control connections varpd closed: limit, idle or protocol",
                    ["reason"],
                    registry=metrics.registry,
                )
                metrics.control_closed = self._counter

    def closed(self, reason: str, message: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self._counter is not None:
            self._counter.labels(reason=reason).inc()
        now = trio.current_time()
        last = self._logged.get(reason)
        if last is None or now - last >= _LOG_EVERY:
            self._logged[reason] = now
            log.warning("control connection closed: %s (%d so far)", message, self.counts[reason])


async def handle_connection(
    varpd: Varpd,
    stream: trio.SocketStream,
    idle_timeout: float = IDLE_TIMEOUT,
    closures: _Closures | None = None,
) -> None:
    decoder = Decoder()
    closures = closures or _Closures(varpd)
    try:
        while True:
            msg = None
            with trio.move_on_after(idle_timeout):
                while msg is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    decoder.receive_data(data)
                    msg = decoder.next_message()
            if msg is None:
                closures.closed(
                    "idle",
                    f"no whole request within {idle_timeout:g} s "
                    f"({decoder.buffered} bytes pending)",
                )
                return
            while msg is not None:
                if not isinstance(msg, Request):
                    raise ControlProtocolError("clients send requests, not replies")
                reply = await dispatch(varpd, msg)
                try:
                    frame = encode_reply(reply)
                except Exception as exc:  # too big, or a result msgpack cannot carry
                    log.error("control op %s: cannot encode the reply: %s", msg.op, exc)
                    frame = encode_reply(
                        Reply(msg.id, False, error=ErrorInfo("internal", str(exc)))
                    )
                with trio.move_on_after(idle_timeout) as sending:
                    await stream.send_all(frame)
                if sending.cancelled_caught:
                    closures.closed("idle", f"reply not read within {idle_timeout:g} s")
                    return
                msg = decoder.next_message()
    except ControlProtocolError as exc:
        closures.closed("protocol", str(exc))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _socket_is_live(path: str) -> bool:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        with trio.move_on_after(1):
            await sock.connect(path)
            return True
        return False
    except OSError:
        return False
    finally:
        sock.close()


async def check_control_socket(path: str) -> None:
    """Raise OSError if ``path`` is a live varpd socket or not a socket at all."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"control socket path {path} exists and is not a socket")
        if await _socket_is_live(path):
            raise OSError(f"control socket {path} is in use by another varpd")


async def serve_control(
    varpd: Varpd,
    path: str,
    *,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = IDLE_TIMEOUT,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on the Unix socket ``path`` until cancelled; ``started`` with the path.

    At most ``max_connections`` are served at once; each must send a whole request within
    ``idle_timeout`` seconds (see the module docstring)."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o755, exist_ok=True)
    await check_control_socket(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o660)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    listener = trio.SocketListener(sock)
    closures = _Closures(varpd)
    active = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal active
        try:
            await handle_connection(varpd, stream, idle_timeout, closures)
        finally:
            active -= 1

    try:
        task_status.started(path)
        async with listener, trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: wait, do not spin
                    log.error("control socket accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                if active >= max_connections:
                    closures.closed("limit", f"{max_connections} connections already open")
                    await trio.aclose_forcefully(stream)
                    continue
                active += 1
                nursery.start_soon(handler, stream)
    finally:
        with contextlib.suppress(OSError):
            if os.path.exists(path):
                os.unlink(path)
