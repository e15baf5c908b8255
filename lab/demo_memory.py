"""The demo in this process: memory backend, guests driven through the VNIC ports.

The guests are the memory VNIC ports: the scenario writes Ethernet frames into them
(`lab.frames`) and reads what they receive. Light observers print one line per event: each
node's driver is an `lab.observe.ObservedDriver`, each VNIC an `ObservedVnic`, and an
underlay tap shows the encapsulated datagrams. See `lab.demo` for the steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from lab.cluster import Cluster, Node
from lab.demo import (
    DEVICE,
    OBSERVE,
    QUIET,
    SUBNET,
    UDP_DPORT,
    UDP_SPORT,
    UL_PORT,
    VM_A,
    VM_B,
    VNET_ID,
    DemoBase,
    demo_spec,
)
from lab.frames import Summary, icmp_echo, summarize, udp_frame
from lab.observe import ObservedDriver
from lab.scenario import StepResult, ms, wait_for_signal
from protocol.addr import format_mac, parse_mac
from protocol.ethernet import ARP_REQUEST, BROADCAST_MAC, build_arp
from varpd.shim.types import Point


@dataclass
class Guest:
    name: str
    mac: bytes
    ip: str
    node: Node

    def port(self) -> Any:
        return self.node.varpd.vnic(DEVICE, self.mac).port

    def vnic(self) -> Any:
        return self.node.varpd.vnic(DEVICE, self.mac)


class MemoryDemo(DemoBase):
    """The in-process flavour (see the module docstring)."""

    EXPECTED = (
        ("arp", "A's ARP for B's IP answered by proxy (SVP VL3)"),
        ("ping", "echo A->B encapsulated to cn-b; reply after a VL2 lookup"),
        ("move", "B moved to cn-c via the API; every node shot down; echo follows"),
        ("firewall", "firewall on B blocks inbound UDP; ALLOW rule lets it in"),
        ("metrics", "every /metrics endpoint answers and counts the lookups"),
    )

    def __init__(self, options: Any, workdir: str) -> None:
        self.guests: dict[str, Guest] = {}
        super().__init__(options, workdir)

    def make_cluster(self) -> Cluster:
        cluster = Cluster(
            demo_spec(),
            log=self.events,
            workdir=self.workdir,
            driver_factory=lambda node, backend: ObservedDriver(backend, node.name, self.events),
        )
        cluster.underlay.tap(self._on_datagram)
        return cluster

    @property
    def nodes(self) -> list[Node]:
        return list(self.cluster.nodes.values())

    def cache_dest(self, node: Node, mac: bytes) -> str | None:
        entry = node.driver.cache_get(DEVICE, mac)
        if entry is None or entry.point is None:
            return None
        return str(entry.point)

    async def expect(
        self, guest: Guest, match: Callable[[Summary], bool], timeout: float = OBSERVE
    ) -> float | None:
        """Seconds until ``guest`` receives a frame ``match`` accepts (others are skipped);
        None when none arrived within ``timeout``."""
        port = guest.port()
        t0 = time.perf_counter()
        with trio.move_on_after(timeout):
            while True:
                frame = await port.receive()
                if match(summarize(frame)):
                    return time.perf_counter() - t0
        return None

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = OBSERVE
    ) -> float | None:
        t0 = time.perf_counter()
        with trio.move_on_after(timeout):
            while not predicate():
                await trio.sleep(0.005)
            return time.perf_counter() - t0
        return None

    def _on_datagram(self, datagram: Any) -> None:
        payload = datagram.payload
        vni = int.from_bytes(payload[4:7], "big")
        src = self.events.underlay.get(datagram.src.ip, "?")
        dst = self.events.underlay.get(datagram.dst.ip, "?")
        self.events(
            "underlay",
            f"VXLAN vni {vni} {src} -> {dst} ({self.events.point(datagram.dst)}): "
            f"{self.events.frame(payload[8:])}",
        )

    async def provision_vnics(self) -> None:
        """Two VNICs through the API, each plugged into its node's varpd."""
        for name, node_name, vm in (("A", "cn-a", VM_A), ("B", "cn-b", VM_B)):
            node = self.cluster.node(node_name)
            vnic = await self.create_vnic(node_name, vm)
            mac = parse_mac(vnic["mac"])
            guest = Guest(name, mac, vnic["ip"], node)
            self.guests[name] = guest
            self.events.macs[mac] = name
            self.events("demo", f"VNIC {name}: mac {vnic['mac']} ip {vnic['ip']} on {node.name}")
            await self.cluster.vnic_add(node, vnic["mac"])  # the orchestrator plugs it in
        # Creating the VNICs queued VL3 log entries (gratuitous ARPs) for the nodes of the
        # vnet; let them be applied so that they do not interleave with the first step.
        await trio.sleep(0.6)
        for guest in self.guests.values():
            guest.port().received()

    async def step_arp(self, r: StepResult) -> None:
        a, b = self.guests["A"], self.guests["B"]
        who_has = build_arp(ARP_REQUEST, a.mac, a.ip, b"\0" * 6, b.ip, dst=BROADCAST_MAC)
        self.events("guest A", f"sends {self.events.frame(who_has)}")
        a.port().send_nowait(who_has)

        def is_answer(s: Summary) -> bool:
            return s.kind == "arp-reply" and s.src_ip == b.ip and s.detail == format_mac(b.mac)

        took = await self.expect(a, is_answer)
        if took is None:
            r.observed = "no ARP reply reached A"
            return
        r.observed = f"A got '{b.ip} is-at {format_mac(b.mac)}' in {ms(took)}"
        r.status = "OK"

    async def _ping(
        self, src: Guest, dst: Guest, seq: int, *, answer: bool = True
    ) -> tuple[float | None, float | None]:
        """Echo src -> dst, and dst's answer; seconds to each delivery (None: not seen)."""
        request = icmp_echo(src.mac, dst.mac, src.ip, dst.ip, seq)
        self.events(f"guest {src.name}", f"sends {self.events.frame(request)}")
        src.port().send_nowait(request)
        there = await self.expect(
            dst,
            lambda s: s.kind == "echo-request" and s.src_ip == src.ip and s.detail == f"seq {seq}",
        )
        if there is None:
            return None, None
        if not answer:
            back = None
            await trio.sleep(QUIET)
        else:
            reply = icmp_echo(dst.mac, src.mac, dst.ip, src.ip, seq, reply=True)
            self.events(f"guest {dst.name}", f"answers {self.events.frame(reply)}")
            dst.port().send_nowait(reply)
            back = await self.expect(
                src,
                lambda s: (
                    s.kind == "echo-reply" and s.src_ip == dst.ip and s.detail == f"seq {seq}"
                ),
            )
        return there, back

    async def step_ping(self, r: StepResult) -> None:
        a, b = self.guests["A"], self.guests["B"]
        lookups_before = b.node.driver.counters["responds"]
        there, back = await self._ping(a, b, 1, answer=self.fail_step != "ping")
        if there is None:
            r.observed = "the echo request never reached B on cn-b"
            return
        if back is None:
            r.observed = f"request reached B ({ms(there)}) but no reply reached A"
            return
        vl2 = b.node.driver.counters["responds"] - lookups_before
        cached = self.cache_dest(b.node, a.mac)
        r.observed = (
            f"request at B in {ms(there)}, reply at A in {ms(back)}; "
            f"cn-b VL2 lookups {vl2}, cached A -> {cached}"
        )
        r.status = "OK" if vl2 >= 1 and cached is not None else "FAIL"

    async def step_move(self, r: StepResult) -> None:
        a, b = self.guests["A"], self.guests["B"]
        old, new = b.node, self.cluster.node("cn-c")
        target = f"{new.underlay_ip}:{UL_PORT}"
        self.events("demo", f"orchestrator: plug B into {new.name}'s varpd")
        await new.varpd.vnic_add(DEVICE, format_mac(b.mac))
        t0 = time.perf_counter()
        if self.fail_step != "move":
            await self.api("PUT", f"/vnics/{format_mac(b.mac)}", {"cn_uuid": new.cn_uuid})
        self.events("demo", f"orchestrator: unplug B from {old.name}'s varpd")
        await old.varpd.vnic_remove(DEVICE, format_mac(b.mac))
        b.node = new
        # Every node of the vnet applies the shootdown: its cache now sends B to cn-c.
        applied: dict[str, float] = {}

        def everywhere() -> bool:
            for node in self.nodes:
                if node.name not in applied and self.cache_dest(node, b.mac) == target:
                    applied[node.name] = time.perf_counter() - t0
            return len(applied) == len(self.nodes)

        converged = await self.wait_for(everywhere)
        if converged is not None:
            converged = max(applied.values())
            detail = ", ".join(f"{n} {ms(t)}" for n, t in sorted(applied.items()))
            self.events("demo", f"every node applied the shootdown after the PUT: {detail}")
        there, back = await self._ping(a, b, 2)
        parts = []
        if converged is None:
            stale = [n.name for n in self.nodes if n.name not in applied]
            parts.append(
                f"not applied on {', '.join(stale)} (cn-a has B -> "
                f"{self.cache_dest(a.node, b.mac)})"
            )
        else:
            parts.append(f"all 3 caches B -> {target} within {ms(converged)} of the PUT")
        if there is None:
            parts.append("echo not delivered on cn-c")
        elif back is None:
            parts.append("echo at B on cn-c, no reply at A")
        else:
            parts.append(f"echo at B on cn-c in {ms(there)}, reply at A")
        r.observed = "; ".join(parts)
        r.status = (
            "OK" if converged is not None and there is not None and back is not None else "FAIL"
        )

    async def firewall_scenario(self, r: StepResult) -> None:
        a, b = self.guests["A"], self.guests["B"]
        vnic = b.vnic()
        mac = format_mac(b.mac)
        await self.api("PUT", f"/vnics/{mac}", {"firewall_enabled": True})
        applied = await self.wait_for(lambda: b.vnic().filter is not None)
        if applied is None:
            r.observed = f"no firewall policy for B reached {b.node.name}"
            return
        self.events(b.node.name, f"firewall policy for B applied ({ms(applied)} after the PUT)")

        def udp_at_b(s: Summary) -> bool:
            return s.kind == "udp" and s.src_ip == a.ip and s.detail == f"{UDP_SPORT}>{UDP_DPORT}"

        frame = udp_frame(a.mac, b.mac, a.ip, b.ip, UDP_SPORT, UDP_DPORT)
        drops = vnic.counters["filter_drop_in"]
        self.events("guest A", f"sends {self.events.frame(frame)}")
        a.port().send_nowait(frame)
        leaked = await self.expect(b, udp_at_b, QUIET)
        blocked = vnic.counters["filter_drop_in"] > drops and leaked is None
        if not blocked:
            r.observed = "UDP reached B with the firewall enabled and no rule"
            return
        await self.allow_udp_to_b()

        def has_allow() -> bool:
            flt = b.vnic().filter
            return flt is not None and any(rule.action == "allow" for rule in flt.rules)

        allowed = await self.wait_for(has_allow)
        if allowed is not None:
            self.events(b.node.name, f"policy with the ALLOW rule applied ({ms(allowed)})")
        self.events("guest A", f"sends {self.events.frame(frame)}")
        a.port().send_nowait(frame)
        passed = await self.expect(b, udp_at_b, OBSERVE if allowed is not None else QUIET)
        if passed is None:
            r.observed = "blocked without a rule; still blocked after POST /rules ALLOW"
            return
        r.observed = (
            f"blocked without a rule (filter drop, nothing delivered); delivered "
            f"{ms(passed)} after sending once the ALLOW rule applied"
        )
        r.status = "OK"

    # -- output ----------------------------------------------------------------------------

    def print_header(self) -> None:
        say = self.events.say
        say("\nportolan demo: one portolan and three compute nodes in this process")
        say(f"  work folder  {self.workdir}")
        svp, api, met = (self.cluster.bound[k] for k in ("svp", "api", "metrics"))
        say(
            f"  portolan     svp={svp[0]}:{svp[1]} api={self.cluster.api_url} "
            f"metrics=http://{met[0]}:{met[1]}/metrics"
        )
        for n in self.nodes:
            say(
                f"  {n.name:<12} varpd underlay {n.underlay_ip}:{UL_PORT} "
                f"metrics={n.metrics_url} control={n.control_path}"
            )
        say(f"  vnet {VNET_ID}, subnet {SUBNET}, overlay device {DEVICE} on every node")

    def print_endpoints(self) -> None:
        say = self.offer
        host, port = self.cluster.bound["metrics"]
        say("\nmetrics endpoints:")
        say(f"  portolan  http://{host}:{port}/metrics")
        for n in self.nodes:
            say(f"  {n.name:<9} {n.metrics_url}")

    def print_keep(self) -> None:
        say = self.offer
        b = self.guests["B"]
        say("\n--keep: everything stays up until Ctrl-C. Try:")
        say(f"  portolan vnic list --api {self.cluster.api_url}")
        say(f"  portolan cn list --api {self.cluster.api_url}")
        say(f"  portolan network list --api {self.cluster.api_url}")
        say(f"  portolan vnic show {format_mac(b.mac)} --api {self.cluster.api_url}")
        say(f"  curl {self.cluster.api_url}/vnics")
        for n in self.nodes:
            say(f"  varpdadm --socket {n.control_path} list")
        a, c = self.cluster.node("cn-a"), self.cluster.node("cn-c")
        say(f"  varpdadm --socket {a.control_path} cache list {DEVICE}")
        say(f"  varpdadm --socket {a.control_path} vnic list {DEVICE}")
        say(f"  varpdadm --socket {c.control_path} firewall")
        say(f"  portolan rule list --api {self.cluster.api_url}")
        say(f"  curl {a.metrics_url}")
        say("A move to watch (the portolan side only; cn-a's cache follows within a second):")
        say(
            f"  portolan vnic move {format_mac(b.mac)} --cn {a.cn_uuid} --api {self.cluster.api_url}"
        )
        say(f"  varpdadm --socket {a.control_path} cache list {DEVICE}")

    # -- main ------------------------------------------------------------------------------

    async def run(self) -> int:
        async with self.cluster as cluster:
            self.events.say(
                f"== setup: compute nodes and the network through the API at {cluster.api_url}"
            )
            await self.provision_network()
            await cluster.start_nodes()
            for node in self.nodes:
                self.events.underlay[Point.of(node.underlay_ip, UL_PORT).ip] = node.name
            self.print_header()
            self.events.say("\n== setup: VNICs through the API, plugged into their varpd")
            await self.provision_vnics()
            await self.run_steps()
            self.print_summary()
            self.events.enabled = self.options.keep and self.options.events
            if self.options.keep:  # once the run ends, these endpoints are gone
                self.print_endpoints()
                self.print_keep()
                await wait_for_signal()
                self.offer("stopping")
        return 0 if self.ok else 1
