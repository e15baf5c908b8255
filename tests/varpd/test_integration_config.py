"""The configuration keys the integration added: portolan_api_token, [firewall], [svp]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from varpd.config import ConfigError, FirewallConfig, load_config, parse_config
from varpd.daemon import Varpd
from varpd.plugins.svp import SvpOptions

CN = "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd"

EXAMPLE = f"""
cn_uuid = "{CN}"
state_dir = "/var/lib/varpd"
control_socket = "/var/run/varpd/varpd.sock"
metrics = "127.0.0.1:9339"
portolan_api = "http://10.0.0.10:1280"
portolan_api_token = "s3cret"

[firewall]
wait = 20
max_flows = 65536

[svp]
connect_wait = 2.5
retries = 3
query_timeout = 10
log_interval = 0.5
log_count = 4096
resolve_interval = 60
backoff = [0.5, 1, 2]
version = 2
"""


def test_readme_example_with_firewall_and_svp_tables_parses(tmp_path: Path) -> None:
    f = tmp_path / "varpd.toml"
    f.write_text(EXAMPLE)
    cfg = load_config(f)
    assert cfg.portolan_api == "http://10.0.0.10:1280" and cfg.portolan_api_token == "s3cret"
    assert cfg.firewall == FirewallConfig(wait=20.0, max_flows=65536)
    assert cfg.svp == {
        "connect_wait": 2.5,
        "retries": 3,
        "query_timeout": 10.0,
        "log_interval": 0.5,
        "log_count": 4096,
        "resolve_interval": 60.0,
        "backoff": (0.5, 1.0, 2.0),
        "version": 2,
    }


def test_defaults_without_the_new_keys() -> None:
    cfg = parse_config({})
    assert cfg.portolan_api is None and cfg.portolan_api_token is None
    assert cfg.firewall == FirewallConfig(wait=30.0, max_flows=32768)
    assert cfg.svp == {}


def _svp(**kw: object) -> dict[str, object]:
    return {"svp": kw}


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"portolan_api": "http://x:1280"}, "cn_uuid"),
        ({"portolan_api_token": 5}, "portolan_api_token"),
        ({"portolan_api_token": "a b"}, "portolan_api_token"),
        ({"firewall": 3}, "firewall"),
        ({"firewall": {"wait": 0}}, "firewall.wait"),
        ({"firewall": {"wait": 301}}, "firewall.wait"),
        ({"firewall": {"wait": True}}, "firewall.wait"),
        ({"firewall": {"max_flows": 1.5}}, "firewall.max_flows"),
        ({"firewall": {"max_flows": 2}}, "firewall.max_flows"),
        ({"firewall": {"colour": "red"}}, "firewall.colour"),
        ({"svp": "fast"}, "svp"),
        (_svp(bogus=1), "svp.bogus"),
        (_svp(connect_wait=-1), "svp.connect_wait"),
        (_svp(query_timeout=0), "svp.query_timeout"),
        (_svp(query_timeout="10"), "svp.query_timeout"),
        (_svp(log_interval=float("nan")), "svp.log_interval"),
        (_svp(retries=1.5), "svp.retries"),
        (_svp(retries=101), "svp.retries"),
        (_svp(retries=False), "svp.retries"),
        (_svp(log_count=10), "svp.log_count"),
        (_svp(log_count=2**32), "svp.log_count"),
        (_svp(resolve_interval=0), "svp.resolve_interval"),
        (_svp(dns_retry=-0.5), "svp.dns_retry"),
        (_svp(degrade_after=-1), "svp.degrade_after"),
        (_svp(version=3), "svp.version"),
        (_svp(backoff=[]), "svp.backoff"),
        (_svp(backoff="1,2"), "svp.backoff"),
        (_svp(backoff=[1, -2]), "svp.backoff[1]"),
        (_svp(log_wait="yes"), "svp.log_wait"),
        (_svp(log_wait_time=0.5), "svp.log_wait_time"),
        (_svp(backoff_jitter=1.5), "svp.backoff_jitter"),
        (_svp(reconnect_spread=-1), "svp.reconnect_spread"),
    ],
)
def test_bad_new_keys_are_refused_naming_the_key(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert info.value.key == key
    assert str(info.value).startswith(key)


def test_svp_table_becomes_the_shared_svp_options(tmp_path: Path) -> None:
    cfg = parse_config(
        {"state_dir": str(tmp_path), "svp": {"connect_wait": 1, "retries": 0, "log_count": 512}}
    )
    options = Varpd(cfg).shared["svp:options"]
    assert isinstance(options, SvpOptions)
    assert options.connect_wait == 1.0 and options.retries == 0 and options.log_count == 512
    assert options.query_timeout == SvpOptions().query_timeout  # untouched keys keep defaults


def test_svp_extension_keys_reach_the_shared_options(tmp_path: Path) -> None:
    svp = {"log_wait": False, "log_wait_time": 20, "backoff_jitter": 0, "reconnect_spread": 2}
    options = Varpd(parse_config({"state_dir": str(tmp_path), "svp": svp})).shared["svp:options"]
    assert options.log_wait is False and options.log_wait_time == 20.0
    assert options.backoff_jitter == 0.0 and options.reconnect_spread == 2.0


def test_no_svp_table_leaves_the_plugin_defaults(tmp_path: Path) -> None:
    assert "svp:options" not in Varpd(parse_config({"state_dir": str(tmp_path)})).shared


def test_fetcher_is_made_from_portolan_api_token_and_wait(tmp_path: Path) -> None:
    v = Varpd(
        parse_config(
            {
                "state_dir": str(tmp_path),
                "cn_uuid": CN,
                "portolan_api": "http://10.0.0.10:1280/",
                "portolan_api_token": "tok",
                "firewall": {"wait": 7, "max_flows": 100},
            }
        )
    )
    assert v.fetcher is not None
    assert v.fetcher.url == f"http://10.0.0.10:1280/firewalls/cns/{CN}/policy"
    assert v.fetcher.token == "tok" and v.fetcher.wait == 7.0
    assert v.firewall.max_flows == 100


async def test_svp_plugin_of_a_running_daemon_uses_the_configured_options(
    make_varpd: Any,
) -> None:
    async with make_varpd("s", svp={"connect_wait": 0.5, "retries": 1}) as v:
        await v.create(
            "o0",
            77,
            "svp",
            props={
                "vxlan/listen_ip": "10.0.0.1",
                "svp/host": "127.0.0.1",
                "svp/port": 9,  # nothing listens: we only look at the options
                "svp/underlay_ip": "10.0.0.1",
            },
        )
        await v.activate("o0")
        plugin = v.instances["o0"].plugin
        assert plugin is not None
        assert plugin.options.connect_wait == 0.5 and plugin.options.retries == 1  # type: ignore[attr-defined]
