"""The per-CN policy compiler, at the policy-document level: the enforcement scenarios of
spec/fwrule-cases.md §D with the VNICs spread over several compute nodes, datacenter-wide peer
resolution (§7 q9), and the policy service's incremental updates agreeing with a full compile."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portolan.firewall.compiler import compile_all
from portolan.firewall.policy_service import PolicyService
from portolan.firewall.rules import RuleChange
from portolan.firewall.selection import tag_text
from portolan.index import IndexChange
from portolan.model import Rule, Vnic
from protocol.fwpolicy import Policy, from_json
from protocol.fwrule import canonicalize

A = "aaaaaaaa-0000-4000-8000-00000000000a"
B = "bbbbbbbb-0000-4000-8000-00000000000b"
CN1 = "11111111-1111-4111-8111-111111111111"
CN2 = "22222222-2222-4222-8222-222222222222"
CN3 = "33333333-3333-4333-8333-333333333333"
CNS = (CN1, CN2, CN3)


def vm(n: int) -> str:
    return f"00000000-0000-4000-8000-0000000000{n:02d}"


def mac(n: int, nic: int = 0) -> str:
    return f"02:00:00:00:{nic:02x}:{n:02x}"


def vnic(
    n: int,
    *,
    cn: str | None = None,
    owner: str | None = A,
    tags: dict[str, Any] | None = None,
    fw: bool = True,
    ip: str | None = None,
    nic: int = 0,
) -> Vnic:
    """VNIC of VM n (uuid vm(n)), IP 10.0.0.n, on CN (n-1) % 3 unless given."""
    return Vnic(
        mac=bytes.fromhex(mac(n, nic).replace(":", "")),
        ip=ip or f"10.0.0.{n}",
        vnet_id=12340,
        vlan_id=0,
        cn_uuid=cn or CNS[(n - 1) % 3],
        belongs_to_uuid=vm(n),
        owner_uuid=owner,
        tags=tags or {},
        firewall_enabled=fw,
    )


_rule_seq = iter(range(1, 1 << 30))


def rule(text: str, *, owner: str | None = A, enabled: bool = True, log: bool = False) -> Rule:
    n = next(_rule_seq)
    return Rule(
        uuid=f"ffffffff-0000-4000-8000-{n:012d}",
        rule=canonicalize(text.replace("VM01", vm(1)).replace("VM03", vm(3))),
        owner_uuid=owner,
        is_global=owner is None,
        enabled=enabled,
        log=log,
    )


def compile_docs(vnics: list[Vnic], rules: list[Rule]) -> dict[str, Policy]:
    policies = compile_all(vnics, rules, generation=1)
    for p in policies.values():  # every document is valid for varpd, and round-trips
        assert from_json(p.to_json()) == p
    return policies


def entries(policies: dict[str, Policy], n: int, nic: int = 0) -> list[dict[str, Any]] | None:
    """The rules of VNIC n as JSON without uuid/log; None when the VNIC is not in any policy."""
    for p in policies.values():
        vp = p.vnic(mac(n, nic))
        if vp is not None:
            out = []
            for r in vp.rules:
                j = r.to_json()
                del j["uuid"], j["log"]
                out.append(j)
            return out
    return None


def tcp(direction: str, action: str, port: Any, peers: Any, prio: int = 0) -> dict[str, Any]:
    ports = port if port == "all" or isinstance(port, list) else [[port, port]]
    return {
        "direction": direction,
        "action": action,
        "priority": prio,
        "protocol": "tcp",
        "ports": ports,
        "peers": peers,
    }


# -- spec/fwrule-cases.md §D -------------------------------------------------------------------


def test_d01_owned_all_vms_selects_only_the_owners_vnics() -> None:
    vnics = [vnic(1), vnic(2), vnic(3, owner=B)]
    docs = compile_docs(vnics, [rule("FROM any TO all vms ALLOW tcp PORT 22")])
    assert entries(docs, 1) == [tcp("in", "allow", 22, "any")]
    assert entries(docs, 2) == [tcp("in", "allow", 22, "any")]
    assert entries(docs, 3) == []  # filtered, nothing allowed in: ssh to 03 blocked
    assert set(docs) == {CN1, CN2, CN3}
    assert list(docs[CN1].vnics) == [mac(1)]


def test_d02_global_rule_selects_every_owner() -> None:
    vnics = [vnic(1), vnic(2), vnic(3, owner=B)]
    docs = compile_docs(vnics, [rule("FROM any TO all vms ALLOW tcp PORT 22", owner=None)])
    for n in (1, 2, 3):
        assert entries(docs, n) == [tcp("in", "allow", 22, "any")]


def test_d03_tag_to_tag_with_peers_from_other_cns_of_the_same_owner_only() -> None:
    vnics = [
        vnic(1, tags={"role": "www"}),
        vnic(2, tags={"role": "db"}),
        vnic(3, owner=B, tags={"role": "www"}),
    ]
    docs = compile_docs(vnics, [rule("FROM tag role = www TO tag role = db ALLOW tcp PORT 5432")])
    assert entries(docs, 2) == [tcp("in", "allow", 5432, ["10.0.0.1/32"])]
    assert entries(docs, 1) == []  # FROM side + ALLOW at priority 0: a no-op
    assert entries(docs, 3) == []  # other owner: neither selected nor a peer


def test_d04_tag_values_compare_as_strings_and_bare_tag_matches_any_value() -> None:
    vnics = [
        vnic(1, tags={"web": True}),
        vnic(2, tags={"web": "no", "tier": 2}),
        vnic(4, tags={}),
    ]
    rules = [
        rule("FROM ip 192.168.1.1 TO tag web ALLOW tcp PORT 80"),
        rule("FROM ip 192.168.1.2 TO tag web = true ALLOW tcp PORT 81"),
        rule("FROM ip 192.168.1.3 TO tag tier = 2 ALLOW tcp PORT 82"),
    ]
    docs = compile_docs(vnics, rules)
    assert entries(docs, 1) == [
        tcp("in", "allow", 80, ["192.168.1.1/32"]),
        tcp("in", "allow", 81, ["192.168.1.2/32"]),
    ]
    assert entries(docs, 2) == [
        tcp("in", "allow", 80, ["192.168.1.1/32"]),
        tcp("in", "allow", 82, ["192.168.1.3/32"]),
    ]
    assert entries(docs, 4) == []


def test_tag_text_is_javascript_string() -> None:
    assert [tag_text(v) for v in (True, False, 2, 2.0, 2.5, None, "x", [1, "a"])] == [
        "true",
        "false",
        "2",
        "2",
        "2.5",
        "null",
        "x",
        "1,a",
    ]


def test_d05_outbound_block() -> None:
    docs = compile_docs(
        [vnic(1, tags={"nosmtp": True})], [rule("FROM tag nosmtp TO any BLOCK tcp PORT 25")]
    )
    assert entries(docs, 1) == [tcp("out", "block", 25, "any")]


def test_d06_priority_zero_no_ops_are_left_out() -> None:
    rules = [
        rule("FROM any TO vm VM01 BLOCK tcp PORT 23"),
        rule("FROM vm VM01 TO any ALLOW tcp PORT 443"),
    ]
    assert entries(compile_docs([vnic(1)], rules), 1) == []


def test_d07_inbound_block_above_allow_both_present() -> None:
    rules = [
        rule("FROM any TO vm VM01 ALLOW tcp PORT 25"),
        rule("FROM subnet 10.20.30.0/24 TO vm VM01 BLOCK tcp PORT 25 PRIORITY 1"),
    ]
    got = entries(compile_docs([vnic(1)], rules), 1)
    assert got == [
        tcp("in", "block", 25, ["10.20.30.0/24"], prio=1),
        tcp("in", "allow", 25, "any"),
    ]


def test_d08_equal_priority_entries_are_all_present() -> None:
    rules = [
        rule("FROM ip 10.9.9.9 TO vm VM01 BLOCK tcp PORT 80 PRIORITY 5"),
        rule("FROM ip 10.9.9.9 TO vm VM01 ALLOW tcp PORT 80 PRIORITY 5"),
        rule("FROM vm VM01 TO ip 10.8.8.8 ALLOW udp PORT 53 PRIORITY 5"),
        rule("FROM vm VM01 TO ip 10.8.8.8 BLOCK udp PORT 53 PRIORITY 5"),
    ]
    got = entries(compile_docs([vnic(1)], rules), 1)
    assert got is not None and len(got) == 4
    shapes = {(e["direction"], e["action"], e["protocol"], e["priority"]) for e in got}
    assert shapes == {
        ("in", "block", "tcp", 5),
        ("in", "allow", "tcp", 5),
        ("out", "allow", "udp", 5),
        ("out", "block", "udp", 5),
    }
    assert all(e["peers"] in (["10.9.9.9/32"], ["10.8.8.8/32"]) for e in got)


def test_d10_all_vms_includes_itself_and_firewall_disabled_peers_on_other_cns() -> None:
    vnics = [
        vnic(1, cn=CN1),
        vnic(1, cn=CN2, nic=1, ip="fd00::5"),  # VM 01's second VNIC, on another CN
        vnic(2, cn=CN3, fw=False),
    ]
    docs = compile_docs(vnics, [rule("FROM all vms TO all vms ALLOW tcp PORT 22")])
    peers = ["10.0.0.1/32", "10.0.0.2/32", "fd00::5/128"]
    assert entries(docs, 1) == [tcp("in", "allow", 22, peers)]
    assert entries(docs, 1, nic=1) == [tcp("in", "allow", 22, peers)]
    assert entries(docs, 2) is None  # firewall off: not in any policy (not filtered)
    assert docs[CN3].vnics == {}


def test_d12_naming_another_owners_vm_does_nothing() -> None:
    vnics = [vnic(1), vnic(3, owner=B)]
    docs = compile_docs(vnics, [rule("FROM any TO (vm VM01 OR vm VM03) ALLOW tcp PORT 8080")])
    assert entries(docs, 1) == [tcp("in", "allow", 8080, "any")]
    assert entries(docs, 3) == []


def test_d13_icmp_families_filter_peers() -> None:
    vnics = [vnic(1, cn=CN1), vnic(1, cn=CN2, nic=1, ip="fd00::1")]
    rules = [
        rule("FROM any TO all vms ALLOW icmp TYPE 8 CODE 0"),
        rule("FROM any TO all vms ALLOW icmp6 (TYPE 128 CODE 0 AND TYPE 135)"),
        rule("FROM ip 10.1.1.1 TO all vms ALLOW icmp TYPE all"),
        rule("FROM all vms TO all vms ALLOW icmp6 TYPE all"),
        rule("FROM all vms TO all vms ALLOW icmp TYPE 0"),
    ]
    got = entries(compile_docs(vnics, rules), 1)
    assert got is not None
    by_types = {(e["protocol"], str(e["types"])): e["peers"] for e in got}
    assert by_types == {
        ("icmp", "[[8, 0]]"): "any",
        ("icmp6", "[[128, 0], [135, None]]"): "any",
        ("icmp", "all"): ["10.1.1.1/32"],
        ("icmp6", "all"): ["fd00::1/128"],  # all vms, IPv6 addresses only
        ("icmp", "[[0, None]]"): ["10.0.0.1/32"],  # all vms, IPv4 addresses only
    }


def test_d14_port_lists_ranges_and_mixed_families() -> None:
    text = (
        "FROM (ip fd00::1 OR subnet 10.5.0.0/16 OR subnet fe80::/64) TO all vms "
        "ALLOW tcp PORTS 443, 80, 8000-8100"
    )
    got = entries(compile_docs([vnic(1)], [rule(text)]), 1)
    assert got == [
        tcp(
            "in",
            "allow",
            [[80, 80], [443, 443], [8000, 8100]],
            ["10.5.0.0/16", "fd00::1/128", "fe80::/64"],
        )
    ]


def test_d15_disabled_rule_contributes_nothing() -> None:
    docs = compile_docs([vnic(1)], [rule("FROM any TO all vms ALLOW tcp PORT 22", enabled=False)])
    assert entries(docs, 1) == []


def test_d16_ah_and_esp_carry_no_ports_or_types() -> None:
    rules = [rule("FROM ip 1.2.3.4 TO vm VM01 ALLOW ah"), rule("FROM vm VM01 TO any BLOCK esp")]
    got = entries(compile_docs([vnic(1)], rules), 1)
    assert sorted(got or [], key=lambda e: e["protocol"]) == [
        {"direction": "in", "action": "allow", "priority": 0, "protocol": "ah",
         "peers": ["1.2.3.4/32"]},
        {"direction": "out", "action": "block", "priority": 0, "protocol": "esp",
         "peers": "any"},
    ]  # fmt: skip


def test_d17_each_rule_enforced_on_the_end_it_changes() -> None:
    vnics = [vnic(1, tags={"a": 1}), vnic(2, tags={"b": 1})]
    vm2 = vm(2)
    rules = [
        rule(f"FROM vm VM01 TO vm {vm2} ALLOW tcp PORT 3306"),
        rule("FROM tag a TO tag b BLOCK udp PORT 161"),
    ]
    docs = compile_docs(vnics, rules)
    assert entries(docs, 1) == [
        {"direction": "out", "action": "block", "priority": 0, "protocol": "udp",
         "ports": [[161, 161]], "peers": ["10.0.0.2/32"]},
    ]  # fmt: skip
    assert entries(docs, 2) == [tcp("in", "allow", 3306, ["10.0.0.1/32"])]


def test_d20_priority_block_and_higher_allow() -> None:
    rules = [
        rule("FROM any TO all vms BLOCK tcp PORT all PRIORITY 1"),
        rule("FROM ip 10.3.3.3 TO all vms ALLOW tcp PORT 22 PRIORITY 2"),
    ]
    assert entries(compile_docs([vnic(1)], rules), 1) == [
        tcp("in", "allow", 22, ["10.3.3.3/32"], prio=2),
        tcp("in", "block", "all", "any", prio=1),
    ]


def test_ownerless_vnic_is_a_peer_of_owned_rules_but_never_selected_by_them() -> None:
    vnics = [vnic(1), vnic(9, owner=None, tags={"role": "bastion"})]
    docs = compile_docs(vnics, [rule("FROM tag role = bastion TO all vms ALLOW tcp PORT 22")])
    assert entries(docs, 1) == [tcp("in", "allow", 22, ["10.0.0.9/32"])]
    assert entries(docs, 9) == []


def test_global_rule_resolves_peers_datacenter_wide_and_across_owners() -> None:
    """§7 q9: one central engine -> a global rule's tag peers include every owner's VNICs on
    every CN (fwadm's agent would only have seen VMs local to the CN)."""
    vnics = [
        vnic(1, cn=CN1),
        vnic(2, cn=CN2, owner=B, tags={"role": "bastion"}),
        vnic(3, cn=CN3, tags={"role": "bastion"}),
    ]
    docs = compile_docs(
        vnics, [rule("FROM tag role = bastion TO all vms ALLOW tcp PORT 22", owner=None)]
    )
    assert entries(docs, 1) == [tcp("in", "allow", 22, ["10.0.0.2/32", "10.0.0.3/32"])]


def test_log_flag_and_rule_uuid_are_carried() -> None:
    r = rule("FROM any TO all vms ALLOW tcp PORT 22", log=True)
    vp = compile_docs([vnic(1)], [r])[CN1].vnic(mac(1))
    assert vp is not None and vp.ips == ("10.0.0.1",) and vp.vnet_id == 12340
    assert [(e.uuid, e.log) for e in vp.rules] == [(r.uuid, True)]


# -- incremental updates agree with a full compile ------------------------------------------

TAGS = st.dictionaries(st.sampled_from(["role", "web", "tier"]), st.sampled_from(["www", "db", True, 2]), max_size=2)  # fmt: skip
RULE_TEXTS = [
    "FROM any TO all vms ALLOW tcp PORT 22",
    "FROM all vms TO all vms ALLOW udp PORT 53 PRIORITY 1",
    "FROM tag role = www TO tag role = db ALLOW tcp PORT 5432",
    "FROM tag role TO any BLOCK tcp PORT 25",
    "FROM any TO tag web = true BLOCK tcp PORT 80 PRIORITY 3",
    "FROM tag tier = 2 TO (tag role = db OR vm VM01) ALLOW tcp PORT 9000 PRIORITY 2",
    "FROM vm VM03 TO all vms ALLOW icmp TYPE 8",
]
VNIC_OP = st.tuples(
    st.just("vnic"),
    st.integers(1, 5),
    st.sampled_from([None, *CNS]),  # None: delete
    st.sampled_from([A, B, None]),
    TAGS,
    st.booleans(),
)
RULE_OP = st.tuples(
    st.just("rule"),
    st.integers(0, 3),  # rule slot
    st.sampled_from([None, *RULE_TEXTS]),  # None: delete
    st.sampled_from([A, B, None]),
    st.booleans(),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(VNIC_OP, RULE_OP), min_size=1, max_size=25))
