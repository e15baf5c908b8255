"""The files plugin and the ARP/NDP/DHCP proxies, through the shim (memory backend)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import (
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from varpd.instance import VarpdError
from varpd.plugins.base import PropError
from varpd.plugins.files import FilesPlugin, parse_files
from varpd.shim.types import Point

A, B, C, S = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c", "02:00:00:00:00:0d"
BCAST = "ff:ff:ff:ff:ff:ff"


def mapping(**extra: Any) -> dict[str, Any]:
    doc = {
        "2:0:0:0:0:a": {
            "ip": "10.0.0.1",
            "port": 4789,
            "arp": "192.168.0.1",
            "ndp": "fd00::1",
            "dhcp-proxy": S,
        },
        B: {"ip": "10.0.0.2", "port": 4789, "arp": "192.168.0.2", "ndp": "fd00::2"},
        S: {"ip": "10.0.0.2", "port": 4789, "arp": "192.168.0.254"},
    }
    doc.update(extra)
    return doc


def write(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    os.replace(tmp, path)


async def node(v: Any, listen: str, files: Path, vnics: list[dict[str, Any]]) -> None:
    await v.create(
        "o0",
        200,
        "files",
        vnics=vnics,
        props={"vxlan/listen_ip": listen, "files/config": str(files)},
    )
    await v.activate("o0")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    f = tmp_path / "overlay.json"
    write(f, mapping())
    return f


@pytest.fixture(autouse=True)
def fast_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FilesPlugin, "poll_interval", 0.05)


async def test_unicast_lookup_answers_from_the_file(
    make_varpd: Any, files: Path, metric: Any
) -> None:
    async with make_varpd("a") as a, make_varpd("b") as b:
        await node(a, "10.0.0.1", files, [{"mac": A}])
        await node(b, "10.0.0.2", files, [{"mac": B}])
        frame = bytes(Ether(src=A, dst=B) / IP(src="192.168.0.1", dst="192.168.0.2") / UDP() / b"x")
        a.vnic("o0", A).port.send_nowait(frame)
        with trio.fail_after(5):
            assert await b.vnic("o0", B).port.receive() == frame
        assert a.cache_get("o0", B) == {"mac": B, "flags": ["valid"], "dest": "10.0.0.2:4789"}
        assert metric(a, "varpd_lookups_total", plugin="files", result="respond") == 1
        assert metric(a, "varpd_lookup_seconds_count", plugin="files") == 1


async def test_unknown_destination_is_dropped(
    make_varpd: Any, files: Path, metric: Any, until: Any
) -> None:
    async with make_varpd("a") as a:
        await node(a, "10.0.0.1", files, [{"mac": A}])
        a.vnic("o0", A).port.send_nowait(bytes(Ether(src=A, dst=C) / IP() / b"x"))
        await until(lambda: metric(a, "varpd_lookups_total", plugin="files", result="drop") == 1)
        assert a.cache_list("o0") == []
        await until(lambda: a.show("o0")["device"]["counters"]["tx_drop_lookup"] == 1)


async def test_proxy_arp_reply_keeps_the_vlan_tag(
    make_varpd: Any, files: Path, metric: Any
) -> None:
    async with make_varpd("a") as a:
        await node(a, "10.0.0.1", files, [{"mac": A, "vlan_id": 5}])
        injected: list[bytes] = []
        real_inject = a.driver.inject

        def spy(name: str, frame: bytes, **kw: Any) -> None:
            injected.append(frame)
            real_inject(name, frame, **kw)

        a.driver.inject = spy
        port = a.vnic("o0", A).port
        request = Ether(src=A, dst=BCAST) / ARP(
            op=1, hwsrc=A, psrc="192.168.0.1", pdst="192.168.0.2"
        )
        port.send_nowait(bytes(request))
        with trio.fail_after(5):
            got = Ether(await port.receive())
        # what the guest sees (the shim strips the tag on delivery)
        assert got.dst == A and got.src == B
        arp = got[ARP]
        assert arp.op == 2 and arp.hwsrc == B and arp.psrc == "192.168.0.2"
        assert arp.hwdst == A and arp.pdst == "192.168.0.1"
        # what varpd injected: the original L2 header, 802.1Q tag included
        (frame,) = injected
        tagged = Ether(frame)
        assert tagged.haslayer(Dot1Q) and tagged[Dot1Q].vlan == 5
        assert tagged[ARP].op == 2 and tagged[ARP].hwsrc == B
        assert metric(a, "varpd_proxied_replies_total", kind="arp") == 1
        assert metric(a, "varpd_lookups_total", plugin="files", result="proxy_arp") == 1


async def test_gratuitous_and_unknown_arp_are_dropped(
    make_varpd: Any, files: Path, metric: Any, until: Any
) -> None:
    async with make_varpd("a") as a:
        await node(a, "10.0.0.1", files, [{"mac": A}])
        port = a.vnic("o0", A).port
        port.send_nowait(
            bytes(
                Ether(src=A, dst=BCAST) / ARP(op=1, hwsrc=A, psrc="192.168.0.1", pdst="192.168.0.1")
            )
        )
        await until(
            lambda: metric(a, "varpd_proxy_dropped_total", kind="arp", reason="gratuitous") == 1
        )
        port.send_nowait(
            bytes(
                Ether(src=A, dst=BCAST)
                / ARP(op=1, hwsrc=A, psrc="192.168.0.1", pdst="192.168.0.99")
            )
        )
        await until(
            lambda: metric(a, "varpd_proxy_dropped_total", kind="arp", reason="no_answer") == 1
        )
        assert port.pending() == 0
        assert metric(a, "varpd_proxied_replies_total", kind="arp") == 0


async def test_proxy_ndp_answers_with_a_valid_advertisement(
    make_varpd: Any, files: Path, metric: Any
) -> None:
    async with make_varpd("a") as a:
        await node(a, "10.0.0.1", files, [{"mac": A}])
        port = a.vnic("o0", A).port
        ns = (
            Ether(src=A, dst="33:33:ff:00:00:02")
            / IPv6(src="fd00::1", dst="ff02::1:ff00:2", hlim=255)
            / ICMPv6ND_NS(tgt="fd00::2")
            / ICMPv6NDOptSrcLLAddr(lladdr=A)
        )
        port.send_nowait(bytes(ns))
        with trio.fail_after(5):
            raw = await port.receive()
        got = Ether(raw)
        assert got.dst == A and got.src == B
        ip6 = got[IPv6]
        assert ip6.src == "fd00::2" and ip6.dst == "fd00::1" and ip6.hlim == 255
        assert ip6.plen == 32
        na = got[ICMPv6ND_NA]
        assert na.type == 136 and na.code == 0
        assert (na.R, na.S, na.O) == (0, 1, 1)
        assert na.tgt == "fd00::2"
        assert got[ICMPv6NDOptDstLLAddr].lladdr == B
        sent = na.cksum
        rebuilt = Ether(raw)
        del rebuilt[ICMPv6ND_NA].cksum  # scapy recomputes it on build
        assert Ether(bytes(rebuilt))[ICMPv6ND_NA].cksum == sent
        assert metric(a, "varpd_proxied_replies_total", kind="ndp") == 1


async def test_ndp_without_source_link_layer_option_is_dropped(
    make_varpd: Any, files: Path, metric: Any, until: Any
) -> None:
    async with make_varpd("a") as a:
        await node(a, "10.0.0.1", files, [{"mac": A}])
        ns = (
            Ether(src=A, dst="33:33:ff:00:00:02")
            / IPv6(src="fd00::1", dst="ff02::1:ff00:2")
            / ICMPv6ND_NS(tgt="fd00::2")
        )
        a.vnic("o0", A).port.send_nowait(bytes(ns))
        await until(
            lambda: metric(a, "varpd_proxy_dropped_total", kind="ndp", reason="no_slla") == 1
        )


def dhcp_discover(src: str) -> bytes:
    pkt = (
        Ether(src=src, dst=BCAST)
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=bytes.fromhex(src.replace(":", "")))
        / DHCP(options=[("message-type", "discover"), "end"])
    )
    raw = bytes(pkt)
    if len(raw) < 14 + 328:
        pkt = pkt / Raw(b"\x00" * (14 + 328 - len(raw)))
    return bytes(pkt)


async def test_dhcp_broadcast_is_redirected_to_the_proxy_mac(
    make_varpd: Any, files: Path, metric: Any
) -> None:
    async with make_varpd("a") as a, make_varpd("b") as b:
        await node(a, "10.0.0.1", files, [{"mac": A}])
        await node(b, "10.0.0.2", files, [{"mac": S}])
        discover = dhcp_discover(A)
        a.vnic("o0", A).port.send_nowait(discover)
        with trio.fail_after(5):
            got = await b.vnic("o0", S).port.receive()
        assert got[:6] == bytes.fromhex(S.replace(":", ""))
        assert got[6:] == discover[6:]
        assert Ether(got)[BOOTP].op == 1
        assert metric(a, "varpd_proxied_replies_total", kind="dhcp") == 1
        assert metric(a, "varpd_lookups_total", plugin="files", result="proxy_dhcp") == 1


async def test_dhcp_from_a_mac_without_dhcp_proxy_is_dropped(
    make_varpd: Any, files: Path, metric: Any, until: Any
) -> None:
    async with make_varpd("a") as a:
        await node(a, "10.0.0.1", files, [{"mac": C}])
        a.vnic("o0", C).port.send_nowait(dhcp_discover(C))
        await until(lambda: metric(a, "varpd_lookups_total", plugin="files", result="drop") == 1)
        assert metric(a, "varpd_proxied_replies_total", kind="dhcp") == 0


def test_invalid_entries_are_refused_naming_the_entry() -> None:
    cases = {
        '{"0:a:95:9d:68:16": {"ip": "10.0.0.1", "port": 70000}}': 'files/config: entry "0:a:95:9d:68:16": port must be 1..65535',
        '{"0:a:95:9d:68:16": {"port": 1}}': 'entry "0:a:95:9d:68:16": ip is required',
        '{"nomac": {"ip": "10.0.0.1", "port": 1}}': 'entry "nomac": key is not a MAC',
        '{"0:a:95:9d:68:16": {"ip": "10.0.0.1", "port": 1, "arp": "fd00::1"}}': 'entry "0:a:95:9d:68:16": arp',
        '{"0:a:95:9d:68:16": {"ip": "10.0.0.1", "port": 1, "dhcp-proxy": "x"}}': 'entry "0:a:95:9d:68:16": dhcp-proxy',
        "[1, 2]": "top level must be a JSON object",
        "{nope": "not valid JSON",
    }
    for text, message in cases.items():
        with pytest.raises(PropError) as info:
            parse_files(text)
        assert message in str(info.value), text
        assert info.value.prop == "files/config"


async def test_activation_with_an_invalid_file_is_refused(make_varpd: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    write(bad, {"0:a:95:9d:68:16": {"ip": "10.0.0.1", "port": 70000}})
    async with make_varpd("a") as a:
        await a.create(
            "o0", 1, "files", props={"vxlan/listen_ip": "10.0.0.1", "files/config": str(bad)}
        )
        with pytest.raises(VarpdError) as info:
            await a.activate("o0")
        assert info.value.field == "files/config"
        assert 'entry "0:a:95:9d:68:16": port must be 1..65535' in info.value.message
        assert a.show("o0")["state"] == "created"
        with pytest.raises(VarpdError) as info:
            await a.set_props("o0", {"files/config": "relative.json"})
        assert info.value.field == "files/config"


async def test_a_changed_file_is_reloaded_live(
    make_varpd: Any, files: Path, underlay: Any, metric: Any, until: Any
) -> None:
    captured = underlay.capture()
    async with make_varpd("a") as a:
        await node(a, "10.0.0.1", files, [{"mac": A}])
        port = a.vnic("o0", A).port
        port.send_nowait(bytes(Ether(src=A, dst=B) / b"first"))
        await until(lambda: len(captured) == 1)
        assert captured[0].dst == Point.of("10.0.0.2", 4789)
        write(
            files,
            mapping(**{B: {"ip": "10.0.0.3", "port": 4789}, C: {"ip": "10.0.0.4", "port": 4790}}),
        )
        await until(lambda: metric(a, "varpd_files_reloads_total", result="ok") == 1)
        # B's destination changed: its kernel cache entry was invalidated and looked up again
        port.send_nowait(bytes(Ether(src=A, dst=B) / b"second"))
        port.send_nowait(bytes(Ether(src=A, dst=C) / b"third"))
        await until(lambda: len(captured) == 3)
        assert {d.dst for d in captured[1:]} == {
            Point.of("10.0.0.3", 4789),
            Point.of("10.0.0.4", 4790),
        }


async def test_an_invalid_new_file_keeps_the_old_content(
    make_varpd: Any, files: Path, underlay: Any, metric: Any, until: Any
) -> None:
    captured = underlay.capture()
    async with make_varpd("a") as a:
        await node(a, "10.0.0.1", files, [{"mac": A}])
        write(files, {B: {"ip": "10.0.0.9", "port": 0}})
        await until(lambda: metric(a, "varpd_files_reloads_total", result="invalid") == 1)
        shown = a.show("o0")
        assert shown["degraded"] and "port must be 1..65535" in shown["reason"]
        assert metric(a, "varpd_degraded_instances") == 1
        a.vnic("o0", A).port.send_nowait(bytes(Ether(src=A, dst=B) / b"x"))
        await until(lambda: len(captured) == 1)
        assert captured[0].dst == Point.of("10.0.0.2", 4789)  # the old mapping still answers
        await trio.sleep(0.2)
        assert metric(a, "varpd_files_reloads_total", result="invalid") == 1  # logged once
        write(files, mapping())
        await until(lambda: not a.show("o0")["degraded"])
        assert metric(a, "varpd_degraded_instances") == 0
