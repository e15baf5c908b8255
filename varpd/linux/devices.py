"""Create and remove the kernel objects of one overlay device, with rollback.

These functions are blocking and run in `Netlink`'s worker thread (``await nl.call(fn,
...)``); each takes the ``IPRoute`` first. Per overlay device (names in `varpd.linux.names`):

    pvb<vni>  a Linux bridge (no STP, no multicast snooping, IPv6 off), up
    pvx<vni>  a vxlan netdev: id = vnetid, local = vxlan/listen_ip, dstport =
              vxlan/listen_port, nolearning; DYNAMIC devices add l2miss, l3miss and proxy
              (POINT devices get none of them: every frame, ARP included, goes to the one
              default fdb entry, as the shim sends everything to the point); offloads left
              as the kernel sets them (see below); IPv6 on without addresses (the NDP proxy
              needs the device's inet6 data); enslaved to the bridge; up
    pvh<hash> the host end of a VNIC's veth pair, enslaved to the bridge, IPv6 off, up;
              its peer (the tenant end) carries the VNIC's MAC and the device MTU

Checksums: with TX checksum offload on (the kernel's default), the inner TCP/UDP checksum of
an encapsulated segment is left for the underlay NIC (or the kernel's software fallback when the
NIC cannot) to fill in. On real hardware that always happens before the wire. On a veth
underlay inside one host, as in the tests, the partial checksum travels on to the peer: a
kernel peer trusts it, but a peer that reads VXLAN in userland (the udp backend) sees an
unfinished checksum and its tenant drops the segment. Turning offload off on the vxlan device
itself costs 80% of the throughput (3.5 against 17.7 Gbit/s here, bench/kernel_datapath.py), so
varpd does not; such a test topology turns it off on the underlay veth (``lab.netns.txcsum_off``
on ``ul0``), which completes the checksums where they leave the node.

Every creation is a list of steps; when one fails, the steps already done are undone in
reverse and `StepError` names the failed step and the kernel's message, e.g. ``creating
vxlan pvx2a: add link: Address already in use``. Removal is idempotent (a missing link is
not an error). `sweep` is the start-up clean-up: it deletes every vxlan and bridge of the
name scheme and returns the host-side veth ends it found, which the driver adopts for the
VNICs it re-creates (so tenant ends moved into tenant namespaces survive a restart) and
deletes after start-up when no VNIC claimed them.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable
from typing import Any

from varpd.linux import names
from varpd.linux.netlink import (
    NTF_SELF,
    NUD_PERMANENT,
    ZERO_MAC_TEXT,
    KernelError,
    kernel_message,
)


class StepError(KernelError):
    """A creation step failed (the message names the object, the step and the kernel's
    reason); everything done before it was undone."""


def _ifindex(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _sysctl(name: str, key: str, value: str) -> None:
    path = f"/proc/sys/net/ipv6/conf/{name}/{key}"
    with contextlib.suppress(FileNotFoundError), open(path, "w") as f:
        f.write(value)


class _Steps:
    """Run named steps; on failure undo the done ones in reverse and raise `StepError`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.undo: list[Callable[[], Any]] = []

    def run(self, step: str, fn: Callable[[], Any], undo: Callable[[], Any] | None = None) -> Any:
        try:
            result = fn()
        except Exception as exc:
            code, text = kernel_message(exc)
            self.rollback()
            raise StepError(f"{self.what}: {step}: {text}", code) from None
        if undo is not None:
            self.undo.append(undo)
        return result

    def rollback(self) -> None:
        for fn in reversed(self.undo):
            with contextlib.suppress(Exception):
                fn()
        self.undo.clear()


def delete_link(ipr: Any, name: str) -> bool:
    """Delete link ``name``; False when it did not exist."""
    index = _ifindex(ipr, name)
    if index is None:
        return False
    try:
        ipr.link("del", index=index)
    except Exception as exc:
        code, text = kernel_message(exc)
        if code == errno.ENODEV:
            return False
        raise StepError(f"deleting {name}: {text}", code) from None
    return True


def sweep(ipr: Any) -> list[str]:
    """Delete stale vxlan/bridge links of the scheme; return the host veth ends found."""
    hosts: list[str] = []
    doomed: list[str] = []
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME") or ""
        if not names.is_own(name):
            continue
        if names.is_host_end(name):
            hosts.append(name)
        else:
            doomed.append(name)
    for name in sorted(doomed, key=lambda n: not n.startswith("pvx")):  # vxlan first
        delete_link(ipr, name)
    return hosts


def ensure_bridge(ipr: Any, name: str) -> int:
    """The bridge's ifindex, creating it (up, IPv6 off) when missing."""
    index = _ifindex(ipr, name)
    if index is not None:
        return index
    steps = _Steps(f"creating bridge {name}")
    steps.run(
        "add link",
        lambda: ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_mcast_snooping=0),
        lambda: delete_link(ipr, name),
    )
    index = steps.run("look up link", lambda: _ifindex(ipr, name))
    steps.run("disable IPv6", lambda: _sysctl(name, "disable_ipv6", "1"))
    steps.run("set up", lambda: ipr.link("set", index=index, state="up"))
    return int(index)


