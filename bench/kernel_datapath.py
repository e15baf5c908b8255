"""Tenant-to-tenant throughput and first-packet latency on the kernel data path.

What is measured, in one run and on one topology of namespaces made for it::

    ns ul: bridge br0 10.77.0.254/24, `portolan serve` (SVP + API)
      |-- veth -- ns cn1: ul0 10.77.0.1  (data path under test) -- tenant end -> ns t1 192.168.77.1
      '-- veth -- ns cn2: ul0 10.77.0.2  (data path under test) -- tenant end -> ns t2 192.168.77.2

The data path of the two compute nodes is built three ways, one after the other, on the same
namespaces and the same underlay:

- ``static``: a plain kernel ``vxlan`` device (nolearning) in a bridge with a veth to the
  tenant, and static fdb entries for the peer (its MAC and the all-zeros flood entry). No
  varpd at all: the kernel's own limit on this machine, the baseline of the throughput goal.
- ``linux``: ``varpd run`` with ``backend = "linux"`` and the svp plugin against portolan: the
  same kernel objects, created by varpd, whose fdb and neighbour entries come from SVP lookups
  on the kernel's L2/L3 misses.
- ``udp``: ``varpd run`` with ``backend = "udp"``: the userland shim (TAP + UDP sockets).

Throughput: TCP from t1 to t2 for a few seconds with ``iperf3`` when it is installed
(``apt-get install iperf3``; `.ci/run` installs it), else with a socket sender of our own
(one TCP stream, 128 KiB writes): the results say which. Ratios: linux / static (goal >= 0.90)
and linux / udp (goal >= 15).

First-packet latency (linux backend): ``N`` VNICs (MAC + IP never seen by cn1) are registered
in portolan on cn2 (the VL3 shootdowns that creation writes make cn1's varpd install them at
once; the run waits for that, then deletes those neighbour and fdb entries again, so that what
is timed is a real miss); for each, t1 sends one UDP datagram to its IP. The tenant's kernel first
asks ARP (an L3 miss on cn1's vxlan device -> varpd -> SVP VL3 lookup -> neighbour + fdb
entries and an announcement -> the tenant's queued datagram leaves), then the datagram crosses
the overlay; cn2's bridge floods the unknown destination MAC to t2, where a promiscuous packet
socket sees it. Sample = arrival time in t2 - the time t1's ``sendto`` was called (one
monotonic clock: every namespace shares it). p50/p99 over the samples (goal p99 < 5 ms).

Nothing here touches the caller's namespace: every namespace carries the run's prefix
(``pkd<pid>``), leftovers of a killed run with the same prefix are removed first, and all of
them are deleted at the end, whatever happened (`lab.netns.Namespaces`).

    python -m bench.kernel_datapath [--quick] [--seconds S] [--fresh N]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, percentile, print_table, write_results
from lab import netns
from lab.netns import in_netns
from lab.netns import run as sh

VNET = 7707
MTU = 1400
PORTOLAN_IP = "10.77.0.254"
OWNER = "7c0f6a3e-0000-4000-8000-0000000000aa"
CNS = {
    "cn1": ("7c0f6a3e-0000-4000-8000-000000000001", "10.77.0.1"),
    "cn2": ("7c0f6a3e-0000-4000-8000-000000000002", "10.77.0.2"),
}
TENANT = {
    "cn1": ("02:77:00:00:00:01", "192.168.77.1"),
    "cn2": ("02:77:00:00:00:02", "192.168.77.2"),
}
THROUGHPUT_GOAL_STATIC = 0.90
THROUGHPUT_GOAL_UDP = 15.0
FIRST_PACKET_P99_GOAL_MS = 5.0


# ------------------------------------------------------------------------------ namespaces


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, vxlan, bridges)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`) to build the namespaces"
    return None


class Topology:
    """The namespaces of one run; ``close()`` kills what it started and deletes them."""

    def __init__(self) -> None:
        self.lab = netns.Namespaces(prefix="pkd")  # pkd<pid hex>
        netns.sweep(self.lab.prefix)
        self.tmp = Path(tempfile.mkdtemp(prefix="kernel-datapath-"))
        self.ns = {name: self.lab.ns(name, ipv6=True) for name in ("ul", "cn1", "cn2", "t1", "t2")}
        self.lab.bridge(self.ns["ul"], f"{PORTOLAN_IP}/24")
        for cn, (_uuid, ip) in CNS.items():
            self.lab.uplink(self.ns[cn], f"{ip}/24", self.ns["ul"], f"p{cn}")

    def popen(self, ns: str, argv: list[str], log: str) -> subprocess.Popen:
        return self.lab.popen(ns, argv, stderr_path=self.tmp / log, cwd=REPO_ROOT)

    def stop(self, proc: subprocess.Popen) -> None:
        self.lab.stop(proc)

    def close(self) -> None:
        self.lab.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def reset_node(self, cn: str) -> None:
        """Remove the tenant's interface and every vxlan/bridge/veth of the node (not ul0)."""
        for ns in (self.ns[cn], self.ns["t" + cn[-1]]):
            links = json.loads(sh("ip", "-j", "-n", ns, "link", "show").stdout or "[]")
            for link in links:
                if link["ifname"] not in ("lo", "ul0"):
                    sh("ip", "-n", ns, "link", "del", link["ifname"], check=False)

    def tenant_up(self, cn: str, ifname: str, mac: str, ip: str) -> None:
        tns = self.ns["t" + cn[-1]]
        sh("ip", "-n", tns, "link", "set", ifname, "name", "eth0")
        sh("ip", "-n", tns, "link", "set", "eth0", "address", mac, "mtu", str(MTU))
        sh("ip", "-n", tns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", tns, "link", "set", "eth0", "up")


def wait_ready(proc: subprocess.Popen, timeout: float = 30.0) -> dict[str, str]:
    """The ``key=value`` words of ``proc``'s READY line (AssertionError without one)."""
    line = netns.wait_for_line(proc, "READY", timeout)
    return dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)


