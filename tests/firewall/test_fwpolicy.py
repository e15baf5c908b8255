"""The policy document (protocol/fwpolicy.py): what validates, what does not, and where."""

from __future__ import annotations

import copy
from ipaddress import ip_network
from typing import Any

import pytest

from protocol.fwpolicy import Policy, PolicyError, from_json, to_json

MAC = "02:00:00:00:00:01"


def good_doc() -> dict[str, Any]:
    return {
        "version": 1,
        "cn_uuid": "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd",
        "generation": 17,
        "vnics": {
            MAC: {
                "ips": ["10.0.0.5", "fd00::5"],
                "vnet_id": 12340,
                "rules": [
                    {
                        "uuid": "r1",
                        "direction": "in",
                        "action": "allow",
                        "priority": 0,
                        "protocol": "tcp",
                        "ports": [[22, 22], [8000, 8100]],
                        "peers": ["10.0.0.0/24", "fd00::1/128"],
                        "log": False,
                    },
                    {
                        "uuid": "r2",
                        "direction": "in",
                        "action": "allow",
                        "priority": 3,
                        "protocol": "icmp",
                        "types": [[8, 0], [3, None]],
                        "peers": "any",
                    },
                    {
                        "uuid": "r3",
                        "direction": "out",
                        "action": "block",
                        "priority": 100,
                        "protocol": "esp",
                        "peers": ["192.0.2.7"],
                        "log": True,
                    },
                    {
                        "uuid": "r4",
                        "direction": "in",
                        "action": "allow",
                        "priority": 0,
                        "protocol": "udp",
                        "ports": "all",
                        "peers": "any",
                    },
                    {
                        "uuid": "r5",
                        "direction": "in",
                        "action": "allow",
                        "priority": 0,
                        "protocol": "icmp6",
                        "types": "all",
                        "peers": ["fe80::/64"],
                    },
                ],
            }
        },
    }


def test_good_document_builds_typed_policy():
    policy = from_json(good_doc())
    assert isinstance(policy, Policy)
    assert (policy.version, policy.cn_uuid, policy.generation) == (
        1,
        "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd",
        17,
    )
    vnic = policy.vnic(bytes.fromhex("020000000001"))
    assert vnic is not None and vnic.ips == ("10.0.0.5", "fd00::5") and vnic.vnet_id == 12340
    r1, r2, r3, r4, r5 = vnic.rules
    assert r1.ports == ((22, 22), (8000, 8100)) and r1.types is None
    assert r1.peers == (ip_network("10.0.0.0/24"), ip_network("fd00::1/128"))
    assert r2.types == ((8, 0), (3, None)) and r2.peers == "any" and r2.log is False
    assert r3.ports is None and r3.types is None and r3.log is True
    assert r3.peers == (ip_network("192.0.2.7/32"),) and r3.protocol_number == 50
    assert r4.ports == "all" and r5.types == "all"


def test_to_json_is_canonical_and_round_trips():
    doc = good_doc()
    out = to_json(from_json(doc))
    assert out["vnics"][MAC]["rules"][2]["peers"] == ["192.0.2.7/32"]
    assert out["vnics"][MAC]["rules"][1]["log"] is False
    assert from_json(out) == from_json(doc)
    assert to_json(from_json(out)) == out


def test_mac_keys_are_normalised_and_empty_policy_is_valid():
    doc = good_doc()
    doc["vnics"] = {"2:0:0:0:0:1": doc["vnics"][MAC]}
    assert list(from_json(doc).vnics) == [MAC]
    empty = from_json({"version": 1, "cn_uuid": "cn", "generation": 0, "vnics": {}})
    assert empty.vnics == {}


def test_unknown_keys_are_ignored_for_forward_compatibility():
    doc = good_doc()
    doc["extra"] = 1
    doc["vnics"][MAC]["owner"] = "x"
    doc["vnics"][MAC]["rules"][0]["description"] = "ssh"
    assert from_json(doc) == from_json(good_doc())


R = f'vnics["{MAC}"].rules'


def _set(path: list[Any], value: Any) -> dict[str, Any]:
    doc = good_doc()
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


