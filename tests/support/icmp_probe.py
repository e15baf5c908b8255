"""The ICMP echo probe of the packet tests: `lab.probe` run through `lab.netns.ping`."""

from lab.netns import ping
from lab.probe import PROBE

__all__ = ["PROBE", "ping"]
