"""A synchronous two-node Portolan cluster in network namespaces, for driving `portolan-cni`.

Topology (every name carries this run's prefix ``pcni<pid hex>x``; what runs whose process
is gone left behind is swept at start, another live run's namespaces are left alone)::

    ns ul : bridge br0 10.77.0.254/24, `portolan serve` (SVP on 10.77.0.254, API on ul's lo);
            the plugin runs here (the "management" namespace a runtime would run in)
      |-- veth -- ns cn1: ul0 10.77.0.1, `varpd run` (backend udp or linux), overlay0
      '-- veth -- ns cn2: ul0 10.77.0.2, `varpd run`                         overlay0

Container namespaces are made by `Cluster.container_ns` (the harness) or by the runtime
(podman). The plugin is exec'd with ``ip netns exec <ul>`` and the spec's environment; it
reaches each varpd by its control socket path (a file, valid across network namespaces).
`Cluster.close()` stops the processes and deletes every namespace this cluster created
(a `lab.netns.Namespaces`; commands, ``in_netns`` and ``wait_for_line`` are `lab.netns`'s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from lab import netns
from lab.netns import in_netns, nsexec, run, wait_for_line

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "pcni"
VNET = 7707
OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"
HUB_IP = "10.77.0.254"
SUBNET = "192.168.77.0/24"
GATEWAY = "192.168.77.1"
CNS = {
    "cn1": ("7c0a77e0-0000-4000-8000-000000000001", "10.77.0.1"),
    "cn2": ("7c0a77e0-0000-4000-8000-000000000002", "10.77.0.2"),
}


def plugin_path() -> str | None:
    """The installed `portolan-cni` console script next to this interpreter (or on PATH)."""
    here = Path(sys.executable).parent / "portolan-cni"
    if here.exists():
        return str(here)
    return shutil.which("portolan-cni")


def sweep() -> None:
    """Delete namespaces left by killed runs of these tests (``pcni<pid>x*``, pid gone)."""
    netns.sweep(PREFIX, r"([0-9a-f]+)x")


def unavailable() -> str | None:
    reason = netns.unavailable()  # root, /dev/net/tun, `ip`, a namespace and a veth
    if reason is None and plugin_path() is None:
        return "portolan-cni is not installed (pip install -e .)"
    return reason


def backend_unavailable(backend: str) -> str | None:
    from varpd import config as varpd_config

    if backend not in varpd_config.BACKENDS:
        return f"varpd has no {backend!r} backend yet (BACKENDS = {varpd_config.BACKENDS})"
    return None


class Cluster:
    def __init__(self, tmp: Path, backend: str = "udp") -> None:
        self.tmp = tmp
        self.backend = backend
        self.lab = netns.Namespaces(tag="x", prefix=PREFIX)  # pcni<pid hex>x
        self.logs: list[Path] = []
        self.ns: dict[str, str] = {}
        self.api_base = ""
        self.network: dict[str, Any] = {}
        self.plugin = plugin_path() or "portolan-cni"
        self._containers = 0

    # -- building ------------------------------------------------------------------------

    def popen(self, ns: str, argv: list[str], log: str) -> subprocess.Popen:
        err_path = self.tmp / f"{log}.err"
        self.logs.append(err_path)
        return self.lab.popen(ns, argv, stderr_path=err_path, cwd=REPO_ROOT)

    def build(self) -> None:
        sweep()
        for name in ("ul", "cn1", "cn2"):
            self.ns[name] = self.lab.ns(name)
        ul = self.ns["ul"]
        self.lab.bridge(ul, f"{HUB_IP}/24")
        for cn, (_, ip) in CNS.items():
            self.lab.uplink(self.ns[cn], f"{ip}/24", ul, f"to{cn}")
        argv = [sys.executable, "-m", "portolan.cli.main", "serve",
                "--store", f"sqlite:{self.tmp / 'portolan.db'}",
                "--svp-listen", f"{HUB_IP}:0", "--api-listen", "127.0.0.1:0",
                "--metrics-listen", "127.0.0.1:0", "--reload-interval", "0"]  # fmt: skip
        proc = self.popen(ul, argv, "portolan")
        ready = wait_for_line(proc, "READY", timeout=60).split()
        addrs = dict(w.split("=", 1) for w in ready[1:])
        svp_port = int(addrs["svp"].rsplit(":", 1)[1])
        self.api_base = f"http://127.0.0.1:{addrs['api'].rsplit(':', 1)[1]}"
        for uuid, ip in CNS.values():
            self.api("PUT", f"/cns/{uuid}", {"ip": ip, "port": 4789})
        self.network = self.api("POST", "/networks", {
            "name": "cni-test", "owner_uuid": OWNER, "vnet_id": VNET, "vlan_id": 0,
            "subnet": SUBNET, "gateway": GATEWAY})  # fmt: skip
        for cn in CNS:
            self.start_varpd(cn, svp_port)

    def start_varpd(self, cn: str, svp_port: int) -> None:
        uuid, ip = CNS[cn]
        lines = [
            f'cn_uuid = "{uuid}"',
            f'state_dir = "{self.tmp / (cn + "-state")}"',
            f'control_socket = "{self.socket(cn)}"',
            'metrics = "127.0.0.1:0"',
            f'backend = "{self.backend}"',
            "",
            "[[device]]",
            'name = "overlay0"',
            f"vnetid = {VNET}",
            "mtu = 1400",
            'search = "svp"',
            f'props = {{ "vxlan/listen_ip" = "{ip}", "vxlan/listen_port" = 4789, '
            f'"svp/host" = "{HUB_IP}", "svp/port" = {svp_port}, '
            f'"svp/underlay_ip" = "{ip}", "svp/underlay_port" = 4789 }}',
        ]
        config = self.tmp / f"{cn}.toml"
        config.write_text("\n".join(lines) + "\n")
        proc = self.popen(
            self.ns[cn], [sys.executable, "-m", "varpd.cli", "run", "--config", str(config)],
            f"varpd-{cn}",
        )  # fmt: skip
        wait_for_line(proc, "READY", timeout=60)

    def close(self) -> None:
        self.lab.close()

    def diagnostics(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in self.logs
            if p.exists()
        )

    # -- talking to the parts ------------------------------------------------------------

    def socket(self, cn: str) -> str:
        return str(self.tmp / f"{cn}.sock")

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with in_netns(self.ns["ul"]), httpx.Client(timeout=10) as client:
            resp = client.request(method, self.api_base + path, json=body)
        assert resp.status_code < 300, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json() if resp.content else None

    def vnics(self) -> list[dict[str, Any]]:
        return self.api("GET", f"/vnics?network_uuid={self.network['uuid']}")

    def varpd_vnics(self, cn: str) -> list[str]:
        argv = [sys.executable, "-m", "varpd.adm", "--socket", self.socket(cn),
                "vnic", "list", "overlay0", "--json"]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stderr
        return [v["mac"] for v in json.loads(proc.stdout)]

    def links(self, ns: str) -> list[str]:
        out = run("ip", "-n", ns, "-j", "link", "show").stdout
        return [link["ifname"] for link in json.loads(out)]

    def conf(self, cn: str, **extra: Any) -> dict[str, Any]:
        conf = {
            "cniVersion": "1.0.0",
            "name": "blue",
            "type": "portolan-cni",
            "api": self.api_base,
            "network_uuid": self.network["uuid"],
            "cn_uuid": CNS[cn][0],
            "varpd_socket": self.socket(cn),
            "overlay": "overlay0",
            "mtu": 1400,
        }
        conf.update(extra)
        return conf

    def container_ns(self) -> str:
        self._containers += 1
        return self.lab.ns(f"k{self._containers}")

    def exec_plugin(
        self, command: str, conf: dict[str, Any], *, timeout: float = 60.0, **runtime: str
    ) -> tuple[int, Any]:
        """Exec the plugin as a runtime does (``runtime``: `spawn_plugin`'s ``container_id``,
        ``netns``, ``ifname``, ``args``); (exit status, parsed stdout or None)."""
        proc = self.spawn_plugin(command, conf, **runtime)
        return finish_plugin(proc, json.dumps(conf), timeout)

    def spawn_plugin(
        self,
        command: str,
        conf: dict[str, Any],
        *,
        container_id: str = "",
        netns: str = "",
        ifname: str = "eth0",
        args: str = "",
    ) -> subprocess.Popen:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": f"/var/run/netns/{netns}" if netns and "/" not in netns else netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": args,
            "CNI_PATH": str(Path(self.plugin).parent),
        }
        proc = subprocess.Popen(
            nsexec(self.ns["ul"], self.plugin),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        proc._cni_stdin = json.dumps(conf)  # type: ignore[attr-defined]
        return proc


def finish_plugin(proc: subprocess.Popen, stdin: str | None = None, timeout: float = 60.0):
    data = stdin if stdin is not None else proc._cni_stdin  # type: ignore[attr-defined]
    out, err = proc.communicate(data.encode(), timeout=timeout)
    text = out.decode().strip()
    assert not (text and proc.returncode == 0 and err.strip().startswith(b"Traceback")), err
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        raise AssertionError(f"plugin printed non-JSON: {text!r}; stderr {err!r}") from None
    return proc.returncode, doc
