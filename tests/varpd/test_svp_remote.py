"""Remotes: DNS, the set of connections, degrade messages, waiting for and retrying queries."""

from __future__ import annotations

import errno
import socket
from collections import deque
from ipaddress import IPv4Address, ip_address

import pytest
import trio

import varpd.plugins.svp.remote as remote_mod
from protocol.svp import Op, Status
from tests.varpd.svp_script_server import (
    FakeHost,
    ScriptServer,
    answer,
    bad_crc,
    reframe,
    refused_port,
    reset,
    stall,
    wait_until,
)
from varpd.plugins.svp.conn import ConnectionLost, ConnState, NoConnection, open_tcp
from varpd.plugins.svp.remote import (
    DNS_FAIL_MESSAGE,
    REMOTE_FAIL_MESSAGE,
    Remote,
    SvpOptions,
    resolve_host,
)

MAC_A = bytes.fromhex("000a959d6816")
UL_A = bytes.fromhex("00000000000000000000ffff0a000001")
VNET = 12340


def static_resolver(*addrs: str):
    async def resolver(host: str, port: int):
        return [ip_address(a) for a in addrs]

    return resolver


async def start_remote(nursery, port: int, host: FakeHost | None = None, **opts) -> Remote:
    opts.setdefault("resolver", static_resolver("127.0.0.1"))
    # exact backoff times (the jitter of issue 17 is tested in test_svp_ext_client.py)
    opts.setdefault("backoff_jitter", 0.0)
    opts.setdefault("reconnect_spread", 0.0)
    remote = Remote("portolan.test", port, "192.168.1.1", SvpOptions(**opts))
    if host is not None:
        remote.attach(host)
    await nursery.start(remote.run)
    return remote


async def table_server(nursery, **kw) -> ScriptServer:
    server = ScriptServer()
    server.vl2[(MAC_A, VNET)] = (4789, UL_A)
    await server.start(nursery, **kw)
    return server


def lookups(server: ScriptServer):
    return server.ops(Op.VL2_REQ)


# ------------------------------------------------------------------------ retries


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda req, frame: bad_crc(frame),
        lambda req, frame: reframe(frame, version=2),
        lambda req, frame: reframe(frame, body=frame[16:] + b"\x00"),
        lambda req, frame: reframe(frame, op=Op.LOG_RM_ACK, body=b"\x00" * 4),
    ],
    ids=["bad_crc", "wrong_version", "wrong_size", "wrong_op"],
)
async def test_query_in_flight_is_retried_on_the_new_connection(autojump_clock, nursery, rewrite):
    server = await table_server(nursery)
    server.script_for[Op.VL2_REQ] = deque([answer(rewrite)])
    remote = await start_remote(nursery, server.port)
    reply = await remote.vl2(MAC_A, VNET)
    assert reply.status == Status.OK and reply.addr == UL_A
    conns = [c for c, m in server.requests if m.OP == Op.VL2_REQ]
    assert conns == [0, 1]
    await remote.aclose()


async def test_retries_are_bounded(autojump_clock, nursery):
    server = await table_server(nursery)
    server.script_for[Op.VL2_REQ] = deque([reset()] * 10)
    remote = await start_remote(nursery, server.port, retries=2)
    with pytest.raises(ConnectionLost):
        await remote.vl2(MAC_A, VNET)
    assert len(lookups(server)) == 3
    await remote.aclose()


async def test_timed_out_query_is_retried_after_the_reset(autojump_clock, nursery):
    server = await table_server(nursery)
    server.script_for[Op.VL2_REQ] = deque([stall()])
    remote = await start_remote(nursery, server.port)
    t0 = trio.current_time()
    reply = await remote.vl2(MAC_A, VNET)
    assert reply.status == Status.OK
    assert 30 <= trio.current_time() - t0 < 40
    await remote.aclose()


async def test_queries_are_spread_over_the_active_connections(autojump_clock, nursery):
    server = await table_server(nursery, host="0.0.0.0")
    remote = await start_remote(
        nursery, server.port, resolver=static_resolver("127.0.0.1", "127.0.0.2")
    )
    await wait_until(lambda: sum(c.usable for c in remote.conns.values()) == 2)
    for _ in range(6):
        await remote.vl2(MAC_A, VNET)
    per_conn = [c for c, m in server.requests if m.OP == Op.VL2_REQ]
    assert sorted(set(per_conn)) == [0, 1]
    await remote.aclose()


