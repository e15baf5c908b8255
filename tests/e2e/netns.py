"""Network-namespace helpers for the packet tests: the lab's (`lab.netns`), under the names
the tests have always used.

Everything a test builds is named with a per-run prefix (``pt<pid-hex>...``) and registered
on a `Lab` (`lab.netns.Namespaces`); ``Lab.close()`` (always reached through a fixture
finalizer) kills the processes the lab started, then deletes its namespaces, which takes
their veths, vxlans and TAPs with them. See `lab.netns` for `in_netns`, `unavailable`,
`ping`, `udp_exchange` and `wait_for_line`.
"""

from __future__ import annotations

from lab.netns import (
    CLONE_NEWNET,
    UDP_CLIENT,
    UDP_ECHO,
    in_netns,
    nsexec,
    ping,  # lab.probe's raw-socket echo: no `ping` binary needed
    run,
    txcsum_off,
    udp_exchange,
    unavailable,
    wait_for_line,
)
from lab.netns import Namespaces as Lab

__all__ = [
    "CLONE_NEWNET",
    "UDP_CLIENT",
    "UDP_ECHO",
    "Lab",
    "in_netns",
    "nsexec",
    "ping",
    "run",
    "txcsum_off",
    "udp_exchange",
    "unavailable",
    "wait_for_line",
]
