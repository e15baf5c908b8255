"""The svp client's side of the SVP extension (protocol/svp_ext.py): waiting with LOG_WAIT when
portolan offers it, falling back to LOG_REQ polling against v1 servers, and the jittered
reconnect backoff (issue 17)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
import trio

from portolan.metrics import PortolanMetrics
from portolan.service import Directory
from portolan.svp_server import SvpServer
from protocol.addr import ip_to_wire, parse_mac
from protocol.svp import LogVL3Entry, Op
from tests.varpd.svp_script_server import (
    Act,
    FakeHost,
    ScriptServer,
    refused_port,
    wait_until,
)
from varpd.plugins.svp import SvpOptions, SvpPlugin
from varpd.plugins.svp.conn import Connection
from varpd.shim.types import Point

VNET = 12340
CN1, CN1_IP = "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd", "192.168.1.1"
CN2, CN2_IP = "c5f6aa75-7b40-11e4-a6fa-d34c824a42ce", "192.168.1.2"
OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"


async def local_resolver(host: str, port: int):
    return [ip_address("127.0.0.1")]


async def start_plugin(host: FakeHost, port: int, **options: object) -> SvpPlugin:
    opts = SvpOptions(resolver=local_resolver, **options)  # type: ignore[arg-type]
    plugin = SvpPlugin(
        host,
        {"svp/host": "portolan.test", "svp/port": port, "svp/underlay_ip": CN1_IP},
        options=opts,
    )
    await plugin.start()
    return plugin


def connection(plugin: SvpPlugin) -> Connection:
    assert plugin.remote is not None
    (conn,) = plugin.remote.conns.values()
    return conn


# ------------------------------------------------------------------ against a v1 server


async def test_v1_server_gets_one_probe_then_plain_polling(autojump_clock, nursery):
    server = ScriptServer()
    await server.start(nursery)
    plugin = await start_plugin(FakeHost(nursery), server.port)
    await trio.sleep(2.0)
    # One HELLO (a PING with a body, answered with a plain PONG), then LOG_REQ every 0.25 s.
    assert len(server.pings) == 1
    polls = server.ops(Op.LOG_REQ)
    assert 6 <= len(polls) <= 9
    assert connection(plugin).caps == 0
    times = [t for t, (_, m) in zip(server.request_times, server.requests, strict=True)]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(g == pytest.approx(0.25, abs=0.01) for g in gaps)
    # A change is still picked up within one interval.
    server.log.append(LogVL3Entry(bytes(range(16)), ip_to_wire("172.16.0.5"), 0, VNET))
    await wait_until(lambda: bool(server.removed), timeout=1.0, step=0.001)
    await plugin.stop()


async def test_server_that_drops_the_probe_is_never_probed_again(autojump_clock, nursery):
    server = ScriptServer()
    server.ping_act = Act.CLOSE
    await server.start(nursery)
    plugin = await start_plugin(FakeHost(nursery), server.port)
    await wait_until(lambda: len(server.ops(Op.LOG_REQ)) >= 4, timeout=30)
    conn = connection(plugin)
    assert conn.ext_refused and conn.caps == 0
    assert len(server.pings) == 1
    assert len(server.accept_times) == 2  # the probed connection, then one without a probe
    await plugin.stop()


async def test_log_wait_off_sends_no_probe_at_all(autojump_clock, nursery):
    server = ScriptServer()
    await server.start(nursery)
    plugin = await start_plugin(FakeHost(nursery), server.port, log_wait=False)
    await wait_until(lambda: len(server.ops(Op.LOG_REQ)) >= 3)
    assert server.pings == []
    await plugin.stop()


# ------------------------------------------------------------------ backoff jitter


async def test_backoff_is_jittered_within_its_bounds(autojump_clock, nursery):
    attempts: list[float] = []
    port = refused_port()

    async def opener(addr, p):
        attempts.append(trio.current_time())
        raise OSError(111, "Connection refused")

    conn = Connection(ip_address("127.0.0.1"), port, opener=opener, backoff_jitter=0.5)
    nursery.start_soon(conn.run)
    await wait_until(lambda: len(attempts) >= 8, timeout=500)
    conn.close()
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    for gap, base in zip(gaps, (1, 2, 4, 8, 16, 32, 32), strict=False):
        assert 0.5 * base - 1e-6 <= gap <= base + 1e-6
    assert any(abs(g - b) > 1e-3 for g, b in zip(gaps, (1, 2, 4, 8, 16, 32, 32), strict=False))


async def test_reset_of_a_healthy_connection_reconnects_within_the_spread(autojump_clock, nursery):
    server = ScriptServer()
    await server.start(nursery)
    host = FakeHost(nursery)
    plugin = await start_plugin(host, server.port, reconnect_spread=0.5, log_interval=60)
    await wait_until(lambda: len(server.ops(Op.LOG_REQ)) >= 1)
    t0 = trio.current_time()
    await server.stop()
    await server.start(nursery, port=server.port)
    await wait_until(lambda: len(server.accept_times) >= 2, timeout=10)
    assert 0 <= server.accept_times[1] - t0 <= 0.5 + 0.01
    await plugin.stop()


# ------------------------------------------------------------------ against portolan


@pytest.fixture
async def portolan(nursery, tmp_path):
    d = await Directory.open(f"sqlite:{tmp_path / 'portolan.db'}")
    await d.put_cn(CN1, CN1_IP, 4789)
    await d.put_cn(CN2, CN2_IP, 4789)
    net = await d.create_network(
        name="fabric0", owner_uuid=OWNER, vnet_id=VNET, vlan_id=0, subnet="10.0.0.0/24"
    )
    await d.create_vnic(
        network_uuid=net.uuid, cn_uuid=CN1, mac=parse_mac("02:00:00:00:00:01"), ip="10.0.0.1"
    )
    for entry in await d.pending_log(CN1):
        await d.remove_log([entry.entry_id])
    server = SvpServer(d, metrics=PortolanMetrics())
    _, port = await nursery.start(server.serve, "127.0.0.1", 0)
    d.test_network = net  # type: ignore[attr-defined]
    d.test_port = port  # type: ignore[attr-defined]
    d.test_server = server  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        await d.aclose()


async def test_waits_with_log_wait_and_applies_a_shootdown_at_once(nursery, portolan):
    host = FakeHost(nursery)
    plugin = await start_plugin(host, portolan.test_port, log_wait_time=30)
    with trio.fail_after(10):
        while portolan.test_server._log_hub.held != 1:
            await trio.sleep(0.01)
    conn = connection(plugin)
    assert conn.caps == 1 and conn.max_wait == 60
    poller_requests = portolan.test_server.metrics.svp_requests
    await trio.sleep(1.0)  # idle: nothing is polled
    assert poller_requests.get(("log", "ok"), 0) == 0
    mac = parse_mac("02:00:00:00:00:02")
    started = trio.current_time()
    await portolan.create_vnic(
        network_uuid=portolan.test_network.uuid, cn_uuid=CN2, mac=mac, ip="10.0.0.2"
    )
    with trio.fail_after(10):
        while ("cache_set", "overlay0", mac, Point.of(CN2_IP, 4789)) not in host.driver.calls:
            await trio.sleep(0.005)
    assert trio.current_time() - started < 5
    with trio.fail_after(10):
        while await portolan.pending_log(CN1):
            await trio.sleep(0.01)
    assert poller_requests[("log_wait", "ok")] == 1
    assert plugin.remote is not None
    await plugin.stop()


async def test_short_waits_are_renewed_without_polling(nursery, portolan):
    plugin = await start_plugin(FakeHost(nursery), portolan.test_port, log_wait_time=0.3)
    await trio.sleep(1.5)
    metrics = portolan.test_server.metrics.svp_requests
    assert 3 <= metrics.get(("log_wait", "empty"), 0) <= 6
    assert metrics.get(("log", "ok"), 0) == 0
    await plugin.stop()
