"""The svp plugin: properties, start/stop and sharing of remotes, lookup dispatch, arp()."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
import trio

from protocol.addr import ip_to_wire
from protocol.svp import Op, VL3Type
from tests.varpd.svp_script_server import (
    FakeHost,
    FakeReply,
    ScriptServer,
    refused_port,
    wait_until,
)
from varpd.metrics import VarpdMetrics
from varpd.plugins import PLUGINS
from varpd.plugins.base import PluginNotReady, PropError
from varpd.plugins.svp import SvpOptions, SvpPlugin
from varpd.plugins.svp.remote import REMOTE_FAIL_MESSAGE, remote_key
from varpd.shim.types import DstType, LookupRequest, Point, TargetMode

VNET = 12340
MAC_A = bytes.fromhex("000a959d6816")
MAC_GUEST = bytes.fromhex("000a959d0001")
UL_A = ip_to_wire("10.0.0.1")
IP_A = IPv4Address("172.16.0.5")
IP6_A = IPv6Address("fd00::5")


async def local_resolver(host: str, port: int):
    return [ip_address("127.0.0.1")]


OPTIONS = SvpOptions(resolver=local_resolver)


def props(port: int, **extra: object) -> dict[str, object]:
    values: dict[str, object] = {
        "svp/host": "portolan.test",
        "svp/port": port,
        "svp/underlay_ip": "192.168.1.1",
    }
    values.update(extra)
    return {k: v for k, v in values.items() if v is not None}


def request(
    dst: bytes, sap: int = 0x0800, dst_type: DstType = DstType.UNICAST, vnet: int = VNET
) -> LookupRequest:
    return LookupRequest(
        req_id=1,
        device="overlay0",
        varpd_id=1,
        vnet_id=vnet,
        hdr_size=14,
        pkt_size=64,
        src_mac=MAC_GUEST,
        dst_mac=dst,
        dst_type=dst_type,
        sap=sap,
        vlan=0,
        frame=dst + MAC_GUEST + sap.to_bytes(2, "big") + b"\x00" * 50,
    )


@pytest.fixture
async def server(nursery) -> ScriptServer:
    s = ScriptServer()
    s.vl2[(MAC_A, VNET)] = (4789, UL_A)
    s.vl3[(ip_to_wire(IP_A), VNET)] = (MAC_A, 4789, UL_A)
    s.vl3[(ip_to_wire(IP6_A), VNET)] = (MAC_A, 4790, UL_A)
    await s.start(nursery)
    return s


async def started(host: FakeHost, port: int, **extra: object) -> SvpPlugin:
    plugin = SvpPlugin(host, props(port, **extra), options=OPTIONS)
    await plugin.start()
    return plugin


# ------------------------------------------------------------------------ properties


def test_plugin_is_registered_as_svp_in_dynamic_mode():
    assert PLUGINS["svp"] is SvpPlugin
    assert SvpPlugin.name == "svp" and SvpPlugin.mode is TargetMode.DYNAMIC


def test_property_table_matches_illumos():
    specs = {s.name: s for s in SvpPlugin.props}
    assert list(specs) == ["svp/host", "svp/port", "svp/underlay_ip", "svp/underlay_port"]
    assert specs["svp/port"].default == 1296 and specs["svp/underlay_port"].default == 1339
    assert all(s.required for s in specs.values())
    assert specs["svp/host"].type == "string" and specs["svp/underlay_ip"].type == "ip"
    for name in ("svp/port", "svp/underlay_port"):
        assert specs[name].validate("1") == 1 and specs[name].validate(65535) == 65535
        for bad in (0, 65536, "x"):
            with pytest.raises(PropError):
                specs[name].validate(bad)


@pytest.mark.parametrize(
    "bad", ["224.0.0.1", "ff02::1", "::10.0.0.1", "2002:a00:1::1", "not-an-ip", "0.0.0.0"]
)
def test_underlay_ip_rejects_what_illumos_rejects(bad):
    spec = SvpPlugin.prop_spec("svp/underlay_ip")
    assert spec is not None
    with pytest.raises(PropError):
        spec.validate(bad)


def test_underlay_ip_accepts_unicast_v4_and_v6():
    spec = SvpPlugin.prop_spec("svp/underlay_ip")
    assert spec is not None
    assert spec.validate("192.168.1.1") == "192.168.1.1"
    assert spec.validate("::ffff:192.168.1.1") == "192.168.1.1"
    assert spec.validate("fd00::1") == "fd00::1"


@pytest.mark.parametrize("missing", ["svp/host", "svp/underlay_ip"])
async def test_start_without_a_required_property_names_it(nursery, missing):
    values = props(1296)
    del values[missing]
    plugin = SvpPlugin(FakeHost(nursery), values, options=OPTIONS)
    with pytest.raises(PluginNotReady) as info:
        await plugin.start()
    assert info.value.prop == missing
    assert plugin.host.shared == {}


async def test_start_with_an_invalid_value_is_a_prop_error(nursery):
    plugin = SvpPlugin(FakeHost(nursery), props(0), options=OPTIONS)
    with pytest.raises(PropError) as info:
        await plugin.start()
    assert info.value.prop == "svp/port"


async def test_options_come_from_host_shared_when_not_given(nursery):
    host = FakeHost(nursery)
    host.shared["svp:options"] = {"connect_wait": 1.5, "log_interval": 0.1}
    plugin = SvpPlugin(host, props(1296))
    assert plugin.options.connect_wait == 1.5 and plugin.options.log_interval == 0.1
    assert SvpPlugin(FakeHost(nursery), props(1296)).options == SvpOptions()


# ------------------------------------------------------------------------ remotes are shared


async def test_instances_with_the_same_service_share_one_remote(autojump_clock, nursery, server):
    shared: dict = {}
    h1 = FakeHost(nursery, vnet_id=1, device="o1", shared=shared)
    h2 = FakeHost(nursery, vnet_id=2, device="o2", shared=shared)
    h3 = FakeHost(nursery, vnet_id=3, device="o3", shared=shared)
    p1 = await started(h1, server.port)
    p2 = await started(h2, server.port)
    p3 = await started(h3, server.port, **{"svp/underlay_ip": "192.168.1.2"})
    assert p1.remote is p2.remote and p3.remote is not p1.remote
    assert set(p1.remote.hosts) == {1, 2}
    key = remote_key("portolan.test", server.port, "192.168.1.1")
    assert shared[key] is p1.remote
    await p1.stop()
    assert shared[key] is p2.remote and set(p2.remote.hosts) == {2}
    remote = p2.remote
    await p2.stop()
    assert key not in shared
    assert all(c.state.value == "CLOSED" for c in remote.conns.values()) or not remote.conns
    await p3.stop()
    assert shared == {}


async def test_second_instance_of_a_vnet_on_one_remote_is_refused(autojump_clock, nursery, server):
    shared: dict = {}
    p1 = await started(FakeHost(nursery, shared=shared), server.port)
    with pytest.raises(ValueError, match="already has an svp instance"):
        await started(FakeHost(nursery, shared=shared, device="other"), server.port)
    await p1.stop()


# ------------------------------------------------------------------------ lookup dispatch


async def outcome(plugin: SvpPlugin, req: LookupRequest) -> list[tuple[str, object]]:
    reply = FakeReply()
    await plugin.lookup(req, reply)
    return reply.outcomes


async def test_unicast_miss_is_answered_by_a_vl2_lookup(autojump_clock, nursery, server):
    plugin = await started(FakeHost(nursery), server.port)
    assert await outcome(plugin, request(MAC_A)) == [("respond", Point(UL_A, 4789))]
    (req,) = server.ops(Op.VL2_REQ)
    assert req.mac == MAC_A and req.vnet_id == VNET and req.version == 1
    await plugin.stop()


async def test_unknown_mac_is_dropped(autojump_clock, nursery, server):
    plugin = await started(FakeHost(nursery), server.port)
    assert await outcome(plugin, request(bytes.fromhex("000a959dffff"))) == [("drop", None)]
    await plugin.stop()


async def test_arp_goes_to_the_arp_proxy(autojump_clock, nursery, server):
    plugin = await started(FakeHost(nursery), server.port)
    req = request(b"\xff" * 6, sap=0x0806, dst_type=DstType.BROADCAST)
    assert await outcome(plugin, req) == [("proxy_arp", None)]
    assert await outcome(plugin, request(MAC_A, sap=0x0806)) == [("proxy_arp", None)]
    assert not server.ops(Op.VL2_REQ)
    await plugin.stop()


async def test_ipv6_multicast_goes_to_the_ndp_proxy_and_other_33_33_is_dropped(
    autojump_clock, nursery, server
):
    plugin = await started(FakeHost(nursery), server.port)
    ns_dst = bytes.fromhex("3333ff000005")
    assert await outcome(plugin, request(ns_dst, 0x86DD, DstType.MULTICAST)) == [
        ("proxy_ndp", None)
    ]
    assert await outcome(plugin, request(ns_dst, 0x0800, DstType.MULTICAST)) == [("drop", None)]
    await plugin.stop()


@pytest.mark.parametrize(
    ("dst", "dst_type"),
    [
        (b"\xff" * 6, DstType.BROADCAST),
        (bytes.fromhex("01005e000001"), DstType.MULTICAST),
        (bytes.fromhex("010203040506"), DstType.UNICAST),  # group bit set, whatever the type
    ],
)
async def test_broadcast_and_multicast_are_dropped(autojump_clock, nursery, server, dst, dst_type):
    plugin = await started(FakeHost(nursery), server.port)
    assert await outcome(plugin, request(dst, dst_type=dst_type)) == [("drop", None)]
    assert not server.ops(Op.VL2_REQ)
    await plugin.stop()


async def test_lookup_with_the_server_down_drops_after_the_wait_bound(autojump_clock, nursery):
    plugin = await started(FakeHost(nursery), refused_port())
    t0 = trio.current_time()
    assert await outcome(plugin, request(MAC_A)) == [("drop", None)]
    assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.01)
    await plugin.stop()


# ------------------------------------------------------------------------ arp()


async def test_arp_caches_the_vl2_mapping_before_answering(autojump_clock, nursery, server):
    host = FakeHost(nursery)
    plugin = await started(host, server.port)
    mac = await plugin.arp(IP_A)
    assert mac == MAC_A
    assert host.driver.calls == [("cache_set", "overlay0", MAC_A, Point(UL_A, 4789))]
    (req,) = server.ops(Op.VL3_REQ)
    assert req.ip == ip_to_wire(IP_A) and req.ip_type == VL3Type.IP and req.vnet_id == VNET
    await plugin.stop()


async def test_arp_for_ipv6_asks_with_the_v6_type(autojump_clock, nursery, server):
    host = FakeHost(nursery)
    plugin = await started(host, server.port)
    assert await plugin.arp(IP6_A) == MAC_A
    (req,) = server.ops(Op.VL3_REQ)
    assert req.ip == IP6_A.packed and req.ip_type == VL3Type.IPV6
    assert host.driver.calls == [("cache_set", "overlay0", MAC_A, Point(UL_A, 4790))]
    await plugin.stop()


async def test_arp_for_an_unknown_ip_returns_none_and_caches_nothing(
    autojump_clock, nursery, server
):
    host = FakeHost(nursery)
    plugin = await started(host, server.port)
    assert await plugin.arp(IPv4Address("172.16.0.99")) is None
    assert host.driver.calls == []
    await plugin.stop()


# ------------------------------------------------------------------------ degrade and metrics


async def test_unreachable_service_degrades_the_instance(autojump_clock, nursery):
    host = FakeHost(nursery)
    plugin = await started(host, refused_port())
    await trio.sleep(65)
    assert host.degraded == REMOTE_FAIL_MESSAGE
    assert plugin.status()["degraded"] == REMOTE_FAIL_MESSAGE
    await plugin.stop()


async def test_metrics_count_connections_and_queries(autojump_clock, nursery, server):
    metrics = VarpdMetrics()
    host = FakeHost(nursery, metrics=metrics)
    plugin = await started(host, server.port)
    await outcome(plugin, request(MAC_A))
    await outcome(plugin, request(bytes.fromhex("000a959dffff")))
    label = f"portolan.test:{server.port}"
    get = metrics.registry.get_sample_value
    assert get("varpd_svp_connections", {"remote": label, "state": "ACTIVE"}) == 1
    assert get("varpd_svp_queries_total", {"op": "vl2", "result": "ok"}) == 1
    assert get("varpd_svp_queries_total", {"op": "vl2", "result": "notfound"}) == 1
    await wait_until(
        lambda: (get("varpd_svp_queries_total", {"op": "log", "result": "ok"}) or 0) > 0
    )
    await plugin.stop()
    assert get("varpd_svp_connections", {"remote": label, "state": "ACTIVE"}) == 0


# ------------------------------------------------------------------------ end to end


async def test_end_to_end_with_portolan_and_varpd_daemons(tmp_path, nursery, make_varpd):
    """Real portolan Directory + SVP server, real varpd daemons on the memory underlay: a
    unicast miss, a proxied ARP, then a VNIC move converging on the sender through the log."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import ARP, Ether

    from portolan.metrics import PortolanMetrics
    from portolan.service import Directory
    from portolan.svp_server import SvpServer

    mac_a, mac_b = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
    ip_a, ip_b = "192.168.0.1", "192.168.0.2"
    owner = "930896af-bf8c-48d4-885c-6573a94b1853"
    cn_a, cn_b, cn_c = (f"00000000-0000-4000-8000-00000000000{i}" for i in (1, 2, 3))
    directory = await Directory.open(f"sqlite:{tmp_path / 'portolan.db'}")
    try:
        await directory.put_cn(cn_a, "10.0.0.1", 4789)
        await directory.put_cn(cn_b, "10.0.0.2", 4789)
        await directory.put_cn(cn_c, "10.0.0.3", 4789)
        net = await directory.create_network(
            name="net0", owner_uuid=owner, vnet_id=200, vlan_id=0, subnet="192.168.0.0/24"
        )
        for mac, ip, cn in ((mac_a, ip_a, cn_a), (mac_b, ip_b, cn_b)):
            await directory.create_vnic(
                network_uuid=net.uuid, cn_uuid=cn, mac=bytes.fromhex(mac.replace(":", "")), ip=ip
            )
        _, svp_port = await nursery.start(
            SvpServer(directory, metrics=PortolanMetrics()).serve, "127.0.0.1", 0
        )

        async def next_non_garp(port) -> bytes:
            with trio.fail_after(10):
                while True:
                    data = await port.receive()
                    pkt = Ether(data)
                    if not (ARP in pkt and pkt[ARP].psrc == pkt[ARP].pdst):
                        return data

        async def next_arp(port, match):
            with trio.fail_after(10):
                while True:
                    pkt = Ether(await port.receive())
                    if ARP in pkt and match(pkt[ARP]):
                        return pkt[ARP]

        async def node(v, listen: str, vnic: str) -> None:
            props = {
                "vxlan/listen_ip": listen,
                "svp/host": "127.0.0.1",
                "svp/port": svp_port,
                "svp/underlay_ip": listen,
            }
            await v.create("o0", 200, "svp", props=props, vnics=[{"mac": vnic}])
            await v.activate("o0")

        async with make_varpd("a") as a, make_varpd("b") as b, make_varpd("c") as c:
            await node(a, "10.0.0.1", mac_a)
            await node(b, "10.0.0.2", mac_b)
            await node(c, "10.0.0.3", "02:00:00:00:00:0c")
            guest_a = a.vnic("o0", mac_a).port
            frame = bytes(Ether(src=mac_a, dst=mac_b) / IP(src=ip_a, dst=ip_b) / UDP() / b"hi")
            guest_a.send_nowait(frame)
            assert await next_non_garp(b.vnic("o0", mac_b).port) == frame
            assert a.cache_get("o0", mac_b)["dest"] == "10.0.0.2:4789"

            who_has = Ether(src=mac_a, dst="ff:ff:ff:ff:ff:ff") / ARP(
                op=1, hwsrc=mac_a, psrc=ip_a, pdst=ip_b
            )
            guest_a.send_nowait(bytes(who_has))
            # (Gratuitous ARPs from the log entries of the VNICs' creation may come first.)
            reply = await next_arp(guest_a, lambda arp: arp.op == 2)
            assert reply.hwsrc == mac_b and reply.psrc == ip_b and reply.pdst == ip_a

            # Move B to node C: the orchestrator adds it there, then tells portolan.
            await c.vnic_add("o0", mac_b)
            t0 = trio.current_time()
            await directory.update_vnic(bytes.fromhex(mac_b.replace(":", "")), cn_uuid=cn_c)
            garp = await next_arp(guest_a, lambda arp: arp.op == 1 and arp.psrc == ip_b)
            elapsed = trio.current_time() - t0
            assert garp.pdst == ip_b and garp.hwsrc == mac_b
            with trio.fail_after(10):
                while (a.cache_get("o0", mac_b) or {}).get("dest") != "10.0.0.3:4789":
                    await trio.sleep(0.01)
            guest_a.send_nowait(frame)
            assert await next_non_garp(c.vnic("o0", mac_b).port) == frame
            assert elapsed < 10
            with trio.fail_after(10):
                while await directory.pending_log(cn_a):
                    await trio.sleep(0.05)
    finally:
        await directory.aclose()
