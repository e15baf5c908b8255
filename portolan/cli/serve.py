"""``portolan serve``: open the store, load the index, start every listener, wait for a signal.

Task tree (one trio run, no threads but the store's bounded worker threads)::

    run (before trio)                  check the command line; raise the open-file limit;
                                       bind-probe every listener (nothing opened on failure)
    serve_portolan
      Directory.open(store)            store -> index (logged: which store, what it holds)
      nursery
        SvpServer.serve                trio.serve_tcp, one task per SVP connection
        portolan.api.serve_api         hypercorn on trio (when portolan.api is importable)
        serve_metrics                  /metrics responder
        follow_store                   reloads the index after writes by other processes
        Coherence.run (PostgreSQL)     LISTEN/NOTIFY + changes feed, instead of follow_store
      READY line on stdout once the three are bound (stdout only; the log says "listening")

Start-up refusals are one line on stderr and exit 2: a malformed command line, an unsafe API
address, or a listener that cannot bind (``svp listener 0.0.0.0:1296: address already in use``).
The listeners are probed (bound and released, all at once, so two listeners on one address
are caught too) before the store is opened, so a refused start leaves no new store file. A
listener that still fails to bind for real afterwards (another process took the port in
between) is reported the same way.

File descriptors: the soft RLIMIT_NOFILE is raised to the hard limit at start (logged), and
SVP connections are capped (``--svp-max-connections``, default: the limit minus a reserve of
max(128, limit/10) for the API, /metrics, the store and the log). Past the cap the SVP server
accepts and closes (see portolan.svp_server); trio's own "accept returned EMFILE" log line,
should the process still run out, is rate-limited to one per 10 s.

The management API gets an access log at INFO on ``portolan.api.access``: one line per request
with the method, path, status and milliseconds (the API itself is portolan.api's).

Coherence with writers outside this process: the Directory updates the index itself after its
own commits. On SQLite, a write by another process (``portolan load`` against the same file)
is noticed by `follow_store`, which compares the store's change counter with the index's every
``--reload-interval`` seconds (default 1) and reloads the whole index when the store is ahead.
On PostgreSQL (several instances may share the database) `portolan.coherence.Coherence`
runs instead: LISTEN/NOTIFY plus the changes feed, applying other instances' changes key by
key as they commit (``--reload-interval`` is not used).

SIGINT/SIGTERM cancel the nursery; the Directory is closed on the way out and the process exits
0. The API on a non-loopback address without a token is refused before anything is opened
(exit 2): an open management API on the network is never what an operator meant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, TypeVar

import trio

from portolan.cli import format_hostport, is_loopback_host, parse_hostport
from portolan.metrics import PortolanMetrics, serve_metrics
from portolan.ratelimit import RateLimitFilter
from portolan.store import check_url, redact_url
from portolan.svp_server import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FRAME, SvpServer

log = logging.getLogger("portolan.serve")
access_log = logging.getLogger("portolan.api.access")
E = TypeVar("E", bound=BaseException)

DEFAULT_STORE = "sqlite:./portolan.db"
DEFAULT_SVP_LISTEN = "0.0.0.0:1296"
DEFAULT_API_LISTEN = "127.0.0.1:1280"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9296"
DEFAULT_RELOAD_INTERVAL = 1.0
#: descriptors kept for everything but SVP connections: at least this many, or a tenth
FD_RESERVE_MIN = 128
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


@dataclass(frozen=True, slots=True)
class ServeConfig:
    store: str = DEFAULT_STORE
    svp: tuple[str, int] = ("0.0.0.0", 1296)
    api: tuple[str, int] = ("127.0.0.1", 1280)
    metrics: tuple[str, int] = ("127.0.0.1", 9296)
    api_token: str | None = field(default=None, repr=False)
    api_max_body: int = 1 << 20
    svp_max_frame: int = DEFAULT_MAX_FRAME
    svp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    reload_interval: float = DEFAULT_RELOAD_INTERVAL
    svp_max_connections: int | None = None  # None: from the open-file limit at start


class ConfigRefused(Exception):
    """The command line asks for something unsafe or malformed (exit 2)."""


class ListenerFailed(Exception):
    """A listener cannot bind (exit 2); the message names it: ``svp listener H:P: why``."""

    def __init__(self, name: str, address: tuple[str, int], reason: str) -> None:
        super().__init__(f"{name} listener {format_hostport(*address)}: {reason}")
        self.name = name
        self.address = address


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the SVP server, the management API and /metrics",
        description="Run portolan: the SVP lookup server, the management API and /metrics. "
        "Prints 'READY svp=H:P api=H:P metrics=H:P' on stdout once every listener is bound.",
    )
    p.add_argument(
        "--store",
        default=os.environ.get("PORTOLAN_STORE", DEFAULT_STORE),
        help=f"store URL: sqlite:PATH or postgresql://... (default {DEFAULT_STORE})",
    )
    p.add_argument(
        "--svp-listen",
        default=DEFAULT_SVP_LISTEN,
        metavar="HOST:PORT",
        help=f"SVP listener (default {DEFAULT_SVP_LISTEN}; port 0 picks a free one)",
    )
    p.add_argument(
        "--api-listen",
        default=DEFAULT_API_LISTEN,
        metavar="HOST:PORT",
        help=f"management API listener (default {DEFAULT_API_LISTEN})",
    )
    p.add_argument(
        "--api-max-body",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="largest management API request body; larger ones get 413 (default 1 MiB)",
    )
    p.add_argument(
        "--api-token",
        default=None,
        metavar="TOKEN",
        help="bearer token the API requires (default: $PORTOLAN_API_TOKEN); "
        "mandatory when the API listens on a non-loopback address",
    )
    p.add_argument(
        "--metrics-listen",
        default=DEFAULT_METRICS_LISTEN,
        metavar="HOST:PORT",
        help=f"Prometheus /metrics listener (default {DEFAULT_METRICS_LISTEN})",
    )
    p.add_argument(
        "--svp-max-frame",
        type=int,
        default=DEFAULT_MAX_FRAME,
        metavar="BYTES",
        help="largest SVP body accepted; a larger declared size closes the "
        f"connection (default {DEFAULT_MAX_FRAME})",
    )
    p.add_argument(
        "--svp-idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close an SVP connection whose frame is not complete this long after its "
        f"first byte (default {DEFAULT_IDLE_TIMEOUT:g})",
    )
    p.add_argument(
        "--svp-max-connections",
        type=int,
        default=None,
        metavar="N",
        help="most SVP connections served at once; more are accepted and closed (default: "
        f"the open-file limit minus max({FD_RESERVE_MIN}, a tenth of it), kept for the API, "
        "/metrics and the store)",
    )
    p.add_argument(
        "--log-level",
        dest="command_log_level",
        default=None,
        choices=LOG_LEVELS,
        help="log level on stderr (default INFO; the same as `portolan --log-level LEVEL serve`)",
    )
    p.add_argument(
        "--reload-interval",
        type=float,
        default=DEFAULT_RELOAD_INTERVAL,
        metavar="SECONDS",
        help="how often to look for changes written to the store by another process "
        "(e.g. `portolan load`) and reload the index; 0 turns it off "
        f"(default {DEFAULT_RELOAD_INTERVAL:g})",
    )
    p.set_defaults(func=run, default_log_level="INFO")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Validate the command line; raise ConfigRefused with an operator-facing sentence."""
    listens = {}
    for name in ("svp_listen", "api_listen", "metrics_listen"):
        text = getattr(args, name)
        try:
            listens[name] = parse_hostport(text)
        except ValueError as exc:
            raise ConfigRefused(f"--{name.replace('_', '-')}: {exc}") from None
    token = args.api_token or os.environ.get("PORTOLAN_API_TOKEN") or None
    api_host = listens["api_listen"][0]
    if token is None and not is_loopback_host(api_host):
        raise ConfigRefused(
            f"refusing to serve the management API on {args.api_listen} without a token: "
            "anyone who can reach that address could change the network. Give --api-token "
            "(or set PORTOLAN_API_TOKEN), or listen on a loopback address such as 127.0.0.1."
        )
    if args.svp_max_frame < 64:
        raise ConfigRefused("--svp-max-frame must be at least 64 bytes")
    if args.svp_idle_timeout <= 0:
        raise ConfigRefused("--svp-idle-timeout must be positive")
    if args.reload_interval < 0:
        raise ConfigRefused("--reload-interval must be 0 (off) or positive")
    max_conns = getattr(args, "svp_max_connections", None)
    if max_conns is not None and max_conns < 1:
        raise ConfigRefused("--svp-max-connections must be at least 1")
    try:
        check_url(args.store)
    except ValueError as exc:
        raise ConfigRefused(f"--store: {exc}") from None
    return ServeConfig(
        store=args.store,
        svp=listens["svp_listen"],
        api=listens["api_listen"],
        metrics=listens["metrics_listen"],
        api_token=token,
        api_max_body=args.api_max_body,
        svp_max_frame=args.svp_max_frame,
        svp_idle_timeout=args.svp_idle_timeout,
        reload_interval=args.reload_interval,
        svp_max_connections=max_conns,
    )


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; return (before, after) soft limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:  # NOFILE cannot be unlimited: the kernel's ceiling
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


