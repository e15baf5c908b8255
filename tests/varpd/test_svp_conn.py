"""The svp connection state machine against a scripted server (autojump clock throughout)."""

from __future__ import annotations

import errno
from contextlib import asynccontextmanager
from ipaddress import IPv4Address

import pytest
import trio

from protocol.svp import (
    LogAck,
    LogRequest,
    Op,
    Pong,
    Shootdown,
    Status,
    VL2Ack,
    VL2Request,
    VL3Ack,
    encode_frame,
)
from tests.varpd.svp_script_server import (
    ScriptServer,
    answer,
    bad_crc,
    defer,
    reframe,
    refused_port,
    reset,
    send,
    stall,
    wait_until,
)
from varpd.plugins.svp.conn import (
    MAX_ID,
    Connection,
    ConnectionLost,
    ConnState,
    QueryFailed,
    open_tcp,
)

LOCALHOST = IPv4Address("127.0.0.1")
MAC_A = bytes.fromhex("000a959d6816")
MAC_B = bytes.fromhex("000a959d6817")
UL_A = bytes.fromhex("00000000000000000000ffff0a000001")
UL_B = bytes.fromhex("00000000000000000000ffff0a000002")
VNET = 12340


@asynccontextmanager
async def running(conn: Connection):
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        yield conn
        nursery.cancel_scope.cancel()


def recording_opener(times: list[float], refuse_first: int = 0, port: int | None = None):
    """An opener that records attempt times; refuses the first ``refuse_first`` attempts."""

    async def opener(addr, p):
        times.append(trio.current_time())
        if len(times) <= refuse_first:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return await open_tcp(addr, port if port is not None else p)

    return opener


async def server_with_table(nursery) -> ScriptServer:
    server = ScriptServer()
    server.vl2[(MAC_A, VNET)] = (4789, UL_A)
    server.vl2[(MAC_B, VNET)] = (4790, UL_B)
    await server.start(nursery)
    return server


def vl2(mac: bytes = MAC_A) -> VL2Request:
    return VL2Request(0, mac, VNET)


def diffs(times: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]


# ------------------------------------------------------------------------ backoff / degrade


async def test_backoff_doubles_to_32s_against_a_refusing_port(autojump_clock):
    times: list[float] = []
    conn = Connection(LOCALHOST, refused_port(), opener=recording_opener(times, 0))
    async with running(conn):
        await wait_until(lambda: len(times) >= 8, timeout=500)
    assert diffs(times[:8]) == [1, 2, 4, 8, 16, 32, 32]


async def test_backoff_applies_to_a_server_that_resets_on_accept(autojump_clock, nursery):
    server = ScriptServer()
    server.on_accept.extend([reset()] * 10)
    port = await server.start(nursery)
    conn = Connection(LOCALHOST, port)
    async with running(conn):
        await wait_until(lambda: len(server.accept_times) >= 8, timeout=500)
    assert diffs(server.accept_times[:8]) == [1, 2, 4, 8, 16, 32, 32]


async def test_degraded_after_more_than_six_failures_and_restored_on_success(
    autojump_clock, nursery
):
    server = await server_with_table(nursery)
    times: list[float] = []
    changes: list[tuple[ConnState, bool]] = []
    conn = Connection(
        LOCALHOST,
        server.port,
        opener=recording_opener(times, refuse_first=8),
        on_change=lambda c: changes.append((c.state, c.degraded)),
    )
    async with running(conn):
        await wait_until(lambda: len(times) == 6 and conn.state is ConnState.BACKOFF)
        assert conn.failures == 6 and not conn.degraded
        await wait_until(lambda: len(times) == 7 and conn.state is ConnState.BACKOFF)
        assert conn.failures == 7 and conn.degraded
        await wait_until(lambda: conn.state is ConnState.ACTIVE, timeout=200)
        assert not conn.degraded
        reply = await conn.query(vl2())
        assert isinstance(reply, VL2Ack) and reply.status == Status.OK
    # The degraded mark went up exactly once, with the 7th failure, and came down on ACTIVE.
    flips = [d for _, d in changes]
    first = flips.index(True)
    assert changes[first][0] is ConnState.BACKOFF
    assert flips[first:].count(False) >= 1
    assert (ConnState.ACTIVE, False) in changes[first:]


async def test_reset_after_answering_reconnects_at_once_with_counter_cleared(
    autojump_clock, nursery
):
    server = await server_with_table(nursery)
    server.script.extend([answer(), reset()])
    conn = Connection(LOCALHOST, server.port)
    async with running(conn):
        await wait_until(lambda: conn.usable)
        await conn.query(vl2())
        t0 = trio.current_time()
        with pytest.raises(ConnectionLost):
            await conn.query(vl2())
        await wait_until(lambda: len(server.accept_times) == 2 and conn.usable)
        assert server.accept_times[1] - t0 < 0.1
        assert conn.failures == 0


