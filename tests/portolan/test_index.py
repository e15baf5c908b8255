"""LookupIndex: VL2 / VL3 / underlay / route answers from memory, load and apply."""

from __future__ import annotations

import struct
import time
import zlib
from typing import Any
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

import portolan.index as index_module
from portolan.index import FLAT_VL2, FlatTable, IndexChange, LookupIndex, vl2_key, vl3_key
from portolan.model import ComputeNode, Route, Vnic
from portolan.store import Snapshot
from portolan.svp_server import SvpServer
from protocol.addr import ip_to_wire, mac_to_int
from protocol.svp import Status, VL2Ack, VL2Request, VL3Ack, VL3Request, VL3Type, decode_frame
from tests.portolan.conftest import CN1, CN2, CN3

MAC1 = bytes.fromhex("000a959d6816")
MAC2 = bytes.fromhex("020000000002")
UL1 = ip_to_wire("192.168.1.1")
UL2 = ip_to_wire("192.168.1.2")
ZERO = bytes(16)


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
    ),
    st.booleans(),
)
def test_apply_agrees_with_a_naive_model(
    ops: list[tuple[str, int, int, str, int]], tiny_flat: bool
) -> None:
    """Random puts/removes/CN moves leave the index answering exactly like a plain dict model
    (also with flat tables of 8 records, which fill up, wrap and fall back on the dicts)."""
    idx = LookupIndex()
    cns = {c: f"192.168.0.{i + 1}" for i, c in enumerate((CN1, CN2, CN3))}
    with patch.object(index_module, "_FLAT_MIN", 8 if tiny_flat else index_module._FLAT_MIN):
        idx.load(Snapshot(version=0, cns=[ComputeNode(c, ip) for c, ip in cns.items()]))
    assert (len(idx._flat2.buf) == 8 * 16) == tiny_flat
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
    # the lane (wire-keyed tables) and the iterators agree with the same model
    lane = _lane(
        idx,
        [VL2Request(m, bytes([2, 0, 0, 0, 0, m]), 7).encode() for m in range(6)]
        + [VL3Request(i, ip_to_wire(f"10.0.0.{i}"), 1, 7).encode() for i in range(4)],
    )
    for m, reply in enumerate(lane[:6]):
        v = vnics.get(m)
        assert (reply.port, reply.addr) == ((4789, ip_to_wire(cns[v.cn_uuid])) if v else (0, ZERO))
    for i, reply in enumerate(lane[6:]):
        holder = next((v for v in vnics.values() if v.ip == f"10.0.0.{i}"), None)
        assert reply.mac == (holder.mac if holder else bytes(6))
    assert sorted(idx.vl2_items()) == sorted(
        (v.mac, 7, 4789, ip_to_wire(cns[v.cn_uuid])) for v in vnics.values()
    )
    assert sorted(idx.vl3_items()) == sorted(
        (ip_to_wire(v.ip), 7, v.mac, 4789, ip_to_wire(cns[v.cn_uuid])) for v in vnics.values()
    )


# -- the wire-keyed layout (what the SVP server's lookup lane probes) ----------------------------


class _Dir:
    def __init__(self, index: LookupIndex) -> None:
        self.index = index


def _lane(idx: LookupIndex, frames: list[bytes]) -> list[Any]:
    """Run the SVP server's lookup lane over ``frames``; the decoded replies."""
    out: list[bytes] = []
    data = b"".join(frames)
    assert SvpServer(_Dir(idx))._lookup_lane(data, 0, out) == len(data)
    return [decode_frame(f) for f in _split(b"".join(out))]


def _split(data: bytes) -> list[bytes]:
    frames = []
    while data:
        end = 16 + int.from_bytes(data[4:8], "big")
        frames.append(data[:end])
        data = data[end:]
    return frames


def _vl2_frame(rid: int, mac: bytes, vnet: int, version: int = 1, pad: bytes = b"\0\0") -> bytes:
    """A VL2_REQ frame with an arbitrary pad (the encoder always writes zeros)."""
    body = mac + pad + vnet.to_bytes(4, "big")
    head = struct.pack(">HHII", version, 3, 12, rid)
    crc = zlib.crc32(head + bytes(4) + body)
    return head + crc.to_bytes(4, "big") + body


def test_keys_are_the_request_bodies_with_the_pad_zeroed_and_the_type_canonical() -> None:
    assert vl2_key(MAC1, 12340) == VL2Request(7, MAC1, 12340).encode()[16:]
    ip4, ip6 = ip_to_wire("10.0.0.1"), ip_to_wire("fd00::2")
    assert vl3_key(ip4, 12340) == VL3Request(7, ip4, VL3Type.IP, 12340).encode()[16:]
    assert vl3_key(ip6, 12340) == VL3Request(7, ip6, VL3Type.IPV6, 12340).encode()[16:]


