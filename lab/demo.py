"""``portolan demo``: the quickstart scenario, run on a lab cluster.

Theory of operation
-------------------
One portolan and three compute nodes ``cn-a``, ``cn-b``, ``cn-c`` (`DEMO_NODES`), built by
`lab.cluster.Cluster` from `demo_spec`: in this process on the memory backend (default;
`lab.demo_memory`), or with ``--netns`` as ``varpd run`` processes on namespaces, TAP devices
and UDP sockets (`lab.demo_netns`). Compute nodes, the network and the VNICs are created
through the management API, never by calling the Directory; the VNICs are then plugged into
their node's varpd, as an orchestrator does. Then the steps run, each verified by observing
it happen (`STEPS`):

1. ``arp``: guest A asks ARP who-has B's IP; varpd on cn-a proxies it with an SVP VL3 lookup.
2. ``ping``: an echo A -> B crosses the underlay to cn-b; B's answer misses, varpd asks
   portolan (VL2), the cache fills and the reply reaches A.
3. ``move``: B moves to cn-c (VNIC added on cn-c, ``PUT /vnics/{mac}``, removed from cn-b);
   the shootdown reaches the nodes and the echo follows B.
4. ``firewall``: ``firewall_enabled`` on B blocks inbound UDP; an ALLOW rule lets it in.
5. ``metrics``: every ``/metrics`` endpoint answers and counts the lookups.

A summary table (step, expected, observed, time, result) ends the run; the exit status is 0
only when every step was observed to happen. ``--quiet`` prints that summary only.
``--keep`` leaves everything running until Ctrl-C and prints the commands that reach it;
``--fail-step`` (hidden, for tests) leaves out one action (`SABOTAGE`) so that its
verification must fail.

Lifecycle: `main` owns one ``trio.run``; the cluster context manager owns every task,
process and namespace; the work folder is removed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
import trio

from lab.cluster import Cluster, unavailable
from lab.scenario import Events, Scenario, StepResult
from lab.spec import ClusterSpec, DeviceSpec, LabError, NodeSpec

VNET_ID = 12340
DEVICE = "overlay0"
OWNER = "9dce1460-0c4f-4a3e-8e9f-5a6c3a1f0001"
VM_A = "c0ffee00-0000-4000-8000-00000000000a"
VM_B = "c0ffee00-0000-4000-8000-00000000000b"
SUBNET = "192.168.100.0/24"
GATEWAY = "192.168.100.1"
UL_PORT = 4789
DEMO_NODES = (
    NodeSpec("cn-a", "0a1b2c3d-0000-4000-8000-00000000000a", "10.0.0.1"),
    NodeSpec("cn-b", "0a1b2c3d-0000-4000-8000-00000000000b", "10.0.0.2"),
    NodeSpec("cn-c", "0a1b2c3d-0000-4000-8000-00000000000c", "10.0.0.3"),
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


@dataclass
class DemoOptions:
    keep: bool = False
    netns: bool = False
    backend: str = "udp"  # with netns: "udp" or "linux" (the kernel data path)
    fail_step: str | None = None
    events: bool = True
    out: TextIO = field(default_factory=lambda: sys.stdout)


def demo_spec(netns: bool = False, backend: str = "udp") -> ClusterSpec:
    """The demo's cluster: three nodes, one device on vnet 12340, memory, udp or linux."""
    return ClusterSpec(
        nodes=DEMO_NODES,
        backend=backend if netns else "memory",  # type: ignore[arg-type]
        placement="netns" if netns else "inprocess",
        devices=(DeviceSpec(DEVICE, VNET_ID, mtu=1400),),
        prefix="pd",
    )


def firewall_available(options: DemoOptions) -> str | None:
    """None when the firewall step can run; else why not (the linux backend needs nftables)."""
    if options.netns and options.backend == "linux" and shutil.which("nft") is None:
        return "the linux backend's firewall is nftables and there is no `nft` command"
    return None


def netns_unavailable(backend: str = "udp") -> str | None:
    """None when ``--netns`` can run here; else why not."""
    return unavailable(demo_spec(netns=True, backend=backend))


