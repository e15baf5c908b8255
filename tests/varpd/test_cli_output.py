"""What the command-line tools print: readable values, quiet exits on a closed pipe, errors
said once and in the user's terms, listeners named when they cannot bind."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from portolan.cli.admin import ApiError, cmd_rule_add, report_error
from tests.varpd.test_cli import Daemon, write_config
from varpd.adm import format_duration, render_info

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_into_closed_pipe(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with stdout a pipe nobody reads any more (as ``| head`` after it quit)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(
            argv, stdout=w, stderr=subprocess.PIPE, text=True, env=ENV, timeout=60, **kw
        )
    finally:
        os.close(w)


def assert_quiet_pipe_exit(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 141, res.stderr
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert "Exception ignored" not in res.stderr, res.stderr


# ---------------------------------------------------------------------- varpdadm ping


INFO = {
    "pid": 4242,
    "cn_uuid": "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd",
    "backend": "udp",
    "instances": 2,
    "lookup_workers": 5,
    "plugins": ["direct", "files", "svp"],
    "uptime": 11.843,
    "moved_aside": [],
    "firewall": "disabled",
    "firewall_generation": None,
}


def test_ping_prints_plain_values_with_units() -> None:
    text = render_info(INFO)
    assert "[" not in text and "]" not in text and "None" not in text
    lines = dict(line.split(":", 1) for line in text.splitlines())
    assert lines["plugins"].strip() == "direct, files, svp"
    assert lines["uptime"].strip() == "11.8 s"
    assert lines["moved aside"].strip() == "none"
    assert lines["firewall generation"].strip() == "-"


def test_ping_lists_the_files_moved_aside() -> None:
    info = {**INFO, "moved_aside": [{"file": "/s/o1.varpd", "reason": "checksum mismatch"}]}
    text = render_info(info)
    assert "moved aside:" in text and "1 state file(s)" in text
    assert "  /s/o1.varpd: checksum mismatch" in text
    assert "{" not in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "0.2 s"),
        (59.9, "59.9 s"),
        (187, "3 min 7 s"),
        (7500, "2 h 05 min"),
        (3 * 86400 + 4 * 3600, "3 d 4 h"),
    ],
)
def test_durations_carry_their_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# ---------------------------------------------------------------------- closed pipes


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    d = Daemon(write_config(tmp_path))
    yield d
    d.stop()


def test_varpdadm_and_varpd_exit_quietly_on_a_closed_pipe(daemon: Daemon, tmp_path: Path) -> None:
    sock = daemon.listeners["control"]
    for args in (["ping"], ["plugins", "--json"], ["list"]):
        res = run_into_closed_pipe([sys.executable, "-m", "varpd.adm", "--socket", sock, *args])
        assert_quiet_pipe_exit(res)
    res = run_into_closed_pipe(
        [sys.executable, "-m", "varpd.cli", "check-config", str(daemon.config)]
    )
    assert_quiet_pipe_exit(res)


def test_portolan_exits_quietly_on_a_closed_pipe(tmp_path: Path) -> None:
    # a stand-in API: GET /rules answers a long JSON list (a file served by http.server)
    rules = [
        {"uuid": f"{i:08x}-0000-4000-8000-000000000000", "rule": "x" * 200} for i in range(400)
    ]
    (tmp_path / "rules").write_text(json.dumps(rules))
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...)"
        port = int(line.split(" port ")[1].split()[0])
        api = ["--api", f"http://127.0.0.1:{port}"]
        for extra in (["--json"], []):
            res = run_into_closed_pipe(
                [sys.executable, "-m", "portolan.cli.main", "rule", "list", *api, *extra]
            )
            assert_quiet_pipe_exit(res)
    finally:
        server.terminate()
        server.wait(10)


# ---------------------------------------------------------------------- portolan errors


def _err(exc: ApiError, **kw: Any) -> str:
    out = io.StringIO()
    report_error(exc, out, **kw)
    return out.getvalue()


def test_a_field_error_the_headline_already_gives_is_not_repeated() -> None:
    body = {
        "code": "InvalidParameters",
        "message": "owner_uuid required",
        "errors": [
            {"field": "owner_uuid", "code": "MissingParameter", "message": "owner_uuid required"}
        ],
    }
    text = _err(ApiError(422, body))
    assert text.count("owner_uuid required") == 1
    body = {
        "code": "InvalidParameters",
        "message": "Invalid parameters: uuid",
        "errors": [
            {"field": "uuid", "code": "InvalidParameter", "message": "'nope' is not a UUID"}
        ],
    }
    assert "  uuid: 'nope' is not a UUID" in _err(ApiError(422, body))


def test_a_401_tells_a_cli_user_how_to_give_the_token() -> None:
    body = {"code": "Unauthorized", "message": "send 'Authorization: Bearer <token>'"}
    text = _err(ApiError(401, body))
    assert "--api-token" in text and "PORTOLAN_API_TOKEN" in text and "401" in text
    refused = _err(
        ApiError(401, {"code": "Unauthorized", "message": "wrong token"}), token_given=True
    )
    assert "refused the token" in refused and "--api-token" in refused


class RefusingApi:
    def request(self, method: str, path: str, **kw: Any) -> Any:
        raise ApiError(
            422,
            {
                "code": "InvalidParameters",
                "message": "owner_uuid required",
                "errors": [
                    {
                        "field": "owner_uuid",
                        "code": "MissingParameter",
                        "message": "owner_uuid required",
                    }
                ],
            },
        )


def test_rule_add_without_owner_or_global_mentions_global() -> None:
    args = argparse.Namespace(
        rule="FROM any TO all vms ALLOW tcp PORT 22",
        enabled=False,
        log=False,
        owner_uuid=None,
        is_global=False,
        description=None,
        uuid=None,
    )
    with pytest.raises(ApiError) as info:
        cmd_rule_add(RefusingApi(), args)  # type: ignore[arg-type]
    text = _err(info.value)
    assert "--global" in text and "--owner-uuid" in text
    assert text.count("owner_uuid required") == 1


# ---------------------------------------------------------------------- varpd run


def test_a_metrics_port_in_use_names_the_listener_and_address(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    cfg = tmp_path / "varpd.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path / "state"}"\ncontrol_socket = "{tmp_path / "s.sock"}"\n'
        f'metrics = "127.0.0.1:{port}"\n'
    )
    try:
        res = subprocess.run(
            [sys.executable, "-m", "varpd.cli", "run", str(cfg)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=30,
        )
    finally:
        busy.close()
    assert res.returncode == 1
    assert (
        f"metrics listener (config key metrics) 127.0.0.1:{port}: Address already in use"
        in res.stderr
    )
    assert "[Errno" not in res.stderr and "READY" not in res.stdout


def test_httpx_request_lines_are_quiet_unless_debugging() -> None:
    code = (
        "import logging,sys\n"
        "from varpd.cli import configure_logging\n"
        "configure_logging(sys.argv[1])\n"
        "logging.getLogger('httpx').info('HTTP Request: GET http://x/policy 304')\n"
        "logging.getLogger('varpd').info('varpd line')\n"
    )
    info = subprocess.run(
        [sys.executable, "-c", code, "INFO"], capture_output=True, text=True, timeout=30
    )
    assert "varpd line" in info.stderr and "HTTP Request" not in info.stderr
    debug = subprocess.run(
        [sys.executable, "-c", code, "DEBUG"], capture_output=True, text=True, timeout=30
    )
    assert "HTTP Request" in debug.stderr
