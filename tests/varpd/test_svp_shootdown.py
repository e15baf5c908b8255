"""The log poller: VL2/VL3 shootdowns applied to the kernel side, LOG_RM, poll cadence."""

from __future__ import annotations

from collections import deque
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
import trio
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from protocol.addr import format_mac, ip_to_wire
from protocol.svp import LogVL2Entry, LogVL3Entry, Op, Status, VL3Ack
from tests.varpd.svp_script_server import (
    FakeHost,
    ScriptServer,
    answer,
    refused_port,
    wait_until,
)
from varpd.metrics import VarpdMetrics
from varpd.plugins.svp import SvpOptions, SvpPlugin
from varpd.plugins.svp.shootdown import build_announcement, build_unsolicited_na
from varpd.shim.types import Point

VNET = 12340
OTHER_VNET = 999
MAC_OLD = bytes.fromhex("000a959d6816")
MAC_NEW = bytes.fromhex("000a959d7777")
UL_NEW = ip_to_wire("10.0.0.2")
IP4 = IPv4Address("172.16.0.5")
IP6 = IPv6Address("fd00::5")


def eid(n: int) -> bytes:
    return n.to_bytes(16, "big")


async def local_resolver(host: str, port: int):
    return [ip_address("127.0.0.1")]


@pytest.fixture
async def server(nursery) -> ScriptServer:
    s = ScriptServer()
    s.vl3[(ip_to_wire(IP4), VNET)] = (MAC_NEW, 4789, UL_NEW)
    s.vl3[(ip_to_wire(IP6), VNET)] = (MAC_NEW, 4789, UL_NEW)
    await s.start(nursery)
    return s


async def start_plugin(host: FakeHost, port: int, **options: object) -> SvpPlugin:
    options.setdefault("backoff_jitter", 0.0)  # exact backoff times (jitter: issue 17's tests)
    options.setdefault("reconnect_spread", 0.0)
    opts = SvpOptions(resolver=local_resolver, **options)  # type: ignore[arg-type]
    plugin = SvpPlugin(
        host,
        {"svp/host": "portolan.test", "svp/port": port, "svp/underlay_ip": "192.168.1.1"},
        options=opts,
    )
    await plugin.start()
    return plugin


def injected(host: FakeHost) -> list[bytes]:
    return [c[2] for c in host.driver.named("inject")]


# ------------------------------------------------------------------------ VL2


async def test_vl2_entry_removes_the_mac_from_the_right_instance(autojump_clock, nursery, server):
    shared: dict = {}
    h1 = FakeHost(nursery, vnet_id=VNET, device="o1", shared=shared)
    h2 = FakeHost(nursery, vnet_id=OTHER_VNET, device="o2", shared=shared)
    server.log = [LogVL2Entry(eid(1), MAC_OLD, VNET), LogVL2Entry(eid(2), MAC_OLD, OTHER_VNET)]
    p1 = await start_plugin(h1, server.port)
    p2 = await start_plugin(h2, server.port)
    await wait_until(lambda: not server.log)
    assert h1.driver.calls == [("cache_remove", "o1", MAC_OLD)]
    assert h2.driver.calls == [("cache_remove", "o2", MAC_OLD)]
    assert server.removed == [(eid(1), eid(2))]
    await p1.stop()
    await p2.stop()


async def test_entries_for_unknown_vnets_are_acknowledged(autojump_clock, nursery, server):
    host = FakeHost(nursery)
    server.log = [
        LogVL2Entry(eid(1), MAC_OLD, OTHER_VNET),
        LogVL3Entry(eid(2), ip_to_wire(IP4), 0, OTHER_VNET),
    ]
    plugin = await start_plugin(host, server.port)
    await wait_until(lambda: bool(server.removed))
    assert server.removed == [(eid(1), eid(2))]
    assert host.driver.calls == [] and not server.ops(Op.VL3_REQ)
    await plugin.stop()


# ------------------------------------------------------------------------ VL3