class DemoBase(Scenario):
    """What both flavours share: the cluster, the API provisioning, the step list."""

    #: (step, expected) in order; the flavour's ``step_<name>`` methods run them
    EXPECTED: tuple[tuple[str, str], ...] = ()

    #: the metrics step fails unless portolan served VL2 and VL3 lookups
    REQUIRE_LOOKUPS = True

    def __init__(self, options: DemoOptions, workdir: str) -> None:
        events = Events(options.out, enabled=options.events, narrate=options.events)
        super().__init__(events, fail_step=options.fail_step, sabotage=SABOTAGE)
        self.options = options
        self.workdir = workdir
        self.network: dict[str, Any] = {}
        self.firewall_missing = firewall_available(options)
        self.cluster: Cluster = self.make_cluster()

    def make_cluster(self) -> Cluster:
        raise NotImplementedError

    async def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return await self.cluster.api(method, path, body)

    async def provision_network(self) -> None:
        """Compute nodes and the network, through the management API (before the nodes
        start, so that their first log requests already find their CN)."""
        await self.cluster.register_cns()
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

    async def create_vnic(self, node_name: str, vm: str) -> dict[str, Any]:
        return await self.api(
            "POST",
            "/vnics",
            {
                "network_uuid": self.network["uuid"],
                "cn_uuid": self.cluster.node(node_name).cn_uuid,
                "owner_uuid": OWNER,
                "belongs_to_uuid": vm,
            },
        )

    async def allow_udp_to_b(self) -> None:
        """The ALLOW rule of the firewall step (left out by ``--fail-step firewall``)."""
        if self.fail_step == "firewall":
            return
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

    async def step_firewall(self, r: StepResult) -> None:
        if self.firewall_missing is not None:
            r.status, r.observed = "SKIP", f"not available yet: {self.firewall_missing}"
            return
        await self.firewall_scenario(r)

    async def firewall_scenario(self, r: StepResult) -> None:
        raise NotImplementedError

    async def run_steps(self) -> None:
        for name, expected in self.EXPECTED:
            await self.step(name, expected, getattr(self, f"step_{name}"))

    def offer(self, text: str = "") -> None:
        """A line of what ``--keep`` offers (printed even with ``--quiet``)."""
        self.events.say(text, always=True)

    async def run(self) -> int:
        raise NotImplementedError

    async def step_metrics(self, r: StepResult) -> None:
        """Every /metrics endpoint answers; portolan's shows the VL2/VL3 lookups the steps
        caused (when ``REQUIRE_LOOKUPS``)."""
        from prometheus_client.parser import text_string_to_metric_families

        assert self.cluster.http is not None
        host, port = self.cluster.bound["metrics"]
        endpoints = [("portolan", f"http://{host}:{port}/metrics")]
        endpoints += [(n.name, n.metrics_url) for n in self.nodes]
        figures = []
        for name, url in endpoints:
            try:
                response = await self.cluster.http.get(url)
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
        if self.REQUIRE_LOOKUPS and (svp.get("vl2", 0) < 1 or svp.get("vl3", 0) < 1):
            r.observed = "portolan's /metrics shows no VL2/VL3 lookups"
            return
        r.observed = (
            f"{len(endpoints)} endpoints answer; portolan served {int(svp.get('vl2', 0))} VL2, "
            f"{int(svp.get('vl3', 0))} VL3, {int(svp.get('log', 0))} LOG requests"
        )
        r.status = "OK"


async def run_demo(options: DemoOptions) -> int:
    """Run the scenario; the exit status (0 all OK, 1 a step failed or setup broke)."""
    from lab.demo_memory import MemoryDemo
    from lab.demo_netns import NetnsDemo

    workdir = tempfile.mkdtemp(prefix="portolan-demo-")
    try:
        demo = NetnsDemo(options, workdir) if options.netns else MemoryDemo(options, workdir)
        try:
            return await demo.run()
        except LabError as exc:
            print(f"portolan demo: {exc}", file=sys.stderr)
            return 1
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)


def main(options: DemoOptions) -> int:
    if options.netns:
        why = netns_unavailable(options.backend)
        if why is not None:
            print(f"portolan demo --netns: not available here: {why}", file=sys.stderr)
            return 2
    return trio.run(run_demo, options)


def parser(prog: str = "python -m lab demo") -> argparse.ArgumentParser:
    """The demo's command line; ``portolan demo`` passes its arguments through to it."""
    p = argparse.ArgumentParser(
        prog=prog, description="Run a portolan and three varpd nodes and show them at work."
    )
    p.add_argument("--keep", action="store_true", help="leave everything running (Ctrl-C)")
    p.add_argument("--netns", action="store_true", help="namespaces, TAPs and UDP (root)")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.add_argument(
        "--backend",
        choices=("udp", "linux"),
        default="udp",
        help="with --netns: udp (TAPs, Python data path) or linux (kernel vxlan/bridge/veth)",
    )
    p.add_argument("--fail-step", choices=sorted(SABOTAGE), help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="WARNING", help=argparse.SUPPRESS)
    return p


def cli(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    options = DemoOptions(
        keep=args.keep,
        netns=args.netns,
        fail_step=args.fail_step,
        events=not args.quiet,
        backend=args.backend,
    )
    try:
        return main(options)
    except KeyboardInterrupt:
        return 130


__all__ = ["SABOTAGE", "STEPS", "DemoOptions", "cli", "demo_spec", "main", "run_demo"]
