"""The admin command line (`portolan cn|network|vnic ...`) as an operator runs it: a real
``portolan serve`` process (ports 0, READY line parsed) and the CLI run as subprocesses, checking
table output, ``--json`` output, exit codes and error messages on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.portolan.conftest_api import OWNER, new_uuid

TOKEN = "cli-test-token"
READY_TIMEOUT = 30


@dataclass
class Server:
    api_url: str
    env: dict[str, str]  # the environment a CLI run gets: PORTOLAN_API and the token set


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PORTOLAN_API", "PORTOLAN_API_TOKEN"):
        env.pop(name, None)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


async def run_cli(*args: str, env: dict[str, str]) -> Result:
    proc = await trio.run_process(
        [sys.executable, "-m", "portolan.cli.main", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    env = _base_env()
    env["PORTOLAN_API_TOKEN"] = TOKEN
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "portolan.cli.main",
            "serve",
            "--store",
            f"sqlite:{tmp_path / 'portolan.db'}",
            "--svp-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert proc.stdout is not None
        buffer = b""
        with trio.fail_after(READY_TIMEOUT):
            while b"\n" not in buffer or not buffer.startswith(b"READY"):
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"portolan serve exited before READY: {buffer!r}")
                buffer += chunk
                if b"\n" in buffer and not buffer.startswith(b"READY"):
                    buffer = buffer.split(b"\n", 1)[1]  # skip anything printed before READY
        line = buffer.split(b"\n", 1)[0].decode()
        listeners = dict(word.split("=", 1) for word in line.split()[1:])
        api_url = f"http://{listeners['api']}"
        cli_env = _base_env()
        cli_env["PORTOLAN_API"] = api_url
        cli_env["PORTOLAN_API_TOKEN"] = TOKEN
        yield Server(api_url, cli_env)
    finally:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def cli(server: Server, *args: str) -> Result:
    return await run_cli(*args, env=server.env)


async def ok(server: Server, *args: str) -> Result:
    result = await cli(server, *args)
    assert result.rc == 0, (args, result)
    return result


def table(text: str) -> list[list[str]]:
    """Rows of a table printed by the CLI, split on runs of spaces (no cell has spaces)."""
    return [line.split() for line in text.strip().splitlines()]


# -- compute nodes and networks ------------------------------------------------------------


async def test_cn_commands_print_tables_and_json(server: Server) -> None:
    cn_uuid = new_uuid()
    result = await ok(server, "cn", "set", cn_uuid, "--ip", "192.168.1.1")
    shown = dict(line.split(None, 1) for line in result.out.strip().splitlines())
    assert shown["uuid"] == cn_uuid and shown["ip"] == "192.168.1.1" and shown["port"] == "4789"

    await ok(server, "cn", "set", new_uuid(), "--ip", "192.168.1.2", "--port", "4790")
    rows = table((await ok(server, "cn", "list")).out)
    assert rows[0] == ["UUID", "IP", "PORT", "VERSION"]
    assert sorted((r[1], r[2]) for r in rows[1:]) == [
        ("192.168.1.1", "4789"),
        ("192.168.1.2", "4790"),
    ]

    listed = (await ok(server, "cn", "list", "--json")).json()
    assert isinstance(listed, list) and len(listed) == 2
    shown_json = (await ok(server, "cn", "show", cn_uuid, "--json")).json()
    assert shown_json["uuid"] == cn_uuid and shown_json["ip"] == "192.168.1.1"

    result = await ok(server, "cn", "rm", cn_uuid)
    assert cn_uuid in result.out
    result = await cli(server, "cn", "show", cn_uuid)
    assert result.rc == 1 and result.out == ""
    assert "not found" in result.err and "404" in result.err


async def test_network_commands(server: Server) -> None:
    created = (
        await ok(
            server,
            "network",
            "create",
            "--name",
            "blue",
            "--owner-uuid",
            OWNER,
            "--vnet-id",
            "12340",
            "--vlan-id",
            "7",
            "--subnet",
            "10.1.0.0/24",
            "--gateway",
            "10.1.0.1",
            "--provision-start",
            "10.1.0.10",
            "--provision-end",
            "10.1.0.20",
            "--json",
        )
    ).json()
    assert isinstance(created, dict)
    assert (created["name"], created["vnet_id"], created["vlan_id"]) == ("blue", 12340, 7)
    assert (created["provision_start"], created["provision_end"]) == ("10.1.0.10", "10.1.0.20")

    rows = table((await ok(server, "network", "list")).out)
    assert rows[0][:5] == ["UUID", "NAME", "VNET_ID", "VLAN_ID", "SUBNET"]
    assert rows[1][:6] == [created["uuid"], "blue", "12340", "7", "10.1.0.0/24", "10.1.0.1"]
    shown = (await ok(server, "network", "show", created["uuid"])).out
    assert "10.1.0.0/24" in shown and "gateway" in shown

    # Overlap in the same vnet: refused with the server's message.
    result = await cli(
        server,
        "network",
        "create",
        "--name",
        "overlap",
        "--owner-uuid",
        OWNER,
        "--vnet-id",
        "12340",
        "--vlan-id",
        "8",
        "--subnet",
        "10.1.0.0/16",
    )
    assert result.rc == 1 and "409" in result.err and "Conflict" in result.err

    await ok(server, "network", "rm", created["uuid"])
    assert (await ok(server, "network", "list", "--json")).json() == []


# -- VNICs ---------------------------------------------------------------------------------


async def test_vnic_lifecycle(server: Server) -> None:
    cn1, cn2 = new_uuid(), new_uuid()
    await ok(server, "cn", "set", cn1, "--ip", "192.168.1.1")
    await ok(server, "cn", "set", cn2, "--ip", "192.168.1.2")
    net = (
        await ok(
            server,
            "network",
            "create",
            "--name",
            "n",
            "--owner-uuid",
            OWNER,
            "--vnet-id",
            "500",
            "--vlan-id",
            "0",
            "--subnet",
            "10.5.0.0/24",
            "--json",
        )
    ).json()
    assert isinstance(net, dict)

    vm = new_uuid()
    created = (
        await ok(
            server,
            "vnic",
            "create",
            "--network",
            net["uuid"],
            "--cn",
            cn1,
            "--mac",
            "0:A:95:9D:68:16",
            "--ip",
            "10.5.0.16",
            "--belongs-to",
            vm,
            "--tag",
            "role=web",
            "--tag",
            "tier=2",
            "--firewall",
            "--json",
        )
    ).json()
    assert isinstance(created, dict)
    assert created["mac"] == "00:0a:95:9d:68:16" and created["ip"] == "10.5.0.16"
    assert created["tags"] == {"role": "web", "tier": "2"}
    assert created["firewall_enabled"] is True and created["belongs_to_uuid"] == vm
    other = (
        await ok(server, "vnic", "create", "--network", net["uuid"], "--cn", cn2, "--json")
    ).json()
    assert isinstance(other, dict)

    rows = table((await ok(server, "vnic", "list")).out)
    assert rows[0] == [
        "MAC",
        "IP",
        "VNET_ID",
        "VLAN_ID",
        "CN_UUID",
        "NETWORK_UUID",
        "FIREWALL",
        "TAGS",
    ]
    by_mac = {r[0]: r for r in rows[1:]}
    assert by_mac["00:0a:95:9d:68:16"] == [
        "00:0a:95:9d:68:16",
        "10.5.0.16",
        "500",
        "0",
        cn1,
        net["uuid"],
        "yes",
        "role=web,tier=2",
    ]
    filtered = table((await ok(server, "vnic", "list", "--cn", cn2)).out)
    assert [r[0] for r in filtered[1:]] == [other["mac"]]
    assert (await ok(server, "vnic", "list", "--vnet-id", "501", "--json")).json() == []

    shown = (await ok(server, "vnic", "show", "00-0a-95-9d-68-16")).out
    assert "10.5.0.16" in shown and cn1 in shown

    moved = (await ok(server, "vnic", "move", "0:a:95:9d:68:16", "--cn", cn2, "--json")).json()
    assert isinstance(moved, dict) and moved["cn_uuid"] == cn2

    updated = (
        await ok(
            server,
            "vnic",
            "update",
            "00:0a:95:9d:68:16",
            "--ip",
            "10.5.0.17",
            "--tag",
            "role=db",
            "--no-firewall",
            "--json",
        )
    ).json()
    assert isinstance(updated, dict)
    assert updated["ip"] == "10.5.0.17" and updated["tags"] == {"role": "db"}
    assert updated["firewall_enabled"] is False
    assert updated["version"] > moved["version"] > created["version"]
    cleared = (await ok(server, "vnic", "update", created["mac"], "--clear-tags", "--json")).json()
    assert isinstance(cleared, dict) and cleared["tags"] == {}

    # The CN still holds VNICs: refused, and the message says why.
    result = await cli(server, "cn", "rm", cn2)
    assert result.rc == 1 and "InUse" in result.err and "409" in result.err

    result = await ok(server, "vnic", "rm", created["mac"])
    assert "00:0a:95:9d:68:16" in result.out
    result = await cli(server, "vnic", "show", created["mac"])
    assert result.rc == 1 and "404" in result.err


# -- errors --------------------------------------------------------------------------------


async def test_field_errors_go_to_stderr_with_exit_1(server: Server) -> None:
    result = await cli(
        server,
        "vnic",
        "create",
        "--network",
        "not-a-uuid",
        "--cn",
        new_uuid(),
        "--mac",
        "zz",
        "--ip",
        "1.2.3",
    )
    assert result.rc == 1
    assert result.out == ""
    assert "InvalidParameters" in result.err and "422" in result.err
    for field in ("network_uuid", "mac", "ip"):
        assert f"  {field}: " in result.err, result.err
    assert (await ok(server, "vnic", "list", "--json")).json() == []

    # --json also prints the error document on stdout.
    result = await cli(server, "vnic", "show", "02:00:00:00:00:99", "--json")
    assert result.rc == 1
    body = result.json()
    assert isinstance(body, dict) and body["code"] == "ResourceNotFound"


async def test_writes_without_the_token_are_refused_and_reads_work(server: Server) -> None:
    env = dict(server.env)
    env.pop("PORTOLAN_API_TOKEN")
    result = await run_cli("cn", "set", new_uuid(), "--ip", "192.168.1.1", env=env)
    assert result.rc == 1 and "401" in result.err and "Unauthorized" in result.err
    result = await run_cli(
        "cn", "set", new_uuid(), "--ip", "192.168.1.1", "--api-token", "wrong", env=env
    )
    assert result.rc == 1 and "401" in result.err
    result = await run_cli("cn", "list", "--json", env=env)
    assert result.rc == 0 and json.loads(result.out) == []
    result = await run_cli(
        "cn", "set", new_uuid(), "--ip", "192.168.1.1", "--api-token", TOKEN, env=env
    )
    assert result.rc == 0, result


async def test_api_url_flag_and_unreachable_api(server: Server) -> None:
    env = _base_env()  # no PORTOLAN_API: --api must say where
    result = await run_cli("cn", "list", "--api", server.api_url, env=env)
    assert result.rc == 0 and result.out.startswith("UUID")

    result = await run_cli("cn", "list", "--api", "http://127.0.0.1:9", env=env)
    assert result.rc == 1
    assert "cannot reach the management API at http://127.0.0.1:9" in result.err
    assert "Traceback" not in result.err


async def test_command_line_mistakes_exit_2(server: Server) -> None:
    result = await cli(
        server, "vnic", "create", "--network", new_uuid(), "--cn", new_uuid(), "--tag", "novalue"
    )
    assert result.rc == 2 and "KEY=VALUE" in result.err
    result = await cli(server, "vnic", "update", "02:00:00:00:00:01")
    assert result.rc == 2 and "nothing to change" in result.err
    result = await cli(server, "cn", "set", new_uuid())  # --ip missing: argparse
    assert result.rc == 2 and "--ip" in result.err
