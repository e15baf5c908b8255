"""The demo on namespaces: ``varpd run`` processes, the udp backend, TAP devices.

Topology (every name carries a per-run prefix; `lab.cluster.Cluster` builds the first two)::

    <p>ul     bridge br0, 10.0.0.254/24: portolan (this process's main thread joins it)
    <p>a/b/c  one per compute node: ul0 10.0.0.1-3/24 (veth to br0), a `varpd run`
              process (udp backend); the VNICs' TAPs are created here ...
    <p>ta/tb  ... and moved into the tenant namespaces of guests A and B

The guests are the tenant namespaces' kernels: ``ping``, a raw-socket ARP probe and UDP echo
programs run in them. Nothing is configured in the caller's namespace. See `lab.demo` for
the steps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import trio

from lab import probe
from lab.cluster import Cluster, Node
from lab.demo import (
    DEVICE,
    OBSERVE,
    OWNER,
    QUIET,
    UDP_DPORT,
    UDP_SPORT,
    UL_PORT,
    VM_A,
    VM_B,
    DemoBase,
    demo_spec,
)
from lab.netns import UDP_ECHO, lines
from lab.scenario import StepResult, ms, wait_for_signal

#: the guest-side programs, run with this interpreter inside the tenant namespaces
ARP_PROBE = """
import socket, struct, sys, time
dev, mac, ip, target, wait = sys.argv[1], bytes.fromhex(sys.argv[2]), socket.inet_aton(
    sys.argv[3]), socket.inet_aton(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((dev, 0))
s.settimeout(0.3)
req = b"\\xff" * 6 + mac + b"\\x08\\x06" + struct.pack(
    ">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, b"\\0" * 6, target)
end = time.monotonic() + wait
while time.monotonic() < end:
    s.send(req)
    t = time.monotonic()
    while time.monotonic() - t < 0.3:
        try:
            f = s.recv(2048)
        except socket.timeout:
            break
        if struct.unpack_from(">H", f, 20)[0] == 2 and f[28:32] == target:
            print(f[22:28].hex(":"))
            sys.exit(0)
sys.exit(1)
"""

UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[5]))
s.sendto(b"hello", (sys.argv[3], int(sys.argv[4])))
try:
    print(s.recvfrom(65535)[0].decode())
except socket.timeout:
    sys.exit(1)
"""


@dataclass
class NsGuest:
    name: str
    mac: str
    ip: str
    ns: str
    tap: str
    node: Node


class NetnsDemo(DemoBase):
    """The namespace flavour (see the module docstring)."""

    #: the kernel answers misses from its own tables; portolan may see few or no VL2 lookups
    REQUIRE_LOOKUPS = False
    EXPECTED = (
        ("arp", "A's ARP for B's IP answered by proxy (SVP VL3)"),
        ("ping", "ping A->B through VXLAN over UDP; B answers"),
        ("move", "B moved to cn-c via the API; cn-a shot down; ping follows"),
        ("firewall", "firewall on B blocks inbound UDP; ALLOW rule lets it in"),
        ("metrics", "every /metrics endpoint answers"),
    )

    def __init__(self, options: Any, workdir: str) -> None:
        self.guests: dict[str, NsGuest] = {}
        self.helpers: list[Any] = []
        super().__init__(options, workdir)

    def make_cluster(self) -> Cluster:
        spec = demo_spec(netns=True, backend=getattr(self.options, "backend", "udp"))
        return Cluster(spec, log=self.events, workdir=self.workdir)

    @property
    def nodes(self) -> list[Node]:
        return list(self.cluster.nodes.values())

    async def cache_dest(self, node: Node, mac: str) -> str | None:
        return await self.cluster.cache_dest(node, mac)

    async def plug(self, guest: NsGuest, node: Node, tap: str) -> None:
        """The orchestrator: VNIC on the node's varpd with a TAP, the TAP into the tenant."""
        self.events("demo", f"orchestrator: plug {guest.name} into {node.name} (TAP {tap})")
        await self.cluster.control(node, "vnic_add", name=DEVICE, mac=guest.mac, tap=tap)
        await self.cluster.shell.sh("ip", "-n", node.ns, "link", "set", tap, "netns", guest.ns)
        await self.cluster.shell.sh("ip", "-n", guest.ns, "link", "set", tap, "mtu", "1400", "up")
        await self.cluster.shell.sh(
            "ip", "-n", guest.ns, "addr", "add", f"{guest.ip}/24", "dev", tap
        )
        guest.node, guest.tap = node, tap

    # -- steps -----------------------------------------------------------------------------

    async def ping(self, src: NsGuest, dst: NsGuest) -> tuple[bool, str]:
        code, out = await self.cluster.shell.in_ns(
            src.ns, *probe.command(dst.ip, 2, 4), check=False
        )  # the raw-socket echo probe: no `ping` binary needed
        summary = next((ln for ln in out.splitlines() if "packets transmitted" in ln), out.strip())
        self.events(f"guest {src.name}", f"ping {dst.ip}: {summary}")
        return code == 0, summary

    async def step_arp(self, r: StepResult) -> None:
        a, b = self.guests["A"], self.guests["B"]
        code, out = await self.cluster.shell.in_ns(
            a.ns, sys.executable, "-c", ARP_PROBE, a.tap, a.mac.replace(":", ""), a.ip, b.ip, "3",
            check=False,
        )  # fmt: skip
        answer = out.strip()
        if code != 0:
            r.observed = "no ARP reply reached A"
            return
        self.events("guest A", f"ARP reply: {b.ip} is-at {answer}")
        r.observed = f"raw ARP request from A's namespace answered '{b.ip} is-at {answer}'"
        r.status = "OK" if answer == b.mac else "FAIL"

    async def step_ping(self, r: StepResult) -> None:
        a, b = self.guests["A"], self.guests["B"]
        if self.fail_step == "ping":
            await self.cluster.shell.sh("ip", "-n", b.ns, "link", "set", b.tap, "down")
        ok, summary = await self.ping(a, b)
        if self.fail_step == "ping":
            await self.cluster.shell.sh("ip", "-n", b.ns, "link", "set", b.tap, "up")
        cached = await self.cache_dest(b.node, a.mac)
        r.observed = f"{summary}; cn-b caches A -> {cached}"
        r.status = "OK" if ok and cached else "FAIL"

    async def step_move(self, r: StepResult) -> None:
        a, b = self.guests["A"], self.guests["B"]
        old, new = b.node, self.cluster.node("cn-c")
        target = f"{new.underlay_ip}:{UL_PORT}"
        old_tap = b.tap
        await self.cluster.control(new, "vnic_add", name=DEVICE, mac=b.mac, tap="vnB2")
        self.events("demo", "orchestrator: B's new TAP replaces the old one in B's namespace")
        await self.cluster.shell.sh("ip", "-n", b.ns, "link", "set", old_tap, "down")
        await self.cluster.shell.sh("ip", "-n", new.ns, "link", "set", "vnB2", "netns", b.ns)
        await self.cluster.shell.sh("ip", "-n", b.ns, "link", "set", "vnB2", "mtu", "1400", "up")
        await self.cluster.shell.sh("ip", "-n", b.ns, "addr", "add", f"{b.ip}/24", "dev", "vnB2")
        t0 = time.perf_counter()
        if self.fail_step != "move":
            await self.api("PUT", f"/vnics/{b.mac}", {"cn_uuid": new.cn_uuid})
        await self.cluster.control(old, "vnic_rm", name=DEVICE, mac=b.mac)
        b.node, b.tap = new, "vnB2"
        converged: float | None = None
        with trio.move_on_after(OBSERVE):
            while await self.cache_dest(self.cluster.node("cn-a"), b.mac) != target:
                await trio.sleep(0.01)
            converged = time.perf_counter() - t0
        if converged is not None:
            self.events("demo", f"cn-a's cache sends B to {target} {ms(converged)} after the PUT")
        ok, summary = await self.ping(a, b)
        if converged is None:
            now = await self.cache_dest(self.cluster.node("cn-a"), b.mac)
            first = f"cn-a's cache still has B -> {now}"
        else:
            first = f"cn-a's cache B -> {target} within {ms(converged)} of the PUT"
        r.observed = f"{first}; ping after the move: {summary}"
        r.status = "OK" if converged is not None and ok else "FAIL"

    async def firewall_scenario(self, r: StepResult) -> None:
        a, b = self.guests["A"], self.guests["B"]
        echo = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", b.ns, sys.executable, "-c", UDP_ECHO, b.ip, str(UDP_DPORT)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.helpers.append(echo)
        async for line in lines(echo.stdout):
            if line.startswith("READY"):
                break
        self.events(f"guest {b.name}", f"UDP echo server listening on {b.ip}:{UDP_DPORT}")

        async def firewall_row() -> dict[str, Any]:
            status = await self.cluster.control(b.node, "firewall")
            return next((v for v in status.get("vnics", []) if v["mac"] == b.mac), {})

        async def ask(sport: int) -> str | None:
            code, out = await self.cluster.shell.in_ns(
                a.ns, sys.executable, "-c", UDP_ASK, a.ip, str(sport), b.ip, str(UDP_DPORT),
                f"{QUIET * 3:g}", check=False,
            )  # fmt: skip
            return out.strip() if code == 0 else None

        await self.api("PUT", f"/vnics/{b.mac}", {"firewall_enabled": True})
        with trio.move_on_after(OBSERVE):
            while not (await firewall_row()).get("filtered"):
                await trio.sleep(0.02)
        before = (await firewall_row()).get("blocked_in", 0)
        if not (await firewall_row()).get("filtered"):
            r.observed = f"no firewall policy for B reached {b.node.name}"
            return
        answer = await ask(UDP_SPORT)
        blocked = (await firewall_row()).get("blocked_in", 0) - before
        echoed = f"echo {answer!r}" if answer is not None else "no echo"
        self.events(b.node.name, f"firewall: B's inbound drops +{blocked}; {echoed}")
        if answer is not None or blocked < 1:
            r.observed = "UDP reached B with the firewall enabled and no rule"
            return
        await self.allow_udp_to_b()
        with trio.move_on_after(OBSERVE):
            while not (await firewall_row()).get("rules"):
                await trio.sleep(0.02)
        answer = await ask(UDP_SPORT + 1)
        if answer is None:
            r.observed = "blocked without a rule; still blocked after POST /rules ALLOW"
            return
        self.events(f"guest {a.name}", f"UDP answer from B: {answer!r}")
        r.observed = (
            f"blocked without a rule ({blocked} drop(s), no echo); echo after the ALLOW rule"
        )
        r.status = "OK"

    def print_header(self, hub: str) -> None:
        say = self.events.say
        say("\nportolan demo --netns: one portolan and three varpd processes on namespaces")
        say(f"  work folder  {self.workdir}")
        met = self.cluster.bound["metrics"]
        say(f"  portolan     in namespace {hub}: api={self.cluster.api_url} "
            f"metrics=http://{met[0]}:{met[1]}/metrics")  # fmt: skip
        for n in self.nodes:
            say(f"  {n.name:<12} namespace {n.ns}, underlay {n.underlay_ip}:{UL_PORT}, "
                f"metrics={n.metrics_url} control={n.control_path}")  # fmt: skip
        for g in self.guests.values():
            say(f"  guest {g.name}      namespace {g.ns}, {g.tap} {g.mac} {g.ip}")

    def print_keep(self, hub: str) -> None:
        say = self.offer
        a, b = self.guests["A"], self.guests["B"]
        say("\n--keep: everything stays up until Ctrl-C. The API lives in namespace "
            f"{hub}, so run the CLI there:")  # fmt: skip
        say(f"  ip netns exec {hub} portolan vnic list --api {self.cluster.api_url}")
        say(f"  ip netns exec {hub} portolan rule list --api {self.cluster.api_url}")
        for n in self.nodes:
            say(f"  varpdadm --socket {n.control_path} list")
        say(f"  varpdadm --socket {self.cluster.node('cn-a').control_path} cache list {DEVICE}")
        say(
            f"B's firewall lets in only udp {UDP_DPORT}, so a ping is dropped until a rule allows it:"
        )
        say(f"  ip netns exec {a.ns} ping -c 3 {b.ip}")
        say(
            f"  ip netns exec {hub} portolan rule add --api {self.cluster.api_url} --owner-uuid {OWNER} "
            f"--enabled 'FROM any TO vm {VM_B} ALLOW icmp TYPE 8 CODE 0'"
        )
        say(f"  ip netns exec {a.ns} ping -c 3 {b.ip}")
        say(f"  ip netns exec {hub} curl {self.cluster.node('cn-a').metrics_url}")

    # -- main ------------------------------------------------------------------------------

    async def run(self) -> int:
        self.events.say("== topology: namespaces, a bridge, veths")
        async with self.cluster as cluster:
            try:
                assert cluster.netns is not None
                hub = cluster.netns.hub
                for tenant in ("ta", "tb"):
                    await cluster.netns.add_ns(tenant)
                self.events.say("\n== setup through the management API")
                await self.provision_network()
                await cluster.start_nodes()
                for name, node_name, vm, tenant in (
                    ("A", "cn-a", VM_A, "ta"),
                    ("B", "cn-b", VM_B, "tb"),
                ):
                    node = cluster.node(node_name)
                    vnic = await self.create_vnic(node_name, vm)
                    guest = NsGuest(
                        name, vnic["mac"], vnic["ip"], cluster.netns.prefix + tenant, "", node
                    )
                    self.guests[name] = guest
                    await self.plug(guest, node, f"vn{name}")
                self.print_header(hub)
                await trio.sleep(0.6)  # the VNIC creations' log entries are applied
                await self.run_steps()
                self.print_summary()
                self.events.enabled = self.options.keep and self.options.events
                if self.options.keep:
                    self.print_keep(hub)
                    await wait_for_signal()
                    self.offer("stopping")
            finally:
                for proc in self.helpers:
                    with contextlib.suppress(ProcessLookupError, OSError):
                        os.killpg(proc.pid, signal.SIGTERM)
        return 0 if self.ok else 1
