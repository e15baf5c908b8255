"""``varpd run`` and ``varpdadm`` as real processes: persistence across restarts, every command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


class Daemon:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "varpd.cli", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("READY") or not line:
                break
        if not line.startswith("READY"):
            self.proc.kill()
            raise AssertionError(f"no READY line; stderr: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.ready = line.split()
        self.listeners = dict(part.split("=", 1) for part in self.ready[1:])

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err


def write_config(tmp: Path, devices: str = "") -> Path:
    cfg = tmp / "varpd.toml"
    cfg.write_text(
        f'cn_uuid = "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd"\n'
        f'state_dir = "{tmp / "state"}"\n'
        f'control_socket = "{tmp / "varpd.sock"}"\n'
        f'metrics = "127.0.0.1:0"\n' + devices
    )
    return cfg


def adm(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "varpd.adm", "--socket", str(tmp / "varpd.sock"), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=30,
    )


def ok(tmp: Path, *args: str) -> str:
    res = adm(tmp, *args)
    assert res.returncode == 0, res.stderr
    return res.stdout


def fails(tmp: Path, *args: str) -> str:
    res = adm(tmp, *args)
    assert res.returncode == 1, res.stdout
    assert res.stdout == ""
    assert res.stderr.startswith("varpdadm: ")
    return res.stderr


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(write_config(tmp_path))
    yield d
    if d.proc.poll() is None:
        d.stop()


DIRECT = [
    "-p",
    "vxlan/listen_ip=10.0.0.1",
    "-p",
    "direct/dest_ip=10.0.0.2",
    "-p",
    "direct/dest_port=4789",
]


def test_ready_line_names_bound_listeners(daemon: Daemon, tmp_path: Path) -> None:
    assert daemon.listeners["control"] == str(tmp_path / "varpd.sock")
    host, port = daemon.listeners["metrics"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    with urllib.request.urlopen(f"http://{daemon.listeners['metrics']}/metrics", timeout=10) as r:
        body = r.read().decode()
    assert "varpd_degraded_instances" in body and "varpd_lookups_total" in body


def test_instances_survive_a_real_restart(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    d = Daemon(cfg)
    ok(tmp_path, "create", "o1", "--vnetid", "77", "--search", "direct", *DIRECT)
    ok(tmp_path, "activate", "o1")
    ok(tmp_path, "vnic", "add", "o1", "2:0:0:0:0:1", "--vlan", "4")
    ok(tmp_path, "set", "o1", "direct/dest_port=5000")
    rc, _ = d.stop()
    assert rc == 0
    assert not (tmp_path / "varpd.sock").exists()
    (tmp_path / "state" / "junk.varpd").write_bytes(b"\x93not a state file")
    d = Daemon(cfg)
    try:
        listed = json.loads(ok(tmp_path, "list", "--json"))
        assert [(i["name"], i["id"], i["vnetid"], i["state"]) for i in listed] == [
            ("o1", 1, 77, "active")
        ]
        shown = json.loads(ok(tmp_path, "--json", "show", "o1"))
        values = {p["name"]: p["value"] for p in shown["props"]}
        assert values["direct/dest_port"] == 5000
        assert shown["vnic_list"] == [{"mac": "02:00:00:00:00:01", "vlan_id": 4, "tap": None}]
        assert "o1" in ok(tmp_path, "list")
    finally:
        _, err = d.stop()
    assert (tmp_path / "state" / "junk.varpd.corrupt").exists()
    assert "junk.varpd cannot be restored" in err


def test_varpdadm_commands_end_to_end(daemon: Daemon, tmp_path: Path) -> None:
    files = tmp_path / "map.json"
    files.write_text(json.dumps({"0:a:95:9d:68:16": {"ip": "10.1.1.1", "port": 4789}}))
    # create / list / show
    out = ok(
        tmp_path,
        "create",
        "ovl0",
        "--vnetid",
        "10",
        "--search",
        "files",
        "--mtu",
        "1300",
        "-p",
        "vxlan/listen_ip=10.0.0.1",
        "-p",
        f"files/config={files}",
    )
    assert "state:   created" in out
    ok(tmp_path, "activate", "ovl0")
    table = ok(tmp_path, "list").splitlines()
    assert table[0].split() == [
        "NAME",
        "ID",
        "VNETID",
        "SEARCH",
        "MODE",
        "STATE",
        "STATUS",
        "VNICS",
    ]
    assert table[1].split() == ["ovl0", "1", "10", "files", "dynamic", "active", "ONLINE", "0"]
    shown = ok(tmp_path, "show", "ovl0")
    assert "files/config" in shown and "ONLINE" in shown and "1300" in shown
    # errors name the property or value; exit 1, message on stderr
    assert "direct/dest_port" in fails(
        tmp_path, "create", "x0", "--vnetid", "11", "--search", "direct", "-p", "direct/dest_port=0"
    )
    assert "search" in fails(tmp_path, "set", "ovl0", "search=direct")
    assert "vxlan/listen_port" in fails(tmp_path, "set", "ovl0", "vxlan/listen_port=1")
    assert "nosuch" in fails(tmp_path, "set", "ovl0", "files/nosuch=1")
    assert "absolute" in fails(tmp_path, "set", "ovl0", "files/config=rel.json")
    assert "no overlay device named nope" in fails(tmp_path, "show", "nope")
    assert "unknown search plugin" in fails(
        tmp_path, "create", "x1", "--vnetid", "12", "--search", "bogus"
    )
    assert "vnetid" in fails(tmp_path, "create", "x2", "--vnetid", "10", "--search", "files")
    # cache
    ok(tmp_path, "cache", "set", "ovl0", "0:a:95:9d:68:20", "10.9.9.9:4789")
    ok(tmp_path, "cache", "set", "ovl0", "00:0a:95:9d:68:21", "[fd00::9]:4789")
    ok(tmp_path, "cache", "set", "ovl0", "00-0a-95-9d-68-22", "drop")
    rows = ok(tmp_path, "cache", "list", "ovl0").splitlines()
    assert rows[1].split() == ["00:0a:95:9d:68:20", "valid", "10.9.9.9:4789"]
    assert rows[2].split() == ["00:0a:95:9d:68:21", "valid", "[fd00::9]:4789"]
    assert rows[3].split() == ["00:0a:95:9d:68:22", "drop", "drop"]
    got = json.loads(ok(tmp_path, "--json", "cache", "get", "ovl0", "0:a:95:9d:68:21"))
    assert got == {"mac": "00:0a:95:9d:68:21", "flags": ["valid"], "dest": "[fd00::9]:4789"}
    assert "[ADDRESS]:PORT" in fails(
        tmp_path, "cache", "set", "ovl0", "0:a:95:9d:68:23", "fd00::9:4789"
    )
    assert "invalid MAC" in fails(tmp_path, "cache", "get", "ovl0", "zz")
    ok(tmp_path, "cache", "rm", "ovl0", "0:a:95:9d:68:20")
    assert "not in the cache" in fails(tmp_path, "cache", "get", "ovl0", "0:a:95:9d:68:20")
    ok(tmp_path, "cache", "flush", "ovl0")
    assert json.loads(ok(tmp_path, "cache", "list", "ovl0", "--json")) == []
    # vnics
    assert "added VNIC 02:00:00:00:00:05 (vlan 3)" in ok(
        tmp_path, "vnic", "add", "ovl0", "2:0:0:0:0:5", "--vlan", "3"
    )
    assert "already" in fails(tmp_path, "vnic", "add", "ovl0", "2:0:0:0:0:5")
    assert "vlan" in fails(tmp_path, "vnic", "add", "ovl0", "2:0:0:0:0:6", "--vlan", "5000")
    rows = ok(tmp_path, "vnic", "list", "ovl0").splitlines()
    assert rows[1].split() == ["02:00:00:00:00:05", "3", "-"]
    ok(tmp_path, "vnic", "rm", "ovl0", "2:0:0:0:0:5")
    assert "no VNIC" in fails(tmp_path, "vnic", "rm", "ovl0", "2:0:0:0:0:5")
    assert json.loads(ok(tmp_path, "vnic", "list", "ovl0", "--json")) == []
    # a POINT device has no cache
    ok(tmp_path, "create", "pt0", "--vnetid", "20", "--search", "direct", *DIRECT)
    ok(tmp_path, "activate", "pt0")
    assert "POINT" in fails(tmp_path, "cache", "set", "pt0", "0:a:95:9d:68:20", "1.2.3.4:5")
    assert "already active" in fails(tmp_path, "activate", "pt0")
    # plugins and ping
    assert "direct/dest_ip" in ok(tmp_path, "plugins")
    assert json.loads(ok(tmp_path, "ping", "--json"))["instances"] == 2
    # delete
    ok(tmp_path, "delete", "ovl0")
    ok(tmp_path, "delete", "pt0")
    assert json.loads(ok(tmp_path, "list", "--json")) == []
    assert list((tmp_path / "state").glob("*.varpd")) == []


def test_varpdadm_reports_an_absent_daemon(tmp_path: Path) -> None:
    err = fails(tmp_path, "list")
    assert "cannot talk to varpd" in err


def test_varpdadm_uses_the_environment_socket(daemon: Daemon, tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "varpd.adm", "list"],
        capture_output=True,
        text=True,
        env={**ENV, "VARPD_SOCKET": str(tmp_path / "varpd.sock")},
        timeout=30,
    )
    assert res.returncode == 0 and res.stdout.startswith("NAME")


def test_broken_config_is_refused_naming_the_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, '[[device]]\nname = "o0"\nvnetid = 99999999\nsearch = "direct"\n')
    res = subprocess.run(
        [sys.executable, "-m", "varpd.cli", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=30,
    )
    assert res.returncode == 2
    assert "device[0].vnetid" in res.stderr and "out of range" in res.stderr


def test_config_devices_are_created_at_start(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        '[[device]]\nname = "overlay0"\nvnetid = 12340\nbackend = "memory"\nsearch = "direct"\n'
        'props = { "vxlan/listen_ip" = "192.168.1.1", "vxlan/listen_port" = 4789, '
        '"direct/dest_ip" = "192.168.1.2", "direct/dest_port" = 4789 }\n'
        '[[device.vnic]]\nmac = "00:0a:95:9d:68:16"\nvlan_id = 0\n',
    )
    d = Daemon(cfg)
    try:
        listed = json.loads(ok(tmp_path, "list", "--json"))
        assert [(i["name"], i["state"], i["vnics"]) for i in listed] == [("overlay0", "active", 1)]
    finally:
        d.stop()


def test_a_second_daemon_on_the_same_socket_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "varpd.cli", "run", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=30,
    )
    assert res.returncode == 1
    assert "is in use by another varpd" in res.stderr
    assert json.loads(ok(tmp_path, "list", "--json")) == []  # the first one still serves