def create_vxlan(
    ipr: Any,
    name: str,
    vni: int,
    local: str | None,
    port: int,
    mtu: int,
    dynamic: bool,
    bridge: int,
) -> int:
    """Create the device's vxlan netdev in ``bridge`` (see the module docstring)."""
    steps = _Steps(f"creating vxlan {name}")
    kw: dict[str, Any] = {
        "ifname": name,
        "kind": "vxlan",
        "vxlan_id": vni,
        "vxlan_port": port,
        "vxlan_learning": 0,
        "mtu": mtu,
    }
    if local is not None:
        kw["vxlan_local6" if ":" in local else "vxlan_local"] = local
    if dynamic:
        kw.update(vxlan_l2miss=1, vxlan_l3miss=1, vxlan_proxy=1)
    steps.run("add link", lambda: ipr.link("add", **kw), lambda: delete_link(ipr, name))
    index = steps.run("look up link", lambda: _ifindex(ipr, name))
    steps.run("IPv6 without addresses", lambda: _sysctl(name, "addr_gen_mode", "1"))
    steps.run("enable IPv6 (NDP proxy)", lambda: _sysctl(name, "disable_ipv6", "0"))
    steps.run("enslave to the bridge", lambda: ipr.link("set", index=index, master=bridge))
    steps.run("set up", lambda: ipr.link("set", index=index, state="up"))
    return int(index)


def create_vnic(
    ipr: Any, host: str, tenant: str, mac: str, mtu: int, bridge: int
) -> tuple[int, bool]:
    """Create (or adopt, when ``host`` exists) a VNIC's veth pair; (host ifindex, adopted)."""
    index = _ifindex(ipr, host)
    adopted = index is not None
    steps = _Steps(f"{'adopting' if adopted else 'creating'} VNIC {mac} ({host}/{tenant})")
    if not adopted:
        steps.run(
            "add veth pair",
            lambda: ipr.link(
                "add",
                ifname=host,
                kind="veth",
                mtu=mtu,
                peer={"ifname": tenant, "address": mac, "mtu": mtu},
            ),
            lambda: delete_link(ipr, host),
        )
        index = steps.run("look up host end", lambda: _ifindex(ipr, host))
        steps.run("disable IPv6 on the host end", lambda: _sysctl(host, "disable_ipv6", "1"))
        steps.run(
            "set tenant end up",
            lambda: ipr.link("set", index=_ifindex(ipr, tenant), state="up"),
        )
    else:
        steps.run("set host end mtu", lambda: ipr.link("set", index=index, mtu=mtu))
    steps.run("enslave host end", lambda: ipr.link("set", index=index, master=bridge))
    steps.run("set host end up", lambda: ipr.link("set", index=index, state="up"))
    return int(index), adopted


# ---------------------------------------------------------------------- table writes


def fdb_replace(ipr: Any, ifindex: int, mac: str, dst: str | None, port: int | None) -> None:
    """A permanent fdb entry ``mac -> dst:port`` (``dst`` None: the unspecified remote, which
    the vxlan device treats as "drop")."""
    kw: dict[str, Any] = {"ifindex": ifindex, "lladdr": mac, "state": NUD_PERMANENT}
    kw["dst"] = dst if dst is not None else "0.0.0.0"
    if dst is not None and port is not None:
        kw["port"] = port
    ipr.fdb("replace", flags=NTF_SELF, **kw)


def fdb_default(ipr: Any, ifindex: int, dst: str, port: int) -> None:
    """The all-zero-MAC default entry (POINT devices): ``replace`` is refused for it
    (EOPNOTSUPP), so delete any previous one and append."""
    fdb_delete(ipr, ifindex, ZERO_MAC_TEXT)
    ipr.fdb(
        "append",
        ifindex=ifindex,
        lladdr=ZERO_MAC_TEXT,
        dst=dst,
        port=port,
        state=NUD_PERMANENT,
        flags=NTF_SELF,
    )


def fdb_delete(ipr: Any, ifindex: int, mac: str) -> None:
    try:
        ipr.fdb("del", ifindex=ifindex, lladdr=mac, flags=NTF_SELF)
    except Exception as exc:
        code, _ = kernel_message(exc)
        if code != errno.ENOENT:
            raise


def neigh_replace(ipr: Any, ifindex: int, ip: str, mac: str) -> None:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    ipr.neigh("replace", ifindex=ifindex, dst=ip, lladdr=mac, state=NUD_PERMANENT, family=family)


def neigh_delete(ipr: Any, ifindex: int, ip: str) -> None:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        ipr.neigh("del", ifindex=ifindex, dst=ip, family=family)
    except Exception as exc:
        code, _ = kernel_message(exc)
        if code != errno.ENOENT:
            raise


def fdb_dump(ipr: Any, ifindex: int) -> list[Any]:
    return list(ipr.fdb("dump", ifindex=ifindex))