@pytest.mark.parametrize("vlan", [0, 42])
async def test_vl3_entry_re_resolves_caches_and_injects_a_garp(
    autojump_clock, nursery, server, vlan
):
    host = FakeHost(nursery)
    server.log = [LogVL3Entry(eid(7), ip_to_wire(IP4), vlan, VNET)]
    plugin = await start_plugin(host, server.port)
    await wait_until(lambda: bool(server.removed))
    (req,) = server.ops(Op.VL3_REQ)
    assert req.ip == ip_to_wire(IP4) and req.vnet_id == VNET
    assert host.driver.calls[0] == ("cache_set", "overlay0", MAC_NEW, Point(UL_NEW, 4789))
    assert host.driver.calls[1][0] == "inject" and host.driver.calls[1][1] == "overlay0"
    pkt = Ether(host.driver.calls[1][2])
    assert pkt.dst == "ff:ff:ff:ff:ff:ff" and pkt.src == format_mac(MAC_NEW)
    if vlan:
        assert pkt[Dot1Q].vlan == vlan and pkt[Dot1Q].prio == 0
    else:
        assert Dot1Q not in pkt
    arp = pkt[ARP]
    assert arp.op == 1
    assert arp.psrc == arp.pdst == str(IP4)
    assert arp.hwsrc == format_mac(MAC_NEW)
    assert arp.hwdst == "ff:ff:ff:ff:ff:ff"
    assert server.removed == [(eid(7),)]
    await plugin.stop()


@pytest.mark.parametrize("vlan", [0, 7])
async def test_ipv6_vl3_entry_injects_an_unsolicited_na(autojump_clock, nursery, server, vlan):
    host = FakeHost(nursery)
    server.log = [LogVL3Entry(eid(8), ip_to_wire(IP6), vlan, VNET)]
    plugin = await start_plugin(host, server.port)
    await wait_until(lambda: bool(server.removed))
    (frame,) = injected(host)
    pkt = Ether(frame)
    assert pkt.dst == "33:33:00:00:00:01" and pkt.src == format_mac(MAC_NEW)
    assert (pkt[Dot1Q].vlan == vlan) if vlan else (Dot1Q not in pkt)
    ip6 = pkt[IPv6]
    assert ip6.src == str(IP6) and ip6.dst == "ff02::1" and ip6.hlim == 255
    na = pkt[ICMPv6ND_NA]
    assert na.tgt == str(IP6) and na.O == 1 and na.S == 0 and na.R == 0
    assert pkt[ICMPv6NDOptDstLLAddr].lladdr == format_mac(MAC_NEW)
    # The checksum scapy computes from scratch equals ours.
    original = na.cksum
    del na.cksum
    assert Ether(bytes(pkt))[ICMPv6ND_NA].cksum == original
    await plugin.stop()


async def test_log_rm_carries_exactly_the_handled_ids(autojump_clock, nursery, server):
    host = FakeHost(nursery)
    ip_fatal = ip_to_wire("172.16.0.6")
    ip_missing = ip_to_wire("172.16.0.7")
    server.vl3[(ip_fatal, VNET)] = (MAC_OLD, 4789, UL_NEW)
    server.log = [
        LogVL2Entry(eid(1), MAC_OLD, VNET),
        LogVL3Entry(eid(2), ip_fatal, 0, VNET),
        LogVL3Entry(eid(3), ip_missing, 0, VNET),
        LogVL3Entry(eid(4), ip_to_wire(IP4), 0, VNET),
    ]

    def fatal_for_ip_fatal(req, frame):
        if req.ip == ip_fatal:
            return VL3Ack(req.id, Status.FATAL, b"\x00" * 6, 0, b"\x00" * 16).encode()
        return frame

    server.script_for[Op.VL3_REQ] = deque([answer(fatal_for_ip_fatal)] * 3)
    plugin = await start_plugin(host, server.port)
    await wait_until(lambda: bool(server.removed))
    assert sorted(server.removed[0]) == [eid(1), eid(3), eid(4)]
    # The failed entry is redelivered and handled on a later poll.
    await wait_until(lambda: len(server.removed) == 2)
    assert server.removed[1] == (eid(2),)
    assert server.log == []
    await plugin.stop()


async def test_shootdowns_are_counted_in_metrics(autojump_clock, nursery, server):
    metrics = VarpdMetrics()
    host = FakeHost(nursery, metrics=metrics)
    server.log = [
        LogVL2Entry(eid(1), MAC_OLD, VNET),
        LogVL3Entry(eid(2), ip_to_wire(IP4), 0, VNET),
    ]
    plugin = await start_plugin(host, server.port)
    await wait_until(lambda: bool(server.removed))
    get = metrics.registry.get_sample_value
    assert get("varpd_svp_shootdowns_total", {"type": "vl2"}) == 1
    assert get("varpd_svp_shootdowns_total", {"type": "vl3"}) == 1
    await plugin.stop()


