"""Policy changes: flows the new rules refuse are dropped; FirewallTable swaps and binds."""

from __future__ import annotations

from typing import Any

from protocol.fwpolicy import PolicyRule, from_json
from tests.firewall.fwnet import (
    IN,
    MAC,
    ME4,
    OUT,
    Clock,
    firewall,
    rule,
    tcp_in,
    tcp_out,
    udp_in,
    udp_out,
)
from varpd.firewall import FirewallTable


def test_inbound_flow_is_dropped_when_its_allow_rule_goes_away():
    fw = firewall(rule("in", "allow", "tcp", ports=[80]), rule("in", "allow", "tcp", ports=[22]))
    assert fw.check(tcp_in("192.0.2.1", 80, sport=5000), IN)
    assert fw.check(tcp_in("192.0.2.1", 22, sport=5001), IN)
    assert fw.check(tcp_out("192.0.2.1", 5000, sport=80, flags="SA"), OUT)
    dropped = fw.install([rule("in", "allow", "tcp", ports=[22])])
    assert dropped == 1
    assert not fw.check(tcp_in("192.0.2.1", 80, sport=5000, flags="A"), IN)
    assert fw.check(tcp_in("192.0.2.1", 22, sport=5001, flags="A"), IN)


def test_outbound_flow_is_dropped_when_a_block_appears_and_others_survive():
    fw = firewall()
    assert fw.check(tcp_out("192.0.2.25", 25, sport=4000), OUT)
    assert fw.check(udp_out("192.0.2.53", 53, sport=4001), OUT)
    assert fw.install([rule("out", "block", "tcp", ports=[25], peers=["192.0.2.0/24"])]) == 1
    assert not fw.check(tcp_in("192.0.2.25", 4000, sport=25, flags="SA"), IN)
    assert not fw.check(tcp_out("192.0.2.25", 25, sport=4000, flags="A"), OUT)
    assert fw.check(udp_in("192.0.2.53", 4001, sport=53), IN)


def test_flow_allowed_by_a_higher_priority_rule_survives_a_lower_block():
    fw = firewall(rule("in", "allow", "tcp", ports=[443], priority=3))
    assert fw.check(tcp_in("198.51.100.1", 443, sport=7000), IN)
    keep = [
        rule("in", "allow", "tcp", ports=[443], priority=3),
        rule("in", "block", "tcp", priority=2),
    ]
    assert fw.install(keep) == 0
    assert fw.check(tcp_in("198.51.100.1", 443, sport=7000, flags="A"), IN)


def policy_doc(generation: int, vnics: dict[str, list[PolicyRule]]) -> dict[str, Any]:
    return {
        "version": 1,
        "cn_uuid": "cn-1",
        "generation": generation,
        "vnics": {
            mac: {"ips": [ME4], "vnet_id": 7, "rules": [r.to_json() for r in rules]}
            for mac, rules in vnics.items()
        },
    }


class FakeVnic:
    def __init__(self, mac: bytes) -> None:
        self.mac = mac
        self.filter: Any = None


MAC2 = "02:00:00:00:00:02"


def test_table_binds_vnics_and_follows_policy_membership():
    table = FirewallTable(clock=Clock())
    v1, v2 = FakeVnic(bytes.fromhex("020000000001")), FakeVnic(bytes.fromhex("020000000002"))
    table.bind(v1)
    table.bind(v2)
    assert v1.filter is None and v2.filter is None and table.generation is None
    table.apply(from_json(policy_doc(1, {MAC: [rule("in", "allow", "tcp", ports=[22])]})))
    assert v1.filter is table.get(MAC) and v2.filter is None and table.generation == 1
    assert v1.filter.check(tcp_in("192.0.2.1", 22), IN)
    assert not v1.filter.check(tcp_in("192.0.2.1", 23), IN)
    table.apply(from_json(policy_doc(2, {MAC2: []})))
    assert v1.filter is None and v2.filter is table.get(MAC2)
    table.unbind(v2)
    assert v2.filter is None
    table.apply(from_json(policy_doc(3, {MAC2: []})))
    assert v2.filter is None


def test_table_keeps_state_of_unchanged_vnics_and_rejudges_changed_ones():
    table = FirewallTable(clock=Clock())
    r22, r80 = rule("in", "allow", "tcp", ports=[22]), rule("in", "allow", "tcp", ports=[80])
    table.apply(from_json(policy_doc(1, {MAC: [r22, r80], MAC2: [r80]})))
    fw1, fw2 = table.get(MAC), table.get(MAC2)
    assert fw1 is not None and fw2 is not None
    compiled2 = fw2._rules
    assert fw1.check(tcp_in("192.0.2.1", 80, sport=1), IN)
    assert fw1.check(tcp_in("192.0.2.1", 22, sport=2), IN)
    assert fw2.check(tcp_in("192.0.2.1", 80, sport=3), IN)
    table.apply(from_json(policy_doc(2, {MAC: [r22], MAC2: [r80]})))
    assert table.get(MAC) is fw1 and table.get(MAC2) is fw2
    assert fw2._rules is compiled2  # unchanged: not recompiled
    assert not fw1.check(tcp_in("192.0.2.1", 80, sport=1, flags="A"), IN)
    assert fw1.check(tcp_in("192.0.2.1", 22, sport=2, flags="A"), IN)
    assert fw2.check(tcp_in("192.0.2.1", 80, sport=3, flags="A"), IN)
    assert table.flows_dropped == 1
    m = table.metrics()
    assert m["generation"] == 2 and m["vnics"] == 2 and m["per_vnic"][MAC]["flows"] == 1
