"""The DYNAMIC target cache, the miss queue and the upcall interface (spec §2.2-§2.4, §9.3)."""

from __future__ import annotations

import pytest
import trio
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from tests.shim.shimnet import (
    A_IP,
    DEV,
    MAC_A1,
    MAC_B1,
    MAC_C1,
    B,
    C,
    frame,
    outer,
    start_node,
)
from varpd.shim import (
    DROP,
    PENDING,
    VALID,
    NoSuchEntry,
    NotAssociated,
    NotSupported,
    OverlayDriver,
    TargetMode,
    UnknownRequest,
)

QUEUE_LIMIT = 128 * 1024


def numbered(n: int, size: int = 1000, dst: bytes = MAC_B1) -> bytes:
    data = frame(MAC_A1, dst, n.to_bytes(4, "big"))
    return data + b"\x00" * (size - len(data))


def seq(data: bytes) -> int:
    return int.from_bytes(data[42:46], "big")  # 14 Ether + 20 IP + 8 UDP


def sent_seqs(captured) -> list[int]:
    return [seq(bytes(VXLAN(d.payload)[Ether])) for d in captured]


async def send(driver: OverlayDriver, data: bytes) -> None:
    await driver.vnic(DEV, MAC_A1).port.send(data)


async def no_lookup(driver: OverlayDriver) -> bool:
    with trio.move_on_after(0.05):
        await driver.next_lookup()
        return False
    return True


async def test_miss_queue_drops_past_128k_and_respond_releases_in_order(pair, captured):
    a, b = pair
    fits = QUEUE_LIMIT // 1000
    for n in range(fits + 5):
        await send(a, numbered(n))
    counters = a.status(DEV).counters
    assert counters["tx_queued"] == fits and counters["tx_drop_queue_full"] == 5
    assert a.metrics()["driver"]["queued_bytes"] == fits * 1000
    req = await a.next_lookup()
    assert seq(req.frame) == 0
    assert captured == []
    a.respond(req.req_id, B)
    assert sent_seqs(captured) == list(range(fits))
    assert [seq(f) for f in b.vnic(DEV, MAC_B1).port.received()] == list(range(fits))
    assert a.metrics()["driver"]["queued_bytes"] == 0
    entry = a.cache_get(DEV, MAC_B1)
    assert entry.flags == VALID and entry.point == B
    await send(a, numbered(999))  # VALID now: straight out, no lookup
    assert sent_seqs(captured)[-1] == 999 and await no_lookup(a)


async def test_one_outstanding_lookup_per_mac(pair):
    a, _ = pair
    for n in range(3):
        await send(a, numbered(n))
    await send(a, numbered(9, dst=MAC_C1))
    first = await a.next_lookup()
    second = await a.next_lookup()
    assert (first.dst_mac, second.dst_mac) == (MAC_B1, MAC_C1)
    assert first.req_id != second.req_id
    assert await no_lookup(a)
    assert a.cache_get(DEV, MAC_B1) is None  # PENDING only: not listed, not returned
    assert a.cache_list(DEV) == []


async def test_drop_drops_only_the_head_and_asks_again(pair, captured):
    a, _ = pair
    for n in range(3):
        await send(a, numbered(n))
    req = await a.next_lookup()
    a.drop(req.req_id)
    assert a.status(DEV).counters["tx_drop_lookup"] == 1
    again = await a.next_lookup()
    assert again.dst_mac == MAC_B1 and seq(again.frame) == 1 and again.req_id != req.req_id
    a.respond(again.req_id, B)
    assert sent_seqs(captured) == [1, 2]


async def test_drop_of_last_frame_returns_entry_to_invalid(pair):
    a, _ = pair
    await send(a, numbered(0))
    a.drop((await a.next_lookup()).req_id)
    assert await no_lookup(a)
    await send(a, numbered(1))  # a new miss, a new lookup
    assert seq((await a.next_lookup()).frame) == 1


async def test_unknown_request_ids(pair):
    a, _ = pair
    await send(a, numbered(0))
    req = await a.next_lookup()
    a.respond(req.req_id, B)
    with pytest.raises(UnknownRequest) as info:
        a.respond(req.req_id, B)
    assert info.value.code == "EINVAL"
    with pytest.raises(UnknownRequest):
        a.drop(12345)
    assert a.counters["unknown_requests"] == 2


