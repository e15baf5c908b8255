"""``portolan demo``: the quickstart scenario (see `portolan.demo`)."""

from __future__ import annotations

import argparse
from typing import Any

from portolan.demo import SABOTAGE, DemoOptions


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a portolan and three varpd nodes in this process and show them at work",
        description="Start a portolan (SQLite in a temporary folder, SVP server, API and "
        "metrics on loopback port 0) and three compute nodes (varpd, memory backend, svp "
        "plugin), create a network and VNICs through the API, then show proxy ARP, VL2 "
        "lookups, a VNIC move with its shootdown and the firewall, each step verified on "
        "the frames. Exit status 0 only when every step was observed.",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave everything running after the scenario (until Ctrl-C) and print the "
        "portolan / varpdadm commands that reach it",
    )
    p.add_argument(
        "--netns",
        action="store_true",
        help="run on network namespaces, TAP devices and UDP sockets (root)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print only the summary, not every event",
    )
    # For tests: leave out one action so that its verification must fail.
    p.add_argument("--fail-step", choices=sorted(SABOTAGE), help=argparse.SUPPRESS)
    p.set_defaults(func=run, default_log_level="WARNING")


def run(args: argparse.Namespace) -> int:
    from portolan import demo

    options = DemoOptions(
        keep=args.keep, netns=args.netns, fail_step=args.fail_step, events=not args.quiet
    )
    return demo.main(options)