async def test_socket_creation_failure_is_error_state_and_degraded(autojump_clock):
    async def opener(addr, port):
        raise OSError(errno.EMFILE, "Too many open files")

    conn = Connection(LOCALHOST, 1, opener=opener)
    async with running(conn):
        await wait_until(lambda: conn.state is ConnState.ERROR)
        assert conn.degraded


# ------------------------------------------------------------------------ queries


async def test_query_gets_its_reply_and_ids_start_at_1(autojump_clock, nursery):
    server = await server_with_table(nursery)
    conn = Connection(LOCALHOST, server.port)
    async with running(conn):
        await wait_until(lambda: conn.usable)
        reply = await conn.query(vl2())
        assert reply == VL2Ack(1, Status.OK, 4789, UL_A)
        reply = await conn.query(vl2(MAC_B))
        assert reply.id == 2 and reply.port == 4790
    assert [m.id for m in server.ops(Op.VL2_REQ)] == [1, 2]


async def test_ids_wrap_within_1_to_2_31_minus_1(autojump_clock, nursery):
    server = await server_with_table(nursery)
    conn = Connection(LOCALHOST, server.port)
    conn._next_id = MAX_ID
    async with running(conn):
        await wait_until(lambda: conn.usable)
        await conn.query(vl2())
        await conn.query(vl2())
    assert [m.id for m in server.ops(Op.VL2_REQ)] == [MAX_ID, 1]


async def test_out_of_order_replies_are_matched_by_id(autojump_clock, nursery):
    server = await server_with_table(nursery)
    server.script.extend([defer(), answer()])
    conn = Connection(LOCALHOST, server.port)
    results: dict[bytes, VL2Ack] = {}

    async def ask(mac: bytes) -> None:
        results[mac] = await conn.query(vl2(mac))

    async with running(conn):
        await wait_until(lambda: conn.usable)
        async with trio.open_nursery() as n:
            n.start_soon(ask, MAC_A)
            await wait_until(lambda: len(server.requests) == 1)
            n.start_soon(ask, MAC_B)
    assert results[MAC_A].addr == UL_A and results[MAC_A].port == 4789
    assert results[MAC_B].addr == UL_B and results[MAC_B].port == 4790
    assert conn.resets == 0


async def test_many_queries_are_pipelined_on_one_connection(autojump_clock, nursery):
    server = await server_with_table(nursery)
    conn = Connection(LOCALHOST, server.port)
    replies: list[VL2Ack] = []

    async def ask(mac: bytes) -> None:
        replies.append(await conn.query(vl2(mac)))

    async with running(conn):
        await wait_until(lambda: conn.usable)
        async with trio.open_nursery() as n:
            for i in range(50):
                n.start_soon(ask, MAC_A if i % 2 else MAC_B)
    assert len(replies) == 50 and len({r.id for r in replies}) == 50
    assert len(server.accept_times) == 1


async def test_query_timeout_resets_the_connection(autojump_clock, nursery):
    server = await server_with_table(nursery)
    server.script.append(stall())
    conn = Connection(LOCALHOST, server.port)
    async with running(conn):
        await wait_until(lambda: conn.usable)
        t0 = trio.current_time()
        with pytest.raises(ConnectionLost, match="no reply within 30 s"):
            await conn.query(vl2())
        assert trio.current_time() - t0 == pytest.approx(30, abs=0.01)
        assert conn.resets == 1
        await wait_until(lambda: conn.usable)
        assert (await conn.query(vl2())).status == Status.OK
    assert len(server.accept_times) == 2


async def test_query_timeout_is_configurable(autojump_clock, nursery):
    server = await server_with_table(nursery)
    server.script.append(stall())
    conn = Connection(LOCALHOST, server.port, query_timeout=2.5)
    async with running(conn):
        await wait_until(lambda: conn.usable)
        t0 = trio.current_time()
        with pytest.raises(ConnectionLost):
            await conn.query(vl2())
        assert trio.current_time() - t0 == pytest.approx(2.5, abs=0.01)


async def test_a_cancelled_query_leaves_its_late_reply_harmless(autojump_clock, nursery):
    server = await server_with_table(nursery)
    server.script.append(answer(delay=3))
    conn = Connection(LOCALHOST, server.port)
    async with running(conn):
        await wait_until(lambda: conn.usable)
        with trio.move_on_after(1):
            await conn.query(vl2())
        await trio.sleep(5)
        assert conn.resets == 0 and conn.outstanding == 0
        assert (await conn.query(vl2(MAC_B))).port == 4790


def _unsolicited(op_frame: bytes):
    return lambda req, frame: op_frame + frame


