"""``portolan rule ...`` as an operator runs it: a real ``portolan serve`` process and the CLI as
subprocesses (the fixture and helpers of tests/portolan/test_admin_cli.py)."""

from __future__ import annotations

from tests.portolan.conftest_api import OWNER, new_uuid
from tests.portolan.test_admin_cli import Server, cli, ok, server  # noqa: F401 (fixture)


async def test_rule_commands(server: Server) -> None:  # noqa: F811
    added = (
        await ok(
            server,
            "rule",
            "add",
            "from any to tag role = www allow tcp port 80",
            "--owner-uuid",
            OWNER,
            "--enabled",
            "--description",
            "web",
            "--json",
        )
    ).json()
    assert isinstance(added, dict)
    uuid = added["uuid"]
    assert added["rule"] == 'FROM any TO tag "role" = "www" ALLOW tcp PORT 80'
    assert added["enabled"] is True and added["owner_uuid"] == OWNER

    glob = (
        await ok(
            server, "rule", "add", "FROM any TO all vms ALLOW icmp TYPE 8", "--global", "--json"
        )
    ).json()
    assert isinstance(glob, dict) and glob["global"] is True and glob["enabled"] is False

    listing = (await ok(server, "rule", "list")).out.strip().splitlines()
    assert listing[0].split() == ["UUID", "ENABLED", "OWNER", "VERSION", "RULE"]
    assert any(line.startswith(uuid) and "yes" in line and "PORT 80" in line for line in listing)
    assert len(listing) == 3
    only_global = (await ok(server, "rule", "list", "--global", "--json")).json()
    assert [r["uuid"] for r in only_global] == [glob["uuid"]]  # type: ignore[index]
    by_tag = (await ok(server, "rule", "list", "--tag", "role=www", "--json")).json()
    assert [r["uuid"] for r in by_tag] == [uuid]  # type: ignore[index]
    enabled = (
        await ok(server, "rule", "list", "--enabled", "--owner-uuid", OWNER, "--json")
    ).json()
    assert [r["uuid"] for r in enabled] == [uuid]  # type: ignore[index]

    shown = (await ok(server, "rule", "show", uuid)).out
    assert "web" in shown and "PORT 80" in shown

    updated = (
        await ok(server, "rule", "update", uuid, "--disable", "--rule",
                 "FROM any TO tag role = www ALLOW tcp PORT 8080", "--json")
    ).json()  # fmt: skip
    assert isinstance(updated, dict)
    assert updated["enabled"] is False and updated["rule"].endswith("PORT 8080")
    assert updated["version"] > added["version"]

    # the VNICs a rule applies to
    cn = new_uuid()
    await ok(server, "cn", "set", cn, "--ip", "192.168.7.1")
    net = (
        await ok(server, "network", "create", "--name", "n", "--owner-uuid", OWNER,
                 "--vnet-id", "12340", "--vlan-id", "0", "--subnet", "10.1.0.0/24", "--json")
    ).json()  # fmt: skip
    assert isinstance(net, dict)
    vnic = (
        await ok(server, "vnic", "create", "--network", net["uuid"], "--cn", cn,
                 "--owner-uuid", OWNER, "--tag", "role=www", "--firewall", "--json")
    ).json()  # fmt: skip
    assert isinstance(vnic, dict)
    rows = (await ok(server, "rule", "vnics", uuid)).out.strip().splitlines()
    assert rows[0].split()[0] == "MAC" and rows[1].split()[0] == vnic["mac"]
    by_vnic = (await ok(server, "rule", "list", "--vnic", vnic["mac"], "--json")).json()
    assert sorted(r["uuid"] for r in by_vnic) == sorted([uuid, glob["uuid"]])  # type: ignore[index]

    # errors: the server's message, non-zero exit
    bad = await cli(
        server, "rule", "add", "FROM any TO any ALLOW tcp PORT 1", "--owner-uuid", OWNER
    )
    assert bad.rc == 1 and "rule does not affect VMs" in bad.err and "422" in bad.err
    bad = await cli(server, "rule", "add", "FROM any TO all vms ALLOW tcp PORT 1")
    assert bad.rc == 1 and "owner_uuid required" in bad.err
    nothing = await cli(server, "rule", "update", uuid)
    assert nothing.rc == 2 and "nothing to change" in nothing.err

    removed = await ok(server, "rule", "rm", uuid)
    assert uuid in removed.out
    gone = await cli(server, "rule", "show", uuid)
    assert gone.rc == 1 and "not found" in gone.err and "404" in gone.err
