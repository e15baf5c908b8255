"""A kernel-data-path cluster for the linux backend tests (root, namespaces; else skipped).

Topology (every namespace carries this run's ``plx<pid>`` prefix; see `lab.netns`)::

    ns ul: bridge br0 10.77.0.254/24 + `portolan serve` (SVP there, API on its lo)
       |-- veth -- ns cnN: ul0 10.77.0.N, `varpd run` (backend per node), VNIC veths
    tenants: one namespace per guest; the orchestrator's step (`plug`) moves the VNIC's
    tenant end (or the udp backend's TAP) there and addresses it.

`KernelCluster` is the test's handle: the portolan API (from inside ns ul), ``varpdadm``
against each node's control socket, node restarts, the kernel tables of a node's vxlan
device read with pyroute2 inside that namespace, ICMP echo from `lab.netns.ping` and TCP/ARP
traffic from `tenant.py` run inside a tenant namespace. The fixture sweeps leftovers of the
prefix first and removes everything it made on the way out, failures included.

Other suites drive the same processes on their own namespaces: a subclass moves the
underlay (``hub_ip``, ``underlay``), portolan's API (``api_host``, ``portolan_args``,
``api_headers``) or the nodes' ``log_level`` (tests/e2e/test_netns_overlay.py: udp backend;
tests/firewall/kernel/test_e2e_linux.py: the API on the underlay, for varpd's firewall).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from lab import netns
from tests.e2e.conftest import REPO_ROOT, parse_ready

PREFIX = "plx"
PORTOLAN_IP = "10.77.0.254"
UL_PORT = 4789
OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"
TENANT = str(Path(__file__).with_name("tenant.py"))


def cn_uuid(n: int) -> str:
    return f"5b9bba4e-0000-4000-8000-0000000000{n:02x}"


def cn_ip(n: int) -> str:
    return f"10.77.0.{n}"


def sweep_leftovers() -> None:
    """Delete ``plx<pid>x*`` namespaces whose test process is gone (a killed run); those of
    a run still going (another engineer's, a parallel session) are left alone."""
    netns.sweep(PREFIX, r"([0-9a-f]+)x")


class KernelCluster:
    """portolan and a ``varpd run`` per node in the namespaces of ``lab`` (see above)."""

    hub_ip = PORTOLAN_IP  # bridge br0 in ns ul: portolan's SVP listens here
    underlay = "10.77.0"  # node N's ul0 is <underlay>.N/24
    api_host = "127.0.0.1"  # portolan's API, in ns ul
    api_headers: dict[str, str] = {}
    portolan_args: tuple[str, ...] = ()  # more `portolan serve` arguments
    log_level: str | None = "DEBUG"  # the nodes' varpd log_level (None: varpd's default)

    def __init__(self, lab: netns.Namespaces, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.ns: dict[str, str] = {}
        self.api_base = ""
        self.svp_port = 0
        self.varpd: dict[str, subprocess.Popen] = {}
        self.configs: dict[str, Path] = {}
        self.metrics: dict[str, str] = {}
        self.logs: list[Path] = []

    # -- building -----------------------------------------------------------------------

    def cn_ip(self, n: int) -> str:
        return f"{self.underlay}.{n}"

    def build(self, cns: int) -> None:
        """ns ul (bridge, `portolan serve`), nodes cn1..cn<cns>, each registered (PUT /cns)."""
        ul = self.ns["ul"] = self.lab.ns("ul")
        self.lab.bridge(ul, f"{self.hub_ip}/24")
        for n in range(1, cns + 1):
            self.add_node(n)
        store = f"sqlite:{self.tmp / 'portolan.db'}"
        err = self.tmp / "portolan.err"
        self.logs.append(err)
        argv = [sys.executable, "-m", "portolan.cli.main", "serve", "--store", store,
                "--svp-listen", f"{self.hub_ip}:0", "--api-listen", f"{self.api_host}:0",
                "--metrics-listen", "127.0.0.1:0", "--reload-interval", "0",
                *self.portolan_args]  # fmt: skip
        proc = self.lab.popen(ul, argv, stderr_path=err, cwd=REPO_ROOT)
        ready = parse_ready(netns.wait_for_line(proc, "READY", timeout=60))
        self.svp_port = ready["svp"][1]
        self.api_base = f"http://{self.api_host}:{ready['api'][1]}"
        for n in range(1, cns + 1):
            self.api("PUT", f"/cns/{cn_uuid(n)}", {"ip": self.cn_ip(n), "port": UL_PORT})

    def add_node(self, n: int) -> str:
        """Namespace ``cnN`` on the underlay hub with address <underlay>.N."""
        cn = f"cn{n}"
        self.ns[cn] = self.lab.ns(cn)
        self.lab.uplink(self.ns[cn], f"{self.cn_ip(n)}/24", self.ns["ul"], f"to{cn}")
        return self.ns[cn]

    def tenant(self, name: str, ipv6: bool = False) -> str:
        ns = self.ns[name] = self.lab.ns(name)
        if ipv6:
            netns.sysctl(ns, "net.ipv6.conf.all.disable_ipv6", 0)
            netns.sysctl(ns, "net.ipv6.conf.default.disable_ipv6", 0)
        return ns

    def tenants(self, *plugs: tuple[str, str, str, str], ipv6: bool = False) -> None:
        """For each ``(cn, ifname, tenant, cidr)``: the tenant's namespace, then `plug`."""
        for _cn, _ifname, tenant, _cidr in plugs:
            self.tenant(tenant, ipv6=ipv6)
        for plug in plugs:
            self.plug(*plug)

    def guests(self, vnet: int, *guests: tuple[int, str, str, str, str]) -> None:
        """For each ``(N, mac, ip, ifname, tenant)``: varpd on cnN (backend linux, svp) with
        the VNIC (tenant end ``ifname``), then `tenants` with ``ip``/24."""
        for n, mac, _ip, ifname, _tenant in guests:
            self.start_varpd(f"cn{n}", vnet, [(mac, ifname)])
        self.tenants(*((f"cn{n}", ifname, t, f"{ip}/24") for n, _m, ip, ifname, t in guests))

    # -- portolan -------------------------------------------------------------------------

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = self.api_headers
        with netns.in_netns(self.ns["ul"]), httpx.Client(timeout=10, headers=headers) as client:
            resp = client.request(method, self.api_base + path, json=body)
        assert resp.status_code < 300, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json() if resp.content else None

    def network(self, vnet: int, subnet: str, vlan: int = 0, name: str = "lx") -> str:
        net = self.api(
            "POST",
            "/networks",
            {"name": name, "owner_uuid": OWNER, "vnet_id": vnet, "vlan_id": vlan, "subnet": subnet},
        )
        return str(net["uuid"])

    def vnic(self, net: str, cn: int, mac: str, ip: str) -> None:
        self.api(
            "POST", "/vnics", {"network_uuid": net, "cn_uuid": cn_uuid(cn), "mac": mac, "ip": ip}
        )

    # -- varpd ----------------------------------------------------------------------------

    def socket(self, cn: str) -> str:
        return str(self.tmp / f"{cn}.sock")

    def start_varpd(
        self,
        cn: str,
        vnet: int,
        vnics: list[tuple[str, str]],
        backend: str = "linux",
        search: str = "svp",
        extra_props: dict[str, Any] | None = None,
    ) -> None:
        n = int(cn[2:])
        ip = self.cn_ip(n)
        props = {
            "vxlan/listen_ip": ip,
            "vxlan/listen_port": UL_PORT,
            "svp/host": self.hub_ip,
            "svp/port": self.svp_port,
            "svp/underlay_ip": ip,
            "svp/underlay_port": UL_PORT,
            **(extra_props or {}),
        }
        if search != "svp":
            props = {k: v for k, v in props.items() if not k.startswith("svp/")}
        inline = ", ".join(f'"{k}" = {json.dumps(v)}' for k, v in props.items())
        key = "ifname" if backend == "linux" else "tap"
        lines = [
            f'cn_uuid = "{cn_uuid(n)}"',
            f'state_dir = "{self.tmp / (cn + "-state")}"',
            f'control_socket = "{self.socket(cn)}"',
            'metrics = "127.0.0.1:0"',
            f'backend = "{backend}"',
            "lookup_workers = 4",
            *([f'log_level = "{self.log_level}"'] if self.log_level else []),
            "",
            "[[device]]",
            'name = "overlay0"',
            f"vnetid = {vnet}",
            "mtu = 1400",
            f'search = "{search}"',
            f"props = {{ {inline} }}",
        ]
        for mac, ifname in vnics:
            lines += ["", "[[device.vnic]]", f'mac = "{mac}"', f'{key} = "{ifname}"']
        config = self.configs[cn] = self.tmp / f"{cn}.toml"
        config.write_text("\n".join(lines) + "\n")
        self._spawn(cn)

    def _spawn(self, cn: str) -> None:
        err = self.tmp / f"varpd-{cn}.err"
        if err not in self.logs:
            self.logs.append(err)
        with open(err, "a") as f:
            f.write(f"--- start {time.strftime('%X')}\n")
        argv = [sys.executable, "-m", "varpd.cli", "run", "--config", str(self.configs[cn])]
        proc = self.lab.popen(self.ns[cn], argv, stderr_path=err, append=True, cwd=REPO_ROOT)
        ready = netns.wait_for_line(proc, "READY", timeout=30)
        metrics = next(w for w in ready.split() if w.startswith("metrics="))
        self.metrics[cn] = f"http://{metrics.partition('=')[2]}/metrics"
        self.varpd[cn] = proc

    def restart_varpd(self, cn: str) -> None:
        self.lab.stop(self.varpd[cn])
        self._spawn(cn)

    def adm(self, cn: str, *args: str, check: bool = True) -> Any:
        argv = [sys.executable, "-m", "varpd.adm", "--socket", self.socket(cn), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
        if check:
            assert proc.returncode == 0, f"varpdadm {' '.join(args)}: {proc.stderr}{proc.stdout}"
        if not check:
            return proc
        return json.loads(proc.stdout) if "--json" in args else proc.stdout

    def cache_dest(self, cn: str, mac: str) -> str | None:
        for entry in self.adm(cn, "cache", "list", "overlay0", "--json"):
            if entry["mac"] == mac:
                return entry["dest"]
        return None

    def metric(self, cn: str, name: str, **labels: str) -> float:
        with netns.in_netns(self.ns[cn]), httpx.Client(timeout=10) as client:
            text = client.get(self.metrics[cn]).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    # -- kernel tables of a node ----------------------------------------------------------

    def kernel(self, cn: str, what: str, ifname: str) -> list[tuple[str | None, str | None]]:
        """(NDA_DST, NDA_LLADDR) rows of ``ifname``'s fdb ("fdb") or neighbours ("neigh")."""
        from pyroute2 import IPRoute

        with netns.in_netns(self.ns[cn]):
            ipr = IPRoute()
        try:
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                return []
            if what == "fdb":
                msgs = ipr.fdb("dump", ifindex=found[0])
                rows = [
                    (m.get_attr("NDA_DST"), m.get_attr("NDA_LLADDR"))
                    for m in msgs
                    if m.get_attr("NDA_MASTER") is None and not m["flags"] & 0x04
                ]
            else:
                msgs = ipr.neigh("dump", ifindex=found[0])
                rows = [(m.get_attr("NDA_DST"), m.get_attr("NDA_LLADDR")) for m in msgs]
                msgs6 = ipr.neigh("dump", ifindex=found[0], family=10)
                rows += [(m.get_attr("NDA_DST"), m.get_attr("NDA_LLADDR")) for m in msgs6]
            return [r for r in rows if r[0] or r[1]]
        finally:
            ipr.close()

    def links(self, ns: str) -> list[str]:
        from pyroute2 import IPRoute

        with netns.in_netns(ns):
            ipr = IPRoute()
        try:
            return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
        finally:
            ipr.close()

    # -- tenants --------------------------------------------------------------------------

    def plug(self, cn: str, ifname: str, tenant: str, cidr: str) -> None:
        netns.run("ip", "-n", self.ns[cn], "link", "set", ifname, "netns", self.ns[tenant])
        netns.run("ip", "-n", self.ns[tenant], "addr", "add", cidr, "dev", ifname, "nodad")
        netns.run("ip", "-n", self.ns[tenant], "link", "set", ifname, "up")

    def run_tenant(
        self, tenant: str, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess:
        argv = netns.nsexec(self.ns[tenant], sys.executable, TENANT, *args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def popen_tenant(self, tenant: str, *args: str, env: dict[str, str] | None = None) -> Any:
        argv = [sys.executable, TENANT, *args]
        return self.lab.popen(self.ns[tenant], argv, env=env)

    def ping(self, tenant: str, dst: str, timeout: float = 10.0) -> float:
        """Seconds until the first echo reply (ICMP or ICMPv6, `lab.netns.ping`); fails the
        test after ``timeout``."""
        t0 = time.monotonic()
        ok, out = netns.ping(self.ns[tenant], dst, count=1, deadline=timeout)
        assert ok, f"{tenant} -> {dst}: {out}\n{self.diag()}"
        return time.monotonic() - t0

    def tcp(
        self,
        server: str,
        client: str,
        dst: str,
        nbytes: int = 4 << 20,
        pause: float = 0.0,
        during: Any = None,
    ) -> str:
        """An echoed TCP transfer; ``during()`` runs while it flows (e.g. a restart)."""
        port = "5201"
        env = {"BIND": "::"} if ":" in dst else None
        srv = self.popen_tenant(server, "tcp-server", port, env=env)
        assert srv.stdout is not None
        netns.wait_for_line(srv, "listening", timeout=10)
        argv = netns.nsexec(
            self.ns[client],
            sys.executable,
            TENANT,
            "tcp-client",
            dst,
            port,
            str(nbytes),
            str(pause),
        )
        cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if during is not None:
                during()
            out, err = cli.communicate(timeout=90)
        finally:
            if cli.poll() is None:
                cli.kill()
            self.lab.stop(srv)
        assert cli.returncode == 0, f"tcp {client} -> {dst}: {out}{err}\n{self.diag()}"
        return out.strip()

    def diag(self) -> str:
        out = []
        for path in self.logs:
            if path.exists():
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)


C = TypeVar("C", bound=KernelCluster)


@contextlib.contextmanager
def managed(c: C) -> Iterator[C]:
    """``c`` for the block: its logs printed when the block fails, its namespaces (and the
    processes in them) removed after it in any case."""
    try:
        yield c
    except BaseException:
        print(c.diag())
        raise
    finally:
        c.lab.close()


@pytest.fixture
def kcluster(tmp_path: Path) -> Iterator[KernelCluster]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    sweep_leftovers()
    with managed(KernelCluster(netns.Namespaces(tag="x", prefix=PREFIX), tmp_path)) as c:
        yield c


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until truthy (returns it) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


__all__ = ["KernelCluster", "cn_ip", "cn_uuid", "kcluster", "managed", "wait_until", "os"]
