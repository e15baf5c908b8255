"""The SVP server over real TCP on 127.0.0.1 with a real Directory on a temporary SQLite store.

Replies are checked byte for byte against the codec (and the worked frames of spec/svp.md §9),
and through a client as strict as illumos varpd (tests/support/svp_v1_client.py).
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from portolan.metrics import PortolanMetrics
from portolan.service import Directory
from portolan.svp_server import BULK_VL2_RECORD, BULK_VL3_RECORD, SvpServer
from protocol.addr import ip_to_wire, parse_mac
from protocol.svp import (
    BulkAck,
    BulkRequest,
    BulkType,
    Decoder,
    LogAck,
    LogRemove,
    LogRemoveAck,
    LogRequest,
    Ping,
    Pong,
    RouteAck,
    RouteRequest,
    Shootdown,
    Status,
    VL2Ack,
    VL2Request,
    VL3Ack,
    VL3Request,
    decode_frame,
    encode_frame,
)
from tests.support.svp_v1_client import StrictV1Client

MAC1 = parse_mac("00:0a:95:9d:68:16")
MAC2 = parse_mac("00:0a:95:9d:68:17")
MAC3 = parse_mac("00:0a:95:9d:68:18")
VNET = 12340
CN1 = "b4e5ff64-7b40-11e4-a6fa-d34c824a42cd"
CN2 = "c5f6aa75-7b40-11e4-a6fa-d34c824a42ce"
CN1_IP = "192.168.1.1"
CN2_IP = "192.168.1.2"
OWNER = "930896af-bf8c-48d4-885c-6573a94b1853"
ZERO16 = bytes(16)


def hexframe(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("|", ""))


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
async def directory(tmp_path):
    d = await Directory.open(f"sqlite:{tmp_path / 'portolan.db'}")
    try:
        await d.put_cn(CN1, CN1_IP, 4789)
        await d.put_cn(CN2, CN2_IP, 4789)
        net = await d.create_network(
            name="fabric0", owner_uuid=OWNER, vnet_id=VNET, vlan_id=5, subnet="10.0.0.0/24"
        )
        await d.create_vnic(network_uuid=net.uuid, cn_uuid=CN1, mac=MAC1, ip="10.0.0.1")
        d.test_network = net  # type: ignore[attr-defined]
        yield d
    finally:
        await d.aclose()


class Running:
    def __init__(self, server: SvpServer, address: tuple[str, int]) -> None:
        self.server = server
        self.address = address
        self.metrics = server.metrics

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(*self.address)

    def errors(self, kind: str) -> int:
        return self.metrics.svp_protocol_errors.get(kind, 0)

    def requests(self, op: str, status: str) -> int:
        return self.metrics.svp_requests.get((op, status), 0)


async def start_server(nursery: trio.Nursery, directory: Directory, **kwargs) -> Running:
    server = SvpServer(directory, metrics=PortolanMetrics(), **kwargs)
    address = await nursery.start(server.serve, "127.0.0.1", 0)
    return Running(server, address)


@pytest.fixture
async def svp(nursery, directory):
    return await start_server(nursery, directory)


async def read_frames(stream: trio.abc.Stream, n: int) -> list[bytes]:
    """n whole frames, as raw bytes."""
    buf = b""
    frames = []
    with trio.fail_after(10):
        while len(frames) < n:
            while len(buf) >= 16 and len(buf) >= 16 + int.from_bytes(buf[4:8], "big"):
                end = 16 + int.from_bytes(buf[4:8], "big")
                frames.append(buf[:end])
                buf = buf[end:]
                if len(frames) == n:
                    break
            if len(frames) == n:
                break
            data = await stream.receive_some(65536)
            assert data, f"connection closed after {len(frames)} of {n} frames"
            buf += data
    assert buf == b"", "more bytes than expected"
    return frames


async def exchange(svp: Running, frame: bytes, replies: int = 1) -> list[bytes]:
    stream = await svp.connect()
    async with stream:
        await stream.send_all(frame)
        return await read_frames(stream, replies)


async def assert_closed(stream: trio.abc.Stream) -> None:
    """The server closes the connection (EOF or reset) within 10 s, sending nothing."""
    with trio.fail_after(10):
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return
        assert data == b""


async def assert_ping_works(stream: trio.abc.Stream, id: int = 77) -> None:
    await stream.send_all(Ping(id).encode())
    (frame,) = await read_frames(stream, 1)
    assert frame == Pong(id).encode()


# ----------------------------------------------------------------------------------------------
# Lookups, byte-exact


async def test_vl2_found_answers_the_worked_example_byte_for_byte(svp):
    # spec/svp.md §9 #3 -> #4
    request = hexframe("0001 0003 0000000c 00000002 3f23290d | 000a959d6816 0000 00003034")
    (reply,) = await exchange(svp, request)
    assert reply == hexframe(
        "0001 0004 00000014 00000002 821f1b69 | 0000 12b5 00000000000000000000ffffc0a80101"
    )
    assert svp.requests("vl2", "ok") == 1


async def test_vl2_unknown_mac_is_notfound_with_zeros(svp):
    (reply,) = await exchange(svp, VL2Request(3, MAC2, VNET).encode())
    # spec/svp.md §9 #5
    assert reply == hexframe(
        "0001 0004 00000014 00000003 ee1db9a7 | 0002 0000 00000000000000000000000000000000"
    )
    assert svp.requests("vl2", "notfound") == 1


async def test_vl2_known_mac_in_another_vnet_is_notfound(svp):
    (reply,) = await exchange(svp, VL2Request(9, MAC1, VNET + 1).encode())
    assert reply == VL2Ack(9, Status.NOTFOUND, 0, ZERO16).encode()


async def test_vl3_found_answers_the_worked_example_byte_for_byte(svp):
    # spec/svp.md §9 #6 -> #8
    request = hexframe(
        "0001 0005 00000018 00000004 973ee421 | 00000000000000000000ffff0a000001 00000001 00003034"
    )
    (reply,) = await exchange(svp, request)
    assert reply == hexframe(
        "0001 0006 0000001c 00000004 c2905248 | 00000000 000a959d6816 12b5 "
        "00000000000000000000ffffc0a80101"
    )


async def test_vl3_ignores_the_ip_type_like_the_reference(svp):
    (reply,) = await exchange(svp, VL3Request(5, ip_to_wire("10.0.0.1"), 9, VNET).encode())
    assert reply == VL3Ack(5, Status.OK, MAC1, 4789, ip_to_wire(CN1_IP)).encode()


async def test_vl3_unknown_ip_is_notfound_with_zeros(svp):
    (reply,) = await exchange(svp, VL3Request(6, ip_to_wire("fd00::1"), 2, VNET).encode())
    # spec/svp.md §9 #9
    assert reply == hexframe(
        "0001 0006 0000001c 00000006 2f551ae9 | 00000002 000000000000 0000 "
        "00000000000000000000000000000000"
    )
    assert svp.requests("vl3", "notfound") == 1


async def test_ping_answers_pong_with_the_same_id(svp):
    (reply,) = await exchange(svp, hexframe("0001 0001 00000000 00000001 b5b66088"))
    assert reply == hexframe("0001 0002 00000000 00000001 087c0c46")


async def test_a_lookup_sees_a_vnic_created_after_the_server_started(svp, directory):
    await directory.create_vnic(
        network_uuid=directory.test_network.uuid, cn_uuid=CN2, mac=MAC3, ip="10.0.0.3"
    )
    (reply,) = await exchange(svp, VL2Request(1, MAC3, VNET).encode())
    assert reply == VL2Ack(1, Status.OK, 4789, ip_to_wire(CN2_IP)).encode()


# ----------------------------------------------------------------------------------------------
# Versions, ids, pipelining


@pytest.mark.parametrize("version", [1, 2])
async def test_reply_carries_the_request_version(svp, version):
    frames = await exchange(
        svp,
        VL2Request(1, MAC1, VNET, version).encode()
        + VL3Request(2, ip_to_wire("10.0.0.1"), 1, VNET, version).encode()
        + Ping(3, version).encode(),
        3,
    )
    assert frames == [
        VL2Ack(1, Status.OK, 4789, ip_to_wire(CN1_IP), version).encode(),
        VL3Ack(2, Status.OK, MAC1, 4789, ip_to_wire(CN1_IP), version).encode(),
        Pong(3, version).encode(),
    ]


async def test_pipelined_requests_are_answered_in_order_with_their_ids(svp):
    # ids as varpd writes them (native little-endian on x86), MNX's 0xFFFFFFFF, zero...
    weird = [0xFFFFFFFF, 0x01000000, 0x02000000, 0, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF]
    requests = []
    expected = []
    for i in range(300):
        rid = weird[i % len(weird)] ^ (i << 8 if i >= len(weird) else 0)
        kind = i % 4
        if kind == 0:
            requests.append(VL2Request(rid, MAC1, VNET))
            expected.append(VL2Ack(rid, Status.OK, 4789, ip_to_wire(CN1_IP)))
        elif kind == 1:
            requests.append(VL2Request(rid, MAC2, VNET))
            expected.append(VL2Ack(rid, Status.NOTFOUND, 0, ZERO16))
        elif kind == 2:
            requests.append(VL3Request(rid, ip_to_wire("10.0.0.1"), 1, VNET))
            expected.append(VL3Ack(rid, Status.OK, MAC1, 4789, ip_to_wire(CN1_IP)))
        else:
            requests.append(Ping(rid))
            expected.append(Pong(rid))
    frames = await exchange(svp, b"".join(r.encode() for r in requests), len(requests))
    assert frames == [e.encode() for e in expected]
    # ids are copied verbatim: the raw 4 bytes match
    assert [f[8:12] for f in frames] == [r.encode()[8:12] for r in requests]


async def test_requests_split_at_every_byte_boundary_are_answered(svp):
    stream = await svp.connect()
    async with stream:
        data = VL2Request(0x01000000, MAC1, VNET).encode() + Ping(2).encode()
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
        frames = await read_frames(stream, 2)
    assert frames == [
        VL2Ack(0x01000000, Status.OK, 4789, ip_to_wire(CN1_IP)).encode(),
        Pong(2).encode(),
    ]


async def test_strict_v1_client_accepts_every_reply(svp, directory):
    await directory.create_vnic(
        network_uuid=directory.test_network.uuid, cn_uuid=CN2, mac=MAC2, ip="10.0.0.2"
    )
    stream = await svp.connect()
    async with stream:
        client = StrictV1Client(stream)
        replies = await client.pipeline(
            [
                VL2Request(0x01000000, MAC1, VNET),
                VL2Request(0x02000000, MAC3, VNET),
                VL3Request(0x03000000, ip_to_wire("10.0.0.2"), 1, VNET),
                VL3Request(0x04000000, ip_to_wire("10.9.9.9"), 1, VNET),
                LogRequest(0x05000000, 1024, ip_to_wire(CN1_IP)),
                LogRequest(0x06000000, 50, ip_to_wire(CN1_IP)),
                LogRequest(0x07000000, 1024, ip_to_wire("192.0.2.99")),
            ]
        )
        assert [type(r) for r in replies] == [
            VL2Ack,
            VL2Ack,
            VL3Ack,
            VL3Ack,
            LogAck,
            LogAck,
            LogAck,
        ]
        removed = await client.request(
            LogRemove(0x08000000, tuple(e.entry_id for e in replies[4].entries))
        )
        assert removed == LogRemoveAck(0x08000000, Status.OK)
        assert client.outstanding == 0


# ----------------------------------------------------------------------------------------------
# Log (shootdowns)


async def _make_log_entries(directory: Directory) -> None:
    """A second VNIC in the vnet: CN1 (which holds a VNIC there) gets log entries."""
    await directory.create_vnic(
        network_uuid=directory.test_network.uuid, cn_uuid=CN2, mac=MAC2, ip="10.0.0.2"
    )
    await directory.delete_vnic(MAC2)


async def test_log_req_returns_the_pending_entries_of_the_requesting_cn(svp, directory):
    await _make_log_entries(directory)
    pending = await directory.pending_log(CN1)
    assert pending, "the Directory wrote no log entries for CN1"
    (frame,) = await exchange(svp, LogRequest(7, 1024, ip_to_wire(CN1_IP)).encode())
    reply = decode_frame(frame)
    assert isinstance(reply, LogAck) and reply.status == Status.OK
    assert list(reply.entries) == list(pending)[: len(reply.entries)]
    assert reply.body_size <= 1024
    assert frame == LogAck(7, Status.OK, reply.entries).encode()


@pytest.mark.parametrize("count", [4, 35, 36, 47, 48, 80, 91, 92, 200])
async def test_log_ack_body_including_status_never_exceeds_count(svp, directory, count):
    await _make_log_entries(directory)
    await _make_log_entries(directory)
    pending = list(await directory.pending_log(CN1))
    (frame,) = await exchange(svp, LogRequest(7, count, ip_to_wire(CN1_IP)).encode())
    reply = decode_frame(frame)
    assert reply.status == Status.OK
    assert len(frame) - 16 <= count
    # exactly the oldest entries that fit
    budget, fitting = count - 4, []
    for e in pending:
        size = 32 if e.TYPE == 1 else 44
        if size > budget:
            break
        budget -= size
        fitting.append(e)
    assert list(reply.entries) == fitting


async def test_log_rm_removes_the_listed_entries(svp, directory):
    await _make_log_entries(directory)
    before = list(await directory.pending_log(CN1))
    ids = tuple(e.entry_id for e in before[:1])
    (frame,) = await exchange(svp, LogRemove(9, ids).encode())
    assert frame == LogRemoveAck(9, Status.OK).encode()
    after = list(await directory.pending_log(CN1))
    assert after == before[1:]
    assert svp.requests("log_rm", "ok") == 1


async def test_log_rm_of_unknown_ids_is_ok(svp):
    (frame,) = await exchange(svp, LogRemove(9, (b"\x11" * 16,)).encode())
    assert frame == LogRemoveAck(9, Status.OK).encode()


async def test_log_req_from_an_unknown_underlay_ip_is_fatal_with_no_entries(svp):
    (frame,) = await exchange(svp, LogRequest(7, 1024, ip_to_wire("192.0.2.1")).encode())
    assert frame == LogAck(7, Status.FATAL, ()).encode()
    assert svp.requests("log", "fatal") == 1


async def test_store_failure_during_log_req_and_log_rm_answers_fatal(svp, directory, monkeypatch):
    from portolan.errors import StoreUnavailable

    async def broken(*args, **kwargs):
        raise StoreUnavailable("database is locked")

    monkeypatch.setattr(directory, "fetch_log", broken)
    monkeypatch.setattr(directory, "remove_log", broken)
    stream = await svp.connect()
    async with stream:
        await stream.send_all(
            LogRequest(1, 1024, ip_to_wire(CN1_IP)).encode()
            + LogRemove(2, (b"\x22" * 16,)).encode()
        )
        frames = await read_frames(stream, 2)
        assert frames == [LogAck(1, Status.FATAL).encode(), LogRemoveAck(2, Status.FATAL).encode()]
        await assert_ping_works(stream)  # the connection stays usable
    assert svp.metrics.svp_internal_errors["log"] == 1
    assert svp.metrics.svp_internal_errors["log_rm"] == 1


# ----------------------------------------------------------------------------------------------
# Routes, bulk, shootdown


async def test_route_req_without_a_route_is_notfound_with_zeros(svp):
    req = RouteRequest(10, VNET, 5, ip_to_wire("10.0.0.1"), ip_to_wire("10.1.0.7"))
    (frame,) = await exchange(svp, req.encode())
    assert (
        frame
        == RouteAck(10, Status.NOTFOUND, 0, 0, 0, 0, ZERO16, bytes(6), bytes(6), 0, 0).encode()
    )
    assert svp.requests("route", "notfound") == 1


async def test_route_req_answers_the_worked_example_from_a_loaded_route(svp, directory):
    await directory.load(
        {
            "vnics": [
                {
                    "mac": "90:b8:d0:00:00:02",
                    "ip": "10.1.0.7",
                    "vnet_id": 4444,
                    "vlan_id": 6,
                    "cn_uuid": CN2,
                }
            ],
            "routes": [
                {
                    "vnet_id": VNET,
                    "vlan_id": 5,
                    "subnet": "10.0.0.0/24",
                    "r_dc_id": 7,
                    "r_vnet_id": 4444,
                    "r_vlan_id": 6,
                    "r_subnet": "10.1.0.0/16",
                    "r_send_mac": "90:b8:d0:00:00:01",
                }
            ],
        }
    )
    # spec/svp.md §9 #17 -> #18
    request = hexframe(
        "0002 000e 00000028 0000000a 6b9f0854 | 00003034 0005 0000 "
        "00000000000000000000ffff0a000001 00000000000000000000ffff0a010007"
    )
    (frame,) = await exchange(svp, request)
    assert frame == hexframe(
        "0002 000f 00000030 0000000a 08359757 | 00000000 00000007 0000115c 0006 12b5 "
        "00000000000000000000ffffc0a80102 90b8d0000001 90b8d0000002 18 10 0000"
    )
    assert svp.requests("route", "ok") == 1


async def test_bulk_vl2_and_vl3_return_every_mapping_in_our_format(svp, directory):
    await directory.create_vnic(
        network_uuid=directory.test_network.uuid, cn_uuid=CN2, mac=MAC2, ip="10.0.0.2"
    )
    frames = await exchange(
        svp, BulkRequest(1, BulkType.VL2).encode() + BulkRequest(2, BulkType.VL3).encode(), 2
    )
    vl2, vl3 = (decode_frame(f) for f in frames)
    assert isinstance(vl2, BulkAck) and vl2.status == Status.OK and vl2.bulk_type == BulkType.VL2
    total = struct.unpack_from(">I", vl2.data)[0]
    records = {
        BULK_VL2_RECORD.unpack_from(vl2.data, 4 + i * 32) for i in range((len(vl2.data) - 4) // 32)
    }
    assert total == 2 and (len(vl2.data) - 4) % 32 == 0
    assert records == {
        (MAC1, VNET, 4789, ip_to_wire(CN1_IP)),
        (MAC2, VNET, 4789, ip_to_wire(CN2_IP)),
    }
    total = struct.unpack_from(">I", vl3.data)[0]
    records = {
        BULK_VL3_RECORD.unpack_from(vl3.data, 4 + i * 44) for i in range((len(vl3.data) - 4) // 44)
    }
    assert total == 2 and (len(vl3.data) - 4) % 44 == 0
    assert records == {
        (ip_to_wire("10.0.0.1"), VNET, MAC1, 4789, ip_to_wire(CN1_IP)),
        (ip_to_wire("10.0.0.2"), VNET, MAC2, 4789, ip_to_wire(CN2_IP)),
    }


async def test_bulk_reply_is_capped_by_the_frame_limit(nursery, directory):
    net = directory.test_network
    for i in range(2, 12):
        await directory.create_vnic(
            network_uuid=net.uuid, cn_uuid=CN2, mac=bytes([2, 0, 0, 0, 0, i]), ip=f"10.0.0.{i}"
        )
    svp = await start_server(nursery, directory, max_frame=12 + 4 + 3 * 32)
    (frame,) = await exchange(svp, BulkRequest(1, BulkType.VL2).encode())
    reply = decode_frame(frame)
    assert struct.unpack_from(">I", reply.data)[0] == 11
    assert len(reply.data) == 4 + 3 * 32
    assert len(frame) - 16 <= svp.server.max_frame


async def test_bulk_of_an_unknown_type_is_badbulk(svp):
    (frame,) = await exchange(svp, BulkRequest(4, 9).encode())
    assert frame == BulkAck(4, Status.BADBULK, 9, b"").encode()
    assert svp.requests("bulk", "badbulk") == 1


async def test_shootdown_is_counted_and_has_no_reply(svp):
    frames = await exchange(svp, Shootdown(1, MAC1, VNET).encode() + Ping(2).encode())
    assert frames == [Pong(2).encode()]
    assert svp.requests("shootdown", "none") == 1


# ----------------------------------------------------------------------------------------------
# Malformed input: the connection closes, it is counted, the others keep working

MALFORMED = {
    "bad_crc": VL2Request(1, MAC1, VNET).encode()[:12]
    + b"\x00\x00\x00\x00"
    + VL2Request(1, MAC1, VNET).encode()[16:],
    "unknown_op": encode_frame(1, 0x7F, 1, b""),
    "ack_op": VL2Ack(1, Status.OK, 4789, ip_to_wire(CN1_IP)).encode(),
    "short_body": encode_frame(1, 3, 1, b"\x00\x0a\x95\x9d"),
    "bad_version": encode_frame(3, 1, 1, b""),
    "oversize": struct.pack(">HHII", 1, 3, 1 << 20, 1) + b"\x00" * 4 + b"\x00" * 12,
    "bad_length": encode_frame(1, 0x0B, 1, struct.pack(">I", 2) + b"\x11" * 16),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_malformed_input_closes_only_that_connection_and_is_counted(svp, kind):
    bystander = await svp.connect()
    bad = await svp.connect()
    async with bystander, bad:
        await assert_ping_works(bystander, 1)
        await bad.send_all(MALFORMED[kind])
        await assert_closed(bad)
        await assert_ping_works(bystander, 2)
    assert svp.errors(kind) == 1


async def test_route_req_in_a_v1_frame_is_an_unknown_op(svp):
    frame = RouteRequest(10, VNET, 5, ZERO16, ZERO16).encode()
    v1 = encode_frame(1, 0x0E, 10, frame[16:])
    stream = await svp.connect()
    async with stream:
        await stream.send_all(v1)
        await assert_closed(stream)
    assert svp.errors("unknown_op") == 1


async def test_replies_before_a_malformed_frame_in_the_same_write_are_sent(svp):
    stream = await svp.connect()
    async with stream:
        await stream.send_all(Ping(1).encode() + Ping(2).encode() + MALFORMED["bad_crc"])
        frames = await read_frames(stream, 2)
        assert frames == [Pong(1).encode(), Pong(2).encode()]
        await assert_closed(stream)


async def test_a_client_stalled_mid_frame_is_closed_after_the_idle_timeout(nursery, directory):
    svp = await start_server(nursery, directory, idle_timeout=0.5)
    bystander = await svp.connect()
    stalled = await svp.connect()
    async with bystander, stalled:
        await stalled.send_all(VL2Request(1, MAC1, VNET).encode()[:20])
        for i in range(3):  # the others are served while it stalls
            await assert_ping_works(bystander, i)
        await assert_closed(stalled)
        await assert_ping_works(bystander, 9)
    assert svp.errors("idle_timeout") == 1


async def test_an_idle_connection_between_frames_is_left_open(nursery, directory, autojump_clock):
    # No partial frame: no idle timer runs at all (a mocked hour passes in an instant).
    svp = await start_server(nursery, directory, idle_timeout=0.5)
    stream = await svp.connect()
    async with stream:
        await assert_ping_works(stream, 1)
        await trio.sleep(3600)
        await assert_ping_works(stream, 2)
    assert svp.errors("idle_timeout") == 0


async def test_a_client_that_resets_with_requests_outstanding_costs_only_its_connection(svp):
    sock = socket.create_connection(svp.address)
    sock.sendall(b"".join(VL2Request(i, MAC1, VNET).encode() for i in range(2000)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    stream = await svp.connect()
    async with stream:
        await assert_ping_works(stream)
    with trio.fail_after(10):
        while svp.metrics.svp_connections_open > 0:
            await trio.sleep(0.01)


async def test_a_client_that_never_reads_is_no_longer_read_from(svp):
    """The server writes replies with send_all before reading again: once the client's
    window is full, the server stops reading, so nothing queues up without bound."""
    limit = 64 * 1024 * 1024
    hog = socket.create_connection(svp.address)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    hog.setblocking(False)
    burst = b"".join(Ping(i).encode() for i in range(4096))
    sent = 0
    try:
        with trio.fail_after(30):
            blocked_since = None
            while sent < limit:
                try:
                    # keep frames aligned: continue the burst where the last send stopped
                    sent += hog.send(burst[sent % len(burst) :])
                    blocked_since = None
                except BlockingIOError:
                    now = trio.current_time()
                    blocked_since = blocked_since or now
                    if now - blocked_since > 0.5:
                        break  # blocked for half a second: the server stopped reading
                await trio.sleep(0.01)
        assert sent < limit, "the server kept reading from a client that never reads"
        stream = await svp.connect()
        async with stream:
            await assert_ping_works(stream)
    finally:
        hog.close()


async def test_connections_gauge_counts_open_connections(svp):
    a = await svp.connect()
    b = await svp.connect()
    async with a, b:
        await assert_ping_works(a)
        await assert_ping_works(b)
        assert svp.metrics.svp_connections_open == 2
    with trio.fail_after(10):
        while svp.metrics.svp_connections_open:
            await trio.sleep(0.01)
    assert svp.metrics.svp_connections_accepted == 2


async def test_metrics_text_shows_requests_and_errors(svp):
    await exchange(svp, VL2Request(1, MAC1, VNET).encode() + Ping(2).encode(), 2)
    stream = await svp.connect()
    async with stream:
        await stream.send_all(MALFORMED["bad_crc"])
        await assert_closed(stream)
    text = svp.metrics.render().decode()
    assert 'portolan_svp_requests_total{op="vl2",status="ok"} 1.0' in text
    assert 'portolan_svp_requests_total{op="ping",status="ok"} 1.0' in text
    assert 'portolan_svp_protocol_errors_total{kind="bad_crc"} 1.0' in text


def test_decoder_contract_the_server_relies_on():
    # The server closes on any ProtocolError and relies on the decoder never buffering more
    # than one frame past the limit check.
    d = Decoder(max_size=100)
    d.receive_data(struct.pack(">HHIII", 1, 3, 101, 1, 0))
    with pytest.raises(Exception) as info:
        d.next_message()
    assert info.value.kind == "oversize"