# ------------------------------------------------------------------------------ data paths


def build_static(topo: Topology) -> None:
    """A kernel vxlan + bridge + veth per node with static fdb entries: the kernel's limit."""
    for cn, (_uuid, ip) in CNS.items():
        ns, tns = topo.ns[cn], topo.ns["t" + cn[-1]]
        peer = next(p for c, (_u, p) in CNS.items() if c != cn)
        peer_mac = next(m for c, (m, _i) in TENANT.items() if c != cn)
        sh("ip", "-n", ns, "link", "add", "kbr", "type", "bridge")
        sh("ip", "-n", ns, "link", "add", "kvx", "mtu", str(MTU), "type", "vxlan", "id", str(VNET),
           "local", ip, "dstport", "4789", "nolearning")  # fmt: skip
        sh("ip", "-n", ns, "link", "set", "kvx", "master", "kbr", "up")
        sh("ip", "-n", ns, "link", "add", "kh", "mtu", str(MTU), "type", "veth", "peer", "name",
           "kt", "netns", tns)  # fmt: skip
        sh("ip", "-n", ns, "link", "set", "kh", "master", "kbr", "up")
        sh("ip", "-n", ns, "link", "set", "kbr", "up")
        for mac in (peer_mac, "00:00:00:00:00:00"):
            sh("bridge", "-n", ns, "fdb", "append", mac, "dev", "kvx", "dst", peer)
        topo.tenant_up(cn, "kt", *TENANT[cn])


