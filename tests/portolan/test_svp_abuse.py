"""The SVP server under abuse: clients that never read, hold connections, trickle bytes, send
garbage in bulk, and a store that fails under LOG_REQ (issue 12 items 1-4 and 13).

Real TCP on 127.0.0.1, a real Directory on a temporary SQLite store.
"""

from __future__ import annotations

import logging
import socket
import tracemalloc

import pytest
import trio

from portolan.cli.main import main
from portolan.metrics import PortolanMetrics
from portolan.ratelimit import LogLimiter
from portolan.service import Directory
from portolan.svp_server import SvpServer
from protocol.addr import format_mac, ip_to_wire
from protocol.svp import (
    BulkAck,
    BulkRequest,
    BulkType,
    Decoder,
    LogAck,
    LogRequest,
    Ping,
    Pong,
    Status,
    VL2Ack,
    VL2Request,
)

CN1 = "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd"
CN1_IP = "192.168.1.1"
VNET = 12340


def _doc(n_vnics: int) -> dict:
    vnics = [
        {
            "mac": format_mac(bytes([2, 0, 0, 0, i >> 8, i & 0xFF])),
            "ip": f"10.0.{i >> 8}.{i & 0xFF}",
            "vnet_id": VNET,
            "cn_uuid": CN1,
        }
        for i in range(1, n_vnics + 1)
    ]
    return {"cns": [{"uuid": CN1, "ip": CN1_IP}], "vnics": vnics}


MAC1 = bytes([2, 0, 0, 0, 0, 1])


@pytest.fixture
async def directory(tmp_path):
    d = await Directory.open(f"sqlite:{tmp_path / 'portolan.db'}")
    try:
        await d.load(_doc(300))
        yield d
    finally:
        await d.aclose()


async def start(nursery: trio.Nursery, directory: Directory, **kwargs) -> tuple[SvpServer, tuple]:
    server = SvpServer(directory, metrics=PortolanMetrics(), **kwargs)
    address = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, address


async def read_frames(stream: trio.abc.Stream, n: int, timeout: float = 10) -> list[bytes]:
    decoder = Decoder()
    frames: list = []
    with trio.fail_after(timeout):
        while len(frames) < n:
            data = await stream.receive_some(65536)
            assert data, f"connection closed after {len(frames)} of {n} frames"
            decoder.receive_data(data)
            while (msg := decoder.next_message()) is not None:
                frames.append(msg)
    return frames


async def ping_works(address: tuple, id: int = 5) -> None:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(Ping(id).encode())
        assert await read_frames(stream, 1) == [Pong(id)]


async def closed_by_server(stream: trio.abc.Stream, timeout: float = 10) -> bool:
    """True when the server closes (EOF or reset) within ``timeout``; False if data came."""
    with trio.fail_after(timeout):
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return True
    return data == b""


# ----------------------------------------------------------------------------------------------
# 1. BULK_REQ amplification


async def test_a_client_that_never_reads_bulk_replies_holds_only_a_bounded_amount(
    nursery, directory
):
    # 300 mappings fill a 4 KiB BULK_ACK: 3,276 BULK_REQs (one 64 KiB read) would be ~13 MB
    # of replies if they were all built before the first send.
    server, address = await start(nursery, directory, max_frame=4096)
    n = 65536 // 20
    burst = b"".join(BulkRequest(i, BulkType.VL2).encode() for i in range(n))
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(address)
    hog.setblocking(False)
    tracemalloc.start()
    try:
        sent = 0
        with trio.move_on_after(3):
            while sent < len(burst):
                try:
                    sent += hog.send(burst[sent:])
                except BlockingIOError:
                    await trio.sleep(0.01)
            await trio.sleep(1.0)  # let the server build what it will
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert peak < 2 * 1024 * 1024, f"the server built {peak} bytes for a non-reading client"
        # nothing is lost: once the client reads, every request is answered in order
        hog.setblocking(True)
        hog.settimeout(10)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(hog))
        while sent < len(burst):
            await stream.send_all(burst[sent:])
            sent = len(burst)
        acks = await read_frames(stream, n, timeout=60)
        assert [a.id for a in acks] == list(range(n))
        assert all(isinstance(a, BulkAck) and a.status == Status.OK for a in acks)
        assert len(acks[-1].encode()) > 3000
    finally:
        hog.close()
    await ping_works(address)


# ----------------------------------------------------------------------------------------------
# 2. Connection cap


async def test_connections_beyond_the_cap_are_accepted_closed_and_counted_once_in_the_log(
    nursery, directory, caplog
):
    caplog.set_level(logging.WARNING, logger="portolan.svp")
    server, address = await start(nursery, directory, max_connections=3)
    held = [await trio.open_tcp_stream(*address) for _ in range(3)]
    for i, s in enumerate(held):
        await s.send_all(Ping(i).encode())
        assert await read_frames(s, 1) == [Pong(i)]
    for _ in range(5):
        extra = await trio.open_tcp_stream(*address)
        async with extra:
            assert await closed_by_server(extra)
    assert server.connections_refused == 5
    refused_lines = [r for r in caplog.records if "connections" in r.getMessage()]
    assert len(refused_lines) == 1, [r.getMessage() for r in refused_lines]
    assert "3" in refused_lines[0].getMessage()
    # once one goes, a new one is served
    await held.pop().aclose()
    with trio.fail_after(10):
        while server.metrics.svp_connections_open > 2:
            await trio.sleep(0.01)
    await ping_works(address)
    text = server.metrics.render().decode()
    assert "portolan_svp_connections_refused_total 5.0" in text
    for s in held:
        await s.aclose()


