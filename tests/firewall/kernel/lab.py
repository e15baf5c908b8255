"""A bridge in a namespace, with VNIC ports and an uplink, for the kernel firewall tests.

Two namespaces per lab, named with a per-lab prefix (``kfw<pid hex><n>``):

- ``<prefix>b`` holds the bridge ``br0`` and its ports: ``v0..vN-1`` (the VNICs' host-side
  ports, which the firewall filters) and ``up0`` (the "overlay" side: remote peers). The
  nftables tables live here, so its conntrack is the only one that sees the traffic.
- ``<prefix>e`` holds the other ends (``v0e``.., ``up0e``): raw ``AF_PACKET`` sockets there
  send and receive the test frames. IPv6 is off there (no neighbour discovery noise) and no
  nftables table exists there, so that namespace never tracks connections.

Static FDB entries pin every MAC to its port (no flooding: a flooded frame would be judged
once per port and share one conntrack entry). A frame is identified on arrival by its tag:
the IPv4 identification or the IPv6 flow label (both survive the kernel's reassembly and
refragmentation).

``sweep()`` deletes leftover namespaces of this module's prefix family from earlier runs of
the same pid space (``kfw*``) that no process owns any more. Namespaces, commands and
sysctls go through `lab.netns` (``ip`` and ``/proc/sys``: no other tools for the setup).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterator

from lab import netns
from lab.netns import in_netns, run

PREFIX = "kfw"
UPLINK_MAC = "02:aa:00:00:00:fe"
ETH_P_ALL = 0x0003
_seq = 0


def unavailable() -> str | None:
    """Why this machine cannot run the kernel tests, or None."""
    if os.geteuid() != 0:
        return "needs root (namespaces, bridge, nftables)"
    for tool in ("ip", "bridge", "nft", "conntrack"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"no `{tool}` command"
    return None


def sweep() -> None:
    """Delete ``kfw*`` namespaces left by dead test processes (``kfw<pid hex><n><b|e>``)."""
    netns.sweep(PREFIX, r"([0-9a-f]+)..$")


def vnic_mac(i: int) -> str:
    return f"02:aa:00:00:00:{i + 1:02x}"


class Lab:
    """One bridge namespace with ``vnics`` VNIC ports and an uplink (see module docstring)."""

    def __init__(self, vnics: int = 3) -> None:
        global _seq
        _seq += 1
        self.prefix = f"{PREFIX}{os.getpid():x}{_seq % 10}"
        self.nsb = self.prefix + "b"
        self.nse = self.prefix + "e"
        self.n = vnics
        self.ports = [f"v{i}" for i in range(vnics)]
        self.macs = [vnic_mac(i) for i in range(vnics)]
        self.socks: dict[str, socket.socket] = {}
        self._build()

    def _build(self) -> None:
        b, e = self.nsb, self.nse
        netns.add_ns(b, ipv6=True)
        netns.add_ns(e)  # IPv6 off
        for key, value in (("accept_ra", 0), ("addr_gen_mode", 1), ("accept_dad", 0)):
            netns.sysctl(b, f"net.ipv6.conf.default.{key}", value)
        run("ip", "-n", b, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        run("ip", "-n", b, "link", "set", "br0", "type", "bridge", "nf_call_iptables", "1")
        run("ip", "-n", b, "link", "set", "br0", "type", "bridge", "nf_call_ip6tables", "1")
        for port, mac in [*zip(self.ports, self.macs, strict=True), ("up0", UPLINK_MAC)]:
            run(
                "ip",
                "-n",
                b,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                port + "e",
                "netns",
                e,
            )
            run("ip", "-n", b, "link", "set", port, "master", "br0")
            run("ip", "-n", b, "link", "set", port, "type", "bridge_slave", "learning", "off")
            run("ip", "-n", e, "link", "set", port + "e", "address", mac)
            run("ip", "-n", b, "link", "set", port, "up")
            run("ip", "-n", e, "link", "set", port + "e", "up")
            run("bridge", "-n", b, "fdb", "add", mac, "dev", port, "master", "static")
        run("ip", "-n", b, "link", "set", "br0", "up")
        with in_netns(e):
            for port in [*self.ports, "up0"]:
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                s.bind((port + "e", 0))
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                self.socks[port] = s

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        for ns in (self.nsb, self.nse):
            run("ip", "netns", "del", ns, check=False)

    # ------------------------------------------------------------------ traffic

    def send(self, port: str, frame: bytes) -> None:
        self.socks[port].send(frame)

    def drain(self) -> None:
        """Forget everything queued on the receive sockets."""
        for s in self.socks.values():
            with contextlib.suppress(BlockingIOError):
                while True:
                    s.recv(65535)

    def collect(
        self, settle: float = 0.05, quiet: float = 0.03, limit: float = 5.0
    ) -> dict[str, set[tuple[int, int]]]:
        """Tags ((family, tag)) that arrived per port, until no frame came for ``quiet`` s
        (at least ``settle`` s, at most ``limit`` s)."""
        got: dict[str, set[tuple[int, int]]] = {p: set() for p in self.socks}
        by_fd = {s.fileno(): (p, s) for p, s in self.socks.items()}
        deadline = time.monotonic() + settle
        hard = time.monotonic() + limit
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        while time.monotonic() < hard:
            timeout = max(deadline - time.monotonic(), quiet)
            events = poller.poll(timeout * 1000)
            if not events:
                if time.monotonic() >= deadline:
                    break
                continue
            for fd, _ in events:
                port, s = by_fd[fd]
                with contextlib.suppress(BlockingIOError):
                    while True:
                        data, addr = s.recvfrom(65535)
                        if addr[2] == socket.PACKET_OUTGOING:
                            continue
                        tag = frame_tag(data)
                        if tag is not None:
                            got[port].add(tag)
        return got

    def conntrack_flush(self) -> None:
        run(*netns.nsexec(self.nsb, "conntrack", "-F"), check=False)


def frame_tag(frame: bytes) -> tuple[int, int] | None:
    if len(frame) < 34:
        return None
    ethertype = frame[12] << 8 | frame[13]
    if ethertype == 0x0800:
        return 4, frame[18] << 8 | frame[19]
    if ethertype == 0x86DD and len(frame) >= 54:
        return 6, (frame[15] & 0x0F) << 16 | frame[16] << 8 | frame[17]
    return None


@contextlib.contextmanager
def lab(vnics: int = 3) -> Iterator[Lab]:
    sweep()
    lb = Lab(vnics)
    try:
        yield lb
    finally:
        lb.close()
