"""``portolan serve`` / ``load`` / ``lookup`` / ``ping`` / ``log`` as real processes.

Raw SVP goes over a plain socket through the strict v1 client's checks; /metrics is scraped
over HTTP. Time bounds are generous (CONVENTIONS: tests never time anything).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import trio

from portolan.service import Directory
from protocol.addr import ip_to_wire, parse_mac
from protocol.svp import (
    LogAck,
    LogRequest,
    Ping,
    Pong,
    Status,
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
    decode_frame,
    encode_frame,
)
from tests.e2e.conftest import PortolanProcess, run_portolan, start_portolan

CN1 = "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd"
CN2 = "c5f6aa75-7b40-11e4-a6fa-d34c824a42ce"
VNET = 12340


def document() -> dict:
    return {
        "cns": [
            {"uuid": CN1, "ip": "192.168.1.1", "port": 4789},
            {"uuid": CN2, "ip": "192.168.1.2", "port": 4790},
        ],
        "vnics": [
            {
                "mac": "00:0a:95:9d:68:16",
                "ip": "10.0.0.1",
                "vnet_id": VNET,
                "vlan": 0,
                "cn_uuid": CN1,
            },
            {
                "mac": "0:a:95:9d:68:17",
                "ip": "10.0.0.2",
                "vnet_id": VNET,
                "vlan": 0,
                "cn_uuid": CN2,
            },
            {
                "mac": "00:0a:95:9d:68:18",
                "ip": "fd00::3",
                "vnet_id": VNET,
                "vlan_id": 5,
                "cn_uuid": CN2,
            },
            {"mac": "00:0a:95:9d:68:19", "ip": "10.0.0.4", "vnet_id": VNET + 1, "cn_uuid": CN1},
        ],
    }


def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def svp_exchange(address: tuple[str, int], frames: bytes, replies: int) -> list[bytes]:
    out = []
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(frames)
        buf = b""
        while len(out) < replies:
            while len(buf) >= 16 and len(buf) >= 16 + int.from_bytes(buf[4:8], "big"):
                end = 16 + int.from_bytes(buf[4:8], "big")
                out.append(buf[:end])
                buf = buf[end:]
            if len(out) >= replies:
                break
            data = sock.recv(65536)
            assert data, f"connection closed after {len(out)} replies"
            buf += data
    return out


def scrape(process: PortolanProcess) -> str:
    host, port = process.metrics
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def metric(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def server_arg(process: PortolanProcess) -> str:
    return "{}:{}".format(*process.svp)


def wait_until_found(process: PortolanProcess, mac: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    request = VL2Request(1, parse_mac(mac), VNET).encode()
    while time.monotonic() < deadline:
        (frame,) = svp_exchange(process.svp, request, 1)
        if decode_frame(frame).status == Status.OK:
            return
        time.sleep(0.1)
    raise AssertionError(f"{mac} never became visible over SVP")


@pytest.fixture
def loaded(tmp_path) -> PortolanProcess:
    """portolan serve on a store that `portolan load` filled before the start."""
    store = f"sqlite:{tmp_path / 'loaded.db'}"
    done = run_portolan(
        "load", str(write_json(tmp_path / "doc.json", document())), "--store", store
    )
    assert done.returncode == 0, done.stderr
    process = start_portolan(tmp_path, store_url=store)
    yield process
    process.terminate()


def test_ready_line_names_every_listener_with_a_real_port(portolan_process):
    assert set(portolan_process.addresses) == {"svp", "api", "metrics"}
    assert all(port > 0 for _, port in portolan_process.addresses.values())


def test_raw_svp_lookups_against_a_loaded_store(loaded):
    frames = svp_exchange(
        loaded.svp,
        VL2Request(0x01000000, parse_mac("00:0a:95:9d:68:16"), VNET).encode()
        + VL2Request(0x02000000, parse_mac("00:0a:95:9d:68:17"), VNET).encode()
        + VL3Request(0x03000000, ip_to_wire("fd00::3"), 2, VNET).encode()
        + VL2Request(0x04000000, parse_mac("00:0a:95:9d:68:19"), VNET).encode()
        + Ping(0xFFFFFFFF).encode(),
        5,
    )
    assert frames == [
        VL2Ack(0x01000000, Status.OK, 4789, ip_to_wire("192.168.1.1")).encode(),
        VL2Ack(0x02000000, Status.OK, 4790, ip_to_wire("192.168.1.2")).encode(),
        VL3Ack(
            0x03000000, Status.OK, parse_mac("00:0a:95:9d:68:18"), 4790, ip_to_wire("192.168.1.2")
        ).encode(),
        VL2Ack(0x04000000, Status.NOTFOUND, 0, bytes(16)).encode(),
        Pong(0xFFFFFFFF).encode(),
    ]
    (frame,) = svp_exchange(loaded.svp, LogRequest(9, 1024, ip_to_wire("192.168.1.1")).encode(), 1)
    assert frame == LogAck(9, Status.OK, ()).encode()  # load writes no shootdowns


def test_metrics_counters_move_with_traffic(loaded):
    before = scrape(loaded)
    svp_exchange(
        loaded.svp,
        VL2Request(1, parse_mac("00:0a:95:9d:68:16"), VNET).encode()
        + VL2Request(2, parse_mac("00:0a:95:9d:68:99"), VNET).encode(),
        2,
    )
    with socket.create_connection(loaded.svp, timeout=10) as sock:
        sock.sendall(encode_frame(1, 0x7F, 1, b""))
        assert sock.recv(100) == b""  # closed at once
    after = scrape(loaded)
    for series, moved in [
        ('portolan_svp_requests_total{op="vl2",status="ok"}', 1),
        ('portolan_svp_requests_total{op="vl2",status="notfound"}', 1),
        ('portolan_svp_protocol_errors_total{kind="unknown_op"}', 1),
        ("portolan_svp_connections_accepted_total", 2),
    ]:
        assert metric(after, series) - metric(before, series) == moved, series
    assert "portolan_svp_lookup_seconds_bucket" in after


def test_lookup_ping_and_log_commands(loaded):
    server = server_arg(loaded)
    done = run_portolan(
        "lookup", "vl2", "--mac", "0:a:95:9d:68:16", "--vnet", str(VNET), "--server", server
    )
    assert done.returncode == 0, done.stderr
    assert "192.168.1.1:4789" in done.stdout
    done = run_portolan(
        "lookup", "vl3", "--ip", "10.0.0.2", "--vnet", str(VNET), "--server", server, "--json"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "ip": "10.0.0.2",
        "vnet_id": VNET,
        "status": "OK",
        "mac": "00:0a:95:9d:68:17",
        "underlay_ip": "192.168.1.2",
        "underlay_port": 4790,
    }
    done = run_portolan(
        "lookup", "vl2", "--mac", "00:0a:95:9d:68:99", "--vnet", str(VNET), "--server", server
    )
    assert done.returncode == 1
    assert "NOTFOUND" in done.stderr
    done = run_portolan("ping", "--server", server)
    assert done.returncode == 0 and "PONG" in done.stdout
    done = run_portolan("log", "--cn-ip", "192.168.1.1", "--server", server)
    assert done.returncode == 0 and "empty" in done.stdout
    done = run_portolan("log", "--cn-ip", "192.0.2.7", "--server", server)
    assert done.returncode == 1 and "FATAL" in done.stderr


def test_load_into_a_running_server_becomes_visible(portolan_process, tmp_path):
    path = write_json(tmp_path / "doc.json", document())
    done = run_portolan("load", str(path), "--store", portolan_process.store_url)
    assert done.returncode == 0, done.stderr
    assert "4 vnics" in done.stdout
    wait_until_found(portolan_process, "00:0a:95:9d:68:16")


def _vnics_in(store_url: str) -> int:
    async def count() -> int:
        d = await Directory.open(store_url)
        try:
            return len(await d.list_vnics())
        finally:
            await d.aclose()

    return trio.run(count)


def test_a_bad_load_file_is_refused_naming_the_field_and_writes_nothing(tmp_path):
    store = f"sqlite:{tmp_path / 'p.db'}"
    doc = document()
    doc["vnics"].append({"mac": "zz", "ip": "10.0.0.9", "vnet_id": VNET, "cn_uuid": CN1})
    done = run_portolan("load", str(write_json(tmp_path / "bad.json", doc)), "--store", store)
    assert done.returncode == 1
    assert "vnics[4].mac" in done.stderr and '"zz"' in done.stderr.replace("'", '"')
    assert "nothing was written" in done.stderr
    assert _vnics_in(store) == 0


def test_a_file_that_is_not_json_is_refused_before_the_store_is_opened(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"vnics": [')
    db = tmp_path / "never.db"
    done = run_portolan("load", str(path), "--store", f"sqlite:{db}")
    assert done.returncode == 1
    assert "not valid JSON" in done.stderr and "line 1" in done.stderr
    assert not db.exists()
    done = run_portolan("load", str(tmp_path / "missing.json"), "--store", f"sqlite:{db}")
    assert done.returncode == 1 and "cannot read" in done.stderr


def test_api_on_a_non_loopback_address_without_a_token_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PORTOLAN_API_TOKEN"}
    done = run_portolan(
        "serve",
        "--store",
        f"sqlite:{tmp_path / 'p.db'}",
        "--svp-listen",
        "127.0.0.1:0",
        "--api-listen",
        "0.0.0.0:0",
        "--metrics-listen",
        "127.0.0.1:0",
        env=env,
    )
    assert done.returncode == 2
    assert "--api-token" in done.stderr and "0.0.0.0:0" in done.stderr
    assert "READY" not in done.stdout
    assert not (tmp_path / "p.db").exists()


def test_api_on_a_non_loopback_address_with_a_token_starts(tmp_path):
    process = start_portolan(tmp_path, ["--api-listen", "0.0.0.0:0", "--api-token", "s3cret"])
    try:
        assert process.api[1] > 0
    finally:
        assert process.terminate() == 0


def test_sigterm_exits_zero(portolan_process):
    (frame,) = svp_exchange(portolan_process.svp, Ping(1).encode(), 1)
    assert frame == Pong(1).encode()
    assert portolan_process.terminate() == 0, portolan_process.stderr()
