"""``varpd run [--config] FILE`` and ``varpd check-config [--config] FILE``: the daemon's
command line.

Reads and validates the TOML config (a broken file is refused, exit 2, with the offending key
named; ``check-config`` and ``run`` run the same validation, device and plugin properties
included, so a file ``check-config`` passes is one ``run`` can apply), runs a `Varpd`, prints the ready line (``READY control=PATH metrics=HOST:PORT``) on
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
            try:
                print(varpd.ready_line(), flush=True)
            except BrokenPipeError:  # nobody reads stdout: the daemon carries on regardless
                from varpd.adm import closed_pipe_exit

                closed_pipe_exit()
            async for signum in signals:
                logging.getLogger("varpd").info(
                    "signal %s: shutting down", signal.Signals(signum).name
                )
                nursery.cancel_scope.cancel()
                break


#: libraries that log every request at INFO (the policy fetcher's long polls): WARNING and
#: up only, unless varpd itself logs at DEBUG
CHATTY_LOGGERS = ("httpx", "httpcore")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varpd", description="the overlay lookup daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    for p in (run, check):
        # ``varpd check-config FILE`` and ``varpd check-config --config FILE`` both work
        p.add_argument("file", nargs="?", metavar="CONFIG", help="TOML configuration file")
        p.add_argument("--config", "-c", help="TOML configuration file (same as CONFIG)")
    run.add_argument("--log-level", help="override the config's log_level")
    return parser


def varpd_main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.file and args.config and args.file != args.config:
        parser.error("give the config file once (CONFIG or --config)")
    args.config = args.config or args.file
    if not args.config:
        parser.error(f"{args.command}: a config file is required (CONFIG or --config FILE)")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"varpd: config {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        try:
            print(f"{args.config}: ok ({len(config.devices)} device(s))", flush=True)
        except BrokenPipeError:
            from varpd.adm import closed_pipe_exit

            return closed_pipe_exit()
        return 0
    configure_logging((args.log_level or config.log_level).upper())
    from varpd.daemon import StartupError

    fatal = (OSError, StartupError)
    try:
        trio.run(run_daemon, config)
    except BrokenPipeError:  # the READY line's reader went away
        from varpd.adm import closed_pipe_exit

        return closed_pipe_exit()
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
