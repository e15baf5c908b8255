"""The SVP extension on the server: HELLO negotiation and held LOG_WAITs (protocol/svp_ext.py,
portolan/svp_ext_session.py), over real TCP with a real Directory on SQLite."""

# ruff: noqa: F811 - the fixtures of test_svp_server are imported by name

from __future__ import annotations

import pytest
import trio

from protocol.addr import ip_to_wire, parse_mac
from protocol.svp import (
    LogAck,
    LogRemove,
    LogRemoveAck,
    LogVL3Entry,
    Ping,
    Pong,
    Status,
    VL2Ack,
    VL2Request,
    decode_frame,
    encode_frame,
)
from protocol.svp_ext import (
    CAP_LOG_WAIT,
    HELLO_PONG_OPS,
    Hello,
    HelloAck,
    LogWait,
)
from tests.portolan.test_svp_server import (  # noqa: F401 - fixtures
    CN1,
    CN1_IP,
    CN2,
    MAC1,
    VNET,
    assert_closed,
    directory,
    read_frames,
    start_server,
)

CN1_IP16 = ip_to_wire(CN1_IP)
MAC9 = parse_mac("00:0a:95:9d:68:99")


@pytest.fixture
async def svp(nursery, directory):
    """The server, with CN1's log emptied first (the directory fixture's own VNIC creation
    left it an entry)."""
    await drain(directory)
    return await start_server(nursery, directory)


async def drain(directory) -> None:
    pending = await directory.pending_log(CN1)
    await directory.remove_log([e.entry_id for e in pending])


def decode_reply(frame: bytes):
    return decode_frame(frame, extra_ops=HELLO_PONG_OPS)


async def negotiated(svp) -> trio.SocketStream:
    stream = await svp.connect()
    await stream.send_all(Hello(1, CAP_LOG_WAIT).encode())
    (frame,) = await read_frames(stream, 1)
    assert decode_reply(frame) == HelloAck(1, CAP_LOG_WAIT, 60000)
    return stream


async def add_vnic_on_cn2(directory) -> None:
    """A new VNIC of the vnet on CN2: CN1 (which holds MAC1 there) gets a VL3 log entry."""
    await directory.create_vnic(
        network_uuid=directory.test_network.uuid, cn_uuid=CN2, mac=MAC9, ip="10.0.0.9"
    )


async def receive_nothing_for(stream: trio.SocketStream, seconds: float) -> None:
    with trio.move_on_after(seconds):
        data = await stream.receive_some(65536)
        raise AssertionError(f"expected silence, got {data!r}")


async def test_plain_ping_still_gets_the_v1_pong_byte_for_byte(svp):
    stream = await svp.connect()
    async with stream:
        await stream.send_all(Ping(1).encode() + encode_frame(1, 1, 2, bytes(16)))
        first, second = await read_frames(stream, 2)
    assert first == bytes.fromhex("0001 0002 00000000 00000001 087c0c46".replace(" ", ""))
    assert second == Pong(2).encode()  # a body without the magic: a plain PING


async def test_hello_grants_log_wait_and_counts_it(svp):
    stream = await negotiated(svp)
    await stream.aclose()
    assert svp.requests("hello", "ok") == 1


async def test_hello_grants_nothing_when_holding_is_disabled(nursery, directory):
    running = await start_server(nursery, directory, max_log_wait=0)
    stream = await running.connect()
    async with stream:
        await stream.send_all(Hello(3, CAP_LOG_WAIT).encode())
        (frame,) = await read_frames(stream, 1)
        assert decode_reply(frame) == HelloAck(3, 0, 0)
        await stream.send_all(LogWait(4, 1024, CN1_IP16, 1000).encode())
        await assert_closed(stream)
    assert running.errors("unknown_op") == 1


async def test_log_wait_without_hello_is_an_unknown_op(svp):
    stream = await svp.connect()
    async with stream:
        await stream.send_all(LogWait(4, 1024, CN1_IP16, 1000).encode())
        await assert_closed(stream)
    assert svp.errors("unknown_op") == 1


async def test_held_log_wait_wakes_on_a_log_row_and_does_not_block_later_requests(svp, directory):
    stream = await negotiated(svp)
    async with stream:
        await stream.send_all(LogWait(7, 1024, CN1_IP16, 30_000).encode())
        await receive_nothing_for(stream, 0.3)
        assert svp.server._log_hub.held == 1
        # A lookup pipelined behind the held request is answered at once.
        await stream.send_all(VL2Request(8, MAC1, VNET).encode())
        (frame,) = await read_frames(stream, 1)
        ack = decode_reply(frame)
        assert isinstance(ack, VL2Ack) and ack.id == 8 and ack.status == Status.OK
        started = trio.current_time()
        await add_vnic_on_cn2(directory)
        (frame,) = await read_frames(stream, 1)
        assert trio.current_time() - started < 5
        reply = decode_reply(frame)
        assert isinstance(reply, LogAck) and reply.id == 7 and reply.status == Status.OK
        assert [type(e) for e in reply.entries] == [LogVL3Entry]
        assert reply.entries[0].ip == ip_to_wire("10.0.0.9")
        # Acknowledging it wakes nobody; the next LOG_WAIT is held again.
        wakeups = svp.server._log_hub.wakeups
        await stream.send_all(LogRemove(9, (reply.entries[0].entry_id,)).encode())
        (frame,) = await read_frames(stream, 1)
        assert decode_reply(frame) == LogRemoveAck(9, Status.OK)
        assert svp.server._log_hub.wakeups == wakeups
        await stream.send_all(LogWait(10, 1024, CN1_IP16, 30_000).encode())
        await receive_nothing_for(stream, 0.3)
    assert svp.requests("log_wait", "ok") == 1