def test_the_lane_answers_what_vl2_and_vl3_answer() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    ip1, ip2 = ip_to_wire("10.0.0.1"), ip_to_wire("fd00::2")
    frames = [
        _vl2_frame(1, MAC1, 12340),
        _vl2_frame(2, MAC2, 12340, version=2),
        _vl2_frame(3, MAC1, 12340, pad=b"\xab\xcd"),  # a non-zero pad is still a hit
        _vl2_frame(4, MAC1, 12341),
        VL3Request(5, ip1, VL3Type.IP, 12340).encode(),
        VL3Request(6, ip2, VL3Type.IPV6, 12340, version=2).encode(),
        VL3Request(7, ip1, VL3Type.IPV6, 12340).encode(),  # the type is ignored
        VL3Request(8, ip2, 9, 12340).encode(),
        VL3Request(9, ip1, VL3Type.IP, 12341).encode(),
        VL3Request(0xFFFFFFFF, ip_to_wire("10.0.0.2"), VL3Type.IP, 12340).encode(),
    ]
    ok, nf = int(Status.OK), int(Status.NOTFOUND)
    assert _lane(idx, frames) == [
        VL2Ack(1, ok, 4789, UL1),
        VL2Ack(2, ok, 4790, UL2, version=2),
        VL2Ack(3, ok, 4789, UL1),
        VL2Ack(4, nf, 0, bytes(16)),
        VL3Ack(5, ok, MAC1, 4789, UL1),
        VL3Ack(6, ok, MAC2, 4790, UL2, version=2),
        VL3Ack(7, ok, MAC1, 4789, UL1),
        VL3Ack(8, ok, MAC2, 4790, UL2),
        VL3Ack(9, nf, bytes(6), 0, bytes(16)),
        VL3Ack(0xFFFFFFFF, nf, bytes(6), 0, bytes(16)),
    ]


def test_a_cn_address_change_writes_nothing_per_vnic() -> None:
    n = 5000
    cns = [ComputeNode(CN1, "192.168.1.1", 4789, 1), ComputeNode(CN2, "192.168.1.2", 4789, 1)]
    vnics = [(0x020000000000 + i, f"10.0.{i >> 8}.{i & 255}", 7, CN1) for i in range(n)]
    idx = LookupIndex()
    idx.load(Snapshot(version=1, cns=cns, vnics=vnics))
    vl2, vl3 = idx._vl2, idx._vl3
    vl2_before, vl3_before = dict(vl2), dict(vl3)
    idx.apply(IndexChange(2, cns_put=(ComputeNode(CN1, "172.16.0.9", 4800, 2),)))
    # the per-VNIC tables are untouched: the move is the CN's slot alone
    assert idx._vl2 is vl2 and idx._vl3 is vl3
    assert vl2 == vl2_before and vl3 == vl3_before
    new_ul = ip_to_wire("172.16.0.9")
    mac = (0x020000000000 + 4321).to_bytes(6, "big")
    assert idx.vl2(mac, 7) == (4800, new_ul)
    assert idx.vl3(ip_to_wire("10.0.16.225"), 7) == (mac, 4800, new_ul)
    assert _lane(idx, [VL2Request(1, mac, 7).encode()]) == [VL2Ack(1, 0, 4800, new_ul)]


def test_a_removed_cn_comes_back_with_its_vnics() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    idx.apply(IndexChange(6, cns_removed=(CN1,)))
    assert idx.vl2(MAC1, 12340) is None and idx.cn(CN1) is None
    assert idx.vl3(ip_to_wire("10.0.0.1"), 12340) is None
    assert _lane(idx, [VL2Request(1, MAC1, 12340).encode()])[0].status == Status.NOTFOUND
    assert idx.stats()["cns"] == 1 and idx.cns_for_underlay_ip(UL1) == []
    idx.apply(IndexChange(7, cns_put=(ComputeNode(CN1, "192.168.1.7", 4789, 7),)))
    ul = ip_to_wire("192.168.1.7")
    assert idx.vl2(MAC1, 12340) == (4789, ul) and idx.cn(CN1) == (4789, ul)
    assert idx.vl3(ip_to_wire("10.0.0.1"), 12340) == (MAC1, 4789, ul)


def test_a_vnic_on_an_unknown_cn_misses_until_the_cn_is_put() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    idx.apply(IndexChange(6, vnics_put=(Vnic(MAC1, "10.0.0.5", 99, 0, CN3),)))
    assert idx.vl2(MAC1, 99) is None and idx.vl3(ip_to_wire("10.0.0.5"), 99) is None
    total, records = idx.vl2_records(10)
    assert total == 3 and len(records) == 2  # counted, but not listed while unresolvable
    idx.apply(IndexChange(7, cns_put=(ComputeNode(CN3, "192.168.1.3", 4789, 7),)))
    assert idx.vl2(MAC1, 99) == (4789, ip_to_wire("192.168.1.3"))


