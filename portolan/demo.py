"""``portolan demo``: the whole overlay in one process, driven the way an operator would.

Theory of operation
-------------------
The demo assembles, on loopback and in a temporary folder:

- one portolan, exactly as ``portolan serve`` runs it (`portolan.cli.serve.serve_portolan`):
  the Directory on SQLite, the SVP server, the management API and ``/metrics``, every
  listener on port 0;
- three compute nodes ``cn-a``, ``cn-b``, ``cn-c``: one `varpd.daemon.Varpd` each, with the
  memory backend on one shared `MemoryUnderlay` (underlay IPs 10.0.0.1-3), one overlay device
  searched by the svp plugin, its own ``/metrics`` listener and control socket, and
  ``portolan_api`` pointing at the API (firewall policy).

Compute nodes, the network and the VNICs are created through the HTTP API (httpx), never by
calling the Directory; the VNICs are then plugged into their node's varpd, as an orchestrator
does. The guests are the memory VNIC ports: the demo writes Ethernet frames into them and
reads what they receive.

Then the steps run, each verified by observing the frames themselves:

1. ``arp``: guest A asks ARP who-has B's IP; varpd on cn-a proxies it with an SVP VL3 lookup
   and A receives the reply.
2. ``ping``: ICMP echo A -> B, encapsulated over the underlay to cn-b; guest B answers; cn-b
   has no entry for A, so the reply misses, varpd asks portolan (VL2), the cache fills and
   the reply reaches A.
3. ``move``: B moves to cn-c (orchestrator flow: add the VNIC on cn-c's varpd, ``PUT
   /vnics/{mac}`` with the new ``cn_uuid``, remove it from cn-b); cn-a applies the shootdown
   (its cache entry for B now points at cn-c) and the echo follows B there.
4. ``firewall``: ``firewall_enabled`` on B blocks inbound UDP (default inbound BLOCK, seen as
   a VNIC filter drop with nothing delivered); ``POST /rules`` with an ALLOW lets it through.
5. ``metrics``: every ``/metrics`` endpoint answers and shows the lookups made.

While this happens, light observers print one timestamped line per event: the driver of each
node is an `ObservedDriver` (lookups taken and answered, cache fills and removals, injected
frames), each VNIC an `ObservedVnic` (deliveries, firewall decisions), and an underlay tap
shows the encapsulated datagrams. A summary table (step, expected, observed, time, result)
ends the run; the exit status is 0 only when every step was observed to happen.

``--keep`` leaves everything running until Ctrl-C and prints the ``portolan`` and ``varpdadm``
commands that reach it. ``--fail-step`` (hidden, for tests) leaves out one action so that its
verification must fail. ``--netns`` runs the scenario on network namespaces, TAP devices and
UDP sockets when that backend is available.

Lifecycle: `run_demo` owns one trio run; every task lives in its nursery; the temporary
folder (and, with ``--netns``, every namespace and process it made) is removed on the way out.

Layering: this is the one module of ``portolan/`` that imports ``varpd/`` (HACKING: the two
never import each other): the demo assembles both, as the tests do. Only ``portolan demo``
imports it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, TextIO

import httpx
import trio

from protocol.addr import format_mac, parse_mac
from protocol.ethernet import (
    ARP_REQUEST,
    BROADCAST_MAC,
    ETH_P_ARP,
    build_arp,
    build_l2_header,
    inet_checksum,
    parse_arp,
)
from varpd.shim.device import Vnic
from varpd.shim.driver import OverlayDriver
from varpd.shim.types import Point

REPO_ROOT = Path(__file__).resolve().parent.parent
VNET_ID = 12340
DEVICE = "overlay0"
OWNER = "9dce1460-0c4f-4a3e-8e9f-5a6c3a1f0001"
VM_A = "c0ffee00-0000-4000-8000-00000000000a"
VM_B = "c0ffee00-0000-4000-8000-00000000000b"
SUBNET = "192.168.100.0/24"
GATEWAY = "192.168.100.1"
UL_PORT = 4789
NODES = (
    ("cn-a", "0a1b2c3d-0000-4000-8000-00000000000a", "10.0.0.1"),
    ("cn-b", "0a1b2c3d-0000-4000-8000-00000000000b", "10.0.0.2"),
    ("cn-c", "0a1b2c3d-0000-4000-8000-00000000000c", "10.0.0.3"),
)
STEPS = ("arp", "ping", "move", "firewall", "metrics")
#: steps ``--fail-step`` can sabotage, and what it leaves out
SABOTAGE = {
    "ping": "guest B does not answer the echo request",
    "move": "the PUT /vnics/{mac} that tells portolan about the move is not sent",
    "firewall": "the POST /rules that allows the flow is not sent",
}
#: bound on every observation (the goals are far tighter: a lookup is milliseconds, a
#: shootdown 0.25 s + a round trip); kept short so that a failing run still ends quickly
OBSERVE = 3.0
#: how long "nothing was delivered" is watched for
QUIET = 0.4
UDP_DPORT = 5000
UDP_SPORT = 40000

ETH_P_IP = 0x0800


# ------------------------------------------------------------------------------ frames


def ms(seconds: float) -> str:
    """Milliseconds, with the precision a reader needs."""
    value = seconds * 1000
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def _ipv4_packet(src: str, dst: str, proto: int, payload: bytes, ident: int) -> bytes:
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident & 0xFFFF,
        0x4000,
        64,
        proto,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack(">H", inet_checksum(header)) + header[12:]
    return header + payload


def icmp_echo(
    src_mac: bytes, dst_mac: bytes, src: str, dst: str, seq: int, *, reply: bool = False
) -> bytes:
    """An Ethernet/IPv4 ICMP echo request (or reply), identifier 0x7070."""
    body = b"portolan demo payload"
    icmp = struct.pack(">BBHHH", 0 if reply else 8, 0, 0, 0x7070, seq) + body
    icmp = icmp[:2] + struct.pack(">H", inet_checksum(icmp)) + icmp[4:]
    return build_l2_header(dst_mac, src_mac, ETH_P_IP) + _ipv4_packet(src, dst, 1, icmp, seq)


def udp_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int) -> bytes:
    """An Ethernet/IPv4/UDP frame (checksum 0: allowed over IPv4)."""
    data = b"hello through the overlay"
    udp = struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data
    return build_l2_header(dst_mac, src_mac, ETH_P_IP) + _ipv4_packet(src, dst, 17, udp, sport)


@dataclass(frozen=True)
class Summary:
    """What the demo needs to know about a frame (parsed by hand, no scapy)."""

    kind: str  # arp-request | arp-reply | garp | echo-request | echo-reply | udp | other
    src_mac: bytes
    dst_mac: bytes
    src_ip: str = ""
    dst_ip: str = ""
    detail: str = ""


def summarize(frame: bytes) -> Summary:
    dst, src = frame[:6], frame[6:12]
    ethertype = int.from_bytes(frame[12:14], "big") if len(frame) >= 14 else 0
    if ethertype == ETH_P_ARP:
        try:
            arp = parse_arp(frame)
        except ValueError:
            return Summary("other", src, dst, detail="malformed ARP")
        if arp.gratuitous:
            kind = "garp"
        else:
            kind = "arp-request" if arp.op == ARP_REQUEST else "arp-reply"
        return Summary(
            kind, src, dst, str(arp.sender_ip), str(arp.target_ip), format_mac(arp.sender_mac)
        )
    if ethertype == ETH_P_IP and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        sip = str(IPv4Address(frame[26:30]))
        dip = str(IPv4Address(frame[30:34]))
        l4 = frame[14 + ihl :]
        if proto == 1 and len(l4) >= 8:
            kind = {8: "echo-request", 0: "echo-reply"}.get(l4[0], "other")
            seq = int.from_bytes(l4[6:8], "big")
            return Summary(kind, src, dst, sip, dip, f"seq {seq}")
        if proto == 17 and len(l4) >= 8:
            sport, dport = struct.unpack_from(">HH", l4)
            return Summary("udp", src, dst, sip, dip, f"{sport}>{dport}")
        return Summary("other", src, dst, sip, dip, f"IP proto {proto}")
    return Summary("other", src, dst, detail=f"ethertype {ethertype:#06x}")


# ------------------------------------------------------------------------------ events


class Events:
    """Prints one line per event: wall clock, seconds since start, source, text."""

    def __init__(self, out: TextIO, *, enabled: bool = True) -> None:
        self.out = out
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.macs: dict[bytes, str] = {}
        self.ips: dict[str, str] = {}
        self.underlay: dict[bytes, str] = {}

    def __call__(self, source: str, text: str) -> None:
        if not self.enabled:
            return
        now = time.time()
        clock = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        print(f"{clock} +{time.monotonic() - self.t0:6.3f}s  {source:<8} {text}", file=self.out)
        self.out.flush()

    def say(self, text: str = "") -> None:
        print(text, file=self.out)
        self.out.flush()

    def mac(self, mac: bytes) -> str:
        name = self.macs.get(mac)
        return f"{format_mac(mac)} ({name})" if name else format_mac(mac)

    def point(self, point: Point | None) -> str:
        if point is None:
            return "drop"
        text = str(point)
        node = self.underlay.get(point.ip)
        return f"{text} ({node})" if node else text

    def frame(self, frame: bytes) -> str:
        s = summarize(frame)
        if s.kind == "arp-request":
            return f"ARP who-has {s.dst_ip} tell {s.src_ip}"
        if s.kind == "arp-reply":
            return f"ARP reply {s.src_ip} is-at {s.detail}"
        if s.kind == "garp":
            return f"gratuitous ARP {s.src_ip} is-at {s.detail}"
        if s.kind in ("echo-request", "echo-reply"):
            return f"ICMP {s.kind.replace('-', ' ')} {s.src_ip} > {s.dst_ip} {s.detail}"
        if s.kind == "udp":
            sport, _, dport = s.detail.partition(">")
            return f"UDP {s.src_ip}:{sport} > {s.dst_ip}:{dport}"
        return f"{self.mac(s.src_mac)} > {self.mac(s.dst_mac)} {s.detail}"


# ------------------------------------------------------------------------------ observers

#: who called the driver, for readable event text (best effort; only wording depends on it)
_CALLERS = {
    "arp": "proxy ARP: portolan answered VL3",
    "_apply_vl3": "shootdown VL3: re-resolved with portolan",
    "_apply_vl2": "shootdown VL2",
}


def _caller() -> str:
    frame = sys._getframe(2)
    return _CALLERS.get(frame.f_code.co_name, frame.f_code.co_name)


class ObservedDriver(OverlayDriver):
    """The overlay driver of one node, printing its upcalls and cache changes."""

    def __init__(self, backend: Any, node: str, events: Events) -> None:
        super().__init__(backend)
        self.node = node
        self.events = events
        self._asked: dict[int, tuple[Any, float]] = {}

    async def next_lookup(self) -> Any:
        req = await super().next_lookup()
        self._asked[req.req_id] = (req, time.perf_counter())
        if req.sap == ETH_P_ARP:
            what = f"{self.events.frame(req.frame)}: upcall to varpd (proxy ARP)"
        else:
            what = f"miss for {self.events.mac(req.dst_mac)}: upcall to varpd (req {req.req_id})"
        self.events(self.node, what)
        return req

    def respond(self, req_id: int, point: Point) -> None:
        asked = self._asked.pop(req_id, None)
        if asked is not None:
            req, t = asked
            took = ms(time.perf_counter() - t)
            self.events(
                self.node,
                f"VL2 answer from portolan in {took}: {self.events.mac(req.dst_mac)} is at "
                f"{self.events.point(point)}; cache filled, waiting frame sent",
            )
        super().respond(req_id, point)

    def drop(self, req_id: int) -> None:
        asked = self._asked.pop(req_id, None)
        if asked is not None and asked[0].sap != ETH_P_ARP:
            self.events(self.node, f"lookup of {self.events.mac(asked[0].dst_mac)} dropped")
        super().drop(req_id)

    def cache_set(self, name: str, mac: bytes, point: Point | None, drop: bool = False) -> None:
        super().cache_set(name, mac, point, drop)
        self.events(
            self.node,
            f"{_caller()}; cache set {self.events.mac(mac)} -> {self.events.point(point)}",
        )

    def cache_remove(self, name: str, mac: bytes) -> None:
        super().cache_remove(name, mac)
        self.events(self.node, f"{_caller()}; cache entry of {self.events.mac(mac)} removed")

    def inject(self, name: str, frame: bytes, *, bypass_filter: bool = True) -> None:
        self.events(self.node, f"varpd injects towards the guests: {self.events.frame(frame)}")
        super().inject(name, frame, bypass_filter=bypass_filter)

    def add_vnic(self, name: str, mac: bytes, vlan: int = 0, port: Any = None) -> Any:
        vnic = super().add_vnic(name, mac, vlan, port)
        vnic.__class__ = ObservedVnic  # same object, with observed transmit/to_guest
        vnic.node = self.node
        vnic.events = self.events
        return vnic


class ObservedVnic(Vnic):
    """A shim VNIC that reports deliveries and firewall decisions."""

    node: str
    events: Events

    def transmit(self, frame: bytes) -> None:
        before = self.counters["filter_drop_out"]
        super().transmit(frame)
        if self.filter is not None:
            verdict = "BLOCKED" if self.counters["filter_drop_out"] > before else "allowed"
            self.events(self.node, f"firewall {verdict} outbound {self.events.frame(frame)}")

    def to_guest(self, frame: bytes, filtered: bool = True) -> None:
        before = self.counters["filter_drop_in"]
        delivered = self.counters["rx_frames"]
        super().to_guest(frame, filtered)
        who = self.events.macs.get(self.mac, format_mac(self.mac))
        if filtered and self.filter is not None:
            verdict = "BLOCKED" if self.counters["filter_drop_in"] > before else "allowed"
            self.events(
                self.node, f"firewall {verdict} inbound to {who}: {self.events.frame(frame)}"
            )
        if self.counters["rx_frames"] > delivered:
            self.events(self.node, f"guest {who} received {self.events.frame(frame)}")


# ------------------------------------------------------------------------------ results


@dataclass
class StepResult:
    step: str
    expected: str
    observed: str = "not run"
    seconds: float = 0.0
    status: str = "FAIL"  # OK | FAIL | SKIP

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


@dataclass
class Node:
    name: str
    cn_uuid: str
    underlay_ip: str
    varpd: Any = None
    driver: Any = None
    metrics_url: str = ""
    control_path: str = ""


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


@dataclass
class DemoOptions:
    keep: bool = False
    netns: bool = False
    fail_step: str | None = None
    events: bool = True
    out: TextIO = field(default_factory=lambda: sys.stdout)


class DemoError(Exception):
    """The demo could not set itself up (printed, exit 1)."""


def firewall_available() -> str | None:
    """None when portolan serves firewall rules and varpd fetches policies; else why not."""
    try:
        importlib.import_module("portolan.api.rules")
    except ModuleNotFoundError as exc:
        if exc.name == "portolan.api.rules":
            return "portolan.api.rules is not there yet"
        raise
    import varpd.daemon

    source = Path(varpd.daemon.__file__).read_text(encoding="utf-8")
    if "portolan_api" not in source:
        return "varpd does not fetch firewall policies (portolan_api) yet"
    return None


# ------------------------------------------------------------------------------ the scenario


class Scenario:
    """What both flavours share: options, events, the API client, steps and the summary."""

    def __init__(self, options: DemoOptions, workdir: str) -> None:
        self.options = options
        self.workdir = workdir
        self.events = Events(options.out, enabled=options.events)
        self.results: list[StepResult] = []
        self.bound: dict[str, tuple[str, int]] = {}
        self.api_url = ""
        self.http: httpx.AsyncClient | None = None
        self.network: dict[str, Any] = {}
        self.firewall_missing = firewall_available()

    async def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        assert self.http is not None
        response = await self.http.request(method, path, json=body)
        shown = "" if body is None else " " + ", ".join(f"{k}={v}" for k, v in body.items())
        self.events("api", f"{method} {path}{shown} -> {response.status_code}")
        if response.status_code >= 400:
            raise DemoError(f"{method} {path} answered {response.status_code}: {response.text}")
        return response.json() if response.content else None

    async def step(
        self, name: str, expected: str, body: Callable[[StepResult], Awaitable[None]]
    ) -> None:
        result = StepResult(name, expected)
        self.results.append(result)
        self.events.say(f"\n== {name}: {expected}")
        if self.options.fail_step == name:
            self.events.say(f"   (sabotaged for testing: {SABOTAGE[name]})")
        t0 = time.perf_counter()
        try:
            await body(result)
        except DemoError as exc:
            result.status, result.observed = "FAIL", str(exc)
        result.seconds = time.perf_counter() - t0
        self.events("demo", f"{name}: {result.status} ({result.observed})")

    def print_summary(self) -> None:
        say = self.events.say
        say("\n== summary")
        headers = ("step", "expected", "observed", "time", "result")
        limits = (10, 34, 58, 7, 6)
        rows = [
            (r.step, r.expected, r.observed, f"{r.seconds:.2f}s", r.status) for r in self.results
        ]
        widths = [
            min(limit, max(len(h), *(len(row[i]) for row in rows)))
            for i, (h, limit) in enumerate(zip(headers, limits, strict=True))
        ]
        say("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        say("  ".join("-" * w for w in widths))
        for row in rows:
            cells = [textwrap.wrap(c, w) or [""] for c, w in zip(row, widths, strict=True)]
            for i in range(max(len(c) for c in cells)):
                line = [c[i] if i < len(c) else "" for c in cells]
                say("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
        failed = [r.step for r in self.results if not r.ok]
        say("")
        say(f"RESULT: {'FAIL (' + ', '.join(failed) + ')' if failed else 'all steps OK'}")


class Demo(Scenario):
    """The in-process flavour: memory underlay, guests driven through the VNIC ports."""

    def __init__(self, options: DemoOptions, workdir: str) -> None:
        super().__init__(options, workdir)
        self.nodes = [Node(n, u, ip) for n, u, ip in NODES]
        self.underlay: Any = None
        self.guests: dict[str, Guest] = {}

    # -- plumbing --------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

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

    def cache_dest(self, node: Node, mac: bytes) -> str | None:
        entry = node.driver.cache_get(DEVICE, mac)
        if entry is None or entry.point is None:
            return None
        return str(entry.point)

    # -- setup -----------------------------------------------------------------------------

    async def start_portolan(self, nursery: trio.Nursery) -> None:
        from portolan.cli.serve import ServeConfig, serve_portolan

        config = ServeConfig(
            store=f"sqlite:{os.path.join(self.workdir, 'portolan.db')}",
            svp=("127.0.0.1", 0),
            api=("127.0.0.1", 0),
            metrics=("127.0.0.1", 0),
            reload_interval=0,
        )
        self.bound = await nursery.start(serve_portolan, config)
        if "api" not in self.bound:
            raise DemoError("portolan.api is not importable: the demo needs the management API")
        host, port = self.bound["api"]
        self.api_url = f"http://{host}:{port}"

    async def start_nodes(self, nursery: trio.Nursery) -> None:
        from varpd.config import parse_config
        from varpd.daemon import Varpd
        from varpd.shim.memory import MemoryUnderlay

        self.underlay = MemoryUnderlay()
        self.underlay.tap(self._on_datagram)
        svp_port = self.bound["svp"][1]
        for node in self.nodes:
            folder = os.path.join(self.workdir, node.name)
            os.makedirs(folder, exist_ok=True)
            config = parse_config(
                {
                    "cn_uuid": node.cn_uuid,
                    "state_dir": os.path.join(folder, "state"),
                    "control_socket": os.path.join(folder, "varpd.sock"),
                    "metrics": "127.0.0.1:0",
                    "portolan_api": self.api_url,
                    "lookup_workers": 3,
                }
            )
            node.driver = ObservedDriver(self.underlay.backend(), node.name, self.events)
            node.varpd = await nursery.start(Varpd(config, driver=node.driver).run)
            host, port = node.varpd.metrics_address
            node.metrics_url = f"http://{host}:{port}/metrics"
            node.control_path = node.varpd.control_path or ""
            props = {
                "vxlan/listen_ip": node.underlay_ip,
                "vxlan/listen_port": UL_PORT,
                "svp/host": "127.0.0.1",
                "svp/port": svp_port,
                "svp/underlay_ip": node.underlay_ip,
                "svp/underlay_port": UL_PORT,
            }
            await node.varpd.create(DEVICE, VNET_ID, "svp", props=props)
            await node.varpd.activate(DEVICE)
            self.events.underlay[Point.of(node.underlay_ip, UL_PORT).ip] = node.name

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

    async def provision_network(self) -> None:
        """Compute nodes and the network, through the management API (before the nodes
        start, so that their first log requests already find their CN)."""
        for node in self.nodes:
            await self.api("PUT", f"/cns/{node.cn_uuid}", {"ip": node.underlay_ip, "port": UL_PORT})
        self.network = await self.api(
            "POST",
            "/networks",
            {
                "name": "demo-net",
                "owner_uuid": OWNER,
                "vnet_id": VNET_ID,
                "vlan_id": 0,
                "subnet": SUBNET,
                "gateway": GATEWAY,
            },
        )

    async def provision_vnics(self) -> None:
        """Two VNICs through the API, each plugged into its node's varpd."""
        for name, node_name, vm in (("A", "cn-a", VM_A), ("B", "cn-b", VM_B)):
            node = self.node(node_name)
            vnic = await self.api(
                "POST",
                "/vnics",
                {
                    "network_uuid": self.network["uuid"],
                    "cn_uuid": node.cn_uuid,
                    "owner_uuid": OWNER,
                    "belongs_to_uuid": vm,
                },
            )
            mac = parse_mac(vnic["mac"])
            guest = Guest(name, mac, vnic["ip"], node)
            self.guests[name] = guest
            self.events.macs[mac] = name
            self.events("demo", f"VNIC {name}: mac {vnic['mac']} ip {vnic['ip']} on {node.name}")
            await node.varpd.vnic_add(DEVICE, vnic["mac"])  # the orchestrator plugs it in
        # Creating the VNICs queued VL3 log entries (gratuitous ARPs) for the nodes of the
        # vnet; let them be applied so that they do not interleave with the first step.
        await trio.sleep(0.6)
        for guest in self.guests.values():
            guest.port().received()

    # -- steps -----------------------------------------------------------------------------

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
        there, back = await self._ping(a, b, 1, answer=self.options.fail_step != "ping")
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
        old, new = b.node, self.node("cn-c")
        target = f"{new.underlay_ip}:{UL_PORT}"
        self.events("demo", f"orchestrator: plug B into {new.name}'s varpd")
        await new.varpd.vnic_add(DEVICE, format_mac(b.mac))
        t0 = time.perf_counter()
        if self.options.fail_step != "move":
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

    async def step_firewall(self, r: StepResult) -> None:
        if self.firewall_missing is not None:
            r.status, r.observed = "SKIP", f"not available yet: {self.firewall_missing}"
            return
        await self.firewall_scenario(r)

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
        if self.options.fail_step != "firewall":
            await self.api(
                "POST",
                "/rules",
                {
                    "owner_uuid": OWNER,
                    "rule": f"FROM any TO vm {VM_B} ALLOW udp PORT {UDP_DPORT}",
                    "enabled": True,
                    "description": "portolan demo",
                },
            )

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

    async def step_metrics(self, r: StepResult) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        assert self.http is not None
        host, port = self.bound["metrics"]
        endpoints = [("portolan", f"http://{host}:{port}/metrics")]
        endpoints += [(n.name, n.metrics_url) for n in self.nodes]
        figures = []
        for name, url in endpoints:
            try:
                response = await self.http.get(url)
            except httpx.HTTPError as exc:
                r.observed = f"{url}: {type(exc).__name__}: {exc}"
                return
            if response.status_code != 200:
                r.observed = f"{url} answered {response.status_code}"
                return
            totals: dict[str, float] = {}
            for family in text_string_to_metric_families(response.text):
                for sample in family.samples:
                    if sample.name == "portolan_svp_requests_total":
                        op = sample.labels.get("op", "")
                        totals[op] = totals.get(op, 0) + sample.value
                    elif sample.name == "varpd_lookups_total":
                        totals["lookups"] = totals.get("lookups", 0) + sample.value
                    elif sample.name == "varpd_svp_shootdowns_total":
                        totals["shootdowns"] = totals.get("shootdowns", 0) + sample.value
            shown = ", ".join(f"{k} {int(v)}" for k, v in sorted(totals.items()) if v)
            self.events("metrics", f"{name} {url}: {shown or 'no lookups'}")
            figures.append(totals)
        svp = figures[0]
        if svp.get("vl2", 0) < 1 or svp.get("vl3", 0) < 1:
            r.observed = "portolan's /metrics shows no VL2/VL3 lookups"
            return
        r.observed = (
            f"{len(endpoints)} endpoints answer; portolan served {int(svp['vl2'])} VL2, "
            f"{int(svp['vl3'])} VL3, {int(svp.get('log', 0))} LOG requests"
        )
        r.status = "OK"

    # -- output ----------------------------------------------------------------------------

    def print_header(self) -> None:
        say = self.events.say
        say("\nportolan demo: one portolan and three compute nodes in this process")
        say(f"  work folder  {self.workdir}")
        svp, api, met = (self.bound[k] for k in ("svp", "api", "metrics"))
        say(
            f"  portolan     svp={svp[0]}:{svp[1]} api={self.api_url} "
            f"metrics=http://{met[0]}:{met[1]}/metrics"
        )
        for n in self.nodes:
            say(
                f"  {n.name:<12} varpd underlay {n.underlay_ip}:{UL_PORT} "
                f"metrics={n.metrics_url} control={n.control_path}"
            )
        say(f"  vnet {VNET_ID}, subnet {SUBNET}, overlay device {DEVICE} on every node")

    def print_endpoints(self) -> None:
        say = self.events.say
        host, port = self.bound["metrics"]
        say("\nmetrics endpoints:")
        say(f"  portolan  http://{host}:{port}/metrics")
        for n in self.nodes:
            say(f"  {n.name:<9} {n.metrics_url}")

    def print_keep(self) -> None:
        say = self.events.say
        b = self.guests["B"]
        say("\n--keep: everything stays up until Ctrl-C. Try:")
        say(f"  portolan vnic list --api {self.api_url}")
        say(f"  portolan cn list --api {self.api_url}")
        say(f"  portolan network list --api {self.api_url}")
        say(f"  portolan vnic show {format_mac(b.mac)} --api {self.api_url}")
        say(f"  curl {self.api_url}/vnics")
        for n in self.nodes:
            say(f"  varpdadm --socket {n.control_path} list")
        a, c = self.node("cn-a"), self.node("cn-c")
        say(f"  varpdadm --socket {a.control_path} cache list {DEVICE}")
        say(f"  varpdadm --socket {a.control_path} vnic list {DEVICE}")
        say(f"  varpdadm --socket {c.control_path} firewall")
        say(f"  portolan rule list --api {self.api_url}")
        say(f"  curl {a.metrics_url}")
        say("A move to watch (the portolan side only; cn-a's cache follows within a second):")
        say(f"  portolan vnic move {format_mac(b.mac)} --cn {a.cn_uuid} --api {self.api_url}")
        say(f"  varpdadm --socket {a.control_path} cache list {DEVICE}")

    # -- main ------------------------------------------------------------------------------

    async def run(self) -> int:
        async with trio.open_nursery() as nursery:
            await self.start_portolan(nursery)
            async with httpx.AsyncClient(base_url=self.api_url, timeout=10.0) as http:
                self.http = http
                self.events.say(
                    f"== setup: compute nodes and the network through the API at {self.api_url}"
                )
                await self.provision_network()
                await self.start_nodes(nursery)
                self.print_header()
                self.events.say("\n== setup: VNICs through the API, plugged into their varpd")
                await self.provision_vnics()
                await self.step(
                    "arp",
                    "A's ARP for B's IP answered by proxy (SVP VL3)",
                    self.step_arp,
                )
                await self.step(
                    "ping",
                    "echo A->B encapsulated to cn-b; reply after a VL2 lookup",
                    self.step_ping,
                )
                await self.step(
                    "move",
                    "B moved to cn-c via the API; every node shot down; echo follows",
                    self.step_move,
                )
                await self.step(
                    "firewall",
                    "firewall on B blocks inbound UDP; ALLOW rule lets it in",
                    self.step_firewall,
                )
                await self.step(
                    "metrics",
                    "every /metrics endpoint answers and counts the lookups",
                    self.step_metrics,
                )
                self.print_summary()
                self.events.enabled = self.options.keep and self.options.events
                self.print_endpoints()
                if self.options.keep:
                    self.print_keep()
                    await wait_for_signal()
                    self.events.say("stopping")
                nursery.cancel_scope.cancel()
        return 0 if all(r.ok for r in self.results) else 1


