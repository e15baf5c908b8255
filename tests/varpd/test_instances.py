"""Instance lifecycle through the Varpd object API (memory backend, in process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from protocol.addr import ip_to_wire
from varpd.daemon import parse_destination
from varpd.instance import VarpdError
from varpd.shim.types import Point

A_MAC, B_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def direct_props(dest: str = "10.0.0.2", port: int = 4789, listen: str = "10.0.0.1") -> dict:
    return {"vxlan/listen_ip": listen, "direct/dest_ip": dest, "direct/dest_port": port}


async def test_create_activate_and_list(make_varpd: Any) -> None:
    async with make_varpd() as v:
        d = await v.create("overlay0", 100, "direct", props=direct_props())
        assert d["state"] == "created" and d["id"] == 1
        d = await v.activate("overlay0")
        assert d["state"] == "active" and d["device"]["associated"]
        assert d["device"]["state"] == "activated"
        assert [i["name"] for i in v.list()] == ["overlay0"]
        props = {p["name"]: p for p in d["props"]}
        assert props["search"]["value"] == "direct" and props["search"]["perm"] == "r-"


async def test_bad_property_is_refused_naming_it_and_nothing_is_created(make_varpd: Any) -> None:
    async with make_varpd() as v:
        with pytest.raises(VarpdError) as info:
            await v.create(
                "overlay0", 100, "direct", props={**direct_props(), "direct/dest_port": 0}
            )
        assert info.value.field == "direct/dest_port"
        with pytest.raises(VarpdError) as info:
            await v.create(
                "overlay0", 100, "direct", props={**direct_props(), "vxlan/listen_port": 0}
            )
        assert info.value.field == "vxlan/listen_port"
        assert v.list() == [] and v.driver.devices() == []
        with pytest.raises(VarpdError) as info:
            await v.create("overlay0", 100, "nosuch")
        assert info.value.field == "search"


async def test_set_validates_everything_before_applying(make_varpd: Any) -> None:
    async with make_varpd() as v:
        await v.create("o0", 1, "direct", props={"vxlan/listen_ip": "10.0.0.1"})
        with pytest.raises(VarpdError) as info:
            await v.set_props("o0", {"direct/dest_ip": "10.0.0.9", "direct/dest_port": "x"})
        assert info.value.field == "direct/dest_port"
        with pytest.raises(VarpdError) as info:
            await v.set_props("o0", {"direct/dest_ip": "10.0.0.9", "search": "files"})
        assert info.value.code == "read_only" and info.value.field == "search"
        with pytest.raises(VarpdError) as info:
            await v.set_props("o0", {"direct/dest_ip": "10.0.0.9", "mtu": 5})
        assert info.value.field == "mtu"
        detail = v.show("o0")
        values = {p["name"]: p["value"] for p in detail["props"]}
        assert values["direct/dest_ip"] is None  # nothing half-applied
        assert detail["device_props"]["mtu"] == 1400


async def test_activate_without_required_property_names_it(make_varpd: Any) -> None:
    async with make_varpd() as v:
        await v.create(
            "o0", 1, "direct", props={"vxlan/listen_ip": "10.0.0.1", "direct/dest_ip": "10.0.0.2"}
        )
        with pytest.raises(VarpdError) as info:
            await v.activate("o0")
        assert info.value.code == "not_ready" and info.value.field == "direct/dest_port"
        assert v.show("o0")["state"] == "created"
        assert list(Path(v.config.state_dir).glob("*.varpd")) == []
        await v.create("o1", 2, "direct", props=direct_props())
        await v.set_props("o1", {"vxlan/listen_ip": "10.0.0.3"})
        await v.create(
            "o2", 3, "direct", props={"direct/dest_ip": "10.0.0.2", "direct/dest_port": 1}
        )
        with pytest.raises(VarpdError) as info:
            await v.activate("o2")
        assert info.value.field == "vxlan/listen_ip"


async def test_device_props_are_read_only_once_active(make_varpd: Any) -> None:
    async with make_varpd() as v:
        await v.create("o0", 1, "direct", props=direct_props())
        await v.activate("o0")
        with pytest.raises(VarpdError) as info:
            await v.set_props("o0", {"mtu": 1500})
        assert info.value.code == "read_only" and info.value.field == "mtu"
        with pytest.raises(VarpdError) as info:
            await v.activate("o0")
        assert info.value.code == "exists"


async def test_point_mode_sends_every_frame_to_the_point(make_varpd: Any, underlay: Any) -> None:
    captured = underlay.capture()
    async with make_varpd("a") as a, make_varpd("b") as b:
        await a.create("o0", 100, "direct", props=direct_props("10.0.0.2"), vnics=[{"mac": A_MAC}])
        await a.activate("o0")
        await b.create(
            "o0",
            100,
            "direct",
            props=direct_props("10.0.0.1", listen="10.0.0.2"),
            vnics=[{"mac": B_MAC}],
        )
        await b.activate("o0")
        port_a = a.vnic("o0", A_MAC).port
        port_b = b.vnic("o0", B_MAC).port
        unicast = bytes(Ether(src=A_MAC, dst=B_MAC) / IP(dst="192.168.0.2") / UDP() / b"hi")
        broadcast = bytes(Ether(src=A_MAC, dst="ff:ff:ff:ff:ff:ff") / IP() / UDP() / b"all")
        port_a.send_nowait(unicast)
        port_a.send_nowait(broadcast)
        with trio.fail_after(5):
            assert await port_b.receive() == unicast
            assert await port_b.receive() == broadcast
        assert [d.dst for d in captured] == [Point.of("10.0.0.2", 4789)] * 2
        outer = VXLAN(captured[0].payload)
        assert outer.vni == 100
        # no lookups at all in POINT mode
        assert (
            a.metrics.registry.get_sample_value(
                "varpd_lookups_total", {"plugin": "direct", "result": "respond"}
            )
            is None
        )


async def test_point_destination_changes_live_and_is_persisted(
    make_varpd: Any, underlay: Any
) -> None:
    captured = underlay.capture()
    async with make_varpd("a") as a:
        await a.create("o0", 100, "direct", props=direct_props("10.0.0.2"), vnics=[{"mac": A_MAC}])
        await a.activate("o0")
        await a.set_props("o0", {"direct/dest_ip": "10.0.0.7", "direct/dest_port": "5000"})
        a.vnic("o0", A_MAC).port.send_nowait(bytes(Ether(src=A_MAC, dst=B_MAC) / (b"x" * 50)))
        assert captured[-1].dst == Point(ip_to_wire("10.0.0.7"), 5000)
    async with make_varpd("a") as a2:
        values = {p["name"]: p["value"] for p in a2.show("o0")["props"]}
        assert values == {
            "search": "direct",
            "direct/dest_ip": "10.0.0.7",
            "direct/dest_port": 5000,
        }


async def test_restore_recreates_instances_with_their_ids_and_vnics(make_varpd: Any) -> None:
    async with make_varpd("a") as a:
        await a.create("o0", 100, "direct", props=direct_props())
        await a.create(
            "o1",
            101,
            "direct",
            props=direct_props(listen="10.0.0.5"),
            vnics=[{"mac": A_MAC, "vlan_id": 7}],
        )
        await a.activate("o1")
        await a.vnic_add("o1", B_MAC, 8)
    async with make_varpd("a") as a2:
        # o0 was never activated: not persisted (as illumos)
        assert [(i["name"], i["id"], i["state"]) for i in a2.list()] == [("o1", 2, "active")]
        assert a2.vnic_list("o1") == [
            {"mac": A_MAC, "vlan_id": 7, "tap": None},
            {"mac": B_MAC, "vlan_id": 8, "tap": None},
        ]
        await a2.delete("o1")
        assert list(Path(a2.config.state_dir).glob("*.varpd")) == []


async def test_config_devices_are_created_unless_restored(make_varpd: Any) -> None:
    dev = {
        "name": "o0",
        "vnetid": 5,
        "search": "direct",
        "props": direct_props(),
        "vnic": [{"mac": A_MAC}],
    }
    async with make_varpd("a", device=[dev]) as a:
        assert a.show("o0")["state"] == "active"
        await a.set_props("o0", {"direct/dest_port": 6000})
    async with make_varpd("a", device=[dev]) as a2:
        values = {p["name"]: p["value"] for p in a2.show("o0")["props"]}
        assert values["direct/dest_port"] == 6000  # the state file wins over the config
        assert a2.restored == ["o0"]


async def test_unrestorable_state_is_moved_aside(make_varpd: Any, tmp_path: Path) -> None:
    state = tmp_path / "a-state"
    state.mkdir()
    (state / "broken.varpd").write_bytes(b"junk")
    async with make_varpd("a") as a:
        assert a.list() == []
        assert [Path(f).name for f, _ in a.moved_aside] == ["broken.varpd"]
    assert (state / "broken.varpd.corrupt").exists()


async def test_duplicate_names_and_vnetids_are_refused(make_varpd: Any) -> None:
    async with make_varpd() as v:
        await v.create("o0", 1, "direct")
        with pytest.raises(VarpdError) as info:
            await v.create("o0", 2, "direct")
        assert info.value.code == "exists" and info.value.field == "name"
        with pytest.raises(VarpdError) as info:
            await v.create("o1", 1, "direct")
        assert info.value.code == "exists" and info.value.field == "vnetid"


def test_destinations_parse_with_bracketed_ipv6() -> None:
    assert parse_destination("10.0.0.1:4789") == Point.of("10.0.0.1", 4789)
    assert parse_destination("[fd00::1]:4789") == Point.of("fd00::1", 4789)
    assert parse_destination("DROP") is None
    for bad in ("fd00::1:4789", "10.0.0.1", "10.0.0.1:0", "x:1", "[fd00::1]4789"):
        with pytest.raises(ValueError):
            parse_destination(bad)


async def test_restore_keeps_an_instance_whose_plugin_cannot_start(
    make_varpd: Any, tmp_path: Path
) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text('{"2:0:0:0:0:b": {"ip": "10.0.0.2", "port": 4789}}')
    async with make_varpd("a") as a:
        await a.create(
            "o0", 9, "files", props={"vxlan/listen_ip": "10.0.0.1", "files/config": str(mapping)}
        )
        await a.activate("o0")
    mapping.write_text('{"2:0:0:0:0:b": {"ip": "10.0.0.2"}}')
    async with make_varpd("a") as a2:
        shown = a2.show("o0")
        assert shown["state"] == "created" and shown["degraded"]
        assert "restore failed" in shown["reason"] and "port must be" in shown["reason"]
        assert (tmp_path / "a-state" / "o0.varpd").exists()
        mapping.write_text('{"2:0:0:0:0:b": {"ip": "10.0.0.2", "port": 4789}}')
        shown = await a2.activate("o0")
        assert shown["state"] == "active" and not shown["degraded"]


async def test_metrics_endpoint_serves_the_daemon_registry(make_varpd: Any) -> None:
    async with make_varpd("a", metrics="127.0.0.1:0") as a:
        assert a.metrics_address is not None
        host, port = a.metrics_address
        assert port != 0 and a.ready_line() == f"READY metrics={host}:{port}"

        async def get(path: str) -> bytes:
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
            return data

        body = await get("/metrics")
        assert body.startswith(b"HTTP/1.1 200") and b"varpd_degraded_instances 0.0" in body
        assert (await get("/other")).startswith(b"HTTP/1.1 404")