# ------------------------------------------------------------------------ waiting for a connection


async def test_lookup_waits_for_a_server_that_comes_up_within_the_bound(autojump_clock, nursery):
    port = refused_port()
    remote = await start_remote(nursery, port)
    server = ScriptServer()
    server.vl2[(MAC_A, VNET)] = (4789, UL_A)

    async def come_up_later() -> None:
        await trio.sleep(2)
        await server.start(nursery, port=port)

    nursery.start_soon(come_up_later)
    await trio.sleep(0.5)
    t0 = trio.current_time()
    reply = await remote.vl2(MAC_A, VNET)
    assert reply.status == Status.OK
    # Attempts at 0, 1, 3: the one at t=3 finds the server.
    assert trio.current_time() - t0 == pytest.approx(2.5, abs=0.1)
    await remote.aclose()


async def test_lookup_fails_when_no_server_comes_up_within_the_bound(autojump_clock, nursery):
    remote = await start_remote(nursery, refused_port())
    t0 = trio.current_time()
    with pytest.raises(NoConnection):
        await remote.vl2(MAC_A, VNET)
    assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.01)
    await remote.aclose()


async def test_connection_wait_bound_is_configurable(autojump_clock, nursery):
    remote = await start_remote(nursery, refused_port(), connect_wait=0.5)
    t0 = trio.current_time()
    with pytest.raises(NoConnection):
        await remote.vl2(MAC_A, VNET)
    assert trio.current_time() - t0 == pytest.approx(0.5, abs=0.01)
    await remote.aclose()


async def test_lookup_fails_over_to_the_other_address(autojump_clock, nursery):
    server = await table_server(nursery)
    attempts: list[str] = []

    async def opener(addr, port):
        attempts.append(str(addr))
        if str(addr) == "127.0.0.9":
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        return await open_tcp(addr, port)

    remote = await start_remote(
        nursery,
        server.port,
        resolver=static_resolver("127.0.0.9", "127.0.0.1"),
        opener=opener,
    )
    for _ in range(4):
        assert (await remote.vl2(MAC_A, VNET)).status == Status.OK
    assert remote.conns[IPv4Address("127.0.0.9")].state is ConnState.BACKOFF
    await remote.aclose()


# ------------------------------------------------------------------------ degrade


async def test_all_connections_failing_degrades_every_instance_and_success_restores(
    autojump_clock, nursery
):
    port = refused_port()
    h1, h2 = FakeHost(nursery, vnet_id=1), FakeHost(nursery, vnet_id=2)
    remote = await start_remote(nursery, port, h1)
    remote.attach(h2)
    # Failures at t = 0, 1, 3, 7, 15, 31, 63: the 7th degrades.
    await trio.sleep(62)
    assert h1.degraded is None
    await trio.sleep(2)
    assert h1.degraded == REMOTE_FAIL_MESSAGE and h2.degraded == REMOTE_FAIL_MESSAGE
    # A late attacher learns about it at once.
    h3 = FakeHost(nursery, vnet_id=3)
    remote.attach(h3)
    assert h3.degraded == REMOTE_FAIL_MESSAGE
    server = ScriptServer()
    await server.start(nursery, port=port)
    await wait_until(lambda: h1.degraded is None, timeout=40)
    assert h1.events[-1] == ("restore", None) and h2.degraded is None
    assert any(c.state is ConnState.ACTIVE for c in remote.conns.values())
    await remote.aclose()


async def test_dns_failure_degrades_and_resolution_restores(autojump_clock, nursery):
    server = await table_server(nursery)
    answers: list[object] = [socket.gaierror(socket.EAI_NONAME, "Name or service not known")]

    async def resolver(host, port):
        item = answers[0]
        if isinstance(item, Exception):
            raise item
        return item

    host = FakeHost(nursery)
    remote = await start_remote(nursery, server.port, host, resolver=resolver)
    await wait_until(lambda: host.degraded is not None)
    assert host.degraded == DNS_FAIL_MESSAGE.format(host="portolan.test")
    assert host.degraded == "failed to resolve or find entries for hostname portolan.test"
    answers[0] = [IPv4Address("127.0.0.1")]
    await trio.sleep(30.5)
    assert host.degraded is None
    assert (await remote.vl2(MAC_A, VNET)).status == Status.OK
    await remote.aclose()


