"""End to end over real namespaces: portolan + three varpd compute nodes + tenant guests.

Topology (every namespace and address is the test's own; see tests/e2e/netns.py)::

    ns ul: bridge br0 10.88.0.254/24, `portolan serve` (SVP on 10.88.0.254, API on its lo)
       |-- veth -- ns cn1: ul0 10.88.0.1, `varpd run` (udp backend, svp) -- TAP vna -> ns tenA
       |-- veth -- ns cn2: ul0 10.88.0.2, `varpd run`                    -- TAP vnb -> ns tenB
       '-- veth -- ns cn3: ul0 10.88.0.3, `varpd run` (no VNIC yet)

The test drives portolan's API (from inside ns ul) to create the CNs, the network and two
VNICs, starts a real varpd per CN inside its namespace from a TOML config, moves each TAP into
its tenant namespace and addresses it there, then pings B from A: the guest's ARP is answered
by varpd's proxy (SVP VL3 lookup) and the unicast is sent where the VL2 lookup says
(``varpdadm cache list`` shows the entry). Then B migrates to cn3 the way an orchestrator
would -- ``varpdadm vnic add`` on cn3 with a new TAP moved into tenB, ``PUT /vnics/{mac}``
with the new cn_uuid, ``varpdadm vnic rm`` on cn2 -- and pings follow within 10 s (the
shootdown clears cn1's cache entry; the next lookup answers cn3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e import netns
from tests.e2e.conftest import REPO_ROOT, parse_ready

pytestmark = pytest.mark.netns

VNET = 4288
OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"
CNS = {
    "cn1": ("5b9bba4e-0000-4000-8000-000000000001", "10.88.0.1"),
    "cn2": ("5b9bba4e-0000-4000-8000-000000000002", "10.88.0.2"),
    "cn3": ("5b9bba4e-0000-4000-8000-000000000003", "10.88.0.3"),
}
PORTOLAN_IP = "10.88.0.254"
MAC_A, IP_A = "02:00:00:88:00:0a", "192.168.88.10"
MAC_B, IP_B = "02:00:00:88:00:0b", "192.168.88.11"
MOVE_BOUND = 10.0


class Cluster:
    """The namespaces and processes of this test (torn down by the fixture)."""

    def __init__(self, lab: netns.Lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.ns: dict[str, str] = {}
        self.api_base = ""
        self.svp_port = 0
        self.varpd: dict[str, subprocess.Popen] = {}
        self.metrics: dict[str, str] = {}
        self.logs: list[Path] = []

    # -- API, from inside the underlay namespace --------------------------------------

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with netns.in_netns(self.ns["ul"]), httpx.Client(timeout=10) as client:
            resp = client.request(method, self.api_base + path, json=body)
        assert resp.status_code < 300, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json() if resp.content else None

    # -- varpd -------------------------------------------------------------------------

    def socket(self, cn: str) -> str:
        return str(self.tmp / f"{cn}.sock")

    def adm(self, cn: str, *args: str) -> Any:
        argv = [sys.executable, "-m", "varpd.adm", "--socket", self.socket(cn), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
        assert proc.returncode == 0, f"varpdadm {' '.join(args)}: {proc.stderr}{proc.stdout}"
        return json.loads(proc.stdout) if "--json" in args else proc.stdout

    def cache_dest(self, cn: str, mac: str) -> str | None:
        for entry in self.adm(cn, "cache", "list", "overlay0", "--json"):
            if entry["mac"] == mac:
                return entry["dest"]
        return None

    def start_varpd(self, cn: str, vnics: list[tuple[str, str]]) -> None:
        uuid, ip = CNS[cn]
        lines = [
            f'cn_uuid = "{uuid}"',
            f'state_dir = "{self.tmp / (cn + "-state")}"',
            f'control_socket = "{self.socket(cn)}"',
            'metrics = "127.0.0.1:0"',
            'backend = "udp"',
            "lookup_workers = 4",
            "",
            "[[device]]",
            'name = "overlay0"',
            f"vnetid = {VNET}",
            "mtu = 1400",
            'search = "svp"',
            f'props = {{ "vxlan/listen_ip" = "{ip}", "vxlan/listen_port" = 4789, '
            f'"svp/host" = "{PORTOLAN_IP}", "svp/port" = {self.svp_port}, '
            f'"svp/underlay_ip" = "{ip}", "svp/underlay_port" = 4789 }}',
        ]
        for mac, tap in vnics:
            lines += ["", "[[device.vnic]]", f'mac = "{mac}"', "vlan_id = 0", f'tap = "{tap}"']
        config = self.tmp / f"{cn}.toml"
        config.write_text("\n".join(lines) + "\n")
        err = self.tmp / f"varpd-{cn}.err"
        self.logs.append(err)
        proc = self.lab.popen(
            self.ns[cn],
            [sys.executable, "-m", "varpd.cli", "run", "--config", str(config)],
            stderr_path=err,
            cwd=REPO_ROOT,
        )
        ready = netns.wait_for_line(proc, "READY", timeout=30)
        metrics = next(w for w in ready.split() if w.startswith("metrics="))
        self.metrics[cn] = f"http://{metrics.partition('=')[2]}/metrics"
        self.varpd[cn] = proc

    def metric(self, cn: str, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` matching ``labels`` on ``cn``'s /metrics."""
        with netns.in_netns(self.ns[cn]), httpx.Client(timeout=10) as client:
            text = client.get(self.metrics[cn]).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    # -- tenants -----------------------------------------------------------------------

    def plug(self, cn: str, tap: str, tenant: str, cidr: str) -> None:
        """The orchestrator's step: move varpd's TAP into the tenant and address it."""
        netns.run("ip", "-n", self.ns[cn], "link", "set", tap, "netns", self.ns[tenant])
        netns.run("ip", "-n", self.ns[tenant], "addr", "add", cidr, "dev", tap)
        netns.run("ip", "-n", self.ns[tenant], "link", "set", tap, "up")

    def diagnostics(self) -> str:
        out = []
        for path in self.logs:
            if path.exists():
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    lab = netns.Lab("e")
    c = Cluster(lab, tmp_path)
    try:
        build(c)
        yield c
    except BaseException:
        print(c.diagnostics())
        raise
    finally:
        lab.close()


