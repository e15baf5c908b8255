"""``portolan demo``: runs the quickstart scenario, which lives in ``lab`` (``python -m lab demo``).

The demo assembles portolan *and* varpd, so it cannot live in portolan (portolan never
imports varpd, nor lab, which imports both). This subcommand keeps ``portolan demo [flags]``
working as documented by replacing the process with ``python -m lab demo [flags]``
(`os.execv`, same interpreter, same stdio, same exit status, Ctrl-C reaches the demo
directly). ``lab`` is found on the interpreter's path (installed with portolan), or in the
source tree next to this package.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

#: the steps ``--fail-step`` can leave out (lab.demo.SABOTAGE's keys; lab validates)
FAIL_STEPS = ("firewall", "move", "ping")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a portolan and three varpd nodes in this process and show them at work",
        description="Start a portolan (SQLite in a temporary folder, SVP server, API and "
        "metrics on loopback port 0) and three compute nodes (varpd, memory backend, svp "
        "plugin), create a network and VNICs through the API, then show proxy ARP, VL2 "
        "lookups, a VNIC move with its shootdown and the firewall, each step verified on "
        "the frames. Exit status 0 only when every step was observed. "
        "(Runs `python -m lab demo`.)",
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
    p.add_argument(
        "--backend",
        choices=("udp", "linux"),
        default="udp",
        help="with --netns: udp (TAP devices, Python data path) or linux (the kernel's "
        "vxlan, bridge and veth devices; see README, 'The kernel data path')",
    )
    # For tests: leave out one action so that its verification must fail.
    p.add_argument("--fail-step", choices=FAIL_STEPS, help=argparse.SUPPRESS)
    p.set_defaults(func=run, default_log_level="WARNING")


def lab_argv(args: argparse.Namespace) -> list[str]:
    """The ``python -m lab demo`` command line equivalent to these arguments."""
    argv = [sys.executable, "-m", "lab", "demo"]
    argv += [flag for flag, on in (("--keep", args.keep), ("--netns", args.netns),
                                   ("--quiet", args.quiet)) if on]  # fmt: skip
    if args.fail_step:
        argv += ["--fail-step", args.fail_step]
    if getattr(args, "backend", "udp") != "udp":
        argv += ["--backend", args.backend]
    if getattr(args, "log_level", None) and any(a.startswith("--log-level") for a in sys.argv):
        argv += ["--log-level", args.log_level]
    return argv


def run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if importlib.util.find_spec("lab") is None:
        tree = Path(__file__).resolve().parents[2]
        if not (tree / "lab" / "__init__.py").is_file():
            print("portolan demo: the lab package is not installed", file=sys.stderr)
            return 2
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, lab_argv(args), env)
    return 2  # not reached