def test_incremental_updates_equal_a_full_compile(ops: list[tuple[Any, ...]]) -> None:
    service = PolicyService(directory=None, subscribe=False)
    service.load(1, [], [])
    vnics: dict[bytes, Vnic] = {}
    rules: dict[int, Rule] = {}
    version = 1
    generations: dict[str, int] = {}
    for op in ops:
        version += 1
        if op[0] == "vnic":
            _, n, cn, owner, tags, fw = op
            key = bytes.fromhex(mac(n).replace(":", ""))
            old = vnics.pop(key, None)
            new = None
            if cn is not None:
                new = vnic(n, cn=cn, owner=owner, tags=tags, fw=fw)
                vnics[key] = new
            service.on_change(
                IndexChange(
                    version,
                    vnics_removed=(old,) if old else (),
                    vnics_put=(new,) if new else (),
                )
            )
        else:
            _, slot, text, owner, enabled = op
            uuid = f"eeeeeeee-0000-4000-8000-{slot:012d}"
            if text is None:
                rules.pop(slot, None)
                service.on_change(RuleChange(version, rules_removed=(uuid,)))
            else:
                r = replace(rule(text, owner=owner, enabled=enabled), uuid=uuid)
                rules[slot] = r
                service.on_change(RuleChange(version, rules_put=(r,)))
        assert not service.stale
        expected = compile_all(list(vnics.values()), list(rules.values()))
        for cn in CNS:
            doc = service.document(cn)
            want = expected.get(cn)
            assert doc.vnics == (dict(want.vnics) if want else {}), cn
            # generations only grow, and only when the document changed
            assert doc.generation >= generations.get(cn, 0)
            generations[cn] = doc.generation