def build(c: Cluster) -> None:
    lab = c.lab
    for name in ("ul", "cn1", "cn2", "cn3", "tenA", "tenB"):
        c.ns[name] = lab.ns(name)
    ul = c.ns["ul"]
    netns.run("ip", "-n", ul, "link", "add", "br0", "type", "bridge")
    netns.run("ip", "-n", ul, "link", "set", "br0", "up")
    lab.addr(ul, "br0", f"{PORTOLAN_IP}/24")
    for cn in ("cn1", "cn2", "cn3"):
        lab.veth(c.ns[cn], "ul0", ul, f"to{cn}")
        netns.run("ip", "-n", ul, "link", "set", f"to{cn}", "master", "br0")
        lab.addr(c.ns[cn], "ul0", f"{CNS[cn][1]}/24")

    store = f"sqlite:{c.tmp / 'portolan.db'}"
    err = c.tmp / "portolan.err"
    c.logs.append(err)
    argv = [sys.executable, "-m", "portolan.cli.main", "serve", "--store", store,
            "--svp-listen", f"{PORTOLAN_IP}:0", "--api-listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--reload-interval", "0"]  # fmt: skip
    proc = lab.popen(ul, argv, stderr_path=err, cwd=REPO_ROOT)
    ready = parse_ready(netns.wait_for_line(proc, "READY", timeout=60))
    c.svp_port = ready["svp"][1]
    c.api_base = f"http://127.0.0.1:{ready['api'][1]}"

    for uuid, ip in CNS.values():
        c.api("PUT", f"/cns/{uuid}", {"ip": ip, "port": 4789})
    net = c.api(
        "POST",
        "/networks",
        {
            "name": "e2e",
            "owner_uuid": OWNER,
            "vnet_id": VNET,
            "vlan_id": 0,
            "subnet": "192.168.88.0/24",
        },  # fmt: skip
    )
    for mac, ip, cn in ((MAC_A, IP_A, "cn1"), (MAC_B, IP_B, "cn2")):
        c.api(
            "POST",
            "/vnics",
            {"network_uuid": net["uuid"], "cn_uuid": CNS[cn][0], "mac": mac, "ip": ip},
        )

    c.start_varpd("cn1", [(MAC_A, "vna")])
    c.start_varpd("cn2", [(MAC_B, "vnb")])
    c.start_varpd("cn3", [])
    c.plug("cn1", "vna", "tenA", f"{IP_A}/24")
    c.plug("cn2", "vnb", "tenB", f"{IP_B}/24")