def default_svp_max_connections(nofile: int) -> int:
    """SVP connections allowed under an open-file limit of ``nofile``."""
    return max(nofile - max(FD_RESERVE_MIN, nofile // 10), 16)


def probe_listeners(listeners: dict[str, tuple[str, int]]) -> None:
    """Bind every listener's address (all held at once) and release them; raise
    ListenerFailed naming the first that cannot bind. Nothing else is opened."""
    held: list[socket.socket] = []
    try:
        for name, (host, port) in listeners.items():
            try:
                infos = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            except socket.gaierror as exc:
                reason = f"cannot resolve {host!r}: {exc.strerror}"
                raise ListenerFailed(name, (host, port), reason) from None
            for family, kind, proto, _, sockaddr in infos[:1]:
                sock = socket.socket(family, kind, proto)
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(sockaddr)
                    sock.listen(1)
                except OSError as exc:
                    raise ListenerFailed(name, (host, port), _reason(exc)) from None
    finally:
        for sock in held:
            sock.close()


def _reason(exc: OSError) -> str:
    text = exc.strerror or (errno.errorcode.get(exc.errno or 0) if exc.errno else None) or str(exc)
    return text[:1].lower() + text[1:]


def _find(exc: BaseException, kind: type[E]) -> E | None:
    """The first ``kind`` exception in ``exc`` (possibly wrapped in exception groups)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError inside ``exc`` (possibly wrapped in exception groups), if any."""
    return _find(exc, OSError)


async def _start_listener(
    nursery: trio.Nursery,
    name: str,
    address: tuple[str, int],
    start: Callable[..., Awaitable[Any]],
    *args: Any,
) -> Any:
    """``nursery.start(start, *args)``, with a bind failure turned into ListenerFailed."""
    try:
        return await nursery.start(start, *args)
    except BaseException as exc:
        os_error = _os_error(exc)
        if os_error is None or isinstance(exc, trio.Cancelled):
            raise
        raise ListenerFailed(name, address, _reason(os_error)) from None


class AccessLog:
    """ASGI middleware: one INFO line per HTTP request (method, path, status, ms)."""

    def __init__(self, app: Any, logger: logging.Logger = access_log) -> None:
        self.app = app
        self.logger = logger

    def __getattr__(self, name: str) -> Any:  # the app's own attributes (state, routes...)
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not self.logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]

        async def send_noting_status(message: dict) -> None:
            if message.get("type") == "http.response.start":
                status[0] = int(message.get("status", 0))
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            client = scope.get("client")
            self.logger.info(
                "%s %s %s %.1f ms%s",
                scope.get("method", "?"),
                scope.get("path", "?"),
                status[0] or "-",
                (time.perf_counter() - started) * 1000,
                f" from {client[0]}" if client else "",
            )


def _api_module() -> ModuleType | None:
    try:
        return importlib.import_module("portolan.api")
    except ModuleNotFoundError as exc:
        if exc.name == "portolan.api":
            return None
        raise


def _make_app(
    api: ModuleType,
    directory: Any,
    token: str | None,
    metrics: PortolanMetrics,
    max_body: int = 1 << 20,
) -> Any:
    """The management API, counting its requests on our registry."""
    return AccessLog(
        api.create_app(directory, token=token, registry=metrics.registry, max_body=max_body)
    )


def _bound(started: Any, fallback: tuple[str, int]) -> tuple[str, int]:
    if isinstance(started, tuple) and len(started) >= 2:
        return str(started[0]), int(started[1])
    return fallback


async def serve_portolan(
    config: ServeConfig,
    *,
    task_status: trio.TaskStatus[dict[str, tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run portolan until cancelled; `started` with the bound address of every listener."""
    from portolan.service import Directory

    api = _api_module()
    directory = await Directory.open(config.store)
    stats = directory.index.stats()
    log.info(
        "store %s opened: %d compute nodes, %d VNICs, %d routes, version %d",
        redact_url(config.store),
        stats["cns"],
        stats["vnics"],
        stats["routes"],
        stats["version"],
    )
    try:
        metrics = PortolanMetrics()
        server = SvpServer(
            directory,
            metrics=metrics,
            max_frame=config.svp_max_frame,
            idle_timeout=config.svp_idle_timeout,
            max_connections=config.svp_max_connections,
        )
        async with trio.open_nursery() as nursery:
            bound: dict[str, tuple[str, int]] = {}
            bound["svp"] = await _start_listener(
                nursery, "svp", config.svp, server.serve, *config.svp
            )
            if api is not None:
                app = _make_app(api, directory, config.api_token, metrics, config.api_max_body)
                started = await _start_listener(
                    nursery, "api", config.api, api.serve_api, app, *config.api
                )
                bound["api"] = _bound(started, config.api)
            else:
                log.warning("portolan.api is not available: serving without the management API")
            bound["metrics"] = await _start_listener(
                nursery, "metrics", config.metrics, serve_metrics, metrics, *config.metrics
            )
            if getattr(directory.store, "dialect", "") == "postgresql":
                # other instances may share the database: follow their changes (LISTEN/NOTIFY)
                await nursery.start(start_coherence(directory, config.store).run)
            elif config.reload_interval > 0:
                nursery.start_soon(follow_store, directory, config.reload_interval)
            task_status.started(bound)
    finally:
        with trio.CancelScope(shield=True):
            await directory.aclose()


def start_coherence(directory: Any, url: str) -> Any:
    """The cross-instance coherence task of a PostgreSQL store (portolan.coherence). Remote
    changes reach the Directory's subscribers (the firewall policy service) as ``None``."""
    from portolan.coherence import Coherence

    return Coherence(directory, url)


async def follow_store(directory: Any, interval: float) -> None:
    """Reload the index when the store moved past it without this process (another process
    wrote it: ``portolan load`` on the same SQLite file, a second portolan). A write of our
    own is applied to the index right after its commit, so a version seen ahead of the index
    is re-checked a moment later before the (costly) reload."""
    while True:
        await trio.sleep(interval)
        try:
            stored = await directory.current_version()
            if stored <= directory.index.version:
                continue
            await trio.sleep(min(interval, 0.2))
            if stored <= directory.index.version:
                continue
            log.info(
                "store is at version %d, index at %d: reloading the index",
                stored,
                directory.index.version,
            )
            await directory.reload_index()
        except Exception:
            log.exception("checking the store for outside changes failed; will retry")


def ready_line(bound: dict[str, tuple[str, int]]) -> str:
    return "READY " + " ".join(f"{name}={format_hostport(*addr)}" for name, addr in bound.items())


async def _main(config: ServeConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_portolan, config)
            print(ready_line(bound), flush=True)
            log.info(
                "portolan listening: %s",
                " ".join(f"{name}={format_hostport(*addr)}" for name, addr in bound.items()),
            )
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigRefused as exc:
        print(f"portolan serve: {exc}", file=sys.stderr)
        return 2
    try:
        probe_listeners({"svp": config.svp, "api": config.api, "metrics": config.metrics})
    except ListenerFailed as exc:
        print(f"portolan serve: {exc}", file=sys.stderr)
        return 2
    before, nofile = raise_nofile_limit()
    if config.svp_max_connections is None:
        config = replace(config, svp_max_connections=default_svp_max_connections(nofile))
    log.info(
        "open-file limit %d%s; at most %d SVP connections at once",
        nofile,
        f" (raised from {before})" if nofile != before else "",
        config.svp_max_connections,
    )
    if config.svp_max_connections and config.svp_max_connections > nofile - 32:
        log.warning(
            "--svp-max-connections %d leaves little of the open-file limit %d for the API, "
            "/metrics and the store",
            config.svp_max_connections,
            nofile,
        )
    accept_log = logging.getLogger("trio.serve_listeners")
    limit_filter = RateLimitFilter()
    accept_log.addFilter(limit_filter)
    try:
        trio.run(_main, config)
    except OSError as exc:
        print(f"portolan serve: cannot start: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:
        failed = _listener_failed(exc)
        if failed is not None:
            print(f"portolan serve: {failed}", file=sys.stderr)
            return 2
        unavailable = _store_unavailable(exc)
        if unavailable is None:
            raise
        print(f"portolan serve: cannot open the store: {unavailable}", file=sys.stderr)
        return 1
    finally:
        accept_log.removeFilter(limit_filter)
    return 0


def _listener_failed(exc: BaseException) -> ListenerFailed | None:
    """The ListenerFailed inside ``exc`` (possibly wrapped in exception groups), if any."""
    return _find(exc, ListenerFailed)


def _store_unavailable(exc: BaseException) -> BaseException | None:
    """The StoreUnavailable inside ``exc`` (possibly wrapped in exception groups), if any."""
    from portolan.errors import StoreUnavailable

    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _store_unavailable(inner)
            if found is not None:
                return found
    return None