async def test_cache_set_validates_and_flushes_queue_leaving_pending(pair, captured):
    a, _ = pair
    for n in range(2):
        await send(a, numbered(n))
    req = await a.next_lookup()
    a.cache_set(DEV, MAC_B1, B)
    assert sent_seqs(captured) == [0, 1]
    entry = a.cache_get(DEV, MAC_B1)
    assert entry.flags == VALID | PENDING and entry.point == B
    a.respond(req.req_id, C)  # the outstanding lookup still completes
    assert a.cache_get(DEV, MAC_B1).flags == VALID
    assert len(captured) == 2


async def test_cache_set_answers_a_queued_but_not_yet_handed_out_miss(pair, captured):
    a, _ = pair
    await send(a, numbered(0))
    a.cache_set(DEV, MAC_B1, B)
    assert sent_seqs(captured) == [0]
    assert await no_lookup(a)
    assert a.counters["stale_lookups"] == 1
    assert a.cache_get(DEV, MAC_B1).flags == VALID


async def test_drop_wins_over_valid_and_set_never_clears_drop(pair, captured):
    a, _ = pair
    a.cache_set(DEV, MAC_B1, B)
    a.cache_set(DEV, MAC_B1, None, drop=True)
    assert a.cache_get(DEV, MAC_B1).flags == VALID | DROP
    await send(a, numbered(0))
    assert captured == [] and a.status(DEV).counters["tx_drop_cache"] == 1
    a.cache_set(DEV, MAC_B1, C)  # does not clear DROP
    await send(a, numbered(1))
    assert captured == []
    a.cache_remove(DEV, MAC_B1)  # clears both
    assert a.cache_get(DEV, MAC_B1) is None
    await send(a, numbered(2))
    assert (await a.next_lookup()).dst_mac == MAC_B1


async def test_cache_remove_keeps_queued_frames_and_the_outstanding_lookup(pair, captured):
    a, _ = pair
    a.cache_set(DEV, MAC_B1, B)
    a.cache_remove(DEV, MAC_B1)
    await send(a, numbered(0))
    await send(a, numbered(1))
    req = await a.next_lookup()
    a.cache_remove(DEV, MAC_B1)  # entry exists (pending): no error, nothing lost
    a.cache_flush(DEV)
    a.respond(req.req_id, C)
    assert sent_seqs(captured) == [0, 1]
    assert {outer(d).dst for d in captured} == {"10.0.0.3"}
    with pytest.raises(NoSuchEntry):
        a.cache_remove(DEV, bytes.fromhex("020000000999"))


async def test_cache_flush_and_list_in_mac_order(pair):
    a, _ = pair
    macs = [bytes.fromhex(f"0200000000{i:02x}") for i in (9, 3, 7, 1)]
    for mac in macs:
        a.cache_set(DEV, mac, B)
    a.cache_set(DEV, bytes.fromhex("020000000005"), None, drop=True)
    listed = a.cache_list(DEV)
    assert [e.mac[-1] for e in listed] == [1, 3, 5, 7, 9]
    assert listed[2].flags == DROP and listed[2].point is None
    assert [e.mac[-1] for e in a.cache_list(DEV, after=listed[1].mac, limit=2)] == [5, 7]
    a.cache_flush(DEV)
    assert a.cache_list(DEV) == []


async def test_cache_admin_needs_a_dynamic_associated_target(underlay, nursery):
    driver = OverlayDriver(underlay)
    driver.create_device(DEV, 1)
    with pytest.raises(NotAssociated):
        driver.cache_list(DEV)
    point = await start_node(nursery, underlay, A_IP, mode=TargetMode.POINT, point=B, vnet=2)
    for op in (
        lambda: point.cache_set(DEV, MAC_B1, C),
        lambda: point.cache_remove(DEV, MAC_B1),
        lambda: point.cache_flush(DEV),
    ):
        with pytest.raises(NotSupported):
            op()
    driver.associate(DEV, 1, TargetMode.DYNAMIC)
    driver.disassociate(DEV)
    with pytest.raises(NotAssociated):
        driver.cache_set(DEV, MAC_B1, B)


async def test_misses_wait_while_no_varpd_is_associated(pair, captured):
    a, _ = pair
    a.disassociate(DEV)
    await send(a, numbered(0))
    await send(a, numbered(1))
    assert await no_lookup(a)
    assert a.metrics()["driver"]["lookups_waiting"] == 1
    a.associate(DEV, 2, TargetMode.DYNAMIC)
    req = await a.next_lookup()
    assert req.varpd_id == 2 and seq(req.frame) == 0
    a.respond(req.req_id, B)
    assert sent_seqs(captured) == [0, 1]


