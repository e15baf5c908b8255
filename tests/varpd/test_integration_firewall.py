"""The cloud firewall wired into varpd: two daemons on one memory underlay, the policy served
by an in-process stand-in for portolan's policy endpoint (``fwpolicy_server.py``).

Node A (10.0.0.1) and node B (10.0.0.2) each run one ``direct`` overlay device pointing at the
other, so a guest frame reaches the other node's guest synchronously, with no lookups.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Dot1Q, Ether

from tests.varpd.fwpolicy_server import PolicyServer
from varpd import adm
from varpd.daemon import Varpd

CN_A = "00000000-0000-4000-8000-00000000000a"
CN_B = "00000000-0000-4000-8000-00000000000b"
MAC_A, MAC_B, MAC_C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
IP_A, IP_B, IP_C = "192.168.7.1", "192.168.7.2", "192.168.7.3"
VNET = 300
BOUND = 5.0  # seconds a policy change may take to be enforced (the goal is 1 s)
_uuids = itertools.count(1)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def sample(varpd: Varpd, metric: str, **labels: str) -> float:
    value = varpd.metrics.registry.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def rule(direction: str, action: str, protocol: str, ports: Any = "all", **kw: Any) -> dict:
    doc = {
        "uuid": kw.pop("uuid", f"00000000-0000-4000-8000-{next(_uuids):012d}"),
        "direction": direction,
        "action": action,
        "priority": kw.pop("priority", 0),
        "protocol": protocol,
        "peers": kw.pop("peers", "any"),
    }
    if protocol in ("tcp", "udp"):
        doc["ports"] = ports
    return doc


def vnic_policy(ip: str, *rules: dict) -> dict:
    return {"ips": [ip], "vnet_id": VNET, "rules": list(rules)}


def tcp(
    src: tuple[str, str], dst: tuple[str, str], sport: int, dport: int, flags: str = "S"
) -> bytes:
    return bytes(
        Ether(src=src[0], dst=dst[0])
        / IP(src=src[1], dst=dst[1])
        / TCP(sport=sport, dport=dport, flags=flags)
    )


def udp(src: tuple[str, str], dst: tuple[str, str], sport: int, dport: int) -> bytes:
    return bytes(
        Ether(src=src[0], dst=dst[0]) / IP(src=src[1], dst=dst[1]) / UDP(sport=sport, dport=dport)
    )


A, B, C = (MAC_A, IP_A), (MAC_B, IP_B), (MAC_C, IP_C)


def delivered(sender: Varpd, src_mac: str, receiver: Varpd, dst_mac: str, frame: bytes) -> bool:
    """Send ``frame`` from one guest; True if the other guest got it (delivery is synchronous)."""
    inbox = receiver.vnic("o0", dst_mac).port
    inbox.received()
    sender.vnic("o0", src_mac).port.send_nowait(frame)
    return frame in inbox.received()


async def passes_within(check: Callable[[], bool], bound: float = BOUND) -> float:
    """Retry ``check`` until it is true; returns the seconds it took (fails past ``bound``)."""
    t0 = trio.current_time()
    with trio.fail_after(bound):
        while not check():
            await trio.sleep(0.02)
    return trio.current_time() - t0


@pytest.fixture
async def server(nursery: trio.Nursery) -> PolicyServer:
    srv = PolicyServer()
    await nursery.start(srv.serve)
    srv.publish(CN_A, {})
    srv.publish(CN_B, {})
    return srv


@contextlib.asynccontextmanager
async def two_nodes(
    make_varpd: Callable[..., Any], server: PolicyServer, **b_extra: Any
) -> AsyncIterator[tuple[Varpd, Varpd]]:
    common = {"portolan_api": server.url, "firewall": {"wait": 5}}
    async with (
        make_varpd("a", cn_uuid=CN_A, **common) as a,
        make_varpd("b", cn_uuid=CN_B, **common, **b_extra) as b,
    ):
        for node, listen, peer, mac in (
            (a, "10.0.0.1", "10.0.0.2", MAC_A),
            (b, "10.0.0.2", "10.0.0.1", MAC_B),
        ):
            props = {"vxlan/listen_ip": listen, "direct/dest_ip": peer, "direct/dest_port": 4789}
            await node.create("o0", VNET, "direct", props=props, vnics=[{"mac": mac}])
            await node.activate("o0")
        await wait_until(
            lambda: a.firewall.generation is not None and b.firewall.generation is not None
        )
        yield a, b


async def enforce(server: PolicyServer, node: Varpd, cn: str, vnics: dict) -> int:
    generation = server.publish(cn, vnics)
    await wait_until(lambda: node.firewall.generation == generation, timeout=BOUND)
    return generation


# ------------------------------------------------------------------------ the scenario


async def test_enable_allow_delete_cycle_blocks_and_passes_inbound_traffic(
    make_varpd: Any, server: PolicyServer
) -> None:
    async with two_nodes(make_varpd, server) as (a, b):
        web = tcp(A, B, 40000, 80)
        # No VNIC in the policy: nothing is filtered.
        assert a.vnic("o0", MAC_A).filter is None and b.vnic("o0", MAC_B).filter is None
        assert delivered(a, MAC_A, b, MAC_B, web)

        # Firewall enabled on B, no rules: inbound is blocked by default.
        await enforce(server, b, CN_B, {MAC_B: vnic_policy(IP_B)})
        assert b.vnic("o0", MAC_B).filter is b.firewall.get(MAC_B)
        assert not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40001, 80))
        assert b.vnic("o0", MAC_B).counters["filter_drop_in"] == 1

        # An ALLOW rule (tcp 80 from anyone): new connections pass within the bound.
        allow_web = rule(
            "in", "allow", "tcp", [[80, 80]], uuid="11111111-1111-4111-8111-111111111111"
        )
        server.publish(CN_B, {MAC_B: vnic_policy(IP_B, allow_web)})
        took = await passes_within(lambda: delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40002, 80)))
        assert took < BOUND
        assert not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40003, 22))  # other ports: still not

        # Rule deleted: blocked again, including the flow the rule had let in.
        server.publish(CN_B, {MAC_B: vnic_policy(IP_B)})
        await passes_within(lambda: not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40004, 80)))
        assert not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40002, 80, "A"))

        # A was never in the policy: its traffic to B's other direction is not filtered at A.
        assert a.vnic("o0", MAC_A).filter is None


async def test_replies_to_outbound_flows_pass_but_unsolicited_inbound_does_not(
    make_varpd: Any, server: PolicyServer
) -> None:
    async with two_nodes(make_varpd, server) as (a, b):
        await enforce(server, b, CN_B, {MAC_B: vnic_policy(IP_B)})
        # B opens a TCP connection and a UDP exchange towards A (outbound passes by default).
        assert delivered(b, MAC_B, a, MAC_A, tcp(B, A, 50000, 22))
        assert delivered(a, MAC_A, b, MAC_B, tcp(A, B, 22, 50000, "SA"))
        assert delivered(b, MAC_B, a, MAC_A, udp(B, A, 5353, 53))
        assert delivered(a, MAC_A, b, MAC_B, udp(A, B, 53, 5353))
        # ... but not to a port B did not talk from, nor a new connection from A.
        assert not delivered(a, MAC_A, b, MAC_B, udp(A, B, 53, 5354))
        assert not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 22, 50001))
        # An outbound BLOCK stops B's new connections (the verdict happens at B's boundary).
        block_ssh = rule("out", "block", "tcp", [[22, 22]], priority=1)
        await enforce(server, b, CN_B, {MAC_B: vnic_policy(IP_B, block_ssh)})
        assert not delivered(b, MAC_B, a, MAC_A, tcp(B, A, 50002, 22))
        assert b.vnic("o0", MAC_B).counters["filter_drop_out"] >= 1


async def test_vnic_added_later_picks_up_its_filter_and_removal_unbinds_it(
    make_varpd: Any, server: PolicyServer
) -> None:
    async with two_nodes(make_varpd, server) as (a, b):
        # The policy already names C (e.g. the orchestrator enabled it before the move).
        await enforce(server, b, CN_B, {MAC_B: vnic_policy(IP_B), MAC_C: vnic_policy(IP_C)})
        assert b.firewall_status()["policy_only"] == [MAC_C]
        await b.vnic_add("o0", MAC_C)
        vnic_c = b.vnic("o0", MAC_C)
        assert vnic_c.filter is not None and vnic_c.filter is b.firewall.get(MAC_C)
        assert not delivered(a, MAC_A, b, MAC_C, tcp(A, C, 40000, 80))
        assert b.firewall_status()["policy_only"] == []

        # Removing the VNIC clears its hook and the table forgets it on the next policy.
        await b.vnic_remove("o0", MAC_C)
        assert vnic_c.filter is None
        await enforce(server, b, CN_B, {MAC_C: vnic_policy(IP_C)})
        assert vnic_c.filter is None  # not re-bound by a later policy
        assert b.vnic("o0", MAC_B).filter is None  # B left the policy: unfiltered again


async def test_policy_refetched_after_a_reconnect_replaces_everything(
    make_varpd: Any, server: PolicyServer
) -> None:
    async with two_nodes(make_varpd, server) as (a, b):
        allow_web = rule("in", "allow", "tcp", [[80, 80]])
        await enforce(server, b, CN_B, {MAC_B: vnic_policy(IP_B, allow_web)})
        assert b.fetcher is not None
        await wait_until(lambda: b.fetcher.state == "polling")

        server.down = True  # the held long-poll fails, as does every retry
        await wait_until(lambda: b.fetcher.state == "backoff", timeout=BOUND)
        status = b.firewall_status()
        assert status["state"] == "backoff" and "503" in (status["last_error"] or "")
        # the last policy stays in force while portolan is unreachable
        assert b.vnic("o0", MAC_B).filter is not None
        assert not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40000, 22))

        # Portolan changes while we are cut off: B's firewall is disabled, C appears.
        generation = server.publish(CN_B, {MAC_C: vnic_policy(IP_C)})
        mark = len(server.requests)
        server.down = False
        await wait_until(lambda: b.firewall.generation == generation, timeout=15)
        assert b.vnic("o0", MAC_B).filter is None and b.firewall.get(MAC_B) is None
        assert b.firewall_status()["policy_only"] == [MAC_C]
        assert delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40001, 22))
        # the first successful request after the outage was a full fetch (no long-poll)
        first_ok = next(r for r in server.requests[mark:] if r.status == 200)
        assert first_ok.wait is None and first_ok.if_none_match is None
        assert b.firewall_status()["last_error"] is None
        assert sample(b, "varpd_firewall_fetch_errors_total") >= 1


# ------------------------------------------------------------------------ observability


async def test_metrics_export_firewall_state_and_shim_counters(
    make_varpd: Any, server: PolicyServer
) -> None:
    async with two_nodes(make_varpd, server) as (a, b):
        generation = await enforce(
            server, b, CN_B, {MAC_B: vnic_policy(IP_B, rule("in", "allow", "udp", [[53, 53]]))}
        )
        assert not delivered(a, MAC_A, b, MAC_B, tcp(A, B, 40000, 80))
        assert delivered(a, MAC_A, b, MAC_B, udp(A, B, 1234, 53))
        # a guest-made 802.1Q tag is a transmit drop in the shim
        a.vnic("o0", MAC_A).port.send_nowait(
            bytes(Ether(src=MAC_A, dst=MAC_B) / Dot1Q(vlan=5) / IP(src=IP_A, dst=IP_B) / UDP())
        )

        assert sample(b, "varpd_firewall_policy_generation") == generation
        assert sample(b, "varpd_firewall_vnics") == 1
        assert sample(b, "varpd_firewall_packets_total", direction="in", action="blocked") == 1
        assert sample(b, "varpd_firewall_verdicts_total", verdict="drop_default") == 1
        assert sample(b, "varpd_firewall_verdicts_total", verdict="pass_rule") == 1
        assert sample(b, "varpd_firewall_vnic_rules", mac=MAC_B, direction="in") == 1
        assert sample(b, "varpd_firewall_vnic_flows", mac=MAC_B) == 1
        assert sample(b, "varpd_firewall_fetcher_state", state="polling") in (0.0, 1.0)
        assert sample(b, "varpd_firewall_fetches_total", result="applied") >= 2
        assert sample(a, "varpd_overlay_frames_total", device="o0", direction="tx") == 2
        assert sample(a, "varpd_overlay_tx_dropped_total", device="o0", reason="tagged") == 1
        assert sample(b, "varpd_overlay_frames_total", device="o0", direction="rx") == 2
        assert sample(b, "varpd_overlay_filter_dropped_total", device="o0", direction="in") == 1
        assert (
            sample(
                b, "varpd_overlay_vnic_dropped_total", device="o0", mac=MAC_B, reason="filter_in"
            )
            == 1
        )
        assert sample(b, "varpd_overlay_mux_datagrams_total", listen="10.0.0.2:4789") == 2
        assert sample(b, "varpd_overlay_upcalls_total", event="lookups") == 0
        text = b.metrics.render().decode()
        assert "varpd_overlay_rx_dropped_total" in text and "varpd_overlay_lookups_waiting" in text

        # Counters stay monotonic when a VNIC leaves the policy (its firewall is dropped).
        await enforce(server, b, CN_B, {})
        assert sample(b, "varpd_firewall_verdicts_total", verdict="drop_default") == 1
        assert sample(b, "varpd_firewall_vnics") == 0


async def test_varpdadm_firewall_and_show_report_the_policy(
    make_varpd: Any, server: PolicyServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(tmp_path / "b.sock")
    async with two_nodes(make_varpd, server, control_socket=sock) as (a, b):
        allow = rule("in", "allow", "tcp", [[80, 80]])
        block = rule("out", "block", "udp", "all", priority=2)
        generation = await enforce(server, b, CN_B, {MAC_B: vnic_policy(IP_B, allow, block)})

        async def run(*argv: str) -> str:
            capsys.readouterr()
            code = await trio.to_thread.run_sync(adm.main, ["--socket", sock, *argv])
            out = capsys.readouterr().out
            assert code == 0, out
            return out

        shown = json.loads(await run("--json", "firewall"))
        assert shown["enabled"] and shown["generation"] == generation
        assert shown["fetcher"]["state"] in ("polling", "fetching")
        assert shown["fetcher"]["url"].endswith(f"/firewalls/cns/{CN_B}/policy")
        (row,) = shown["vnics"]
        assert row["mac"] == MAC_B and row["filtered"] and row["device"] == "o0"
        assert (row["rules"], row["rules_in"], row["rules_out"]) == (2, 1, 1)

        text = await run("firewall")
        assert "FILTERED" in text and MAC_B in text and str(generation) in text
        text = await run("show", "o0")
        assert "1 in / 1 out" in text and f"policy generation {generation}" in text
        info = json.loads(await run("--json", "ping"))
        assert info["firewall_generation"] == generation


async def test_without_portolan_api_nothing_is_fetched_or_filtered(make_varpd: Any) -> None:
    async with make_varpd("solo") as v:
        assert v.fetcher is None
        await v.create(
            "o0",
            VNET,
            "direct",
            props={
                "vxlan/listen_ip": "10.0.0.9",
                "direct/dest_ip": "10.0.0.8",
                "direct/dest_port": 4789,
            },
            vnics=[{"mac": MAC_A}],
        )
        assert v.vnic("o0", MAC_A).filter is None
        status = v.firewall_status()
        assert status["enabled"] is False and status["state"] == "disabled"
        assert status["generation"] is None
        assert sample(v, "varpd_firewall_fetch_errors_total") == 0