async def wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


# ------------------------------------------------------------------------------ --netns

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

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"echo " + data, peer)
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

CLONE_NEWNET = 0x40000000
HUB_IP = "10.0.0.254"


def netns_unavailable() -> str | None:
    """None when namespaces, veths and TAPs can be used here; else why not."""
    try:
        importlib.import_module("varpd.shim.udp")
    except ModuleNotFoundError as exc:
        if exc.name == "varpd.shim.udp":
            return "the udp backend (varpd.shim.udp) is not available yet"
        raise
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (TAP devices unavailable)"
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command"
    return None


@contextlib.contextmanager
def thread_in_netns(name: str) -> Any:
    """The calling thread (and the sockets it creates) inside namespace ``name``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            libc.setns(own, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(own)


async def _lines(stream: Any) -> Any:
    """The lines of a trio receive stream, decoded."""
    buf = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buf:
                yield buf.decode(errors="replace")
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace")


@dataclass
class NsNode:
    name: str
    cn_uuid: str
    underlay_ip: str
    ns: str = ""
    control_path: str = ""
    metrics_url: str = ""
    proc: Any = None


@dataclass
class NsGuest:
    name: str
    mac: str
    ip: str
    ns: str
    tap: str
    node: NsNode


class NetnsDemo(Scenario):
    """The same scenario on real namespaces: varpd processes with the udp backend and TAPs.

    Topology (every name carries a per-run prefix)::

        <p>ul   bridge br0, 10.0.0.254/24: portolan (this process's main thread joins it)
        <p>a/b/c  one per compute node: ul0 10.0.0.1-3/24 (veth to br0), a `varpd run`
                  process (udp backend), the VNICs' TAPs are created here ...
        <p>ta/tb  ... and moved into the tenant namespaces of guests A and B

    The guests are the tenant namespaces' kernels: ``ping``, a raw-socket ARP probe and UDP
    echo programs run in them. Nothing is configured in the caller's namespace.
    """

    def __init__(self, options: DemoOptions, workdir: str) -> None:
        super().__init__(options, workdir)
        self.prefix = f"pd{os.getpid() % 0xFFFF:x}"
        self.namespaces: list[str] = []
        self.nodes = [NsNode(n, u, ip) for n, u, ip in NODES]
        self.guests: dict[str, NsGuest] = {}
        self.helpers: list[Any] = []
        self._netns: Any = None

    # -- shell -----------------------------------------------------------------------------

    async def sh(self, *argv: str, check: bool = True, show: bool = True) -> str:
        if show:
            self.events("shell", "$ " + " ".join(argv))
        proc = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
        out = (proc.stdout or b"").decode(errors="replace")
        if check and proc.returncode != 0:
            err = (proc.stderr or b"").decode(errors="replace").strip()
            raise DemoError(f"{' '.join(argv)} failed ({proc.returncode}): {err or out}")
        return out if proc.returncode == 0 or not check else out

    async def in_ns(self, ns: str, *argv: str, check: bool = True) -> tuple[int, str]:
        """Run argv inside ``ns``; (exit status, stdout + stderr)."""
        self.events("shell", f"$ ip netns exec {ns} " + " ".join(_short(a) for a in argv))
        proc = await trio.run_process(
            ["ip", "netns", "exec", ns, *argv],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        text = (proc.stdout or b"").decode(errors="replace") + (proc.stderr or b"").decode(
            errors="replace"
        )
        if check and proc.returncode != 0:
            raise DemoError(f"{' '.join(argv[:3])} in {ns} failed: {text.strip()}")
        return proc.returncode, text

    async def control(self, node: NsNode, op: str, **args: Any) -> Any:
        from varpd.adm import AdmError, call

        try:
            return await trio.to_thread.run_sync(call, node.control_path, op, args)
        except AdmError as exc:
            raise DemoError(f"varpd on {node.name}: {op}: {exc}") from None

    def node(self, name: str) -> NsNode:
        return next(n for n in self.nodes if n.name == name)

    # -- topology --------------------------------------------------------------------------

    async def add_ns(self, suffix: str) -> str:
        name = self.prefix + suffix
        await self.sh("ip", "netns", "del", name, check=False, show=False)
        await self.sh("ip", "netns", "add", name, show=False)
        self.namespaces.append(name)
        await self.sh("ip", "-n", name, "link", "set", "lo", "up", show=False)
        for key in ("all", "default"):
            await self.sh(
                "ip", "netns", "exec", name, "sysctl", "-qw",
                f"net.ipv6.conf.{key}.disable_ipv6=1", show=False,
            )  # fmt: skip
        return name

    async def build_topology(self) -> str:
        hub = await self.add_ns("ul")
        await self.sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        await self.sh("ip", "-n", hub, "link", "set", "br0", "up")
        await self.sh("ip", "-n", hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
        for node in self.nodes:
            node.ns = await self.add_ns(node.name[-1])
            peer = f"ul-{node.name[-1]}"
            await self.sh(
                "ip", "link", "add", "ul0", "netns", node.ns, "type", "veth",
                "peer", "name", peer, "netns", hub,
            )  # fmt: skip
            await self.sh("ip", "-n", hub, "link", "set", peer, "master", "br0", "up")
            await self.sh(
                "ip", "-n", node.ns, "addr", "add", f"{node.underlay_ip}/24", "dev", "ul0"
            )
            await self.sh("ip", "-n", node.ns, "link", "set", "ul0", "up")
        for guest in ("ta", "tb"):
            await self.add_ns(guest)
        return hub

    async def teardown(self) -> None:
        with trio.CancelScope(shield=True):
            for proc in self.helpers:
                with contextlib.suppress(ProcessLookupError, OSError):
                    os.killpg(proc.pid, signal.SIGTERM)
            for node in self.nodes:
                if node.proc is not None and node.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError, OSError):
                        node.proc.send_signal(signal.SIGTERM)
                    with trio.move_on_after(5):
                        await node.proc.wait()
                    if node.proc.returncode is None:
                        node.proc.kill()
            for ns in reversed(self.namespaces):
                await self.sh("ip", "netns", "del", ns, check=False, show=False)

    # -- daemons ---------------------------------------------------------------------------

    async def start_varpd(self, nursery: trio.Nursery, node: NsNode) -> None:
        folder = os.path.join(self.workdir, node.name)
        os.makedirs(folder, exist_ok=True)
        svp_port = self.bound["svp"][1]
        node.control_path = os.path.join(folder, "varpd.sock")
        config = f"""
cn_uuid = "{node.cn_uuid}"
state_dir = "{folder}/state"
control_socket = "{node.control_path}"
metrics = "{node.underlay_ip}:0"
portolan_api = "{self.api_url}"
backend = "udp"
lookup_workers = 3
log_level = "INFO"

[[device]]
name = "{DEVICE}"
vnetid = {VNET_ID}
mtu = 1400
search = "svp"
props = {{ "vxlan/listen_ip" = "{node.underlay_ip}", "vxlan/listen_port" = {UL_PORT}, \
"svp/host" = "{HUB_IP}", "svp/port" = {svp_port}, "svp/underlay_ip" = "{node.underlay_ip}", \
"svp/underlay_port" = {UL_PORT} }}
"""
        path = os.path.join(folder, "varpd.toml")
        Path(path).write_text(config)
        argv = [
            "ip",
            "netns",
            "exec",
            node.ns,
            sys.executable,
            "-m",
            "varpd.cli",
            "run",
            "--config",
            path,
        ]
        self.events("shell", "$ " + " ".join(argv))
        node.proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO_ROOT)
        )
        ready = trio.Event()

        async def read_stdout() -> None:
            async for line in _lines(node.proc.stdout):
                if line.startswith("READY"):
                    for word in line.split()[1:]:
                        key, _, value = word.partition("=")
                        if key == "metrics":
                            node.metrics_url = f"http://{value}/metrics"
                    ready.set()

        async def read_stderr() -> None:
            async for line in _lines(node.proc.stderr):
                # "2026-.. INFO varpd.x: message" -> "INFO varpd.x: message"
                parts = line.split(" ", 2)
                text = parts[2] if len(parts) == 3 else line
                if " httpx: " not in f" {text}":  # the policy long-polls, every 30 s
                    self.events(node.name, text)

        nursery.start_soon(read_stdout)
        nursery.start_soon(read_stderr)
        with trio.move_on_after(30):
            await ready.wait()
        if not ready.is_set():
            raise DemoError(f"varpd on {node.name} printed no READY line within 30 s")

    async def plug(self, guest: NsGuest, node: NsNode, tap: str) -> None:
        """The orchestrator: VNIC on the node's varpd with a TAP, the TAP into the tenant."""
        self.events("demo", f"orchestrator: plug {guest.name} into {node.name} (TAP {tap})")
        await self.control(node, "vnic_add", name=DEVICE, mac=guest.mac, tap=tap)
        await self.sh("ip", "-n", node.ns, "link", "set", tap, "netns", guest.ns)
        await self.sh("ip", "-n", guest.ns, "link", "set", tap, "mtu", "1400", "up")
        await self.sh("ip", "-n", guest.ns, "addr", "add", f"{guest.ip}/24", "dev", tap)
        guest.node, guest.tap = node, tap

    # -- steps -----------------------------------------------------------------------------

    async def ping(self, src: NsGuest, dst: NsGuest) -> tuple[bool, str]:
        code, out = await self.in_ns(
            src.ns, "ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", dst.ip, check=False
        )
        summary = next((ln for ln in out.splitlines() if "packets transmitted" in ln), out.strip())
        rtt = next((ln.split("=")[1].strip() for ln in out.splitlines() if "rtt" in ln), "")
        self.events(
            f"guest {src.name}", f"ping {dst.ip}: {summary}" + (f", rtt {rtt}" if rtt else "")
        )
        return code == 0, summary

    async def cache_dest(self, node: NsNode, mac: str) -> str | None:
        try:
            return (await self.control(node, "cache_get", name=DEVICE, mac=mac)).get("dest")
        except DemoError:
            return None

    async def step_arp(self, r: StepResult) -> None:
        a, b = self.guests["A"], self.guests["B"]
        code, out = await self.in_ns(
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
        if self.options.fail_step == "ping":
            await self.sh("ip", "-n", b.ns, "link", "set", b.tap, "down")
        ok, summary = await self.ping(a, b)
        if self.options.fail_step == "ping":
            await self.sh("ip", "-n", b.ns, "link", "set", b.tap, "up")
        cached = await self.cache_dest(b.node, a.mac)
        r.observed = f"{summary}; cn-b caches A -> {cached}"
        r.status = "OK" if ok and cached else "FAIL"

    async def step_move(self, r: StepResult) -> None:
        a, b = self.guests["A"], self.guests["B"]
        old, new = b.node, self.node("cn-c")
        target = f"{new.underlay_ip}:{UL_PORT}"
        old_tap = b.tap
        await self.control(new, "vnic_add", name=DEVICE, mac=b.mac, tap="vnB2")
        self.events("demo", "orchestrator: B's new TAP replaces the old one in B's namespace")
        await self.sh("ip", "-n", b.ns, "link", "set", old_tap, "down")
        await self.sh("ip", "-n", new.ns, "link", "set", "vnB2", "netns", b.ns)
        await self.sh("ip", "-n", b.ns, "link", "set", "vnB2", "mtu", "1400", "up")
        await self.sh("ip", "-n", b.ns, "addr", "add", f"{b.ip}/24", "dev", "vnB2")
        t0 = time.perf_counter()
        if self.options.fail_step != "move":
            await self.api("PUT", f"/vnics/{b.mac}", {"cn_uuid": new.cn_uuid})
        await self.control(old, "vnic_rm", name=DEVICE, mac=b.mac)
        b.node, b.tap = new, "vnB2"
        converged: float | None = None
        with trio.move_on_after(OBSERVE):
            while await self.cache_dest(self.node("cn-a"), b.mac) != target:
                await trio.sleep(0.01)
            converged = time.perf_counter() - t0
        if converged is not None:
            self.events("demo", f"cn-a's cache sends B to {target} {ms(converged)} after the PUT")
        ok, summary = await self.ping(a, b)
        if converged is None:
            now = await self.cache_dest(self.node("cn-a"), b.mac)
            first = f"cn-a's cache still has B -> {now}"
        else:
            first = f"cn-a's cache B -> {target} within {ms(converged)} of the PUT"
        r.observed = f"{first}; ping after the move: {summary}"
        r.status = "OK" if converged is not None and ok else "FAIL"

    async def step_firewall(self, r: StepResult) -> None:
        if self.firewall_missing is not None:
            r.status, r.observed = "SKIP", f"not available yet: {self.firewall_missing}"
            return
        a, b = self.guests["A"], self.guests["B"]
        echo = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", b.ns, sys.executable, "-c", UDP_ECHO, b.ip, str(UDP_DPORT)],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.helpers.append(echo)
        async for line in _lines(echo.stdout):
            if line.startswith("READY"):
                break
        self.events(f"guest {b.name}", f"UDP echo server listening on {b.ip}:{UDP_DPORT}")

        async def firewall_row() -> dict[str, Any]:
            status = await self.control(b.node, "firewall")
            return next((v for v in status.get("vnics", []) if v["mac"] == b.mac), {})

        async def ask(sport: int) -> str | None:
            code, out = await self.in_ns(
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
        self.events(b.node.name, f"firewall: B's inbound drops +{blocked}; echo: {answer}")
        if answer is not None or blocked < 1:
            r.observed = "UDP reached B with the firewall enabled and no rule"
            return
        if self.options.fail_step != "firewall":
            await self.api(
                "POST",
                "/rules",
                {
                    "owner_uuid": OWNER,
                    "rule": f"FROM any TO vm {VM_B} ALLOW udp PORT {UDP_DPORT}",
                    "enabled": True,
                    "description": "portolan demo",
                },
            )
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

    async def step_metrics(self, r: StepResult) -> None:
        assert self.http is not None
        host, port = self.bound["metrics"]
        endpoints = [("portolan", f"http://{host}:{port}/metrics")]
        endpoints += [(n.name, n.metrics_url) for n in self.nodes]
        for name, url in endpoints:
            try:
                response = await self.http.get(url)
            except httpx.HTTPError as exc:
                r.observed = f"{url}: {type(exc).__name__}: {exc}"
                return
            if response.status_code != 200:
                r.observed = f"{url} answered {response.status_code}"
                return
            lookups = sum(
                float(line.rsplit(" ", 1)[1])
                for line in response.text.splitlines()
                if line.startswith(("varpd_lookups_total{", "portolan_svp_requests_total{"))
            )
            self.events("metrics", f"{name} {url}: {int(lookups)} lookups/requests counted")
        r.observed = f"{len(endpoints)} endpoints answer"
        r.status = "OK"

    # -- main ------------------------------------------------------------------------------

    async def run(self) -> int:
        from portolan.cli.serve import ServeConfig, serve_portolan

        try:
            async with trio.open_nursery() as nursery:
                self.events.say("== topology: namespaces, a bridge, veths")
                hub = await self.build_topology()
                # This thread joins the hub namespace: portolan's listeners and the API client
                # live there, next to the compute nodes' underlay.
                self._netns = thread_in_netns(hub)
                self._netns.__enter__()
                config = ServeConfig(
                    store=f"sqlite:{os.path.join(self.workdir, 'portolan.db')}",
                    svp=(HUB_IP, 0),
                    api=(HUB_IP, 0),
                    metrics=(HUB_IP, 0),
                    reload_interval=0,
                )
                self.bound = await nursery.start(serve_portolan, config)
                self.api_url = "http://{}:{}".format(*self.bound["api"])
                async with httpx.AsyncClient(base_url=self.api_url, timeout=10.0) as http:
                    self.http = http
                    self.events.say("\n== setup through the management API")
                    for node in self.nodes:
                        await self.api(
                            "PUT", f"/cns/{node.cn_uuid}", {"ip": node.underlay_ip, "port": UL_PORT}
                        )
                    self.network = await self.api(
                        "POST",
                        "/networks",
                        {
                            "name": "demo-net",
                            "owner_uuid": OWNER,
                            "vnet_id": VNET_ID,
                            "vlan_id": 0,
                            "subnet": SUBNET,
                            "gateway": GATEWAY,
                        },
                    )
                    async with trio.open_nursery() as starting:
                        for node in self.nodes:
                            starting.start_soon(self.start_varpd, nursery, node)
                    for name, node_name, vm, tenant in (
                        ("A", "cn-a", VM_A, "ta"),
                        ("B", "cn-b", VM_B, "tb"),
                    ):
                        node = self.node(node_name)
                        vnic = await self.api(
                            "POST",
                            "/vnics",
                            {
                                "network_uuid": self.network["uuid"],
                                "cn_uuid": node.cn_uuid,
                                "owner_uuid": OWNER,
                                "belongs_to_uuid": vm,
                            },
                        )
                        guest = NsGuest(
                            name, vnic["mac"], vnic["ip"], self.prefix + tenant, "", node
                        )
                        self.guests[name] = guest
                        await self.plug(guest, node, f"vn{name}")
                    self.print_header(hub)
                    await trio.sleep(0.6)  # the VNIC creations' log entries are applied
                    await self.step(
                        "arp", "A's ARP for B's IP answered by proxy (SVP VL3)", self.step_arp
                    )
                    await self.step(
                        "ping", "ping A->B through VXLAN over UDP; B answers", self.step_ping
                    )
                    await self.step(
                        "move", "B moved to cn-c via the API; cn-a shot down; ping follows",
                        self.step_move,
                    )  # fmt: skip
                    await self.step(
                        "firewall", "firewall on B blocks inbound UDP; ALLOW rule lets it in",
                        self.step_firewall,
                    )  # fmt: skip
                    await self.step("metrics", "every /metrics endpoint answers", self.step_metrics)
                    self.print_summary()
                    self.events.enabled = self.options.keep and self.options.events
                    if self.options.keep:
                        self.print_keep(hub)
                        await wait_for_signal()
                        self.events.say("stopping")
                    nursery.cancel_scope.cancel()
        finally:
            if self._netns is not None:
                self._netns.__exit__(None, None, None)
            await self.teardown()
        return 0 if all(r.ok for r in self.results) else 1

    def print_header(self, hub: str) -> None:
        say = self.events.say
        say("\nportolan demo --netns: one portolan and three varpd processes on namespaces")
        say(f"  work folder  {self.workdir}")
        met = self.bound["metrics"]
        say(f"  portolan     in namespace {hub}: api={self.api_url} "
            f"metrics=http://{met[0]}:{met[1]}/metrics")  # fmt: skip
        for n in self.nodes:
            say(f"  {n.name:<12} namespace {n.ns}, underlay {n.underlay_ip}:{UL_PORT}, "
                f"metrics={n.metrics_url} control={n.control_path}")  # fmt: skip
        for g in self.guests.values():
            say(f"  guest {g.name}      namespace {g.ns}, {g.tap} {g.mac} {g.ip}")

    def print_keep(self, hub: str) -> None:
        say = self.events.say
        a, b = self.guests["A"], self.guests["B"]
        say("\n--keep: everything stays up until Ctrl-C. The API lives in namespace "
            f"{hub}, so run the CLI there:")  # fmt: skip
        say(f"  ip netns exec {hub} portolan vnic list --api {self.api_url}")
        say(f"  ip netns exec {hub} portolan rule list --api {self.api_url}")
        for n in self.nodes:
            say(f"  varpdadm --socket {n.control_path} list")
        say(f"  varpdadm --socket {self.node('cn-a').control_path} cache list {DEVICE}")
        say(
            f"B's firewall lets in only udp {UDP_DPORT}, so a ping is dropped until a rule allows it:"
        )
        say(f"  ip netns exec {a.ns} ping -c 3 {b.ip}")
        say(
            f"  ip netns exec {hub} portolan rule add --api {self.api_url} --owner-uuid {OWNER} "
            f"--enabled 'FROM any TO vm {VM_B} ALLOW icmp TYPE 8 CODE 0'"
        )
        say(f"  ip netns exec {a.ns} ping -c 3 {b.ip}")
        say(f"  ip netns exec {hub} curl {self.node('cn-a').metrics_url}")


def _short(arg: str) -> str:
    """Command lines as shown: inline programs are abbreviated."""
    return "<program>" if "\n" in arg else arg


async def run_demo(options: DemoOptions) -> int:
    """Run the scenario; the exit status (0 all OK, 1 a step failed or setup broke)."""
    workdir = tempfile.mkdtemp(prefix="portolan-demo-")
    try:
        demo: Scenario = NetnsDemo(options, workdir) if options.netns else Demo(options, workdir)
        try:
            return await demo.run()  # type: ignore[attr-defined]
        except DemoError as exc:
            print(f"portolan demo: {exc}", file=sys.stderr)
            return 1
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)


def main(options: DemoOptions) -> int:
    if not options.netns:
        return trio.run(run_demo, options)
    why = netns_unavailable()
    if why is not None:
        print(f"portolan demo --netns: not available here: {why}", file=sys.stderr)
        return 2
    return trio.run(run_demo, options)