INVALID_REPLIES = {
    "wrong_version": lambda req, frame: reframe(frame, version=2),
    "version_zero": lambda req, frame: reframe(frame, version=0),
    "wrong_ack_op": lambda req, frame: VL3Ack(req.id, Status.OK, MAC_A, 4789, UL_A).encode(),
    "request_op": lambda req, frame: reframe(frame, op=Op.VL2_REQ),
    "unsolicited_pong": lambda req, frame: Pong(req.id).encode(),
    "unsolicited_shootdown": lambda req, frame: Shootdown(req.id, MAC_A, VNET).encode(),
    "unknown_op": lambda req, frame: reframe(frame, op=0x7F),
    "unknown_id": lambda req, frame: reframe(frame, id=req.id + 1000),
    "body_too_long": lambda req, frame: reframe(frame, body=frame[16:] + b"\x00" * 4),
    "body_too_short": lambda req, frame: reframe(frame, body=frame[16:32]),
    "bad_crc": lambda req, frame: bad_crc(frame),
    "garbage": lambda req, frame: b"\xde\xad\xbe\xef" * 8,
    "huge_size": lambda req, frame: (
        encode_frame(1, Op.VL2_ACK, req.id, b"\x00" * 20)[:4] + b"\x7f\xff\xff\xff" + frame[8:]
    ),
}


@pytest.mark.parametrize("kind", sorted(INVALID_REPLIES))
async def test_invalid_reply_resets_the_connection(autojump_clock, nursery, kind):
    server = await server_with_table(nursery)
    server.script.append(answer(INVALID_REPLIES[kind]))
    conn = Connection(LOCALHOST, server.port)
    async with running(conn):
        await wait_until(lambda: conn.usable)
        with pytest.raises(ConnectionLost):
            await conn.query(vl2())
        assert conn.resets == 1
        await wait_until(lambda: conn.usable)
        assert (await conn.query(vl2())).status == Status.OK
    assert len(server.accept_times) == 2


async def test_log_ack_larger_than_requested_count_resets(autojump_clock, nursery):
    server = await server_with_table(nursery)
    big = LogAck(0, Status.OK, ()).encode()
    server.script.append(
        answer(lambda req, frame: reframe(big, id=req.id, body=b"\x00" * (4 + 32 * 3)))
    )
    conn = Connection(LOCALHOST, server.port)
    async with running(conn):
        await wait_until(lambda: conn.usable)
        with pytest.raises(ConnectionLost, match="LOG_ACK body of 100 bytes outside 4..68"):
            await conn.query(LogRequest(0, 64, UL_A))


async def test_log_ack_with_unparseable_entries_fails_only_that_query(autojump_clock, nursery):
    server = await server_with_table(nursery)
    server.script.append(
        answer(
            lambda req, frame: reframe(frame, body=b"\x00" * 4 + b"\x00\x00\x00\x09" + b"\x00" * 28)
        )
    )
    conn = Connection(LOCALHOST, server.port)
    async with running(conn):
        await wait_until(lambda: conn.usable)
        with pytest.raises(QueryFailed):
            await conn.query(LogRequest(0, 1024, UL_A))
        assert conn.resets == 0
        assert isinstance(await conn.query(LogRequest(0, 1024, UL_A)), LogAck)


async def test_reset_fails_every_query_in_flight(autojump_clock, nursery):
    server = await server_with_table(nursery)
    server.script.extend([stall(), stall(), send(b"garbage-garbage-")])
    conn = Connection(LOCALHOST, server.port)
    errors: list[Exception] = []

    async def ask() -> None:
        try:
            await conn.query(vl2())
        except ConnectionLost as exc:
            errors.append(exc)

    async with running(conn):
        await wait_until(lambda: conn.usable)
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(ask)
    assert len(errors) == 3 and conn.resets == 1


async def test_query_on_an_inactive_connection_is_refused(autojump_clock):
    conn = Connection(LOCALHOST, refused_port())
    with pytest.raises(ConnectionLost):
        await conn.query(vl2())


async def test_winddown_finishes_queries_in_flight_then_closes(autojump_clock, nursery):
    server = await server_with_table(nursery)
    server.script.append(answer(delay=2))
    conn = Connection(LOCALHOST, server.port)
    replies: list[VL2Ack] = []

    async def ask() -> None:
        replies.append(await conn.query(vl2()))

    async with trio.open_nursery() as n:
        await n.start(conn.run)
        await wait_until(lambda: conn.usable)
        n.start_soon(ask)
        await wait_until(lambda: conn.outstanding == 1)
        conn.wind_down()
        assert conn.state is ConnState.WINDDOWN
        with pytest.raises(ConnectionLost):
            await conn.query(vl2(MAC_B))
        await wait_until(lambda: conn.state is ConnState.CLOSED)
    assert len(replies) == 1 and replies[0].status == Status.OK
    assert conn.resets == 0


async def test_winddown_of_an_idle_connection_closes_at_once(autojump_clock, nursery):
    server = await server_with_table(nursery)
    conn = Connection(LOCALHOST, server.port)
    async with trio.open_nursery() as n:
        await n.start(conn.run)
        await wait_until(lambda: conn.usable)
        conn.wind_down()
    assert conn.state is ConnState.CLOSED


async def test_unexpected_opener_error_is_error_state_not_a_crash(autojump_clock):
    async def opener(addr, port):
        raise RuntimeError("boom")

    conn = Connection(LOCALHOST, 1, opener=opener)
    async with running(conn):
        await wait_until(lambda: conn.state is ConnState.ERROR)
        assert conn.degraded and "boom" in (conn.last_error or "")