async def test_disassociate_takes_back_outstanding_requests(pair, captured):
    a, _ = pair
    await send(a, numbered(0))
    old = await a.next_lookup()
    a.disassociate(DEV)
    with pytest.raises(UnknownRequest):
        a.respond(old.req_id, B)
    a.associate(DEV, 3, TargetMode.DYNAMIC)
    new = await a.next_lookup()
    assert seq(new.frame) == 0 and new.req_id != old.req_id
    a.respond(new.req_id, B)
    assert sent_seqs(captured) == [0]


async def test_reassociation_forgets_answers(pair):
    a, _ = pair
    a.cache_set(DEV, MAC_B1, B)
    a.disassociate(DEV)
    a.associate(DEV, 2, TargetMode.DYNAMIC)
    assert a.cache_list(DEV) == []
    await send(a, numbered(0))
    assert (await a.next_lookup()).dst_mac == MAC_B1


async def test_switching_to_point_mode_drops_waiting_frames(pair, captured):
    a, _ = pair
    await send(a, numbered(0))
    a.disassociate(DEV)
    a.associate(DEV, 2, TargetMode.POINT, C)
    assert a.status(DEV).counters["tx_drop_flushed"] == 1
    assert a.metrics()["driver"]["lookups_waiting"] == 0
    assert await no_lookup(a)
    await send(a, numbered(1))
    assert sent_seqs(captured) == [1]


async def test_global_miss_bound(nursery, underlay):
    a = await start_node(nursery, underlay, A_IP, max_waiting_lookups=2)
    a.add_vnic(DEV, MAC_A1)
    for i in range(4):
        await send(a, numbered(i, dst=bytes.fromhex(f"0200000001{i:02x}")))
    counters = a.status(DEV).counters
    assert counters["tx_queued"] == 2 and counters["tx_drop_lookup_queue_full"] == 2
    await a.next_lookup()  # handed out: no longer waiting, room for one more
    await send(a, numbered(5, dst=bytes.fromhex("020000000105")))
    assert a.status(DEV).counters["tx_queued"] == 3


async def test_global_byte_bound(nursery, underlay):
    a = await start_node(nursery, underlay, A_IP, max_queued_bytes=2500)
    a.add_vnic(DEV, MAC_A1)
    for n in range(3):
        await send(a, numbered(n))
    counters = a.status(DEV).counters
    assert counters["tx_queued"] == 2 and counters["tx_drop_lookup_queue_full"] == 1


async def test_delete_device_revokes_requests_and_frees_queued_frames(pair):
    a, _ = pair
    await send(a, numbered(0))
    await send(a, numbered(1, dst=MAC_C1))
    req = await a.next_lookup()
    a.remove_vnic(DEV, MAC_A1)
    await a.delete_device(DEV)
    with pytest.raises(UnknownRequest):
        a.respond(req.req_id, B)
    assert await no_lookup(a)
    metrics = a.metrics()["driver"]
    assert metrics["queued_bytes"] == 0 and metrics["lookups_outstanding"] == 0


async def test_head_frame_with_bad_header_is_dropped_before_varpd(pair):
    a, _ = pair
    truncated_tag = MAC_B1 + MAC_A1 + b"\x81\x00\x00"  # 15 bytes: 802.1Q tag cut short
    a.resend(DEV, truncated_tag)
    await send(a, numbered(1))
    req = await a.next_lookup()
    assert seq(req.frame) == 1
    assert a.status(DEV).counters["tx_drop_bad_header"] == 1


async def test_lookups_are_served_across_devices_in_arrival_order(nursery, underlay):
    a = await start_node(nursery, underlay, A_IP, name="o1", vnet=1)
    a.create_device("o2", 2)
    a.set_prop("o2", "vxlan/listen_ip", A_IP)
    a.associate("o2", 9, TargetMode.DYNAMIC)
    await a.activate("o2")
    v1 = a.add_vnic("o1", MAC_A1)
    v2 = a.add_vnic("o2", MAC_A1)
    await v2.port.send(numbered(0))
    await v1.port.send(numbered(1))
    first, second = await a.next_lookup(), await a.next_lookup()
    assert (first.device, first.varpd_id, first.vnet_id) == ("o2", 9, 2)
    assert (second.device, second.varpd_id, second.vnet_id) == ("o1", 1, 1)
