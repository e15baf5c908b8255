"""``portolan`` entry point: one argparse parser, subcommands registered by their modules."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from portolan.cli import load, lookup, serve

#: optional command modules, registered only when they can be imported
OPTIONAL_COMMANDS = ("portolan.cli.admin", "portolan.cli.demo")


def _optional_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only a missing module itself is tolerated; a broken import inside it is a bug to show.
        if exc.name == name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="portolan",
        description="portolan: the SVP lookup service and management API of the overlay network",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level on stderr (default WARNING; `serve` uses INFO unless given)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (serve, load, lookup):
        module.register(subparsers)
    for name in OPTIONAL_COMMANDS:
        module = _optional_module(name)
        if module is not None:
            module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    # `portolan COMMAND --log-level X` (commands that offer it) wins over `portolan --log-level X`
    level = getattr(args, "command_log_level", None)
    if level is None:
        explicit_level = any(a.startswith("--log-level") for a in (argv or sys.argv[1:]))
        level = args.log_level if explicit_level else getattr(args, "default_log_level", "WARNING")
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return closed_pipe_exit()


def closed_pipe_exit() -> int:
    """stdout's reader went away (``portolan ... | head``): exit quietly, as a tool killed by
    SIGPIPE would (status 141), without a traceback or a flush error at interpreter exit."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
