"""The management API over real HTTP: every endpoint, every error class, and that a refused
request writes nothing. The server is `serve_api` on 127.0.0.1:0 in the test's nursery, in
front of a Directory on a temporary SQLite store."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from portolan.api import create_app, serve_api
from portolan.api.auth import token_matches
from portolan.errors import StoreUnavailable
from tests.portolan.conftest_api import (
    OWNER,
    TOKEN,
    ApiUnderTest,
    directory_and_api,
    new_uuid,
    running_api,
)


@pytest.fixture
async def api(tmp_path: Path) -> Any:
    async with directory_and_api(tmp_path) as running:
        yield running


@pytest.fixture
async def api_with_token(tmp_path: Path) -> Any:
    async with directory_and_api(tmp_path, token=TOKEN) as running:
        yield running


def field_codes(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert body["code"] == "InvalidParameters", body
    return {e["field"]: e["code"] for e in body["errors"]}


async def assert_nothing_written(api: ApiUnderTest, cn_uuids: list[str] = ()) -> None:
    assert await api.directory.list_vnics() == []
    for cn_uuid in cn_uuids:
        assert await api.directory.pending_log(cn_uuid) == []


# -- compute nodes -------------------------------------------------------------------------


async def test_cn_put_creates_then_updates_and_version_grows(api: ApiUnderTest) -> None:
    cn_uuid = new_uuid()
    r = await api.put(f"/cns/{cn_uuid}", {"ip": "192.168.1.1"})
    assert r.status_code == 201
    created = r.json()
    assert created["uuid"] == cn_uuid and created["ip"] == "192.168.1.1"
    assert created["port"] == 4789

    r = await api.put(f"/cns/{cn_uuid}", {"ip": "192.168.1.2", "port": 4790})
    assert r.status_code == 200
    updated = r.json()
    assert (updated["ip"], updated["port"]) == ("192.168.1.2", 4790)
    assert updated["version"] > created["version"]


async def test_cn_uuid_is_accepted_in_upper_case_and_shown_lower_case(api: ApiUnderTest) -> None:
    cn_uuid = new_uuid()
    r = await api.put(f"/cns/{cn_uuid.upper()}", {"ip": "192.168.1.9"})
    assert r.status_code == 201 and r.json()["uuid"] == cn_uuid
    assert (await api.get(f"/cns/{cn_uuid.upper()}")).json()["uuid"] == cn_uuid


async def test_cn_list_show_and_delete(api: ApiUnderTest) -> None:
    a = await api.cn("192.168.1.1")
    b = await api.cn("192.168.1.2")
    r = await api.get("/cns")
    assert r.status_code == 200
    assert sorted(c["uuid"] for c in r.json()) == sorted([a["uuid"], b["uuid"]])
    r = await api.get(f"/cns/{a['uuid']}")
    assert r.status_code == 200 and r.json() == a

    r = await api.delete(f"/cns/{a['uuid']}")
    assert r.status_code == 204 and r.content == b""
    r = await api.get(f"/cns/{a['uuid']}")
    assert r.status_code == 404 and r.json()["code"] == "ResourceNotFound"
    assert [c["uuid"] for c in (await api.get("/cns")).json()] == [b["uuid"]]


async def test_cn_underlay_ip_taken_by_another_cn_is_409_conflict(api: ApiUnderTest) -> None:
    await api.cn("192.168.1.1")
    other = new_uuid()
    r = await api.put(f"/cns/{other}", {"ip": "192.168.1.1"})
    assert r.status_code == 409
    assert r.json()["code"] == "Conflict"
    assert (await api.get(f"/cns/{other}")).status_code == 404


async def test_cn_delete_while_a_vnic_lives_there_is_409_in_use(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    await api.vnic(net["uuid"], cn["uuid"])
    r = await api.delete(f"/cns/{cn['uuid']}")
    assert r.status_code == 409 and r.json()["code"] == "InUse"
    assert (await api.get(f"/cns/{cn['uuid']}")).status_code == 200


async def test_cn_missing_is_404_for_get_and_delete(api: ApiUnderTest) -> None:
    for r in (await api.get(f"/cns/{new_uuid()}"), await api.delete(f"/cns/{new_uuid()}")):
        assert r.status_code == 404
        assert r.json()["code"] == "ResourceNotFound" and r.json()["message"]


# -- networks ------------------------------------------------------------------------------


async def test_network_create_list_show_delete(api: ApiUnderTest) -> None:
    r = await api.post(
        "/networks",
        {
            "name": "blue",
            "owner_uuid": OWNER,
            "vnet_id": 4242,
            "vlan_id": 12,
            "subnet": "10.9.0.0/24",
            "gateway": "10.9.0.1",
            "provision_start": "10.9.0.10",
            "provision_end": "10.9.0.20",
        },
    )
    assert r.status_code == 201, r.text
    net = r.json()
    assert net["name"] == "blue" and net["owner_uuid"] == OWNER
    assert (net["vnet_id"], net["vlan_id"], net["subnet"]) == (4242, 12, "10.9.0.0/24")
    assert (net["gateway"], net["provision_start"], net["provision_end"]) == (
        "10.9.0.1",
        "10.9.0.10",
        "10.9.0.20",
    )
    assert isinstance(net["version"], int)

    assert [n["uuid"] for n in (await api.get("/networks")).json()] == [net["uuid"]]
    assert (await api.get(f"/networks/{net['uuid']}")).json() == net

    r = await api.delete(f"/networks/{net['uuid']}")
    assert r.status_code == 204
    assert (await api.get(f"/networks/{net['uuid']}")).status_code == 404
    assert (await api.get("/networks")).json() == []


async def test_network_overlapping_subnet_in_same_vnet_is_refused(api: ApiUnderTest) -> None:
    await api.network(subnet="10.1.0.0/24", vnet_id=100)
    r = await api.post(
        "/networks",
        {
            "name": "overlap",
            "owner_uuid": OWNER,
            "vnet_id": 100,
            "vlan_id": 5,
            "subnet": "10.1.0.128/25",
        },
    )
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "Conflict"
    # The same subnet in another vnet is fine.
    await api.network(subnet="10.1.0.0/24", vnet_id=101)
    assert len((await api.get("/networks")).json()) == 2


async def test_network_delete_while_vnics_use_it_is_409_in_use(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    await api.vnic(net["uuid"], cn["uuid"])
    r = await api.delete(f"/networks/{net['uuid']}")
    assert r.status_code == 409 and r.json()["code"] == "InUse"
    assert (await api.get(f"/networks/{net['uuid']}")).status_code == 200


async def test_network_create_names_every_bad_field(api: ApiUnderTest) -> None:
    r = await api.post(
        "/networks",
        {
            "owner_uuid": "not-a-uuid",
            "vnet_id": 1 << 24,
            "vlan_id": 4095,
            "subnet": "10.0.0.1/24",
            "gateway": "10.0.0.300",
            "colour": "blue",
        },
    )
    assert r.status_code == 422
    assert field_codes(r) == {
        "name": "MissingParameter",
        "owner_uuid": "InvalidParameter",
        "vnet_id": "InvalidParameter",
        "vlan_id": "InvalidParameter",
        "subnet": "InvalidParameter",
        "gateway": "InvalidParameter",
        "colour": "UnknownParameters",
    }
    assert (await api.get("/networks")).json() == []


async def test_network_gateway_outside_subnet_is_422_from_the_directory(api: ApiUnderTest) -> None:
    r = await api.post(
        "/networks",
        {
            "name": "n",
            "owner_uuid": OWNER,
            "vnet_id": 1,
            "vlan_id": 0,
            "subnet": "10.0.0.0/24",
            "gateway": "10.0.1.1",
        },
    )
    assert r.status_code == 422
    assert "gateway" in field_codes(r)
    assert (await api.get("/networks")).json() == []


# -- VNICs ---------------------------------------------------------------------------------


async def test_vnic_create_allocates_mac_and_ip(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network(vnet_id=777, vlan_id=3, subnet="10.3.0.0/24")
    vnic = await api.vnic(net["uuid"], cn["uuid"])
    assert set(vnic) >= {
        "mac",
        "ip",
        "vnet_id",
        "vlan_id",
        "network_uuid",
        "cn_uuid",
        "belongs_to_uuid",
        "owner_uuid",
        "tags",
        "firewall_enabled",
        "version",
    }
    assert vnic["ip"].startswith("10.3.0.")
    assert (vnic["vnet_id"], vnic["vlan_id"]) == (777, 3)
    assert (vnic["network_uuid"], vnic["cn_uuid"]) == (net["uuid"], cn["uuid"])
    assert vnic["mac"] == vnic["mac"].lower() and len(vnic["mac"]) == 17
    assert vnic["firewall_enabled"] is False and vnic["tags"] == {}


async def test_vnic_create_with_every_field(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    vm, owner = new_uuid(), new_uuid()
    vnic = await api.vnic(
        net["uuid"],
        cn["uuid"],
        mac="0:A:95:9D:68:16",
        ip="10.1.0.77",
        belongs_to_uuid=vm,
        owner_uuid=owner,
        tags={"role": "web", "tier": 2, "public": True},
        firewall_enabled=True,
    )
    assert vnic["mac"] == "00:0a:95:9d:68:16"
    assert vnic["ip"] == "10.1.0.77"
    assert (vnic["belongs_to_uuid"], vnic["owner_uuid"]) == (vm, owner)
    assert vnic["tags"] == {"role": "web", "tier": 2, "public": True}
    assert vnic["firewall_enabled"] is True


@pytest.mark.parametrize(
    "spelling", ["00:0a:95:9d:68:16", "0:a:95:9d:68:16", "00-0A-95-9D-68-16", "0-a-95-9d-68-16"]
)
async def test_vnic_get_accepts_every_mac_spelling(api: ApiUnderTest, spelling: str) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    await api.vnic(net["uuid"], cn["uuid"], mac="00:0a:95:9d:68:16")
    r = await api.get(f"/vnics/{spelling}")
    assert r.status_code == 200, r.text
    assert r.json()["mac"] == "00:0a:95:9d:68:16"


async def test_vnic_list_filters(api: ApiUnderTest) -> None:
    cn1 = await api.cn("192.168.1.1")
    cn2 = await api.cn("192.168.1.2")
    other_owner = new_uuid()
    net_a = await api.network(vnet_id=10, subnet="10.1.0.0/24")
    net_b = await api.network(vnet_id=20, subnet="10.2.0.0/24")
    v1 = await api.vnic(net_a["uuid"], cn1["uuid"])
    v2 = await api.vnic(net_a["uuid"], cn2["uuid"], owner_uuid=other_owner)
    v3 = await api.vnic(net_b["uuid"], cn1["uuid"])

    async def macs(**params: Any) -> set[str]:
        r = await api.get("/vnics", **params)
        assert r.status_code == 200, r.text
        return {v["mac"] for v in r.json()}

    assert await macs() == {v1["mac"], v2["mac"], v3["mac"]}
    assert await macs(vnet_id=10) == {v1["mac"], v2["mac"]}
    assert await macs(cn_uuid=cn1["uuid"]) == {v1["mac"], v3["mac"]}
    assert await macs(network_uuid=net_b["uuid"]) == {v3["mac"]}
    assert await macs(owner_uuid=other_owner) == {v2["mac"]}
    assert await macs(vnet_id=10, cn_uuid=cn1["uuid"]) == {v1["mac"]}
    assert await macs(vnet_id=99) == set()


async def test_vnic_list_refuses_unknown_and_bad_filters(api: ApiUnderTest) -> None:
    r = await api.get("/vnics", vnet="10", cn_uuid="nope", vnet_id="x")
    assert r.status_code == 422
    assert field_codes(r) == {
        "vnet": "UnknownParameters",
        "cn_uuid": "InvalidParameter",
        "vnet_id": "InvalidParameter",
    }


async def test_vnic_update_each_field(api: ApiUnderTest) -> None:
    cn1 = await api.cn("192.168.1.1")
    cn2 = await api.cn("192.168.1.2")
    net = await api.network()
    vnic = await api.vnic(net["uuid"], cn1["uuid"], ip="10.1.0.5")
    path = f"/vnics/{vnic['mac']}"
    version = vnic["version"]

    async def put(body: dict[str, Any]) -> dict[str, Any]:
        nonlocal version
        r = await api.put(path, body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["version"] > version
        version = out["version"]
        return out

    assert (await put({"cn_uuid": cn2["uuid"]}))["cn_uuid"] == cn2["uuid"]
    assert (await put({"ip": "10.1.0.6"}))["ip"] == "10.1.0.6"
    assert (await put({"tags": {"role": "db"}}))["tags"] == {"role": "db"}
    assert (await put({"firewall_enabled": True}))["firewall_enabled"] is True
    vm = new_uuid()
    assert (await put({"belongs_to_uuid": vm}))["belongs_to_uuid"] == vm
    owner = new_uuid()
    assert (await put({"owner_uuid": owner}))["owner_uuid"] == owner
    cleared = await put({"owner_uuid": None, "belongs_to_uuid": None})
    assert cleared["owner_uuid"] is None and cleared["belongs_to_uuid"] is None
    # Everything stuck.
    final = (await api.get(path)).json()
    assert (final["cn_uuid"], final["ip"], final["tags"], final["firewall_enabled"]) == (
        cn2["uuid"],
        "10.1.0.6",
        {"role": "db"},
        True,
    )


async def test_vnic_update_refuses_null_for_fields_that_cannot_be_cleared(
    api: ApiUnderTest,
) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    vnic = await api.vnic(net["uuid"], cn["uuid"])
    r = await api.put(f"/vnics/{vnic['mac']}", {"cn_uuid": None, "ip": None, "bogus": 1})
    assert r.status_code == 422
    assert field_codes(r) == {
        "cn_uuid": "InvalidParameter",
        "ip": "InvalidParameter",
        "bogus": "UnknownParameters",
    }
    assert (await api.get(f"/vnics/{vnic['mac']}")).json() == vnic


async def test_vnic_update_to_unknown_cn_or_ip_outside_subnet_is_422(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    vnic = await api.vnic(net["uuid"], cn["uuid"])
    r = await api.put(f"/vnics/{vnic['mac']}", {"cn_uuid": new_uuid()})
    assert r.status_code == 422 and field_codes(r) == {"cn_uuid": "InvalidParameter"}
    r = await api.put(f"/vnics/{vnic['mac']}", {"ip": "10.200.0.1"})
    assert r.status_code == 422 and field_codes(r) == {"ip": "InvalidParameter"}
    assert (await api.get(f"/vnics/{vnic['mac']}")).json() == vnic


async def test_vnic_delete_then_404(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    vnic = await api.vnic(net["uuid"], cn["uuid"])
    r = await api.delete(f"/vnics/{vnic['mac'].upper()}")
    assert r.status_code == 204
    assert (await api.get(f"/vnics/{vnic['mac']}")).status_code == 404
    assert (await api.delete(f"/vnics/{vnic['mac']}")).status_code == 404
    r = await api.put(f"/vnics/{vnic['mac']}", {"firewall_enabled": True})
    assert r.status_code == 404 and r.json()["code"] == "ResourceNotFound"


async def test_vnic_duplicate_mac_is_409_and_writes_nothing(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    first = await api.vnic(net["uuid"], cn["uuid"], mac="02:00:00:00:00:01")
    log_before = await api.directory.pending_log(cn["uuid"])
    r = await api.post(
        "/vnics",
        {"network_uuid": net["uuid"], "cn_uuid": cn["uuid"], "mac": "2:0:0:0:0:1"},
    )
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "Conflict"
    assert [v["mac"] for v in (await api.get("/vnics")).json()] == [first["mac"]]
    assert await api.directory.pending_log(cn["uuid"]) == log_before


async def test_vnic_ip_taken_in_the_vnet_is_409(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    await api.vnic(net["uuid"], cn["uuid"], ip="10.1.0.50")
    r = await api.post(
        "/vnics", {"network_uuid": net["uuid"], "cn_uuid": cn["uuid"], "ip": "10.1.0.50"}
    )
    assert r.status_code == 409 and r.json()["code"] == "Conflict"
    other = await api.vnic(net["uuid"], cn["uuid"], ip="10.1.0.51")
    r = await api.put(f"/vnics/{other['mac']}", {"ip": "10.1.0.50"})
    assert r.status_code == 409 and r.json()["code"] == "Conflict"
    assert len((await api.get("/vnics")).json()) == 2


async def test_full_slash_30_network_is_507_subnet_full(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network(subnet="10.4.0.0/30")
    made = []
    for _ in range(4):
        r = await api.post("/vnics", {"network_uuid": net["uuid"], "cn_uuid": cn["uuid"]})
        if r.status_code != 201:
            break
        made.append(r.json()["ip"])
    assert sorted(made) == ["10.4.0.1", "10.4.0.2"]
    assert r.status_code == 507
    assert r.json()["code"] == "SubnetFull" and r.json()["message"]
    assert len((await api.get("/vnics")).json()) == 2


async def test_vnic_on_unknown_network_and_cn_names_both(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    r = await api.post("/vnics", {"network_uuid": new_uuid(), "cn_uuid": new_uuid()})
    assert r.status_code == 422
    assert field_codes(r) == {"network_uuid": "InvalidParameter", "cn_uuid": "InvalidParameter"}
    await assert_nothing_written(api, [cn["uuid"]])


# -- request validation --------------------------------------------------------------------


async def test_three_bad_fields_give_three_errors_and_nothing_is_written(
    api: ApiUnderTest,
) -> None:
    cn = await api.cn("192.168.1.1")
    r = await api.post(
        "/vnics",
        {"network_uuid": "nope", "cn_uuid": cn["uuid"], "mac": "zz:00:00:00:00:01", "ip": "1.2.3"},
    )
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "InvalidParameters" and body["message"]
    assert len(body["errors"]) == 3
    assert field_codes(r) == {
        "network_uuid": "InvalidParameter",
        "mac": "InvalidParameter",
        "ip": "InvalidParameter",
    }
    for err in body["errors"]:
        assert err["message"]
    await assert_nothing_written(api, [cn["uuid"]])


async def test_missing_fields_are_missing_parameter(api: ApiUnderTest) -> None:
    r = await api.post("/vnics", {})
    assert r.status_code == 422
    assert field_codes(r) == {"network_uuid": "MissingParameter", "cn_uuid": "MissingParameter"}
    assert r.json()["message"].startswith("Missing parameters")


async def test_nested_bad_field_is_named_by_dotted_path(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    r = await api.post(
        "/vnics",
        {"network_uuid": net["uuid"], "cn_uuid": cn["uuid"], "tags": {"role": ["a", "b"]}},
    )
    assert r.status_code == 422
    assert {f.split(".")[0] for f in field_codes(r)} == {"tags"}
    assert all(f.startswith("tags.role") for f in field_codes(r))
    await assert_nothing_written(api, [cn["uuid"]])


async def test_unknown_field_is_refused(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    net = await api.network()
    r = await api.post(
        "/vnics", {"network_uuid": net["uuid"], "cn_uuid": cn["uuid"], "firewall": True}
    )
    assert r.status_code == 422
    assert field_codes(r) == {"firewall": "UnknownParameters"}
    await assert_nothing_written(api, [cn["uuid"]])


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"network_uuid": ', {"Content-Type": "application/json"}),
        (b"{'single': 'quotes'}", {"Content-Type": "application/json"}),
        (b'{"ip": "10.0.0.1",}', {}),
    ],
)
async def test_malformed_json_is_422_on_field_body(
    api: ApiUnderTest, content: bytes, headers: dict[str, str]
) -> None:
    cn = await api.cn("192.168.1.1")
    r = await api.client.post("/vnics", content=content, headers=headers)
    assert r.status_code == 422
    assert field_codes(r) == {"body": "InvalidParameter"}
    r = await api.client.put(f"/cns/{cn['uuid']}", content=content, headers=headers)
    assert r.status_code == 422
    assert field_codes(r) == {"body": "InvalidParameter"}
    assert (await api.get(f"/cns/{cn['uuid']}")).json() == cn
    await assert_nothing_written(api, [cn["uuid"]])


async def test_body_that_is_not_an_object_or_is_absent_is_422(api: ApiUnderTest) -> None:
    r = await api.post("/networks", [1, 2, 3])
    assert r.status_code == 422 and field_codes(r) == {"body": "InvalidParameter"}
    r = await api.client.post("/networks")
    assert r.status_code == 422 and field_codes(r) == {"body": "MissingParameter"}


async def test_wrong_types_are_not_coerced(api: ApiUnderTest) -> None:
    r = await api.put(f"/cns/{new_uuid()}", {"ip": "192.168.1.1", "port": "4789"})
    assert r.status_code == 422 and field_codes(r) == {"port": "InvalidParameter"}
    r = await api.put(f"/cns/{new_uuid()}", {"ip": "192.168.1.1", "port": 0})
    assert r.status_code == 422 and field_codes(r) == {"port": "InvalidParameter"}
    assert (await api.get("/cns")).json() == []


async def test_bad_path_parameters_are_422(api: ApiUnderTest) -> None:
    r = await api.get("/vnics/not-a-mac")
    assert r.status_code == 422 and field_codes(r) == {"mac": "InvalidParameter"}
    r = await api.put("/cns/not-a-uuid", {"ip": "not-an-ip"})
    assert r.status_code == 422
    assert field_codes(r) == {"uuid": "InvalidParameter", "ip": "InvalidParameter"}
    r = await api.get("/networks/123")
    assert r.status_code == 422 and field_codes(r) == {"uuid": "InvalidParameter"}


async def test_unknown_route_and_method_are_json(api: ApiUnderTest) -> None:
    r = await api.get("/no/such/thing")
    assert r.status_code == 404
    assert r.json()["code"] == "ResourceNotFound" and r.json()["message"]
    r = await api.client.patch("/cns")
    assert r.status_code == 405
    assert set(r.json()) >= {"code", "message"}


# -- auth ----------------------------------------------------------------------------------


async def test_writes_need_the_token_and_reads_do_not(api_with_token: ApiUnderTest) -> None:
    api = api_with_token
    cn_uuid = new_uuid()
    body = {"ip": "192.168.1.1"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = await api.client.put(f"/cns/{cn_uuid}", json=body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["code"] == "Unauthorized" and r.json()["message"]
        assert r.headers["www-authenticate"].lower().startswith("bearer")
    assert (await api.client.get("/cns")).json() == []

    r = await api.client.put(
        f"/cns/{cn_uuid}", json=body, headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert r.status_code == 201
    net = await api.network()
    vnic = await api.vnic(net["uuid"], cn_uuid)

    # Reads are open.
    for path in ("/cns", f"/cns/{cn_uuid}", "/networks", "/vnics", f"/vnics/{vnic['mac']}"):
        assert (await api.client.get(path)).status_code == 200, path

    # Every write route refuses an anonymous client, and nothing changes.
    anonymous = [
        api.client.put(f"/cns/{new_uuid()}", json=body),
        api.client.delete(f"/cns/{cn_uuid}"),
        api.client.post("/networks", json={"name": "x"}),
        api.client.delete(f"/networks/{net['uuid']}"),
        api.client.post("/vnics", json={"network_uuid": net["uuid"], "cn_uuid": cn_uuid}),
        api.client.put(f"/vnics/{vnic['mac']}", json={"firewall_enabled": True}),
        api.client.delete(f"/vnics/{vnic['mac']}"),
        api.client.post("/vnics", content=b"{not json"),
    ]
    for request in anonymous:
        r = await request
        assert r.status_code == 401, r.request.url
    assert [v["mac"] for v in (await api.get("/vnics")).json()] == [vnic["mac"]]
    assert (await api.get(f"/vnics/{vnic['mac']}")).json() == vnic
    assert len((await api.get("/cns")).json()) == 1
    assert len((await api.get("/networks")).json()) == 1


# -- store outage, OpenAPI, metrics --------------------------------------------------------


class UnreachableStoreDirectory:
    """Stands in for a Directory whose store is down."""

    async def list_cns(self) -> list[Any]:
        raise StoreUnavailable("the store at sqlite:/gone cannot be reached")

    async def put_cn(self, uuid: str, ip: str, port: int = 4789) -> Any:
        raise StoreUnavailable("the store at sqlite:/gone cannot be reached")


async def test_store_unavailable_is_503_service_unavailable() -> None:
    async with running_api(UnreachableStoreDirectory()) as api:
        r = await api.get("/cns")
        assert r.status_code == 503
        assert r.json() == {
            "code": "ServiceUnavailable",
            "message": "the store at sqlite:/gone cannot be reached",
        }
        r = await api.put(f"/cns/{new_uuid()}", {"ip": "192.168.1.1"})
        assert r.status_code == 503


async def test_openapi_document_lists_every_route(api: ApiUnderTest) -> None:
    r = await api.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert set(paths["/cns/{uuid}"]) == {"put", "get", "delete"}
    assert set(paths["/cns"]) == {"get"}
    assert set(paths["/networks"]) == {"get", "post"}
    assert set(paths["/networks/{uuid}"]) == {"get", "delete"}
    assert set(paths["/vnics"]) == {"get", "post"}
    assert set(paths["/vnics/{mac}"]) == {"get", "put", "delete"}


async def test_openapi_declares_bearer_auth_on_writes_when_a_token_is_set(
    api_with_token: ApiUnderTest,
) -> None:
    doc = (await api_with_token.get("/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/vnics"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/vnics"]["get"]


async def test_requests_are_counted_by_method_route_and_status(api: ApiUnderTest) -> None:
    cn = await api.cn("192.168.1.1")
    await api.get(f"/cns/{cn['uuid']}")
    await api.get(f"/cns/{new_uuid()}")
    await api.get("/nowhere")
    registry: CollectorRegistry = api.registry

    def count(method: str, route: str, status: str) -> float | None:
        return registry.get_sample_value(
            "portolan_api_requests_total", {"method": method, "route": route, "status": status}
        )

    assert count("PUT", "/cns/{uuid}", "201") == 1
    assert count("GET", "/cns/{uuid}", "200") == 1
    assert count("GET", "/cns/{uuid}", "404") == 1
    assert count("GET", "unmatched", "404") == 1
    n = registry.get_sample_value(
        "portolan_api_request_duration_seconds_count", {"method": "GET", "route": "/cns/{uuid}"}
    )
    assert n == 2


async def test_unauthorized_requests_are_counted_under_their_route(
    api_with_token: ApiUnderTest,
) -> None:
    await api_with_token.client.delete(f"/cns/{new_uuid()}")
    value = api_with_token.registry.get_sample_value(
        "portolan_api_requests_total",
        {"method": "DELETE", "route": "/cns/{uuid}", "status": "401"},
    )
    assert value == 1


def test_token_matching_is_exact_and_scheme_is_case_insensitive() -> None:
    token = b"s3cret"
    assert token_matches(b"Bearer s3cret", token)
    assert token_matches(b"bearer s3cret", token)
    assert not token_matches(None, token)
    assert not token_matches(b"s3cret", token)
    assert not token_matches(b"Basic s3cret", token)
    assert not token_matches(b"Bearer s3cre", token)
    assert not token_matches(b"Bearer s3cret2", token)
    assert not token_matches(b"Bearer ", token)


class BrokenDirectory:
    async def list_networks(self) -> list[Any]:
        raise RuntimeError("a bug")


async def test_unexpected_errors_are_500_json_and_the_server_keeps_serving() -> None:
    async with running_api(BrokenDirectory()) as api:
        r = await api.get("/networks")
        assert r.status_code == 500
        assert r.json()["code"] == "InternalError" and r.json()["message"]
        assert (await api.get("/ping")).json() == {"status": "ok"}


async def test_serve_api_reports_the_bound_port_and_stops_on_shutdown() -> None:
    app = create_app(BrokenDirectory(), token=None)
    shutdown = trio.Event()
    with trio.fail_after(10):  # the nursery exits only once serve_api has returned
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                functools.partial(serve_api, app, "127.0.0.1", 0, shutdown=shutdown)
            )
            assert host == "127.0.0.1" and port > 0
            async with httpx.AsyncClient() as client:
                r = await client.get(f"http://{host}:{port}/ping")
                assert r.status_code == 200
            shutdown.set()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"http://{host}:{port}/ping")
