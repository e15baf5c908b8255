"""LookupIndex: VL2 / VL3 / underlay / route answers from memory, load and apply."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from portolan.index import IndexChange, LookupIndex
from portolan.model import ComputeNode, Route, Vnic
from portolan.store import Snapshot
from protocol.addr import ip_to_wire, mac_to_int
from tests.portolan.conftest import CN1, CN2, CN3

MAC1 = bytes.fromhex("000a959d6816")
MAC2 = bytes.fromhex("020000000002")
UL1 = ip_to_wire("192.168.1.1")
UL2 = ip_to_wire("192.168.1.2")


def _snapshot() -> Snapshot:
    return Snapshot(
        version=5,
        cns=[ComputeNode(CN1, "192.168.1.1", 4789, 1), ComputeNode(CN2, "192.168.1.2", 4790, 2)],
        vnics=[
            (mac_to_int(MAC1), "10.0.0.1", 12340, CN1),
            (mac_to_int(MAC2), "fd00::2", 12340, CN2),
        ],
    )


def test_vl2_and_vl3_answer_from_a_loaded_snapshot() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    assert idx.version == 5
    assert idx.vl2(MAC1, 12340) == (4789, UL1)
    assert idx.vl2(MAC2, 12340) == (4790, UL2)
    assert idx.vl3(ip_to_wire("10.0.0.1"), 12340) == (MAC1, 4789, UL1)
    assert idx.vl3(ip_to_wire("fd00::2"), 12340) == (MAC2, 4790, UL2)
    assert len(idx) == 2


def test_misses() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    assert idx.vl2(MAC1, 12341) is None
    assert idx.vl2(bytes(6), 12340) is None
    assert idx.vl3(ip_to_wire("10.0.0.2"), 12340) is None
    assert idx.vl3(ip_to_wire("10.0.0.1"), 1) is None
    # a vnet id beyond 24 bits must not alias another key
    assert idx.vl2(MAC1, 12340 | 1 << 24) is None
    assert idx.vl3(ip_to_wire("10.0.0.1"), 12340 + (1 << 24)) is None
    assert idx.vl2(b"\x01", 12340) is None
    assert idx.vl3(b"\x01" * 4, 12340) is None


def test_cns_for_underlay_ip() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    assert idx.cns_for_underlay_ip(UL1) == [CN1]
    assert idx.cns_for_underlay_ip(ip_to_wire("192.168.1.3")) == []


def test_a_cn_address_change_moves_all_its_vnics_at_once() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    new_ul = ip_to_wire("172.16.0.1")
    idx.apply(IndexChange(6, cns_put=(ComputeNode(CN1, "172.16.0.1", 4800, 6),)))
    assert idx.vl2(MAC1, 12340) == (4800, new_ul)
    assert idx.vl3(ip_to_wire("10.0.0.1"), 12340) == (MAC1, 4800, new_ul)
    assert idx.cns_for_underlay_ip(UL1) == []
    assert idx.cns_for_underlay_ip(new_ul) == [CN1]
    assert idx.version == 6


def test_apply_moves_and_removes_vnics() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    old = Vnic(MAC1, "10.0.0.1", 12340, 0, CN1)
    moved = Vnic(MAC1, "10.0.0.9", 12340, 0, CN2)
    idx.apply(IndexChange(6, vnics_removed=(old,), vnics_put=(moved,)))
    assert idx.vl2(MAC1, 12340) == (4790, UL2)
    assert idx.vl3(ip_to_wire("10.0.0.1"), 12340) is None
    assert idx.vl3(ip_to_wire("10.0.0.9"), 12340) == (MAC1, 4790, UL2)
    idx.apply(IndexChange(7, vnics_removed=(moved,)))
    assert idx.vl2(MAC1, 12340) is None
    assert idx.vl3(ip_to_wire("10.0.0.9"), 12340) is None
    idx.apply(IndexChange(8, cns_removed=(CN2,)))
    assert idx.vl2(MAC2, 12340) is None  # no CN, no answer


def test_iteration_lists_resolvable_mappings() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    assert sorted(idx.vl2_items()) == sorted([(MAC1, 12340, 4789, UL1), (MAC2, 12340, 4790, UL2)])
    assert (ip_to_wire("10.0.0.1"), 12340, MAC1, 4789, UL1) in list(idx.vl3_items())


def _route(**kw) -> Route:
    base = dict(
        vnet_id=100,
        vlan_id=5,
        subnet="10.0.0.0/24",
        r_dc_id=1,
        r_vnet_id=12340,
        r_vlan_id=0,
        r_subnet="10.0.0.0/16",
        r_send_mac=bytes.fromhex("02000000aaaa"),
    )
    base.update(kw)
    return Route(**base)


def test_route_answers_from_the_remote_vnet_mapping() -> None:
    snap = _snapshot()
    snap.routes = [_route()]
    idx = LookupIndex()
    idx.load(snap)
    ans = idx.route(100, 5, ip_to_wire("10.0.0.7"), ip_to_wire("10.0.0.1"))
    assert ans is not None
    assert (ans.dc_id, ans.vnet_id, ans.vlan, ans.port, ans.addr) == (1, 12340, 0, 4789, UL1)
    assert ans.src_mac == bytes.fromhex("02000000aaaa") and ans.dst_mac == MAC1
    assert (ans.src_prefixlen, ans.dst_prefixlen) == (24, 16)
    # wrong vlan, source outside the subnet, unknown destination without a static remote
    assert idx.route(100, 6, ip_to_wire("10.0.0.7"), ip_to_wire("10.0.0.1")) is None
    assert idx.route(100, 5, ip_to_wire("10.9.0.7"), ip_to_wire("10.0.0.1")) is None
    assert idx.route(100, 5, ip_to_wire("10.0.0.7"), ip_to_wire("10.0.3.3")) is None


def test_route_falls_back_to_the_static_remote_underlay() -> None:
    idx = LookupIndex()
    idx.load(Snapshot(version=1))
    idx.apply(
        IndexChange(
            2,
            routes_put=(_route(r_dc_id=9, r_ul_ip="203.0.113.5", r_ul_port=4790, r_dst_mac=MAC2),),
        )
    )
    ans = idx.route(100, 5, ip_to_wire("10.0.0.7"), ip_to_wire("10.0.3.3"))
    assert ans is not None and ans.addr == ip_to_wire("203.0.113.5") and ans.port == 4790
    assert ans.dst_mac == MAC2 and ans.dc_id == 9
    idx.apply(IndexChange(3, routes_removed=(_route().key,)))
    assert idx.route(100, 5, ip_to_wire("10.0.0.7"), ip_to_wire("10.0.3.3")) is None


def test_loading_100k_vnics_is_quick() -> None:
    n = 100_000
    cns = [ComputeNode(c, f"192.168.0.{i + 1}", 4789, 1) for i, c in enumerate((CN1, CN2, CN3))]
    vnics = [
        (
            0x020000000000 + i,
            f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            1000 + i % 7,
            cns[i % 3].uuid,
        )
        for i in range(n)
    ]
    idx = LookupIndex()
    t0 = time.perf_counter()
    idx.load(Snapshot(version=1, cns=cns, vnics=vnics))
    elapsed = time.perf_counter() - t0
    assert len(idx) == n
    assert elapsed < 10, f"loading {n} VNICs took {elapsed:.2f}s"
    i = 77_777
    mac = (0x020000000000 + i).to_bytes(6, "big")
    ul = ip_to_wire(cns[i % 3].ip)
    assert idx.vl2(mac, 1000 + i % 7) == (4789, ul)
    assert idx.vl3(ip_to_wire(vnics[i][1]), 1000 + i % 7) == (mac, 4789, ul)
    # the CN uuid strings are shared, not one per VNIC
    assert len({id(v) for v in idx._vl2.values()}) == 3


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "remove", "cn"]),
            st.integers(0, 5),  # mac
            st.integers(0, 3),  # ip
            st.sampled_from([CN1, CN2, CN3]),
            st.integers(0, 2),  # cn address
        ),
        max_size=40,
    )
)
def test_apply_agrees_with_a_naive_model(ops: list[tuple[str, int, int, str, int]]) -> None:
    """Random puts/removes/CN moves leave the index answering exactly like a plain dict model."""
    idx = LookupIndex()
    cns = {c: f"192.168.0.{i + 1}" for i, c in enumerate((CN1, CN2, CN3))}
    idx.load(Snapshot(version=0, cns=[ComputeNode(c, ip) for c, ip in cns.items()]))
    vnics: dict[int, Vnic] = {}  # mac -> vnic; (vnet, ip) kept unique like the store does
    for version, (op, m, i, cn, a) in enumerate(ops, start=1):
        mac = bytes([2, 0, 0, 0, 0, m])
        ip = f"10.0.0.{i}"
        if op == "put":
            if any(v.ip == ip and v.mac != mac for v in vnics.values()):
                continue
            new = Vnic(mac, ip, 7, 0, cn)
            old = vnics.get(m)
            idx.apply(IndexChange(version, vnics_removed=(old,) if old else (), vnics_put=(new,)))
            vnics[m] = new
        elif op == "remove" and m in vnics:
            idx.apply(IndexChange(version, vnics_removed=(vnics.pop(m),)))
        elif op == "cn":
            cns[cn] = f"172.16.0.{a}"
            if list(cns.values()).count(cns[cn]) > 1:
                cns[cn] = f"172.17.{version}.1"
            idx.apply(IndexChange(version, cns_put=(ComputeNode(cn, cns[cn]),)))
    for m in range(6):
        mac = bytes([2, 0, 0, 0, 0, m])
        v = vnics.get(m)
        want = (4789, ip_to_wire(cns[v.cn_uuid])) if v else None
        assert idx.vl2(mac, 7) == want
    for i in range(4):
        holder = next((v for v in vnics.values() if v.ip == f"10.0.0.{i}"), None)
        want3 = (holder.mac, 4789, ip_to_wire(cns[holder.cn_uuid])) if holder else None
        assert idx.vl3(ip_to_wire(f"10.0.0.{i}"), 7) == want3
    for c, ip in cns.items():
        assert idx.cns_for_underlay_ip(ip_to_wire(ip)) == [c]
