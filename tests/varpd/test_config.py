from __future__ import annotations

from pathlib import Path

import pytest

from varpd.config import ConfigError, default_workers, load_config, parse_config

EXAMPLE = """
cn_uuid = "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd"
state_dir = "/var/lib/varpd"
control_socket = "/var/run/varpd/varpd.sock"
metrics = "127.0.0.1:9339"
portolan_api = "http://10.0.0.10:1280"

[[device]]
name = "overlay0"
vnetid = 12340
mtu = 1400
backend = "udp"
search = "direct"
props = { "vxlan/listen_ip" = "192.168.1.1", "vxlan/listen_port" = 4789, "direct/dest_ip" = "192.168.1.2", "direct/dest_port" = 4789 }

[[device.vnic]]
mac = "0:a:95:9d:68:16"
vlan_id = 0
tap = "vn0"
"""


def test_example_config_parses(tmp_path: Path) -> None:
    f = tmp_path / "varpd.toml"
    f.write_text(EXAMPLE)
    cfg = load_config(f)
    assert cfg.cn_uuid == "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd"
    assert cfg.metrics_address == ("127.0.0.1", 9339)
    assert cfg.backend == "udp"
    (dev,) = cfg.devices
    assert dev.name == "overlay0" and dev.vnetid == 12340 and dev.search == "direct"
    assert dev.plugin_props == {"direct/dest_ip": "192.168.1.2", "direct/dest_port": 4789}
    assert dev.device_props == {"vxlan/listen_ip": "192.168.1.1", "vxlan/listen_port": 4789}
    assert dev.vnics[0].mac == "00:0a:95:9d:68:16" and dev.vnics[0].tap == "vn0"


def test_defaults_apply_to_an_empty_config() -> None:
    cfg = parse_config({})
    assert cfg.control_socket == "/var/run/varpd/varpd.sock"
    assert cfg.metrics == "127.0.0.1:9339"
    assert cfg.state_dir == "/var/lib/varpd"
    assert cfg.lookup_workers == default_workers()
    assert cfg.devices == ()


def test_metrics_port_zero_is_accepted() -> None:
    assert parse_config({"metrics": "127.0.0.1:0"}).metrics_address == ("127.0.0.1", 0)


def _dev(**kw: object) -> dict[str, object]:
    props = {"vxlan/listen_ip": "10.0.0.1", "direct/dest_ip": "10.0.0.2", "direct/dest_port": 4789}
    props.update(kw.pop("props", {}))  # type: ignore[call-overload]
    d: dict[str, object] = {"name": "overlay0", "vnetid": 1, "search": "direct", "props": props}
    d.update(kw)
    return d


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"bogus": 1}, "bogus"),
        ({"cn_uuid": "not-a-uuid"}, "cn_uuid"),
        ({"metrics": "localhost"}, "metrics"),
        ({"metrics": "127.0.0.1:99999"}, "metrics"),
        ({"metrics": "127.0.0.1:\u00b2"}, "metrics"),  # a digit int() refuses
        ({"state_dir": 5}, "state_dir"),
        ({"lookup_workers": 0}, "lookup_workers"),
        ({"portolan_api": "ftp://x"}, "portolan_api"),
        ({"device": [_dev(vnetid=2**24)]}, "device[0].vnetid"),
        ({"device": [_dev(vnetid="7")]}, "device[0].vnetid"),
        ({"device": [_dev(mtu=100)]}, "device[0].mtu"),
        ({"device": [_dev(backend="tcp")]}, "device[0].backend"),
        ({"device": [_dev(search="nope")]}, "device[0].search"),
        ({"device": [_dev(name="0bad name")]}, "device[0].name"),
        ({"device": [{"vnetid": 1, "search": "direct"}]}, "device[0].name"),
        ({"device": [_dev(colour="red")]}, "device[0].colour"),
        ({"device": [_dev(props={"direct/dest_port": 0})]}, 'device[0].props."direct/dest_port"'),
        (
            {"device": [_dev(props={"direct/dest_ip": "2002::1"})]},
            'device[0].props."direct/dest_ip"',
        ),
        ({"device": [_dev(props={"direct/nope": 1})]}, 'device[0].props."direct/nope"'),
        ({"device": [_dev(vnic=[{"mac": "zz"}])]}, "device[0].vnic[0].mac"),
        (
            {"device": [_dev(vnic=[{"mac": "2:0:0:0:0:1", "vlan_id": 4095}])]},
            "device[0].vnic[0].vlan_id",
        ),
        ({"device": [_dev(), _dev(vnetid=2)]}, "device[1].name"),
        ({"device": [_dev(), _dev(name="o1")]}, "device[1].vnetid"),
    ],
)
def test_bad_config_is_refused_naming_the_key(doc: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert info.value.key == key
    assert str(info.value).startswith(key)


def test_mixed_backends_are_refused() -> None:
    with pytest.raises(ConfigError, match="same backend"):
        parse_config({"device": [_dev(backend="udp"), _dev(name="o1", vnetid=2, backend="memory")]})


def test_invalid_toml_is_refused_with_the_file_named(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("state_dir = \n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(f)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_config_bounds_are_the_shims_and_the_firewalls() -> None:
    # varpd.config keeps copies so that varpdadm need not import trio; keep them equal.
    from varpd import config
    from varpd.firewall.conntrack import DEFAULT_MAX_FLOWS
    from varpd.shim import device

    assert (config.MTU_MIN, config.MTU_MAX, config.MTU_DEFAULT) == (
        device.MTU_MIN,
        device.MTU_MAX,
        device.MTU_DEFAULT,
    )
    assert config.FIREWALL_MAX_FLOWS_DEFAULT == DEFAULT_MAX_FLOWS


def test_a_uint_property_refuses_digits_int_cannot_read() -> None:
    from varpd.plugins.base import PropError, PropSpec

    with pytest.raises(PropError):
        PropSpec("direct/dest_port", "uint").validate("\u00b2")
