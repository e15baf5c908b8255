"""The ``portolan`` command line, in process: argument handling, refusals, load messages."""

from __future__ import annotations

import argparse
import json
import socket

import pytest

from portolan.cli import format_hostport, is_loopback_host, parse_hostport
from portolan.cli.load import field_line, value_at
from portolan.cli.main import build_parser, main
from portolan.cli.serve import ConfigRefused, config_from_args, ready_line

CN1 = "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd"


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1296", ("127.0.0.1", 1296)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:1280", ("::1", 1280)),
        ("localhost:9296", ("localhost", 9296)),
    ],
)
def test_hostport_parses_and_formats_back(text, expected):
    assert parse_hostport(text) == expected
    assert format_hostport(*expected) == text


@pytest.mark.parametrize("text", ["1296", "host:", ":80", "::1:80", "h:99999", "h:x", "[::1"])
def test_malformed_hostport_is_refused(text):
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_hostport_default_port_for_clients():
    assert parse_hostport("10.0.0.1", default_port=1296) == ("10.0.0.1", 1296)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("portolan.example", False),
    ],
)
def test_loopback_detection(host, loopback):
    assert is_loopback_host(host) is loopback


def test_serve_defaults_follow_the_conventions(monkeypatch):
    monkeypatch.delenv("PORTOLAN_API_TOKEN", raising=False)
    monkeypatch.delenv("PORTOLAN_STORE", raising=False)
    config = config_from_args(serve_args())
    assert config.store == "sqlite:./portolan.db"
    assert config.svp == ("0.0.0.0", 1296)
    assert config.api == ("127.0.0.1", 1280)
    assert config.metrics == ("127.0.0.1", 9296)
    assert config.api_token is None
    assert config.svp_max_frame == 65536


def test_api_on_a_public_address_needs_a_token(monkeypatch):
    monkeypatch.delenv("PORTOLAN_API_TOKEN", raising=False)
    with pytest.raises(ConfigRefused, match="--api-token"):
        config_from_args(serve_args("--api-listen", "0.0.0.0:1280"))
    assert (
        config_from_args(serve_args("--api-listen", "0.0.0.0:1280", "--api-token", "t")).api_token
        == "t"
    )
    monkeypatch.setenv("PORTOLAN_API_TOKEN", "from-env")
    assert config_from_args(serve_args("--api-listen", "10.0.0.1:1280")).api_token == "from-env"


def test_serve_refusal_exits_2_with_a_sentence(monkeypatch, capsys):
    monkeypatch.delenv("PORTOLAN_API_TOKEN", raising=False)
    assert main(["serve", "--api-listen", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve the management API on 0.0.0.0:0 without a token" in err
    assert main(["serve", "--svp-listen", "nonsense"]) == 2
    assert "--svp-listen" in capsys.readouterr().err


def test_ready_line_lists_listeners_in_order():
    line = ready_line(
        {"svp": ("127.0.0.1", 40001), "api": ("::1", 40002), "metrics": ("127.0.0.1", 3)}
    )
    assert line == "READY svp=127.0.0.1:40001 api=[::1]:40002 metrics=127.0.0.1:3"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_load_names_the_bad_entry_field_and_value(tmp_path, capsys):
    vnics = [
        {"mac": f"00:0a:95:9d:68:1{i}", "ip": f"10.0.0.{i + 1}", "vnet_id": 1, "cn_uuid": CN1}
        for i in range(3)
    ]
    vnics.append({"mac": "zz", "ip": "10.0.0.9", "vnet_id": 1, "cn_uuid": CN1})
    doc = {"cns": [{"uuid": CN1, "ip": "192.168.1.1"}], "vnics": vnics}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    assert main(["load", str(path), "--store", f"sqlite:{tmp_path / 'p.db'}"]) == 1
    err = capsys.readouterr().err
    assert 'vnics[3].mac: invalid MAC address "zz"' in err
    assert "nothing was written" in err


def test_load_then_summary(tmp_path, capsys):
    doc = {
        "cns": [{"uuid": CN1, "ip": "192.168.1.1"}],
        "vnics": [{"mac": "00:0a:95:9d:68:16", "ip": "10.0.0.1", "vnet_id": 1, "cn_uuid": CN1}],
    }
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(doc))
    assert main(["load", str(path), "--store", f"sqlite:{tmp_path / 'p.db'}", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cns"] == 1 and summary["vnics"] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [("{", "is not valid JSON"), ("[1, 2]", "must be a JSON object"), (b"\xff\xfe", "not UTF-8")],
)
def test_load_refuses_unusable_files_before_opening_the_store(tmp_path, capsys, content, message):
    path = tmp_path / "doc.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    db = tmp_path / "p.db"
    assert main(["load", str(path), "--store", f"sqlite:{db}"]) == 1
    assert message in capsys.readouterr().err
    assert not db.exists()


def test_field_paths_resolve_into_the_document():
    doc = {"vnics": [{"mac": "a"}, {"mac": "zz", "vnet_id": 5}]}
    assert value_at(doc, "vnics[1].mac") == "zz"
    assert field_line(doc, "vnics[1].mac", "invalid MAC address") == (
        'vnics[1].mac: invalid MAC address "zz"'
    )
    assert (
        field_line(doc, "vnics[1].vnet_id", "vnet 5 is taken")
        == "vnics[1].vnet_id: vnet 5 is taken"
    )
    assert field_line(doc, "vnics[7].mac", "missing") == "vnics[7].mac: missing"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lookup_without_a_server_says_so_and_exits_1(capsys):
    server = f"127.0.0.1:{_closed_port()}"
    assert (
        main(["lookup", "vl2", "--mac", "0:a:95:9d:68:16", "--vnet", "1", "--server", server]) == 1
    )
    assert "cannot talk to" in capsys.readouterr().err
    assert main(["ping", "--server", server]) == 1


def test_lookup_refuses_a_bad_mac_with_exit_2(capsys):
    assert main(["lookup", "vl2", "--mac", "zz", "--vnet", "1"]) == 2
    assert "invalid MAC address" in capsys.readouterr().err


def test_a_bad_store_url_is_refused_with_its_password_masked(tmp_path, capsys):
    url = "postgresq://portolan:hunter2@db.example/portolan"
    with pytest.raises(ConfigRefused, match="--store") as refused:
        config_from_args(serve_args("--store", url))
    assert "hunter2" not in str(refused.value)
    path = tmp_path / "doc.json"
    path.write_text("{}")
    assert main(["load", str(path), "--store", url]) == 2
    err = capsys.readouterr().err
    assert "unknown store URL" in err and "hunter2" not in err and "portolan:***@" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["lookup", "vl2", "--mac", "00:0a:95:9d:68:16", "--vnet", "-1"],
        ["lookup", "vl3", "--ip", "10.0.0.1", "--vnet", str(1 << 24)],
        ["log", "--cn-ip", "192.168.1.1", "--count", "-5"],
    ],
)
def test_lookup_arguments_out_of_svp_range_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "must be between" in capsys.readouterr().err