# ----------------------------------------------------------------------------------------------
# 3. Idle timeout counts from the first byte of a frame


async def test_a_frame_trickled_byte_by_byte_is_closed_idle_timeout_after_its_first_byte(
    nursery, directory, autojump_clock
):
    server, address = await start(nursery, directory, idle_timeout=5.0)
    stream = await trio.open_tcp_stream(*address)
    frame = VL2Request(1, MAC1, VNET).encode()  # 28 bytes: 27 s at a byte a second
    started = trio.current_time()

    async def trickle() -> None:
        try:
            for i in range(len(frame)):
                await stream.send_all(frame[i : i + 1])
                await trio.sleep(1.0)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with stream, trio.open_nursery() as inner:
        inner.start_soon(trickle)
        assert await closed_by_server(stream, timeout=20), "the trickled frame was answered"
        closed_after = trio.current_time() - started
        inner.cancel_scope.cancel()
    assert 5.0 <= closed_after < 7.0
    assert server.metrics.svp_protocol_errors["idle_timeout"] == 1


async def test_the_idle_deadline_restarts_with_each_new_frame(nursery, directory, autojump_clock):
    # Each frame takes 4 s of a 5 s budget, and the connection lives far longer than 5 s.
    server, address = await start(nursery, directory, idle_timeout=5.0)
    frames = [VL2Request(i, MAC1, VNET).encode() for i in range(6)]
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(frames[0][:10])
        for i in range(len(frames)):
            await trio.sleep(4.0)
            tail = frames[i][10:] + (frames[i + 1][:10] if i + 1 < len(frames) else b"")
            await stream.send_all(tail)
        acks = await read_frames(stream, len(frames))
    assert [a.id for a in acks] == list(range(6))
    assert all(isinstance(a, VL2Ack) and a.status == Status.OK for a in acks)
    assert server.metrics.svp_protocol_errors["idle_timeout"] == 0


# ----------------------------------------------------------------------------------------------
# 4. Log volume


async def test_malformed_connections_are_counted_exactly_but_logged_once_per_kind(
    nursery, directory, caplog
):
    caplog.set_level(logging.WARNING, logger="portolan.svp")
    server, address = await start(nursery, directory)
    bad_crc = bytearray(Ping(1).encode())
    bad_crc[12] ^= 0xFF
    for frame in [bytes(bad_crc)] * 30 + [b"\x00\x07\x00\x63" + bytes(12)] * 30:
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(frame)
            assert await closed_by_server(stream)
    errors = server.metrics.svp_protocol_errors
    assert errors["bad_crc"] == 30
    assert sum(errors.values()) == 60
    lines = [r.getMessage() for r in caplog.records if r.name == "portolan.svp"]
    assert 2 <= len(lines) <= 3, lines  # one per kind (bad_crc, then the bad header's kind)


def test_the_line_after_held_back_ones_says_how_many_were_held_back(caplog):
    now = [0.0]
    limiter = LogLimiter(logging.getLogger("t.limit"), interval=10, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="t.limit")
    assert limiter.warning("a", "first %d", 1)
    assert not limiter.warning("a", "second")
    assert not limiter.warning("a", "third")
    assert limiter.warning("b", "another kind")
    now[0] = 10.5
    assert limiter.warning("a", "later")
    assert [r.getMessage() for r in caplog.records] == [
        "first 1",
        "another kind",
        "later (2 more like this in the last 10s not logged)",
    ]


# ----------------------------------------------------------------------------------------------
# 13. Store outage during LOG_REQ


async def test_a_store_failure_under_log_req_logs_one_line_without_traceback(
    nursery, directory, monkeypatch, caplog
):
    from portolan.errors import StoreUnavailable

    async def broken(*args, **kwargs):
        raise StoreUnavailable("connection to server at 10.0.0.9 refused\nIs the server running?")

    monkeypatch.setattr(directory, "fetch_log", broken)
    caplog.set_level(logging.DEBUG, logger="portolan.svp")
    server, address = await start(nursery, directory)
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(
            b"".join(LogRequest(i, 1024, ip_to_wire(CN1_IP)).encode() for i in range(20))
        )
        acks = await read_frames(stream, 20)
    assert acks == [LogAck(i, Status.FATAL, ()) for i in range(20)]
    assert server.metrics.svp_internal_errors["log"] == 20
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert lines[0].exc_info is None
    assert "\n" not in lines[0].getMessage()
    assert "refused" in lines[0].getMessage()


async def test_portolan_log_says_the_server_could_not_read_its_store(
    nursery, directory, monkeypatch, capsys
):
    async def broken(*args, **kwargs):
        raise OSError("disk I/O error")

    _, address = await start(nursery, directory)
    server = f"127.0.0.1:{address[1]}"
    monkeypatch.setattr(directory, "fetch_log", broken)
    code = await trio.to_thread.run_sync(main, ["log", "--cn-ip", CN1_IP, "--server", server])
    err = capsys.readouterr().err
    assert code == 1
    assert "could not read its store" in err
    assert "exactly one compute node" not in err
    # an IP that is no CN's is still reported as such
    code = await trio.to_thread.run_sync(main, ["log", "--cn-ip", "192.0.2.99", "--server", server])
    err = capsys.readouterr().err
    assert code == 1
    assert "no compute node" in err or "exactly one compute node" in err
    assert "store" not in err
