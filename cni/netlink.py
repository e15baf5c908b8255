"""Netlink work in other network namespaces: move, configure, inspect and delete a link.

Each function opens a pyroute2 ``NetNS`` on a namespace *path* (``/run/netns/x``,
``/proc/<pid>/ns/net``): the netlink socket is created inside that namespace and the calling
process never changes namespace itself. A link is moved by setting ``IFLA_NET_NS_FD`` to the
target namespace, after which it is found there by name, down and unaddressed; a TAP moved this
way keeps working for the process (varpd) that holds its fd.

Kernel refusals become `CniError` ``NETLINK_ERROR`` (102); a namespace path that does not exist
is ``UNKNOWN_CONTAINER`` (3) where the container's namespace was meant.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import NetNS
from pyroute2.netlink.exceptions import NetlinkError

from cni.spec import NETLINK_ERROR, UNKNOWN_CONTAINER, CniError

IFF_UP = 0x1


@contextmanager
def namespace(path: str, what: str = "namespace") -> Iterator[Any]:
    if not os.path.exists(path):
        raise CniError(UNKNOWN_CONTAINER, f"{what} {path} does not exist")
    try:
        ns = NetNS(path)
    except (OSError, NetlinkError) as exc:
        raise CniError(NETLINK_ERROR, f"cannot open {what} {path}: {exc}") from None
    try:
        yield ns
    except NetlinkError as exc:
        raise CniError(NETLINK_ERROR, f"netlink in {path}: {exc}") from None
    finally:
        ns.close()


def _index(ns: Any, name: str) -> int | None:
    found = ns.link_lookup(ifname=name)
    return found[0] if found else None


def link_exists(path: str, name: str) -> bool:
    with namespace(path) as ns:
        return _index(ns, name) is not None


def move_link(src: str, name: str, dst: str) -> None:
    """Move link ``name`` from namespace ``src`` into namespace ``dst``."""
    with namespace(src, "varpd's namespace") as ns:
        idx = _index(ns, name)
        if idx is None:
            raise CniError(NETLINK_ERROR, f"varpd made no link {name} in {src}")
        ns.link("set", index=idx, net_ns_fd=dst)


def configure(
    path: str,
    name: str,
    *,
    ifname: str,
    mac: str,
    mtu: int,
    address: str,
    gateway: str | None,
) -> None:
    """Rename ``name`` to ``ifname``, set MAC and MTU, bring it up, address it and add the
    default route through ``gateway``."""
    iface = ipaddress.ip_interface(address)
    with namespace(path, "container namespace") as ns:
        idx = _index(ns, name)
        if idx is None:
            raise CniError(NETLINK_ERROR, f"link {name} did not arrive in {path}")
        ns.link("set", index=idx, state="down")
        if name != ifname:
            ns.link("set", index=idx, ifname=ifname)
        ns.link("set", index=idx, address=mac, mtu=mtu)
        ns.link("set", index=idx, state="up")
        ns.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        if gateway:
            dst = "0.0.0.0/0" if iface.version == 4 else "::/0"
            ns.route("add", dst=dst, gateway=gateway, oif=idx)


def inspect(path: str, ifname: str) -> dict[str, Any] | None:
    """The state of ``ifname`` in ``path`` (None if absent): mac, mtu, up, addresses, gateways
    of its default routes."""
    with namespace(path, "container namespace") as ns:
        idx = _index(ns, ifname)
        if idx is None:
            return None
        (link,) = ns.get_links(idx)
        addresses = [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ns.get_addr(index=idx)]
        gateways = []
        for family in (2, 10):
            for r in ns.get_routes(family=family, oif=idx):
                if r["dst_len"] == 0 and r.get("RTA_GATEWAY"):
                    gateways.append(r.get("RTA_GATEWAY"))
        return {
            "mac": link.get("IFLA_ADDRESS"),
            "mtu": link.get("IFLA_MTU"),
            "up": bool(link["flags"] & IFF_UP),
            "addresses": addresses,
            "gateways": gateways,
        }


def delete_link(path: str, ifname: str, mac: str | None = None) -> bool:
    """Delete ``ifname`` in ``path`` if it exists (and carries ``mac``, when given).

    A missing namespace or link is not an error; returns whether a link was deleted."""
    if not path or not os.path.exists(path):
        return False
    try:
        with namespace(path) as ns:
            idx = _index(ns, ifname)
            if idx is None:
                return False
            if mac is not None:
                (link,) = ns.get_links(idx)
                if (link.get("IFLA_ADDRESS") or "").lower() != mac.lower():
                    return False
            try:
                ns.link("del", index=idx)
            except NetlinkError as exc:
                if exc.code == 19:  # ENODEV: went away meanwhile (varpd closed the TAP)
                    return False
                raise
            return True
    except CniError as exc:
        if exc.code == UNKNOWN_CONTAINER:
            return False
        raise
