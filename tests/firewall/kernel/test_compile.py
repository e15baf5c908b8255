"""The policy -> nftables compiler and the diff (pure: no kernel)."""

from __future__ import annotations

from typing import Any

from protocol.fwpolicy import from_json
from varpd.firewall.kernel.compile import TableLayout, compile_policy

MAC = "02:00:00:00:00:01"
OTHER = "02:00:00:00:00:02"


def pol(rules: list[dict[str, Any]], generation: int = 1, extra: bool = False):
    vnics = {MAC: {"ips": ["10.0.0.1"], "vnet_id": 1, "rules": rules}}
    if extra:
        vnics[OTHER] = {"ips": ["10.0.0.2"], "vnet_id": 1, "rules": []}
    full = [{"priority": 0, "peers": "any", **r} for r in rules]
    vnics[MAC]["rules"] = full
    return from_json({"version": 1, "cn_uuid": "c", "generation": generation, "vnics": vnics})


def verdicts(rules: list[list[dict[str, Any]]]) -> list[str]:
    out = []
    for expr in rules:
        for stmt in expr:
            for key in ("accept", "drop", "return"):
                if key in stmt:
                    out.append(key)
    return out


def test_rules_are_ordered_by_priority_then_against_the_default():
    p = pol(
        [
            {"uuid": "a", "direction": "in", "action": "block", "protocol": "tcp", "ports": "all"},
            {"uuid": "b", "direction": "in", "action": "allow", "protocol": "tcp", "ports": "all"},
            {
                "uuid": "c",
                "direction": "in",
                "action": "block",
                "priority": 3,
                "protocol": "udp",
                "ports": [[53, 53]],
            },
            {"uuid": "d", "direction": "out", "action": "allow", "protocol": "tcp", "ports": "all"},
            {"uuid": "e", "direction": "out", "action": "block", "protocol": "tcp", "ports": "all"},
        ]
    )
    v = compile_policy(p)[MAC]
    # in: priority 3 block, then allow (against the default) before block at priority 0;
    # each rule once per address family
    assert verdicts(v.rules_in) == ["drop", "drop", "accept", "accept", "drop", "drop"]
    # out: block (against the default) before allow; allow continues with return
    assert verdicts(v.rules_out) == ["drop", "drop", "return", "return"]


def test_peers_become_named_sets_per_family_collapsed():
    p = pol(
        [
            {
                "uuid": "r",
                "direction": "in",
                "action": "allow",
                "protocol": "tcp",
                "ports": [[22, 22], [8000, 8100]],
                "peers": ["10.1.0.0/24", "10.1.0.7", "10.2.0.0/16", "fd00::/64", "fd01::1"],
            }
        ]
    )
    v = compile_policy(p)[MAC]
    assert set(v.sets) == {"v020000000001_in_r_4", "v020000000001_in_r_6"}
    four = v.sets["v020000000001_in_r_4"].elements
    assert four == (
        {"prefix": {"addr": "10.1.0.0", "len": 24}},
        {"prefix": {"addr": "10.2.0.0", "len": 16}},
    )
    assert len(v.rules_in) == 2
    ports = v.rules_in[0][2]["match"]["right"]
    assert ports == {"set": [22, {"range": [8000, 8100]}]}


def test_a_single_peer_is_matched_inline():
    p = pol(
        [
            {
                "uuid": "r",
                "direction": "out",
                "action": "block",
                "protocol": "udp",
                "ports": "all",
                "peers": ["10.1.0.0/24", "10.1.0.9"],
            }
        ]
    )
    v = compile_policy(p)[MAC]
    assert v.sets == {}
    assert v.rules_out[0][1]["match"]["right"] == {"prefix": {"addr": "10.1.0.0", "len": 24}}
    assert v.rules_out[0][1]["match"]["left"]["payload"]["field"] == "daddr"


def test_icmp_types_with_and_without_codes():
    p = pol(
        [
            {
                "uuid": "i",
                "direction": "in",
                "action": "allow",
                "protocol": "icmp",
                "types": [[8, None], [3, 4], [11, 0], [8, 0]],
            }
        ]
    )
    v = compile_policy(p)[MAC]
    assert len(v.rules_in) == 2  # whole types; (type, code) pairs not covered by them
    pairs = v.rules_in[1][1]["match"]["right"]["set"]
    assert pairs == [{"concat": [3, 4]}, {"concat": [11, 0]}]


def _ops(cmds: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    out = []
    for c in cmds:
        ((op, body),) = c.items()
        ((kind, obj),) = body.items()
        out.append((op, kind, obj.get("name") or obj.get("chain") or ""))
    return out


def test_a_peer_change_rewrites_the_set_only():
    layout = TableLayout("t")
    rule = {
        "uuid": "r",
        "direction": "in",
        "action": "allow",
        "protocol": "tcp",
        "ports": [[22, 22]],
    }
    old = compile_policy(pol([{**rule, "peers": ["10.1.0.0/24", "10.4.0.1"]}]))
    new = compile_policy(pol([{**rule, "peers": ["10.1.0.0/24", "10.3.0.1"]}], 2))
    ops = _ops(layout.diff(old, {MAC: "p1"}, new, {MAC: "p1"}, 2))
    assert ("flush", "set", "v020000000001_in_r_4") in ops
    assert ("add", "element", "v020000000001_in_r_4") in ops
    assert not any(kind in ("chain", "rule") for _, kind, _ in ops), ops


def test_a_rule_change_rewrites_its_chain_only_and_no_change_is_no_command():
    layout = TableLayout("t")
    r1 = {"uuid": "r", "direction": "in", "action": "allow", "protocol": "tcp", "ports": [[22, 22]]}
    old = compile_policy(pol([r1], extra=True))
    assert layout.diff(old, {}, old, {}, 1) == []
    new = compile_policy(pol([{**r1, "ports": [[23, 23]]}], 2, extra=True))
    ops = _ops(layout.diff(old, {}, new, {}, 2))
    flushed = [name for op, kind, name in ops if op == "flush"]
    assert flushed == ["in_v020000000001"]
    assert not any("v020000000002" in name for _, _, name in ops)


def test_vnic_and_port_changes():
    layout = TableLayout("t")
    one = compile_policy(pol([]))
    two = compile_policy(pol([], extra=True))
    ops = _ops(layout.diff(one, {MAC: "p1"}, two, {MAC: "p1", OTHER: "p2"}, 2))
    assert ("add", "chain", "in_v020000000002") in ops
    assert ops.index(("add", "chain", "in_v020000000002")) < ops.index(
        ("add", "element", "in_ports")
    )
    ops = _ops(layout.diff(two, {MAC: "p1", OTHER: "p2"}, one, {MAC: "p9"}, 3))
    assert ("delete", "element", "in_ports") in ops and (
        "delete",
        "chain",
        "in_v020000000002",
    ) in ops
    assert ops.index(("delete", "element", "in_ports")) < ops.index(
        ("delete", "chain", "in_v020000000002")
    )
