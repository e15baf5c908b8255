"""Unit tests of the linux backend's pure parts: the miss tracker, the synthesised frames,
the classification of netlink messages and the name scheme (no root needed)."""

from __future__ import annotations

import trio

from protocol.ethernet import build_arp_reply, check_arp_request, parse_ndp_ns
from varpd.linux import names
from varpd.linux.misses import REQUESTER_MAC, MissTracker, l2_miss_frame, l3_miss_frame


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_lookup_per_key_and_a_negative_memory() -> None:
    clock = Clock()
    t = MissTracker(max_waiting=8, negative_ttl=1.0, clock=clock)
    mac = b"\x02\x00\x00\x00\x00\x01"
    assert t.miss("d", "l2", mac) == "queued"
    assert t.miss("d", "l2", mac) == "pending"
    assert t.miss("d", "l3", "10.0.0.1") == "queued"

    async def pop_two() -> list:
        return [await t.pop(), await t.pop()]

    first, second = trio.run(pop_two)
    req = t.new_request(first)
    assert t.miss("d", "l2", mac) == "pending"  # outstanding counts as pending
    miss = t.take(req)
    assert miss is first
    t.finish(miss, negative=True)
    assert t.miss("d", "l2", mac) == "negative"
    clock.now += 1.01
    assert t.miss("d", "l2", mac) == "queued"
    assert t.counters["suppressed_pending"] == 2
    assert t.counters["suppressed_negative"] == 1
    # an answered key is not remembered as negative
    t.finish(second, negative=False)
    assert t.miss("d", "l3", "10.0.0.1") == "queued"
    # forgive clears a negative memory; forget drops a device's state
    t.forgive("d", "l2", mac)
    t.forget("d")
    assert t.waiting() == 0 and t.outstanding() == 0


def test_a_full_queue_counts_and_drops() -> None:
    t = MissTracker(max_waiting=3)
    results = [t.miss("d", "l2", bytes([2, 0, 0, 0, 0, i])) for i in range(5)]
    assert results == ["queued"] * 3 + ["full"] * 2
    assert t.counters["dropped_full"] == 2
    assert t.waiting() == 3


def test_synthesised_frames_pass_the_proxies_checks() -> None:
    arp = check_arp_request(l3_miss_frame("192.168.1.7"))
    assert str(arp.target_ip) == "192.168.1.7" and arp.sender_mac == REQUESTER_MAC
    reply = build_arp_reply(l3_miss_frame("192.168.1.7"), b"\x02" * 6)
    assert reply[:6] == REQUESTER_MAC  # what the driver recognises as a proxy answer
    ns = parse_ndp_ns(l3_miss_frame("fd00::7"))
    assert str(ns.target) == "fd00::7" and str(ns.dst_ip) == "ff02::1:ff00:7"
    frame = l2_miss_frame(b"\x02\x00\x00\x00\x00\x09")
    assert frame[:6] == b"\x02\x00\x00\x00\x00\x09" and len(frame) == 60


def test_names_fit_and_are_recognised() -> None:
    mac = b"\x02\x00\x00\x00\x00\x09"
    for name in (
        names.vxlan_name(0xFFFFFF),
        names.bridge_name(0xFFFFFF),
        names.host_name(0xFFFFFF, mac),
        names.tenant_name(1, mac),
    ):
        assert len(name) <= 15
    assert names.is_own(names.vxlan_name(42)) and names.is_own(names.host_name(42, mac))
    assert names.host_name(42, mac) == names.host_name(42, mac) != names.host_name(43, mac)
    assert not names.is_own(names.tenant_name(42, mac))  # tenant ends are never swept
    assert not names.is_own("eth0") and not names.is_own("pvxeth")
    assert names.check_ifname("pvx2a") is not None
    assert names.check_ifname("a" * 16) is not None
    assert names.check_ifname("vna") is None
