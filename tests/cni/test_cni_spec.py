"""The plugin's pure parts: environment, configuration, attributes, results, error documents,
and the import rule (``cni`` imports ``protocol`` only, never ``portolan``/``varpd``/``lab``)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from cni.main import run, tap_name
from cni.spec import (
    CniError,
    add_result,
    parse_cni_args,
    parse_config,
    parse_env,
    vnic_attributes,
)
from tests.cni import schema

CONF = {
    "cniVersion": "1.0.0",
    "name": "blue",
    "type": "portolan-cni",
    "api": "http://127.0.0.1:1280",
    "network_uuid": "2b7e8a0c-8d7e-4b5e-95b6-95dd2e2c9c44",
    "cn_uuid": "7c0a77e0-0000-4000-8000-000000000001",
}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "eth0"}  # fmt: skip


def _conf(**kw: object) -> bytes:
    return json.dumps({**CONF, **kw}).encode()


def _code(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(CniError) as info:
        fn(*args)
    return info.value.code


def test_cni_args_split_into_pairs_and_refuse_garbage() -> None:
    assert parse_cni_args("IgnoreUnknown=1;A=b=c; ;K8S_POD_NAME=x") == {
        "IgnoreUnknown": "1", "A": "b=c", "K8S_POD_NAME": "x"}  # fmt: skip
    assert _code(parse_cni_args, "novalue") == 4


def test_environment_requirements_depend_on_the_command() -> None:
    assert parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"
    assert parse_env({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}).netns == ""
    assert _code(parse_env, {**ENV, "CNI_NETNS": ""}) == 4
    assert _code(parse_env, {**ENV, "CNI_COMMAND": "GC"}) == 4
    assert _code(parse_env, {**ENV, "CNI_IFNAME": "a" * 16}) == 4


def test_configuration_defaults_and_refusals() -> None:
    conf = parse_config(_conf())
    assert (conf.varpd_socket, conf.overlay, conf.mtu, conf.timeout) == (
        "/var/run/varpd/varpd.sock", "overlay0", 1400, 10.0)  # fmt: skip
    assert conf.belongs_to("c1") == parse_config(_conf()).belongs_to("c1") != conf.belongs_to("c2")
    assert _code(parse_config, _conf(cniVersion="0.3.1")) == 1
    assert _code(parse_config, _conf(ipam={"type": "host-local"})) == 2
    assert _code(parse_config, b"{") == 6
    assert _code(parse_config, _conf(mtu=9000)) == 7
    assert _code(parse_config, _conf(network_uuid="nope")) == 7
    assert _code(parse_config, _conf(typo_key=1)) == 7
    assert _code(parse_config, _conf(type="bridge")) == 7
    assert parse_config(b'{"cniVersion": "0.4.0"}', "VERSION").version == "0.4.0"


def test_tags_and_firewall_come_from_config_labels_and_cni_args_in_that_order() -> None:
    args = {"cni": {"labels": [{"key": "portolan.tag.role", "value": "db"},
                               {"key": "portolan.firewall", "value": "false"}]},
            "portolan": {"tags": {"zone": "a"}}}  # fmt: skip
    conf = parse_config(_conf(tags={"role": "x", "cni.container_id": "forged"}, firewall=True,
                              args=args))  # fmt: skip
    env = parse_env({**ENV, "CNI_ARGS": "IgnoreUnknown=1;PORTOLAN_TAG_role=www;FOO=1"})
    tags, firewall = vnic_attributes(conf, env)
    assert tags == {"role": "www", "zone": "a", "cni.container_id": "c1", "cni.ifname": "eth0",
                    "cni.network": "blue"}  # fmt: skip
    assert firewall is False
    strict = parse_env({**ENV, "CNI_ARGS": "FOO=1"})
    assert _code(vnic_attributes, conf, strict) == 4
    bad = parse_env({**ENV, "CNI_ARGS": "PORTOLAN_FIREWALL=maybe"})
    assert _code(vnic_attributes, conf, bad) == 7


@pytest.mark.parametrize("version", ["1.0.0", "0.4.0"])
def test_results_have_the_shape_of_their_version(version: str) -> None:
    doc = add_result(version, ifname="eth0", mac="02:00:00:00:00:01", sandbox="/run/netns/x",
                     address="10.1.0.5/24", gateway="10.1.0.1",
                     dns={"nameservers": ["10.1.0.1"]})  # fmt: skip
    schema.check_result(doc, version)
    assert doc["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]
    v6 = add_result(version, ifname="eth0", mac="02:00:00:00:00:01", sandbox="/x",
                    address="fd00::5/64", gateway=None, dns=None)  # fmt: skip
    schema.check_result(v6, version)
    assert v6["routes"] == [] and "gateway" not in v6["ips"][0]


def test_run_answers_version_and_errors_as_documents() -> None:
    assert run({"CNI_COMMAND": "VERSION"}, b"") == (
        0, {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]})  # fmt: skip
    status, doc = run(ENV, _conf(cniVersion="0.4.0", mtu=1))
    assert status == 1 and doc["cniVersion"] == "0.4.0" and doc["code"] == 7
    schema.check_error(doc)
    status, doc = run({**ENV, "CNI_NETNS": "/nonexistent/netns"}, _conf())
    assert status == 1 and doc["code"] == 3
    schema.check_error(doc)


def test_tap_names_fit_ifnamsiz_and_follow_the_mac() -> None:
    assert tap_name("02:AB:00:00:00:01") == "pc02ab00000001"
    assert len(tap_name("02:ab:00:00:00:01")) <= 15


def test_cni_imports_protocol_only() -> None:
    root = Path(__file__).resolve().parents[2] / "cni"
    ours = {"portolan", "varpd", "lab", "bench", "tests"}
    seen: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                seen.add(top)
                assert top not in ours, f"{path.name} imports {name}"
    assert "protocol" in seen  # the control-socket codec is shared, not copied


def test_sigterm_during_add_ends_with_an_error_document(tmp_path: Path) -> None:
    """A runtime giving up sends SIGTERM: the plugin unwinds and still prints the spec's JSON."""
    import signal
    import socket
    import subprocess
    import time

    from tests.cni.cluster import plugin_path

    plugin = plugin_path()
    if plugin is None:
        pytest.skip("portolan-cni is not installed (pip install -e .)")
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        conf = {**CONF, "api": f"http://127.0.0.1:{silent.getsockname()[1]}", "timeout": 30}
        env = {**ENV, "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "pcnitest0",
               "PATH": "/usr/bin:/bin"}  # fmt: skip
        proc = subprocess.Popen([plugin], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(conf).encode())
        proc.stdin.close()
        time.sleep(2.0)  # the plugin is waiting for portolan's answer
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert proc.stdout is not None
    doc = json.loads(proc.stdout.read())
    schema.check_error(doc)
    assert proc.returncode == 1 and doc["code"] == 11 and "signal" in doc["msg"]