async def test_log_wait_answers_at_once_when_entries_are_pending(svp, directory):
    await add_vnic_on_cn2(directory)
    stream = await negotiated(svp)
    async with stream:
        with trio.fail_after(5):
            await stream.send_all(LogWait(2, 1024, CN1_IP16, 60_000).encode())
            (frame,) = await read_frames(stream, 1)
    reply = decode_reply(frame)
    assert isinstance(reply, LogAck) and len(reply.entries) == 1


async def test_log_wait_times_out_with_an_empty_log_ack(svp):
    stream = await negotiated(svp)
    async with stream:
        started = trio.current_time()
        await stream.send_all(LogWait(5, 1024, CN1_IP16, 300, version=2).encode())
        (frame,) = await read_frames(stream, 1)
        assert trio.current_time() - started >= 0.25
    assert decode_reply(frame) == LogAck(5, Status.OK, (), 2)
    assert svp.requests("log_wait", "empty") == 1


async def test_log_wait_is_bounded_by_the_servers_max_wait(nursery, directory):
    await drain(directory)
    running = await start_server(nursery, directory, max_log_wait=0.2)
    stream = await running.connect()
    async with stream:
        await stream.send_all(Hello(1, CAP_LOG_WAIT).encode())
        (frame,) = await read_frames(stream, 1)
        assert decode_reply(frame) == HelloAck(1, CAP_LOG_WAIT, 200)
        await stream.send_all(LogWait(2, 1024, CN1_IP16, 3_600_000).encode())
        (frame,) = await read_frames(stream, 1)  # read_frames gives up after 10 s
    assert decode_reply(frame) == LogAck(2, Status.OK, ())


async def test_log_wait_from_an_unknown_underlay_ip_is_fatal_at_once(svp):
    stream = await negotiated(svp)
    async with stream:
        await stream.send_all(LogWait(3, 1024, ip_to_wire("10.99.0.1"), 60_000).encode())
        (frame,) = await read_frames(stream, 1)
    assert decode_reply(frame) == LogAck(3, Status.FATAL, ())


async def test_closing_a_connection_ends_its_held_requests(svp):
    stream = await negotiated(svp)
    await stream.send_all(LogWait(3, 1024, CN1_IP16, 60_000).encode())
    await stream.send_all(LogWait(4, 1024, CN1_IP16, 60_000).encode())
    with trio.fail_after(5):
        while svp.server._log_hub.held != 2:
            await trio.sleep(0.01)
    await stream.aclose()
    with trio.fail_after(5):
        while svp.server._log_hub.held or svp.metrics.svp_connections_open:
            await trio.sleep(0.01)


async def test_too_many_held_requests_are_answered_at_once(svp):
    stream = await negotiated(svp)
    async with stream:
        await stream.send_all(
            b"".join(LogWait(i, 1024, CN1_IP16, 60_000).encode() for i in range(1, 7))
        )
        frames = await read_frames(stream, 2)  # the 5th and 6th: over the per-connection cap
        assert sorted(decode_reply(f).id for f in frames) == [5, 6]
        # an over-cap request stops counting as held just after its reply is written, so
        # the count settles at the cap (never above it for long, never below it)
        with trio.fail_after(2):
            while svp.server._log_hub.held != 4:
                await trio.sleep(0.001)
        await trio.sleep(0.05)
        assert svp.server._log_hub.held == 4


async def test_many_connections_wake_on_one_write(svp, directory):
    streams = [await negotiated(svp) for _ in range(20)]
    try:
        for i, s in enumerate(streams):
            await s.send_all(LogWait(100 + i, 1024, CN1_IP16, 30_000).encode())
        with trio.fail_after(5):
            while svp.server._log_hub.held != 20:
                await trio.sleep(0.01)
        await add_vnic_on_cn2(directory)
        for i, s in enumerate(streams):
            (frame,) = await read_frames(s, 1)
            reply = decode_reply(frame)
            assert reply.id == 100 + i and len(reply.entries) == 1
    finally:
        for s in streams:
            await s.aclose()


async def test_wake_up_reads_and_log_rms_are_batched(svp, directory):
    """20 held requests woken by one write share store reads, and their 20 LOG_RMs share
    commits (group commit): far fewer store operations than requests."""
    batcher = svp.server._log_batcher
    streams = [await negotiated(svp) for _ in range(20)]
    try:
        for i, s in enumerate(streams):
            await s.send_all(LogWait(100 + i, 1024, CN1_IP16, 30_000).encode())
        with trio.fail_after(5):
            while svp.server._log_hub.held != 20:
                await trio.sleep(0.01)
        fetches = batcher.operations["fetch"]
        await add_vnic_on_cn2(directory)
        ids = []
        for s in streams:
            (frame,) = await read_frames(s, 1)
            ids.append(decode_reply(frame).entries[0].entry_id)
        assert len(set(ids)) == 1  # one CN, one entry: every connection got it
        assert batcher.operations["fetch"] - fetches < 20
        removes = batcher.operations["remove"]
        for i, s in enumerate(streams):
            await s.send_all(LogRemove(200 + i, (ids[0],)).encode())
        for s in streams:
            (frame,) = await read_frames(s, 1)
            assert decode_reply(frame).status == Status.OK
        assert 1 <= batcher.operations["remove"] - removes < 20
        assert await directory.pending_log(CN1) == []
    finally:
        for s in streams:
            await s.aclose()