class Portolan:
    """`portolan serve` in ns ul with the CNs, a network and the tenants' VNICs."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        store = topo.tmp / "portolan.db"
        self.proc = topo.popen(
            topo.ns["ul"],
            [sys.executable, "-m", "portolan.cli.main", "serve", "--store", f"sqlite:{store}",
             "--svp-listen", f"{PORTOLAN_IP}:0", "--api-listen", "127.0.0.1:0",
             "--metrics-listen", "127.0.0.1:0"],
            "portolan.err",
        )  # fmt: skip
        ready = wait_ready(self.proc)
        self.svp_port = int(ready["svp"].rsplit(":", 1)[1])
        self.api = f"http://{ready['api']}"
        for _cn, (uuid, ip) in CNS.items():
            self.call("PUT", f"/cns/{uuid}", {"ip": ip, "port": 4789})
        net = self.call("POST", "/networks", {
            "name": "bench", "owner_uuid": OWNER, "vnet_id": VNET, "vlan_id": 0,
            "subnet": "192.168.77.0/24", "provision_start": "192.168.77.10",
            "provision_end": "192.168.77.250",
        })  # fmt: skip
        self.network = net["uuid"]
        for cn, (mac, ip) in TENANT.items():
            self.vnic(cn, mac, ip)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        with in_netns(self.topo.ns["ul"]), httpx.Client(timeout=30) as client:
            resp = client.request(method, self.api + path, json=body)
        if resp.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text}")
        return resp.json() if resp.content else None

    def vnic(self, cn: str, mac: str, ip: str) -> None:
        self.call("POST", "/vnics", {
            "network_uuid": self.network, "cn_uuid": CNS[cn][0], "mac": mac, "ip": ip,
            "owner_uuid": OWNER,
        })  # fmt: skip


def start_varpd(topo: Topology, portolan: Portolan, cn: str, backend: str) -> subprocess.Popen:
    """``varpd run`` in ``cn``'s namespace with one device and the tenant's VNIC."""
    uuid, ip = CNS[cn]
    mac, _tip = TENANT[cn]
    ifname = f"vt{cn[-1]}"
    port_key = "ifname" if backend == "linux" else "tap"
    lines = [
        f'cn_uuid = "{uuid}"',
        f'state_dir = "{topo.tmp / (cn + "-" + backend)}"',
        f'control_socket = "{topo.tmp / (cn + ".sock")}"',
        'metrics = "127.0.0.1:0"',
        "lookup_workers = 8",
        "",
        "[[device]]",
        'name = "overlay0"',
        f'backend = "{backend}"',
        f"vnetid = {VNET}",
        f"mtu = {MTU}",
        'search = "svp"',
        f'props = {{ "vxlan/listen_ip" = "{ip}", "vxlan/listen_port" = 4789, '
        f'"svp/host" = "{PORTOLAN_IP}", "svp/port" = {portolan.svp_port}, '
        f'"svp/underlay_ip" = "{ip}", "svp/underlay_port" = 4789 }}',
        "",
        "[[device.vnic]]",
        f'mac = "{mac}"',
        "vlan_id = 0",
        f'{port_key} = "{ifname}"',
    ]
    config = topo.tmp / f"{cn}-{backend}.toml"
    config.write_text("\n".join(lines) + "\n")
    proc = topo.popen(
        topo.ns[cn], [sys.executable, "-m", "varpd.cli", "run", "--config", str(config)],
        f"varpd-{cn}-{backend}.err",
    )  # fmt: skip
    wait_ready(proc)
    if backend == "udp":
        sh("ip", "netns", "exec", topo.ns[cn], "ethtool", "-K", ifname, "tx", "off", check=False)
    sh("ip", "-n", topo.ns[cn], "link", "set", ifname, "netns", topo.ns["t" + cn[-1]])
    topo.tenant_up(cn, ifname, *TENANT[cn])
    return proc


# ------------------------------------------------------------------------------ measurements

SINK = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(1)
print("READY", flush=True)
c, _ = s.accept(); total = 0; start = None
buf = bytearray(1 << 20)
while True:
    n = c.recv_into(buf)
    if not n:
        break
    if start is None:
        start = time.monotonic()
    total += n
print(total, time.monotonic() - (start or time.monotonic()), flush=True)
"""