_DELETE = object()
V = ["vnics", MAC]
RULE0 = [*V, "rules", 0]


@pytest.mark.parametrize(
    ("path", "value", "error_path", "words"),
    [
        (["version"], 2, "version", "unsupported"),
        (["version"], True, "version", "unsupported"),
        (["generation"], -1, "generation", "0.."),
        (["generation"], "17", "generation", "integer"),
        (["cn_uuid"], "", "cn_uuid", "non-empty"),
        (["vnics"], [], "vnics", "object"),
        ([*V, "ips"], ["10.0.0.300"], f'vnics["{MAC}"].ips[0]', "not an IP"),
        ([*V, "vnet_id"], 1 << 24, f'vnics["{MAC}"].vnet_id', "0..16777215"),
        ([*V, "rules"], _DELETE, f'vnics["{MAC}"].rules', "missing"),
        ([*RULE0, "direction"], "both", f"{R}[0].direction", "in, out"),
        ([*RULE0, "action"], "deny", f"{R}[0].action", "allow, block"),
        ([*RULE0, "priority"], 101, f"{R}[0].priority", "0..100"),
        ([*RULE0, "priority"], True, f"{R}[0].priority", "integer"),
        ([*RULE0, "protocol"], "gre", f"{R}[0].protocol", "one of"),
        ([*RULE0, "uuid"], _DELETE, f"{R}[0].uuid", "missing"),
        ([*RULE0, "ports"], _DELETE, f"{R}[0].ports", "missing"),
        ([*RULE0, "ports"], [], f"{R}[0].ports", "empty"),
        ([*RULE0, "ports"], [[22]], f"{R}[0].ports[0]", "[start, end]"),
        ([*RULE0, "ports"], [[22, 22], [9, 70000]], f"{R}[0].ports[1][1]", "1..65535"),
        ([*RULE0, "ports"], [[90, 80]], f"{R}[0].ports[0]", "above its end"),
        ([*RULE0, "types"], "all", f"{R}[0].types", "not types"),
        ([*RULE0, "peers"], ["10.0.0.1/24"], f"{R}[0].peers[0]", "host bits"),
        ([*RULE0, "peers"], ["nonsense"], f"{R}[0].peers[0]", "prefix"),
        ([*RULE0, "peers"], [], f"{R}[0].peers", "empty"),
        ([*RULE0, "peers"], "all", f"{R}[0].peers", "array"),
        ([*RULE0, "log"], "false", f"{R}[0].log", "boolean"),
        ([*V, "rules", 1, "types"], [[8, 256]], f"{R}[1].types[0][1]", "0..255"),
        ([*V, "rules", 1, "types"], _DELETE, f"{R}[1].types", "missing"),
        ([*V, "rules", 1, "peers"], ["fd00::/64"], f"{R}[1].peers[0]", "IPv4 peers only"),
        ([*V, "rules", 4, "peers"], ["10.0.0.0/8"], f"{R}[4].peers[0]", "IPv6 peers only"),
        ([*V, "rules", 2, "ports"], "all", f"{R}[2].ports", "no ports"),
    ],
)
def test_bad_field_is_reported_with_its_path(path, value, error_path, words):
    with pytest.raises(PolicyError) as info:
        from_json(_set(path, value))
    assert info.value.path == error_path
    assert words in str(info.value)
    assert str(info.value).startswith(error_path + ": ")


def test_bad_mac_key_and_duplicate_spellings_are_refused():
    doc = good_doc()
    doc["vnics"]["not-a-mac"] = copy.deepcopy(doc["vnics"][MAC])
    with pytest.raises(PolicyError) as info:
        from_json(doc)
    assert info.value.path == 'vnics["not-a-mac"]'
    doc = good_doc()
    doc["vnics"]["02-00-00-00-00-01"] = copy.deepcopy(doc["vnics"][MAC])
    with pytest.raises(PolicyError, match="twice"):
        from_json(doc)


def test_non_object_document_is_refused():
    with pytest.raises(PolicyError, match="expected an object"):
        from_json([])
    with pytest.raises(PolicyError) as info:
        from_json({"version": 1, "generation": 1, "vnics": {}})
    assert info.value.path == "cn_uuid"
