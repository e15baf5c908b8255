"""``varpd check-config`` and ``varpd run`` refuse the same device-property mistakes.

Before the fix, a misspelt device property or a missing required plugin property passed
``check-config``; ``run`` then logged the failure, started with 0 instances and printed READY.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from varpd.config import (
    BACKEND_PROPS,
    ConfigError,
    DevicePropSpec,
    device_prop_specs,
    parse_config,
    register_backend_props,
)

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

SVP_OK = (
    '"vxlan/listen_ip" = "192.168.1.1", "vxlan/listen_port" = 4789, '
    '"svp/host" = "portolan.example", "svp/port" = 1296, "svp/underlay_ip" = "192.168.1.1"'
)


def write(tmp: Path, props: str) -> Path:
    cfg = tmp / "varpd.toml"
    cfg.write_text(
        f'state_dir = "{tmp / "state"}"\n'
        f'control_socket = "{tmp / "varpd.sock"}"\n'
        'metrics = ""\n'
        '[[device]]\nname = "overlay0"\nvnetid = 12340\nsearch = "svp"\n'
        f"props = {{ {props} }}\n"
    )
    return cfg


def varpd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "varpd.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=30,
    )


MISSPELT = SVP_OK.replace("vxlan/listen_port", "vxlan/listen_prot")
NO_HOST = SVP_OK.replace('"svp/host" = "portolan.example", ', "")


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        (
            MISSPELT,
            'device[0].props."vxlan/listen_prot": unknown property; known: '
            "vxlan/listen_ip, vxlan/listen_port",
        ),
        (NO_HOST, 'device[0].props."svp/host": missing required property of search plugin svp'),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_check_config_and_run_refuse_what_run_cannot_apply(
    tmp_path: Path, props: str, expected: str, command: str
) -> None:
    cfg = write(tmp_path, props)
    res = varpd(command, "--config", str(cfg))
    assert res.returncode == 2, res
    assert expected in res.stderr
    assert "READY" not in res.stdout


def test_check_config_accepts_the_positional_form(tmp_path: Path) -> None:
    cfg = write(tmp_path, SVP_OK)
    res = varpd("check-config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "ok (1 device(s))" in res.stdout
    bad = varpd("check-config", str(write(tmp_path, MISSPELT)))
    assert bad.returncode == 2 and "vxlan/listen_prot" in bad.stderr


def test_a_config_file_is_required_in_one_form() -> None:
    res = varpd("check-config")
    assert res.returncode == 2 and "config file is required" in res.stderr


def _device(props: dict[str, object], search: str = "direct") -> dict[str, object]:
    return {"name": "o0", "vnetid": 7, "search": search, "props": props}


DIRECT = {"direct/dest_ip": "10.0.0.2", "direct/dest_port": 4789}


@pytest.mark.parametrize(
    ("props", "key", "words"),
    [
        ({**DIRECT}, '"vxlan/listen_ip"', "missing required property of the vxlan"),
        ({**DIRECT, "vxlan/listen_ip": "224.0.0.1"}, '"vxlan/listen_ip"', "multicast"),
        ({**DIRECT, "vxlan/listen_ip": "nope"}, '"vxlan/listen_ip"', "not an IP address"),
        (
            {**DIRECT, "vxlan/listen_ip": "10.0.0.1", "vxlan/listen_port": 0},
            '"vxlan/listen_port"',
            "1..65535",
        ),
        (
            {"vxlan/listen_ip": "10.0.0.1", "direct/dest_ip": "10.0.0.2"},
            '"direct/dest_port"',
            "missing",
        ),
    ],
)
def test_device_and_plugin_properties_are_checked(
    props: dict[str, object], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"device": [_device(props)]})
    assert info.value.key == f"device[0].props.{key}"
    assert words in info.value.message


def test_a_backend_can_register_its_own_device_properties() -> None:
    def check(value: object) -> None:
        if value not in ("on", "off"):
            raise ValueError("expected on or off")

    props = {**DIRECT, "vxlan/listen_ip": "10.0.0.1", "test/learning": "on"}
    with pytest.raises(ConfigError, match="unknown property"):
        parse_config({"backend": "memory", "device": [_device(props)]})
    register_backend_props("memory", (DevicePropSpec("test/learning", check),))
    try:
        assert "test/learning" in device_prop_specs("memory")
        cfg = parse_config({"device": [_device(props)]})
        assert cfg.devices[0].device_props["test/learning"] == "on"
        with pytest.raises(ConfigError, match="on or off"):
            parse_config({"device": [_device({**props, "test/learning": "maybe"})]})
    finally:
        BACKEND_PROPS.pop("memory", None)