def ping_until(c: Cluster, src: str, dst: str, bound: float) -> float:
    """Ping until one reply arrives; returns the seconds it took (fails after ``bound``)."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < bound:
        ok, last = netns.ping(c.ns[src], dst, count=1, deadline=1)
        if ok:
            return time.monotonic() - t0
    raise AssertionError(f"no reply from {dst} within {bound}s:\n{last}\n{c.diagnostics()}")


def test_ping_across_the_overlay_and_follow_a_vnic_migration(cluster: Cluster) -> None:
    c = cluster
    t_start = time.monotonic()
    # A -> B: proxy ARP (VL3) on cn1, then a VL2 lookup for B's MAC
    ping_until(c, "tenA", IP_B, 15)
    ok, out = netns.ping(c.ns["tenA"], IP_B, count=3)
    assert ok, out
    neigh = netns.run("ip", "-n", c.ns["tenA"], "neigh", "show", IP_B).stdout
    assert MAC_B in neigh  # the proxied ARP answer
    assert c.cache_dest("cn1", MAC_B) == f"{CNS['cn2'][1]}:4789"
    assert c.cache_dest("cn2", MAC_A) == f"{CNS['cn1'][1]}:4789"
    assert c.metric("cn1", "varpd_proxied_replies_total", kind="arp") >= 1
    # lookups went to the svp plugin (the VL3 answer behind the proxied ARP may already fill
    # the cache entry for B's MAC, so the unicast need not miss)
    assert c.metric("cn1", "varpd_lookups_total", plugin="svp", result="proxy_arp") >= 1
    assert c.metric("cn1", "varpd_lookups_total", plugin="svp") >= 1

    # migrate B to cn3: add there (new TAP into tenB), tell portolan, remove from cn2
    c.adm("cn3", "vnic", "add", "overlay0", MAC_B, "--tap", "vnb3")
    tenb = c.ns["tenB"]
    netns.run("ip", "-n", tenb, "link", "set", "vnb", "down")
    netns.run("ip", "-n", tenb, "addr", "flush", "dev", "vnb")
    c.plug("cn3", "vnb3", "tenB", f"{IP_B}/24")
    c.api("PUT", f"/vnics/{MAC_B}", {"cn_uuid": CNS["cn3"][0]})
    t_move = time.monotonic()
    c.adm("cn2", "vnic", "rm", "overlay0", MAC_B)
    # cn2 closed the old TAP's fd: the link is gone from the tenant
    assert netns.run("ip", "-n", tenb, "link", "show", "vnb", check=False).returncode != 0

    took = ping_until(c, "tenA", IP_B, MOVE_BOUND)
    print(f"traffic followed the move after {time.monotonic() - t_move:.2f}s (ping {took:.2f}s)")
    assert c.cache_dest("cn1", MAC_B) == f"{CNS['cn3'][1]}:4789"
    assert c.cache_dest("cn3", MAC_A) == f"{CNS['cn1'][1]}:4789"
    vnics = c.adm("cn3", "vnic", "list", "overlay0", "--json")
    assert [v["mac"] for v in vnics] == [MAC_B]
    assert c.adm("cn2", "vnic", "list", "overlay0", "--json") == []
    assert time.monotonic() - t_start < 60
