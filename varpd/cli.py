"""``varpd run --config FILE``: the daemon's command line.

Reads and validates the TOML config (a broken file is refused, exit 2, with the offending key
named), runs a `Varpd`, prints the ready line (``READY control=PATH metrics=HOST:PORT``) on
stdout once every listener is bound, and shuts down on SIGINT/SIGTERM by cancelling.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from varpd.config import ConfigError, VarpdConfig, load_config


async def run_daemon(config: VarpdConfig) -> None:
    from varpd.daemon import Varpd

    varpd = Varpd(config)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await nursery.start(varpd.run)
            print(varpd.ready_line(), flush=True)
            async for signum in signals:
                logging.getLogger("varpd").info(
                    "signal %s: shutting down", signal.Signals(signum).name
                )
                nursery.cancel_scope.cancel()
                break


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varpd", description="the overlay lookup daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", required=True, help="TOML configuration file")
    run.add_argument("--log-level", help="override the config's log_level")
    sub.add_parser("check-config", help="validate a config file and exit").add_argument(
        "--config", "-c", required=True
    )
    return parser


def varpd_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"varpd: config {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.config}: ok ({len(config.devices)} device(s))")
        return 0
    level = (args.log_level or config.log_level).upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from varpd.daemon import StartupError

    fatal = (OSError, StartupError)
    try:
        trio.run(run_daemon, config)
    except fatal as exc:
        print(f"varpd: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if not all(isinstance(leaf, fatal) for leaf in leaves):
            raise
        for leaf in leaves:
            print(f"varpd: {leaf}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for sub in group.exceptions for leaf in _leaves(sub)]
    return [group]


if __name__ == "__main__":
    sys.exit(varpd_main())
