"""End to end on the linux backend: the demo's firewall step enforced by nftables.

portolan + two varpd (backend = "linux", ``portolan_api`` set) in namespaces (the cluster of
``tests/linux/conftest.py``, with portolan's API on the underlay so varpd can poll it). Guest
A (cn1) sends UDP to guest B (cn2), which echoes:

1. B's firewall off: the echo comes back;
2. ``PUT /vnics/B {"firewall_enabled": true}``: blocked (inbound default drop in cn2's
   kernel table), within 10 s;
3. ``POST /rules`` ALLOW udp to B's port: the echo comes back, within 10 s;
4. ``PUT /rules/{uuid} {"enabled": false}``: blocked again, within 10 s;
5. ``varpdadm firewall`` shows the kernel side (generation, chains, counters) and the drops
   are in ``varpd_firewall_packets_total{vnic, direction, verdict}``;
6. varpd on cn2 stops: B stays blocked (the table stays: fail-closed); restarted, the same.

The guests' UDP programs are the demo's (`lab.demo_netns`: this is its firewall step).
The 1 s goal between an API call and enforcement is measured by the benchmark, not here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import netns
from lab.demo_netns import UDP_ASK
from lab.netns import UDP_ECHO
from tests.linux.conftest import OWNER, PORTOLAN_IP, KernelCluster, cn_uuid

pytestmark = [pytest.mark.netns, pytest.mark.linux]

VNET = 0x4D3
MAC_A, IP_A = "02:00:00:4d:01:0a", "192.168.78.10"
MAC_B, IP_B = "02:00:00:4d:01:0b", "192.168.78.11"
PORT = 7777
VM_A = "b1a5e0a1-0000-4000-8000-00000000000a"
VM_B = "b1a5e0a1-0000-4000-8000-00000000000b"
TOKEN = "kfw-e2e-token"


class FirewallCluster(KernelCluster):
    """The kernel cluster with portolan's API where varpd can reach it (with a token)."""

    api_host = PORTOLAN_IP
    api_headers = {"Authorization": f"Bearer {TOKEN}"}
    portolan_args = ("--api-token", TOKEN)

    def _spawn(self, cn: str) -> None:
        config: Path = self.configs[cn]
        text = config.read_text()
        if "portolan_api" not in text:
            head = f'portolan_api = "{self.api_base}"\nportolan_api_token = "{TOKEN}"\n'
            config.write_text(head + text + "\n[firewall]\nwait = 5\n")
        super()._spawn(cn)


def ask(c: KernelCluster, sport: int, timeout: float = 0.5) -> bool:
    argv = netns.nsexec(
        c.ns["tA"], sys.executable, "-c", UDP_ASK, IP_A, str(sport), IP_B, str(PORT), str(timeout)
    )
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).returncode == 0


def within(c: KernelCluster, want: bool, limit: float, sport: list[int]) -> float:
    """Seconds until a fresh UDP flow A -> B gets (want=True) or no longer gets an echo."""
    t0 = time.monotonic()
    while True:
        sport[0] += 1
        if ask(c, sport[0], 0.3) == want:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < limit, (
            f"not {'allowed' if want else 'blocked'} after {limit}s\n{c.diag()}\n"
            + netns.run(*netns.nsexec(c.ns["cn2"], "nft", "list", "ruleset"), check=False).stdout
            + str(c.adm("cn2", "firewall", "--json", check=False).stdout)
        )


def test_demo_firewall_step_on_the_linux_backend(kcluster: KernelCluster) -> None:
    c = FirewallCluster(kcluster.lab, kcluster.tmp)
    c.build(2)
    net = c.network(VNET, "192.168.78.0/24")
    for cn, mac, ip, vm in ((1, MAC_A, IP_A, VM_A), (2, MAC_B, IP_B, VM_B)):
        c.api(
            "POST",
            "/vnics",
            {"network_uuid": net, "cn_uuid": cn_uuid(cn), "mac": mac, "ip": ip,
             "owner_uuid": OWNER, "belongs_to_uuid": vm},
        )  # fmt: skip
    c.guests(VNET, (1, MAC_A, IP_A, "fwa", "tA"), (2, MAC_B, IP_B, "fwb", "tB"))
    echo = c.lab.popen(c.ns["tB"], [sys.executable, "-c", UDP_ECHO, IP_B, str(PORT)])
    netns.wait_for_line(echo, "READY", timeout=10)
    sport = [20000]
    c.ping("tA", IP_B, timeout=15)
    within(c, True, 10, sport)  # firewall off: echoed

    c.api("PUT", f"/vnics/{MAC_B}", {"firewall_enabled": True})
    took_block = within(c, False, 10, sport)
    rule = c.api(
        "POST",
        "/rules",
        {"rule": f"FROM any TO vm {VM_B} ALLOW udp PORT {PORT}", "owner_uuid": OWNER,
         "enabled": True},
    )  # fmt: skip
    took_allow = within(c, True, 10, sport)
    c.api("PUT", f"/rules/{rule['uuid']}", {"enabled": False})
    took_block_again = within(c, False, 10, sport)
    print(f"enforced after {took_block:.2f}s / {took_allow:.2f}s / {took_block_again:.2f}s")

    def kernel_row() -> dict:
        status = c.adm("cn2", "firewall", "--json")
        assert status["kernel"] is not None, status
        return status["kernel"]["kernel"]["vnics"].get(MAC_B) or {}

    deadline = time.monotonic() + 10
    while not kernel_row().get("counters", {}).get("in_drop_default"):
        assert time.monotonic() < deadline, kernel_row()
        time.sleep(0.2)
    row = kernel_row()
    assert row["port"] and row["port"].startswith("pvh"), row
    assert len(row["chains"]) == 2, row
    text = c.adm("cn2", "firewall")
    assert "kernel:" in text and "DROP IN" in text, text
    drops = c.metric(
        "cn2", "varpd_firewall_packets_total", vnic=MAC_B, direction="in", verdict="drop_default"
    )
    assert drops >= 1

    # the bridge hands its packets to conntrack (br_netfilter), set by varpd
    assert bridge_nf_flags(c, "cn2", f"pvb{VNET:x}") == (1, 1)

    # varpd stops: the table stays in force (fail-closed); restarted: rebuilt, still enforced
    c.lab.stop(c.varpd["cn2"])
    sport[0] += 1
    assert not ask(c, sport[0], 0.5)
    c._spawn("cn2")
    deadline = time.monotonic() + 10
    while (c.adm("cn2", "firewall", "--json").get("kernel") or {}).get("full_rebuilds") != 1:
        sport[0] += 1
        assert not ask(c, sport[0], 0.2)  # blocked all along
        assert time.monotonic() < deadline, "the restarted varpd did not rebuild its tables"
    sport[0] += 1
    assert not ask(c, sport[0], 0.5)


def bridge_nf_flags(c: KernelCluster, cn: str, bridge: str) -> tuple[int, int]:
    from pyroute2 import IPRoute

    with netns.in_netns(c.ns[cn]):
        ipr = IPRoute()
    try:
        link = ipr.get_links(ipr.link_lookup(ifname=bridge)[0])[0]
        data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        return data.get_attr("IFLA_BR_NF_CALL_IPTABLES"), data.get_attr("IFLA_BR_NF_CALL_IP6TABLES")
    finally:
        ipr.close()