async def test_dns_failure_outranks_unreachable_peers(autojump_clock, nursery):
    answers: list[object] = [[IPv4Address("127.0.0.1")]]

    async def resolver(host, port):
        item = answers[0]
        if isinstance(item, Exception):
            raise item
        return item

    host = FakeHost(nursery)
    remote = await start_remote(nursery, refused_port(), host, resolver=resolver)
    await trio.sleep(64)
    assert host.degraded == REMOTE_FAIL_MESSAGE
    answers[0] = socket.gaierror(socket.EAI_FAIL, "Non-recoverable failure")
    await trio.sleep(30)
    assert host.degraded.startswith("failed to resolve")
    answers[0] = [IPv4Address("127.0.0.1")]
    await trio.sleep(30)
    assert host.degraded == REMOTE_FAIL_MESSAGE
    await remote.aclose()


async def test_transient_resolver_errors_are_retried_quickly(autojump_clock, nursery):
    server = await table_server(nursery)
    calls: list[float] = []

    async def resolver(host, port):
        calls.append(trio.current_time())
        if len(calls) < 3:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [IPv4Address("127.0.0.1")]

    host = FakeHost(nursery)
    remote = await start_remote(nursery, server.port, host, resolver=resolver)
    assert (await remote.vl2(MAC_A, VNET)).status == Status.OK
    assert calls[2] - calls[0] == pytest.approx(2.0, abs=0.01)
    assert host.degraded is None and not host.events
    await remote.aclose()


# ------------------------------------------------------------------------ DNS re-resolution


async def test_reresolution_adds_and_winds_down_connections(autojump_clock, nursery, monkeypatch):
    server = await table_server(nursery, host="0.0.0.0")
    current = ["127.0.0.1"]
    seen: list[float] = []

    async def fake_resolve_host(host, port):
        seen.append(trio.current_time())
        return [ip_address(a) for a in current]

    monkeypatch.setattr(remote_mod, "resolve_host", fake_resolve_host)
    remote = Remote("portolan.test", server.port, "192.168.1.1", SvpOptions())
    await nursery.start(remote.run)
    await wait_until(lambda: any(c.usable for c in remote.conns.values()))
    assert set(remote.conns) == {IPv4Address("127.0.0.1")}

    current[:] = ["127.0.0.1", "127.0.0.2"]
    await trio.sleep(30.5)
    await wait_until(lambda: sum(c.usable for c in remote.conns.values()) == 2)
    assert "127.0.0.2" in server.accepted_on

    old = remote.conns[IPv4Address("127.0.0.1")]
    current[:] = ["127.0.0.2"]
    await trio.sleep(30)
    await wait_until(lambda: old.state is ConnState.CLOSED)
    assert set(remote.conns) == {IPv4Address("127.0.0.2")}
    assert diffs(seen[:3]) == [30, 30]
    assert (await remote.vl2(MAC_A, VNET)).status == Status.OK
    await remote.aclose()


def diffs(times: list[float]) -> list[float]:
    return [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]


async def test_resolve_host_returns_ip_literals_and_names():
    assert await resolve_host("127.0.0.1", 1296) == [IPv4Address("127.0.0.1")]
    addrs = await resolve_host("localhost", 1296)
    assert addrs and all(a.is_loopback for a in addrs)


async def test_remote_refuses_two_instances_of_one_vnet(nursery):
    remote = Remote("h", 1296, "192.168.1.1")
    remote.attach(FakeHost(nursery, vnet_id=5))
    with pytest.raises(ValueError, match="vnet 5"):
        remote.attach(FakeHost(nursery, vnet_id=5))


async def test_status_lists_connections(autojump_clock, nursery):
    server = await table_server(nursery)
    remote = await start_remote(nursery, server.port)
    await wait_until(lambda: any(c.usable for c in remote.conns.values()))
    status = remote.status()
    assert status["remote"] == f"portolan.test:{server.port}"
    assert status["connections"][0]["state"] == "ACTIVE"
    assert status["degraded"] is None
    await remote.aclose()


async def test_a_hostname_the_resolver_cannot_encode_degrades_instead_of_crashing(
    autojump_clock, nursery
):
    host = FakeHost(nursery)
    remote = Remote("a..b", 1296, "192.168.1.1")
    remote.attach(host)
    await nursery.start(remote.run)
    await wait_until(lambda: host.degraded is not None)
    assert host.degraded == "failed to resolve or find entries for hostname a..b"
    await remote.aclose()