# ------------------------------------------------------------------------ cadence


async def test_idle_polls_every_250ms_with_count_1024_and_the_underlay_ip(
    autojump_clock, nursery, server
):
    host = FakeHost(nursery)
    plugin = await start_plugin(host, server.port)
    await wait_until(lambda: len(server.ops(Op.LOG_REQ)) >= 6)
    times = [
        t
        for t, (_, m) in zip(server.request_times, server.requests, strict=True)
        if m.OP == Op.LOG_REQ
    ]
    gaps = [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]
    assert gaps[:5] == [0.25] * 5
    req = server.ops(Op.LOG_REQ)[0]
    assert req.count == 1024 and req.ip == ip_to_wire("192.168.1.1") and req.version == 1
    assert not server.ops(Op.LOG_RM)
    await plugin.stop()


async def test_poll_interval_is_configurable(autojump_clock, nursery, server):
    plugin = await start_plugin(FakeHost(nursery), server.port, log_interval=5.0)
    await wait_until(lambda: len(server.ops(Op.LOG_REQ)) >= 3)
    times = [
        t
        for t, (_, m) in zip(server.request_times, server.requests, strict=True)
        if m.OP == Op.LOG_REQ
    ]
    assert round(times[2] - times[1], 3) == 5.0
    await plugin.stop()


async def test_non_empty_batch_is_removed_and_followed_by_an_immediate_poll(
    autojump_clock, nursery, server
):
    host = FakeHost(nursery)
    # 40 VL2 entries: more than one 1024-byte batch (31 entries) holds.
    server.log = [LogVL2Entry(eid(i), MAC_OLD, VNET) for i in range(1, 41)]
    plugin = await start_plugin(host, server.port)
    await wait_until(lambda: len(server.removed) == 2)
    assert [len(r) for r in server.removed] == [31, 9]
    sequence = [(m.OP, t) for t, (_, m) in zip(server.request_times, server.requests, strict=True)]
    ops = [op for op, _ in sequence[:5]]
    assert ops == [Op.LOG_REQ, Op.LOG_RM, Op.LOG_REQ, Op.LOG_RM, Op.LOG_REQ]
    # No waiting between the steps of a busy log (illumos waits 1 s twice).
    assert sequence[4][1] - sequence[0][1] < 0.01
    assert len(host.driver.named("cache_remove")) == 40
    await plugin.stop()


async def test_entry_logged_while_idle_is_applied_within_a_poll_interval(
    autojump_clock, nursery, server
):
    host = FakeHost(nursery)
    plugin = await start_plugin(host, server.port)
    await wait_until(lambda: len(server.ops(Op.LOG_REQ)) >= 2)
    await trio.sleep(0.1)
    t0 = trio.current_time()
    server.log.append(LogVL3Entry(eid(9), ip_to_wire(IP4), 0, VNET))
    await wait_until(lambda: bool(injected(host)), step=0.001)
    assert trio.current_time() - t0 <= 0.25 + 0.01
    await plugin.stop()


async def test_polling_starts_once_a_connection_is_up(autojump_clock, nursery):
    port = refused_port()
    plugin = await start_plugin(FakeHost(nursery), port)
    await trio.sleep(2.5)
    server = ScriptServer()
    await server.start(nursery, port=port)
    await wait_until(lambda: len(server.ops(Op.LOG_REQ)) >= 2, timeout=10)
    # Connection attempts at 0, 1, 3: the first poll goes out on the connection made at t=3.
    assert server.request_times[0] == pytest.approx(3.0, abs=0.01)
    await plugin.stop()


# ------------------------------------------------------------------------ frame builders


def test_build_announcement_picks_garp_for_v4_and_na_for_v6():
    garp = Ether(build_announcement(MAC_NEW, ip_to_wire(IP4), 5))
    assert garp[ARP].op == 1 and garp[Dot1Q].vlan == 5
    na = Ether(build_announcement(MAC_NEW, IP6.packed, 0))
    assert ICMPv6ND_NA in na
    assert build_unsolicited_na(MAC_NEW, IP6.packed) == build_announcement(MAC_NEW, IP6.packed)
