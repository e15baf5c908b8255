"""MAC and IP allocation helpers (pure functions; the Directory calls them inside its write
transaction and relies on the store's uniqueness constraints for cross-process safety).

- MACs: locally administered unicast (first octet 0x02) followed by 40 random bits.
- IPs: the lowest free address of the network's provision range, never the gateway.
  The default provision range is the subnet without its network and broadcast addresses for
  IPv4 prefixes up to /30 (all of a /31 or /32), and without the subnet-router anycast
  address (the first one) for IPv6.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from protocol.addr import ZERO_MAC, is_multicast_mac

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

MAC_PREFIX = 0x02  # locally administered, unicast


def random_mac(randbits: Callable[[int], int] = secrets.randbits) -> bytes:
    """A random locally administered unicast MAC: 02:xx:xx:xx:xx:xx."""
    return bytes([MAC_PREFIX]) + randbits(40).to_bytes(5, "big")


def is_unicast_mac(mac: bytes) -> bool:
    """Six bytes, not multicast/broadcast, not all zeros: a MAC a VNIC may have."""
    return len(mac) == 6 and not is_multicast_mac(mac) and mac != ZERO_MAC


def default_provision_range(net: IPNetwork) -> tuple[IPAddress, IPAddress]:
    """The first and last address handed out by default."""
    if isinstance(net, IPv4Network):
        if net.prefixlen >= 31:
            return net[0], net[-1]
        return net[1], net[-2]
    if net.prefixlen >= 127:
        return net[0], net[-1]
    return net[1], net[-1]


def is_assignable(net: IPNetwork, ip: IPAddress) -> bool:
    """Inside the subnet, and not its IPv4 network/broadcast address (prefixes up to /30)."""
    if ip.version != net.version or ip not in net:
        return False
    if isinstance(net, IPv4Network) and net.prefixlen <= 30:
        return ip not in (net.network_address, net.broadcast_address)
    return True


def lowest_free(
    start: IPAddress, end: IPAddress, used: Iterable[IPAddress | str], gateway: IPAddress | None
) -> IPAddress | None:
    """The lowest address in [start, end] that is neither used nor the gateway, or None."""
    lo, hi = int(start), int(end)
    taken: set[int] = set()
    for u in used:
        ip = ipaddress.ip_address(u) if isinstance(u, str) else u
        if ip.version == start.version:
            n = int(ip)
            if lo <= n <= hi:
                taken.add(n)
    if gateway is not None and gateway.version == start.version:
        taken.add(int(gateway))
    cand = lo
    while cand <= hi and cand in taken:
        cand += 1
    if cand > hi:
        return None
    return ipaddress.ip_address(cand) if start.version == 4 else IPv6Address(cand)


__all__ = [
    "MAC_PREFIX",
    "default_provision_range",
    "is_assignable",
    "is_unicast_mac",
    "lowest_free",
    "random_mac",
]