def test_a_peer_appearing_moving_or_leaving_updates_the_other_end() -> None:
    service = PolicyService(directory=None, subscribe=False)
    service.load(1, [], [])
    db = vnic(2, cn=CN2, tags={"role": "db"})
    service.on_change(RuleChange(2, rules_put=(rule("FROM tag role = www TO tag role = db ALLOW tcp PORT 5432"),)))  # fmt: skip
    service.on_change(IndexChange(3, vnics_put=(db,)))
    assert service.document(CN2).vnics[mac(2)].rules == ()  # no www peer yet: nothing allowed
    gen = service.generation(CN2)
    web = vnic(1, cn=CN1, tags={"role": "www"}, fw=False)
    service.on_change(IndexChange(4, vnics_put=(web,)))
    peers = [str(p) for p in service.document(CN2).vnics[mac(2)].rules[0].peers]
    assert peers == ["10.0.0.1/32"] and service.generation(CN2) == 4 > gen
    assert service.document(CN1).vnics == {}  # firewall off: not in its CN's document
    moved = replace(web, cn_uuid=CN3, ip="10.0.0.99")
    service.on_change(IndexChange(5, vnics_removed=(web,), vnics_put=(moved,)))
    peers = [str(p) for p in service.document(CN2).vnics[mac(2)].rules[0].peers]
    assert peers == ["10.0.0.99/32"] and service.generation(CN2) == 5
    other_owner = replace(moved, owner_uuid=B)
    service.on_change(IndexChange(6, vnics_removed=(moved,), vnics_put=(other_owner,)))
    assert service.document(CN2).vnics[mac(2)].rules == ()
    service.on_change(IndexChange(7, vnics_removed=(other_owner,)))
    assert service.generation(CN2) == 6  # nothing changed for db this time
    assert service.generation(CN1) == 0 and service.generation(CN3) == 0


async def test_a_long_poll_that_gives_up_leaves_no_waiter_behind() -> None:
    service = PolicyService(directory=None, subscribe=False)
    service.load(1, [], [])
    with trio.move_on_after(0.01):
        await service.wait_changed(CN1, 0)
    assert service._events == {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.wait_changed, CN2, 0)
        with trio.move_on_after(0.01):
            await service.wait_changed(CN2, 0)
        assert CN2 in service._events  # the other waiter still holds it
        service.on_change(IndexChange(2, vnics_put=(vnic(2, cn=CN2),)))
    assert service._events == {}
