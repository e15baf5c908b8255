"""``portolan serve``: open the store, load the index, start every listener, wait for a signal.

Task tree (one trio run, no threads but the store's bounded worker threads)::

    serve_portolan
      Directory.open(store)            store -> index
      nursery
        SvpServer.serve                trio.serve_tcp, one task per SVP connection
        portolan.api.serve_api         hypercorn on trio (when portolan.api is importable)
        serve_metrics                  /metrics responder
        follow_store                   reloads the index after writes by other processes
        Coherence.run (PostgreSQL)     LISTEN/NOTIFY + changes feed, instead of follow_store
      READY line on stdout once the three are bound

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
import importlib
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import trio

from portolan.cli import format_hostport, is_loopback_host, parse_hostport
from portolan.metrics import PortolanMetrics, serve_metrics
from portolan.store import check_url
from portolan.svp_server import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FRAME, SvpServer

log = logging.getLogger("portolan.serve")

DEFAULT_STORE = "sqlite:./portolan.db"
DEFAULT_SVP_LISTEN = "0.0.0.0:1296"
DEFAULT_API_LISTEN = "127.0.0.1:1280"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9296"
DEFAULT_RELOAD_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class ServeConfig:
    store: str = DEFAULT_STORE
    svp: tuple[str, int] = ("0.0.0.0", 1296)
    api: tuple[str, int] = ("127.0.0.1", 1280)
    metrics: tuple[str, int] = ("127.0.0.1", 9296)
    api_token: str | None = field(default=None, repr=False)
    svp_max_frame: int = DEFAULT_MAX_FRAME
    svp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    reload_interval: float = DEFAULT_RELOAD_INTERVAL


class ConfigRefused(Exception):
    """The command line asks for something unsafe or malformed (exit 2)."""


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
        help="close an SVP connection that leaves a frame half-sent this long "
        f"(default {DEFAULT_IDLE_TIMEOUT:g})",
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
        svp_max_frame=args.svp_max_frame,
        svp_idle_timeout=args.svp_idle_timeout,
        reload_interval=args.reload_interval,
    )


def _api_module() -> ModuleType | None:
    try:
        return importlib.import_module("portolan.api")
    except ModuleNotFoundError as exc:
        if exc.name == "portolan.api":
            return None
        raise


def _make_app(api: ModuleType, directory: Any, token: str | None, metrics: PortolanMetrics) -> Any:
    """The management API, counting its requests on our registry."""
    return api.create_app(directory, token=token, registry=metrics.registry)


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
    try:
        metrics = PortolanMetrics()
        server = SvpServer(
            directory,
            metrics=metrics,
            max_frame=config.svp_max_frame,
            idle_timeout=config.svp_idle_timeout,
        )
        async with trio.open_nursery() as nursery:
            bound: dict[str, tuple[str, int]] = {}
            bound["svp"] = await nursery.start(server.serve, *config.svp)
            if api is not None:
                app = _make_app(api, directory, config.api_token, metrics)
                started = await nursery.start(api.serve_api, app, *config.api)
                bound["api"] = _bound(started, config.api)
            else:
                log.warning("portolan.api is not available: serving without the management API")
            bound["metrics"] = await nursery.start(serve_metrics, metrics, *config.metrics)
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
            log.info("portolan ready: %s", ready_line(bound))
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
        trio.run(_main, config)
    except OSError as exc:
        print(f"portolan serve: cannot start: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:
        unavailable = _store_unavailable(exc)
        if unavailable is None:
            raise
        print(f"portolan serve: cannot open the store: {unavailable}", file=sys.stderr)
        return 1
    return 0


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