SOURCE = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
chunk = b"x" * (128 * 1024); end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    s.sendall(chunk)
s.close()
"""


def reachable(topo: Topology, timeout: float = 15.0) -> bool:
    """t1 can reach t2 over UDP (the first exchange also warms the caches)."""
    dst = TENANT["cn2"][1]
    with in_netns(topo.ns["t2"]):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("0.0.0.0", 9))
    with in_netns(topo.ns["t1"]):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.settimeout(0.3)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tx.sendto(b"probe", (dst, 9))
            try:
                rx.recvfrom(64)
                return True
            except OSError:
                continue
        return False
    finally:
        rx.close()
        tx.close()


def throughput(topo: Topology, seconds: float) -> tuple[float, str]:
    """Gbit/s of one TCP stream t1 -> t2, and the tool that measured it."""
    dst = TENANT["cn2"][1]
    if shutil.which("iperf3"):
        server = topo.popen(topo.ns["t2"], ["iperf3", "-s", "-1", "-p", "5201"], "iperf3.err")
        time.sleep(0.5)
        try:
            out = sh("ip", "netns", "exec", topo.ns["t1"], "iperf3", "-c", dst, "-p", "5201",
                     "-t", str(seconds), "-J", timeout=seconds + 30)  # fmt: skip
            doc = json.loads(out.stdout)
            return doc["end"]["sum_received"]["bits_per_second"] / 1e9, "iperf3"
        finally:
            topo.stop(server)
    sink = topo.popen(topo.ns["t2"], [sys.executable, "-c", SINK, "5201"], "sink.err")
    wait_ready(sink)
    sh("ip", "netns", "exec", topo.ns["t1"], sys.executable, "-c", SOURCE, dst, "5201",
       str(seconds), timeout=seconds + 30)  # fmt: skip
    assert sink.stdout is not None
    total, elapsed = sink.stdout.readline().split()
    topo.stop(sink)
    return int(total) * 8 / max(float(elapsed), 1e-9) / 1e9, "python socket sender"


def first_packet(topo: Topology, portolan: Portolan, count: int) -> list[float]:
    """Milliseconds from t1's sendto to arrival in t2 for ``count`` never-seen addresses."""
    fresh = []
    for i in range(count):
        mac = f"02:77:01:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}:{(i * 7) & 0xFF:02x}"
        ip = f"192.168.{80 + i // 250}.{1 + i % 250}"
        fresh.append((mac, ip))
    net = portolan.call("POST", "/networks", {
        "name": "bench-fresh", "owner_uuid": OWNER, "vnet_id": VNET, "vlan_id": 0,
        "subnet": "192.168.80.0/22", "provision_start": "192.168.80.1",
        "provision_end": "192.168.83.250", "gateway": "192.168.83.254",
    })  # fmt: skip
    for mac, ip in fresh:
        portolan.call("POST", "/vnics", {
            "network_uuid": net["uuid"], "cn_uuid": CNS["cn2"][0], "mac": mac, "ip": ip,
            "owner_uuid": OWNER,
        })  # fmt: skip
    # Creating a VNIC writes VL3 shootdowns for the vnet, and cn1's varpd installs what they
    # name (neighbour + fdb entries) ahead of any traffic. Once it has, take them out again
    # (the kernel's neighbour entries, and the fdb through varpdadm so varpd's mirror agrees),
    # so every first packet below is a real L3 miss answered over SVP.
    cn1 = topo.ns["cn1"]
    vx = json.loads(sh("ip", "-j", "-n", cn1, "link", "show", "type", "vxlan").stdout)[0]["ifname"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        neigh = json.loads(sh("ip", "-j", "-n", cn1, "neigh", "show", "dev", vx).stdout or "[]")
        if fresh[-1][1] in {n.get("dst") for n in neigh}:
            break
        time.sleep(0.1)
    sh("ip", "-n", cn1, "neigh", "flush", "dev", vx, "nud", "permanent")
    sh("ip", "netns", "exec", cn1, sys.executable, "-m", "varpd.adm", "--socket",
       str(topo.tmp / "cn1.sock"), "cache", "flush", "overlay0")  # fmt: skip
    # the fresh addresses are on-link for t1: a route for their /22 on its eth0
    sh("ip", "-n", topo.ns["t1"], "route", "add", "192.168.80.0/22", "dev", "eth0")
    with in_netns(topo.ns["t2"]):
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        rx.bind(("eth0", 0))
        mreq = struct.pack("iHH8s", socket.if_nametoindex("eth0"), 1, 0, b"")  # PROMISC
        rx.setsockopt(263, 1, mreq)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP
    with in_netns(topo.ns["t1"]):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    samples = []
    try:
        for _mac, ip in fresh:
            want = socket.inet_aton(ip)
            sent = time.monotonic()
            tx.sendto(b"first", (ip, 7))
            deadline = sent + 3.0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ready, _, _ = select.select([rx], [], [], left)
                if not ready:
                    break
                frame = rx.recv(2048)
                if frame[30:34] == want:
                    samples.append((time.monotonic() - sent) * 1000)
                    break
    finally:
        rx.close()
        tx.close()
    return samples


# ------------------------------------------------------------------------------ the run


def run(quick: bool = False, seconds: float | None = None, fresh: int | None = None) -> dict:
    why = unavailable()
    if why:
        return {"skipped": why, "summary": []}
    seconds = seconds or (2.0 if quick else 8.0)
    fresh = min(fresh or (20 if quick else 250), 1000)  # the fresh /22 holds 1,000
    result: dict[str, Any] = {"seconds": seconds, "fresh_addresses": fresh, "errors": {}}
    rates: dict[str, float] = {}
    topo = Topology()
    tool = ""
    try:
        portolan = Portolan(topo)
        for mode in ("static", "linux", "udp"):
            procs = []
            try:
                if mode == "static":
                    build_static(topo)
                else:
                    procs = [start_varpd(topo, portolan, cn, mode) for cn in CNS]
                if not reachable(topo):
                    raise RuntimeError("t1 cannot reach t2")
                rates[mode], tool = throughput(topo, seconds)
                if mode == "linux":
                    samples = first_packet(topo, portolan, fresh)
                    result["first_packet_ms"] = {
                        "samples": len(samples),
                        "lost": fresh - len(samples),
                        "p50": percentile(samples, 50),
                        "p99": percentile(samples, 99),
                        "max": max(samples) if samples else float("nan"),
                    }
            except Exception as exc:  # one data path failing must not hide the others
                result["errors"][mode] = f"{type(exc).__name__}: {exc}"
            finally:
                for proc in procs:
                    topo.stop(proc)
                for cn in CNS:
                    topo.reset_node(cn)
                sh("ip", "-n", topo.ns["t1"], "route", "del", "192.168.80.0/22", check=False)
    finally:
        topo.close()
    result["tool"] = tool
    result["gbit_per_s"] = rates
    nan = float("nan")
    ratio_static = rates.get("linux", nan) / rates.get("static", nan)
    ratio_udp = rates.get("linux", nan) / rates.get("udp", nan)
    p99 = result.get("first_packet_ms", {}).get("p99", nan)
    result["ratios"] = {"linux_over_static": ratio_static, "linux_over_udp": ratio_udp}
    result["goals"] = {
        "linux_over_static": THROUGHPUT_GOAL_STATIC,
        "linux_over_static_met": bool(ratio_static >= THROUGHPUT_GOAL_STATIC),
        "linux_over_udp": THROUGHPUT_GOAL_UDP,
        "linux_over_udp_met": bool(ratio_udp >= THROUGHPUT_GOAL_UDP),
        "first_packet_p99_ms": FIRST_PACKET_P99_GOAL_MS,
        "first_packet_p99_met": bool(p99 < FIRST_PACKET_P99_GOAL_MS),
    }
    result["summary"] = [
        {"figure": "TCP linux backend", "value": rates.get("linux"), "unit": "Gbit/s",
         "baseline": rates.get("static"), "baseline_name": "kernel vxlan, static fdb",
         "ratio": ratio_static, "goal": f">= {THROUGHPUT_GOAL_STATIC}",
         "pass": result["goals"]["linux_over_static_met"]},
        {"figure": "TCP linux vs udp backend", "value": rates.get("linux"), "unit": "Gbit/s",
         "baseline": rates.get("udp"), "baseline_name": "udp backend (TAP)",
         "ratio": ratio_udp, "goal": f">= {THROUGHPUT_GOAL_UDP}",
         "pass": result["goals"]["linux_over_udp_met"]},
        {"figure": "first packet p99", "value": p99, "unit": "ms", "baseline": None,
         "baseline_name": "", "ratio": None, "goal": f"< {FIRST_PACKET_P99_GOAL_MS}",
         "pass": result["goals"]["first_packet_p99_met"]},
    ]  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_datapath", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seconds", type=float, default=None, help="seconds per throughput run")
    p.add_argument("--fresh", type=int, default=None, help="never-seen addresses to time")
    args = p.parse_args(argv)
    result = run(args.quick, args.seconds, args.fresh)
    if "skipped" in result:
        print(f"kernel_datapath skipped: {result['skipped']}")
        return 0
    rows = [[r["figure"], r["value"], r["baseline"], r["ratio"], r["goal"], r["pass"]]
            for r in result["summary"]]  # fmt: skip
    print_table(["figure", "value", "baseline", "ratio", "goal", "met"], rows)
    for mode, err in result["errors"].items():
        print(f"{mode}: {err}")
    print(f"throughput measured with {result['tool']}")
    path = write_results("kernel_datapath", result)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
