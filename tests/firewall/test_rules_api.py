"""Firewall rules over real HTTP: CRUD, filters, validation with the rule language's messages,
404/401, and the two "which applies to what" views (``/rules/{uuid}/vnics`` and
``/firewalls/vnics/{mac}``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.portolan.conftest_api import OWNER, TOKEN, ApiUnderTest, directory_and_api, new_uuid

OTHER = "5a0a2b39-52a1-4b8c-a6a7-2b0a1b2d4a51"
VM1 = "8a343ca8-b42a-4a27-a9c5-800f57d1e8ed"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiUnderTest]:
    async with directory_and_api(tmp_path, token=TOKEN) as api:
        yield api


async def make_rule(api: ApiUnderTest, text: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"rule": text, **fields}
    if "owner_uuid" not in body and "global" not in body:
        body["owner_uuid"] = OWNER
    r = await api.post("/rules", body)
    assert r.status_code == 201, r.text
    return r.json()


async def fabric(api: ApiUnderTest) -> dict[str, Any]:
    """Two CNs, one network, three VNICs: www (VM1, owner), db (owner), www of another owner."""
    cn1, cn2 = await api.cn("192.168.0.1"), await api.cn("192.168.0.2")
    net = await api.network()
    www = await api.vnic(
        net["uuid"],
        cn1["uuid"],
        owner_uuid=OWNER,
        belongs_to_uuid=VM1,
        tags={"role": "www", "tier": 2},
        firewall_enabled=True,
    )
    db = await api.vnic(net["uuid"], cn2["uuid"], owner_uuid=OWNER, tags={"role": "db"})
    alien = await api.vnic(
        net["uuid"], cn2["uuid"], owner_uuid=OTHER, tags={"role": "www", "tier": 1}
    )
    return {"cn1": cn1, "cn2": cn2, "www": www, "db": db, "alien": alien}


# -- CRUD -----------------------------------------------------------------------------------


async def test_create_returns_canonical_rule_with_defaults(api: ApiUnderTest) -> None:
    created = await make_rule(api, "from any to all vms allow tcp ports 80,443")
    assert created["rule"] == "FROM any TO all vms ALLOW tcp (PORT 80 AND PORT 443)"
    assert created["owner_uuid"] == OWNER and created["global"] is False
    assert created["enabled"] is False and created["log"] is False
    assert created["description"] is None and isinstance(created["version"], int)
    got = await api.get(f"/rules/{created['uuid']}")
    assert got.status_code == 200 and got.json() == created


async def test_create_global_with_given_uuid_and_fields(api: ApiUnderTest) -> None:
    uuid = new_uuid()
    created = await make_rule(
        api,
        "FROM any TO all vms ALLOW icmp TYPE 8 CODE 0",
        uuid=uuid,
        enabled="true",
        log=True,
        description="ping",
        **{"global": True},
    )
    assert created["uuid"] == uuid
    assert created["global"] is True and created["owner_uuid"] is None
    assert (created["enabled"], created["log"], created["description"]) == (True, True, "ping")
    again = await api.post("/rules", {"rule": created["rule"], "uuid": uuid, "global": True})
    assert again.status_code == 409 and again.json()["code"] == "Conflict"


async def test_update_merges_bumps_version_and_keeps_uuid(api: ApiUnderTest) -> None:
    created = await make_rule(api, "FROM any TO tag web ALLOW tcp PORT 80", description="d")
    path = f"/rules/{created['uuid']}"
    r = await api.put(path, {"enabled": True})
    assert r.status_code == 200, r.text
    updated = r.json()
    assert updated["enabled"] is True and updated["rule"] == created["rule"]
    assert updated["description"] == "d" and updated["version"] > created["version"]
    # switching to global drops the owner; the text changes too
    r = await api.put(path, {"global": True, "rule": "FROM any TO tag web ALLOW tcp PORT 81"})
    assert r.status_code == 200, r.text
    assert r.json()["global"] is True and r.json()["owner_uuid"] is None
    assert r.json()["rule"].endswith("PORT 81") and r.json()["version"] > updated["version"]
    # and back to an owner; description removed with null
    r = await api.put(path, {"owner_uuid": OTHER, "description": None})
    assert r.json()["owner_uuid"] == OTHER and r.json()["global"] is False
    assert r.json()["description"] is None
    # a change that changes nothing keeps the version
    same = await api.put(path, {"owner_uuid": OTHER})
    assert same.status_code == 200 and same.json()["version"] == r.json()["version"]
    # the uuid cannot change
    bad = await api.put(path, {"uuid": new_uuid()})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "uuid"


async def test_delete_then_404(api: ApiUnderTest) -> None:
    created = await make_rule(api, "FROM any TO all vms ALLOW tcp PORT 22")
    path = f"/rules/{created['uuid']}"
    r = await api.delete(path)
    assert r.status_code == 204 and r.content == b""
    for response in (
        await api.get(path),
        await api.put(path, {"enabled": True}),
        await api.delete(path),
        await api.get(f"{path}/vnics"),
    ):
        assert response.status_code == 404
        assert response.json()["code"] == "ResourceNotFound"


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            {"rule": "FROM any TO all vms ALLOW Tcp port 22", "owner_uuid": OWNER},
            "rule",
            "Error at character 25: 'Tcp', expected: 'TCP', 'UDP', 'ICMP', 'ICMP6', 'AH', "
            "'ESP', found: word",
        ),
        (
            {"rule": "FROM any TO any ALLOW tcp port 22", "owner_uuid": OWNER},
            "rule",
            "rule does not affect VMs",
        ),
        (
            {"rule": "FROM tag foo TO subnet 10.8.0.0/5 ALLOW udp port 53", "owner_uuid": OWNER},
            "rule",
            'Subnet "10.8.0.0/5" is invalid (bits set to right of mask)',
        ),
        ({"rule": "FROM any TO all vms ALLOW tcp PORT 22"}, "owner_uuid", "owner_uuid required"),
        (
            {"rule": "FROM any TO all vms ALLOW tcp PORT 22", "owner_uuid": OWNER, "global": True},
            "global",
            "cannot specify both global and owner_uuid",
        ),
        ({"owner_uuid": OWNER}, "rule", "No rule specified"),
        (
            {"rule": "FROM any TO all vms ALLOW tcp PORT 22", "owner_uuid": "nope"},
            "owner_uuid",
            "Invalid owner UUID",
        ),
        (
            {"rule": "FROM any TO all vms ALLOW tcp PORT 22", "global": True, "enabled": "yes"},
            "enabled",
            "enabled must be true or false",
        ),
        (
            {"rule": "FROM any TO all vms ALLOW tcp PORT 22", "global": True, "colour": 1},
            "colour",
            "unknown parameter 'colour'",
        ),
    ],
)
async def test_invalid_payloads_are_422_with_the_parsers_message(
    api: ApiUnderTest, body: dict[str, Any], field: str, message: str
) -> None:
    r = await api.post("/rules", body)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert payload["code"] == "InvalidParameters"
    assert {"field": field, "message": message} in [
        {"field": e["field"], "message": e["message"]} for e in payload["errors"]
    ]


async def test_several_bad_fields_are_all_reported(api: ApiUnderTest) -> None:
    r = await api.post(
        "/rules", {"rule": "invalid", "uuid": "invalid", "owner_uuid": "x", "log": "x"}
    )
    assert r.status_code == 422
    body = r.json()
    assert body["message"].startswith("first of 4 errors: Error at character 0")
    assert sorted(e["field"] for e in body["errors"]) == ["log", "owner_uuid", "rule", "uuid"]


async def test_update_is_validated_against_the_merged_rule(api: ApiUnderTest) -> None:
    created = await make_rule(api, "FROM any TO all vms ALLOW tcp PORT 22")
    r = await api.put(f"/rules/{created['uuid']}", {"rule": "FROM any TO any ALLOW tcp PORT 1"})
    assert r.status_code == 422
    assert r.json()["errors"][0] == {
        "field": "rule",
        "code": "InvalidParameter",
        "message": "rule does not affect VMs",
    }
    assert (await api.get(f"/rules/{created['uuid']}")).json() == created


async def test_writes_need_the_token_reads_do_not(api: ApiUnderTest) -> None:
    created = await make_rule(api, "FROM any TO all vms ALLOW tcp PORT 22")
    path = f"/rules/{created['uuid']}"
    body = {"rule": "FROM any TO all vms ALLOW tcp PORT 23", "owner_uuid": OWNER}
    for r in (
        await api.client.post("/rules", json=body),
        await api.client.put(path, json={"enabled": True}),
        await api.client.delete(path),
        await api.client.post("/rules", json=body, headers={"Authorization": "Bearer wrong"}),
    ):
        assert r.status_code == 401 and r.json()["code"] == "Unauthorized"
    assert (await api.client.get(path)).status_code == 200
    assert len((await api.client.get("/rules")).json()) == 1


# -- filters ---------------------------------------------------------------------------------


async def test_list_filters(api: ApiUnderTest) -> None:
    f = await fabric(api)
    r_owner = await make_rule(api, "FROM any TO tag role = www ALLOW tcp PORT 80", enabled=True)
    r_vm = await make_rule(api, f"FROM any TO vm {VM1} ALLOW tcp PORT 81")
    r_other = await make_rule(api, "FROM any TO tag tier ALLOW tcp PORT 82", owner_uuid=OTHER)
    r_global = await make_rule(
        api, "FROM any TO all vms ALLOW icmp TYPE 8", enabled=True, **{"global": True}
    )
    r_db = await make_rule(api, "FROM tag role = db TO any BLOCK tcp PORT 25 PRIORITY 1")

    async def uuids(**params: Any) -> set[str]:
        r = await api.get("/rules", **params)
        assert r.status_code == 200, r.text
        return {x["uuid"] for x in r.json()}

    everything = {r["uuid"] for r in (r_owner, r_vm, r_other, r_global, r_db)}
    assert await uuids() == everything
    assert await uuids(owner_uuid=OWNER) == {r_owner["uuid"], r_vm["uuid"], r_db["uuid"]}
    assert await uuids(owner_uuid=OTHER) == {r_other["uuid"]}
    assert await uuids(enabled="true") == {r_owner["uuid"], r_global["uuid"]}
    assert await uuids(enabled="false") == {r_vm["uuid"], r_other["uuid"], r_db["uuid"]}
    assert await uuids(**{"global": "true"}) == {r_global["uuid"]}
    assert await uuids(**{"global": "false"}) == everything - {r_global["uuid"]}
    assert await uuids(tag="role") == {r_owner["uuid"], r_db["uuid"]}
    assert await uuids(tag="role=db") == {r_db["uuid"]}
    assert await uuids(tag="tier=7") == {r_other["uuid"]}  # a bare tag names every value
    assert await uuids(tag=["tier", "role=www"]) == {r_owner["uuid"], r_other["uuid"]}
    assert await uuids(tag="nothing") == set()
    # vnic: the owner's rules and global rules that name it (tag, vm, all vms)
    www = f["www"]["mac"]
    assert await uuids(vnic=www) == {r_owner["uuid"], r_vm["uuid"], r_global["uuid"]}
    assert await uuids(vnic=f["alien"]["mac"]) == {r_other["uuid"], r_global["uuid"]}
    assert await uuids(vnic=www, enabled="true", owner_uuid=OWNER) == {r_owner["uuid"]}
    assert await uuids(vnic="02:00:00:00:00:99") == set()
    bad = await api.get("/rules", vnic="not-a-mac")
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "vnic"
    bad = await api.get("/rules", enabled="maybe")
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "enabled"


# -- which applies to what ------------------------------------------------------------------------


async def test_rule_vnics_and_vnic_rules(api: ApiUnderTest) -> None:
    f = await fabric(api)
    www, db, alien = f["www"]["mac"], f["db"]["mac"], f["alien"]["mac"]
    tag_rule = await make_rule(api, "FROM tag role = www TO tag role = db ALLOW tcp PORT 5432")
    vm_rule = await make_rule(api, f"FROM any TO vm {VM1} ALLOW tcp PORT 443", enabled=True)
    all_global = await make_rule(
        api, "FROM any TO all vms ALLOW tcp PORT 22", enabled=True, **{"global": True}
    )
    ip_other = await make_rule(
        api, "FROM ip 10.9.9.9 TO tag role ALLOW tcp PORT 80", owner_uuid=OTHER
    )

    async def vnics_of(rule: dict[str, Any]) -> list[str]:
        r = await api.get(f"/rules/{rule['uuid']}/vnics")
        assert r.status_code == 200, r.text
        return [v["mac"] for v in r.json()]

    assert await vnics_of(tag_rule) == sorted([www, db])  # alien is another owner's
    assert await vnics_of(vm_rule) == [www]
    assert await vnics_of(all_global) == sorted([www, db, alien])
    assert await vnics_of(ip_other) == [alien]

    async def rules_of(mac: str) -> set[str]:
        r = await api.get(f"/firewalls/vnics/{mac}")
        assert r.status_code == 200, r.text
        return {x["uuid"] for x in r.json()}

    # disabled rules (tag_rule, ip_other) are included, as FWAPI does
    assert await rules_of(www) == {tag_rule["uuid"], vm_rule["uuid"], all_global["uuid"]}
    assert await rules_of(db) == {tag_rule["uuid"], all_global["uuid"]}
    assert await rules_of(alien) == {all_global["uuid"], ip_other["uuid"]}

    # a VNIC change is seen at once: db stops being a db
    r = await api.put(f"/vnics/{db}", {"tags": {"role": "cache"}})
    assert r.status_code == 200
    assert await vnics_of(tag_rule) == [www]
    assert await rules_of(db) == {all_global["uuid"]}

    missing = await api.get("/firewalls/vnics/02:00:00:00:00:99")
    assert missing.status_code == 404 and missing.json()["code"] == "ResourceNotFound"
    assert (await api.get("/firewalls/vnics/zz")).status_code == 422
