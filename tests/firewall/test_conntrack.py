"""Connection tracking: timeouts per state (fake clock), refresh, TCP states, the size bound."""

from __future__ import annotations

import pytest

from tests.firewall.fwnet import (
    IN,
    OUT,
    Clock,
    firewall,
    icmp_in,
    icmp_out,
    tcp_in,
    tcp_out,
    udp_in,
    udp_out,
)
from varpd.firewall import Conntrack, Timeouts
from varpd.firewall.conntrack import TCP_CLOSING, TCP_ESTABLISHED, TCP_NEW


def test_tcp_half_open_flow_expires_after_30_seconds():
    clock = Clock()
    fw = firewall(clock=clock)
    assert fw.check(tcp_out("192.0.2.1", 80, sport=1000), OUT)
    clock.advance(29)
    assert fw.check(tcp_in("192.0.2.1", 1000, sport=80, flags="SA"), IN)
    fw2 = firewall(clock=clock)
    assert fw2.check(tcp_out("192.0.2.1", 80, sport=1000), OUT)
    clock.advance(30.5)
    assert not fw2.check(tcp_in("192.0.2.1", 1000, sport=80, flags="SA"), IN)
    assert fw2.conntrack.counters["expired"] == 1


def test_tcp_established_flow_lives_an_hour_idle_and_closing_two_minutes():
    clock = Clock()
    fw = firewall(clock=clock)
    fw.check(tcp_out("192.0.2.1", 80, sport=1000), OUT)
    fw.check(tcp_in("192.0.2.1", 1000, sport=80, flags="SA"), IN)
    [flow] = [f for _, f in fw.conntrack.items()]
    assert flow.state == TCP_ESTABLISHED
    clock.advance(3599)
    assert fw.check(tcp_in("192.0.2.1", 1000, sport=80, flags="A"), IN)
    clock.advance(3601)
    assert not fw.check(tcp_in("192.0.2.1", 1000, sport=80, flags="A"), IN)

    fw.check(tcp_out("192.0.2.1", 80, sport=2000), OUT)
    fw.check(tcp_in("192.0.2.1", 2000, sport=80, flags="SA"), IN)
    fw.check(tcp_out("192.0.2.1", 80, sport=2000, flags="FA"), OUT)
    [flow] = [f for _, f in fw.conntrack.items()]
    assert flow.state == TCP_CLOSING
    clock.advance(119)
    assert fw.check(tcp_in("192.0.2.1", 2000, sport=80, flags="FA"), IN)
    clock.advance(121)
    assert not fw.check(tcp_in("192.0.2.1", 2000, sport=80, flags="A"), IN)


def test_syn_reopens_a_closing_flow():
    ct = Conntrack(clock=Clock())
    key = (6, b"a", b"b", 1, 2)
    flow = ct.create(key, OUT, (OUT, 4, 6, 0, 2), 0x02, 0.0)
    ct.update(flow, 6, IN, 0x12, 1.0)
    ct.update(flow, 6, OUT, 0x04, 2.0)  # RST
    assert flow.state == TCP_CLOSING
    ct.update(flow, 6, OUT, 0x02, 3.0)
    assert flow.state == TCP_NEW and flow.expires == 33.0


def test_udp_flow_is_refreshed_by_traffic_and_expires_after_60_idle_seconds():
    clock = Clock()
    fw = firewall(clock=clock)
    fw.check(udp_out("192.0.2.53", 53, sport=3000), OUT)
    for _ in range(5):
        clock.advance(50)
        assert fw.check(udp_in("192.0.2.53", 3000, sport=53), IN)
    clock.advance(61)
    assert not fw.check(udp_in("192.0.2.53", 3000, sport=53), IN)


def test_icmp_echo_flow_expires_after_30_seconds():
    clock = Clock()
    fw = firewall(clock=clock)
    fw.check(icmp_out("192.0.2.9", 8, id=3), OUT)
    clock.advance(29)
    assert fw.check(icmp_in("192.0.2.9", 0, id=3), IN)
    clock.advance(31)
    assert not fw.check(icmp_in("192.0.2.9", 0, id=3), IN)


def test_timeouts_are_configurable():
    clock = Clock()
    fw = firewall(clock=clock, timeouts=Timeouts(udp=5.0))
    fw.check(udp_out("192.0.2.53", 53, sport=3000), OUT)
    clock.advance(6)
    assert not fw.check(udp_in("192.0.2.53", 3000, sport=53), IN)


def test_table_is_bounded_and_evicts_the_least_recently_used_flow():
    clock = Clock()
    fw = firewall(clock=clock, max_flows=4)
    for sport in range(1000, 1004):
        fw.check(udp_out("192.0.2.53", 53, sport=sport), OUT)
    # touch 1000 so that 1001 is the least recently used
    assert fw.check(udp_in("192.0.2.53", 1000, sport=53), IN)
    fw.check(udp_out("192.0.2.53", 53, sport=1004), OUT)
    assert len(fw.conntrack) == 4
    assert fw.conntrack.counters["evicted"] == 1
    assert not fw.check(udp_in("192.0.2.53", 1001, sport=53), IN)
    for sport in (1000, 1002, 1003, 1004):
        assert fw.check(udp_in("192.0.2.53", sport, sport=53), IN), sport


def test_expired_flows_make_room_before_live_ones_are_evicted():
    clock = Clock()
    ct = Conntrack(max_flows=3, timeouts=Timeouts(udp=10), clock=clock)
    for i in range(3):
        ct.create((17, b"l", b"r", i, 53), OUT, (OUT, 4, 17, 0, 53), 0, clock())
    clock.advance(11)
    ct.create((17, b"l", b"r", 9, 53), OUT, (OUT, 4, 17, 0, 53), 0, clock())
    assert len(ct) == 1 and ct.counters["expired"] == 3 and ct.counters["evicted"] == 0


def test_sweep_drops_only_expired_flows():
    clock = Clock()
    ct = Conntrack(timeouts=Timeouts(udp=10, icmp=30), clock=clock)
    ct.create((17, b"l", b"r", 1, 53), OUT, (OUT, 4, 17, 0, 53), 0, clock())
    ct.create((1, b"l", b"r", 7, 7), OUT, (OUT, 4, 1, 0, 8 << 8), 0, clock())
    clock.advance(20)
    assert ct.expire() == 1
    assert (1, b"l", b"r", 7, 7) in ct and (17, b"l", b"r", 1, 53) not in ct


def test_zero_size_table_is_refused():
    with pytest.raises(ValueError):
        Conntrack(max_flows=0)