def test_vnet_ids_beyond_24_bits_are_not_indexed() -> None:
    snap = _snapshot()
    snap.vnics.append((mac_to_int(MAC1), "10.0.0.3", 1 << 24, CN1))
    idx = LookupIndex()
    idx.load(snap)
    assert len(idx) == 2
    idx.apply(IndexChange(6, vnics_put=(Vnic(MAC2, "10.0.0.4", 1 << 24, 0, CN1),)))
    assert len(idx) == 2
    assert _lane(idx, [VL2Request(1, MAC2, 1 << 24).encode()])[0].status == Status.NOTFOUND


def test_prepare_builds_aside_and_install_swaps_whole() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    tables = idx.wire_tables()
    snap = _snapshot()
    snap.version = 9
    snap.vnics = [(mac_to_int(MAC2), "10.0.0.9", 1, CN1)]
    prepared = LookupIndex.prepare(snap)
    assert idx.wire_tables() == tables and idx.vl2(MAC1, 12340) == (4789, UL1)  # untouched
    idx.install(prepared)
    assert idx.version == 9 and len(idx) == 1
    assert idx.vl2(MAC1, 12340) is None and idx.vl2(MAC2, 1) == (4789, UL1)
    assert all(new is not old for new, old in zip(idx.wire_tables(), tables, strict=True))


def test_bulk_records_are_bounded_and_count_everything() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    total, recs = idx.vl2_records(1)
    assert total == 2 and len(recs) == 1 and recs[0] in list(idx.vl2_items())
    total, recs = idx.vl3_records(5)
    assert total == 2 and sorted(recs) == sorted(idx.vl3_items())
    assert idx.vl2_records(0) == (2, [])


def _tiny_flat() -> FlatTable:
    t = FlatTable(FLAT_VL2, 12, 0)
    t.mask, t.end, t.limit = 7, 8 * t.size, 5  # 8 records, at most 5 used
    return t


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["put", "discard"]), st.integers(0, 9), st.integers(0, 70000)),
        max_size=60,
    )
)
def test_flat_table_live_records_agree_with_the_dict_it_mirrors(
    ops: list[tuple[str, int, int]],
) -> None:
    """Whatever the table holds live is the dict's value; what it cannot hold it leaves out
    (full table, a slot over u16), so the lane's fallback on the dict stays correct."""
    t = _tiny_flat()
    model: dict[bytes, int] = {}
    for op, k, value in ops:
        key = vl2_key(bytes([2, 0, 0, 0, 0, k]), 7)
        if op == "put":
            model[key] = value
            stored = t.put(key, value)
            assert stored == (t.get(key) == (value,))
            if value >= 1 << 16:
                assert not stored
        else:
            model.pop(key, None)
            t.discard(key)
        assert len(t) <= 5
        for kk in range(10):
            probe = vl2_key(bytes([2, 0, 0, 0, 0, kk]), 7)
            got = t.get(probe)
            assert got is None or (probe in model and got == (model[probe],))


def test_the_lane_falls_back_on_the_dicts_once_the_flat_tables_are_full() -> None:
    idx = LookupIndex()
    idx.load(_snapshot())
    n = 3000  # over the 4096-record tables' 70% (2867)
    vnics = tuple(
        Vnic((0x020000000000 + i).to_bytes(6, "big"), f"10.1.{i >> 8}.{i & 255}", 5, 0, CN2)
        for i in range(n)
    )
    idx.apply(IndexChange(6, vnics_put=vnics))
    assert len(idx._flat2) < n and len(idx) == n + 2
    replies = _lane(
        idx,
        [VL2Request(i, v.mac, 5).encode() for i, v in enumerate(vnics)]
        + [VL3Request(i, ip_to_wire(v.ip), 1, 5).encode() for i, v in enumerate(vnics)],
    )
    assert all(r.status == Status.OK and r.addr == UL2 for r in replies)
    assert [r.mac for r in replies[n:]] == [v.mac for v in vnics]
    # removals reach the VNICs the flat tables hold and those only the dicts hold
    idx.apply(IndexChange(7, vnics_removed=(vnics[0], vnics[-1])))
    gone = _lane(
        idx, [VL2Request(1, vnics[0].mac, 5).encode(), VL2Request(2, vnics[-1].mac, 5).encode()]
    )
    assert [r.status for r in gone] == [Status.NOTFOUND, Status.NOTFOUND]
