"""Interop with sdc-portolan's LOG_ACK sizing.

sdc-portolan counts only the log records against LOG_REQ's ``count``, not the 4-byte status
word: with 32 or more VL2 entries queued, LOG_REQ count 1024 is answered with 32 records, a
1028-byte body. Our svp plugin used to call that a protocol error, reset the connection, back
off and never drain the log. These tests replay exactly that reply.
"""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address

from protocol.svp import LogAck, LogRequest, LogVL2Entry, Message, Status, encoded_size
from tests.varpd.svp_script_server import FakeHost, ScriptServer, wait_until
from varpd.plugins.svp import SvpOptions, SvpPlugin
from varpd.plugins.svp.conn import Connection

VNET = 12340


class SdcPortolan(ScriptServer):
    """Answers LOG_REQ as sdc-portolan does: records up to ``count`` bytes, plus the status."""

    def reply_for(self, req: Message) -> Message | None:
        if isinstance(req, LogRequest):
            out, used = [], 0
            for entry in self.log:
                if used + encoded_size(entry) > req.count:
                    break
                out.append(entry)
                used += encoded_size(entry)
            self.acked_bodies.append(4 + used)
            return LogAck(req.id, Status.OK, tuple(out), req.version)
        return super().reply_for(req)

    def __init__(self) -> None:
        super().__init__()
        self.acked_bodies: list[int] = []


def entries(n: int) -> list[LogVL2Entry]:
    return [
        LogVL2Entry(i.to_bytes(16, "big"), bytes.fromhex("000a959d") + i.to_bytes(2, "big"), VNET)
        for i in range(1, n + 1)
    ]


async def local_resolver(host: str, port: int):
    return [ip_address("127.0.0.1")]


async def test_a_1028_byte_log_ack_for_count_1024_is_accepted(autojump_clock, nursery) -> None:
    server = SdcPortolan()
    server.log = entries(32)
    await server.start(nursery)
    conn = Connection(IPv4Address("127.0.0.1"), server.port)
    await nursery.start(conn.run)
    await wait_until(lambda: conn.usable)
    ack = await conn.query(LogRequest(0, 1024, b"\x00" * 10 + b"\xff\xff\x0a\x00\x00\x01"))
    assert server.acked_bodies == [1028]
    assert isinstance(ack, LogAck) and len(ack.entries) == 32
    assert conn.resets == 0


async def test_the_plugin_drains_an_sdc_portolan_log(autojump_clock, nursery) -> None:
    server = SdcPortolan()
    queued = entries(100)  # 32 + 32 + 32 + 4: three full 1028-byte replies
    server.log = list(queued)
    await server.start(nursery)
    host = FakeHost(nursery, vnet_id=VNET, device="o1", shared={})
    plugin = SvpPlugin(
        host,
        {"svp/host": "portolan.test", "svp/port": server.port, "svp/underlay_ip": "192.168.1.1"},
        options=SvpOptions(resolver=local_resolver),
    )
    await plugin.start()
    try:
        await wait_until(lambda: not server.log, timeout=60)
        assert server.acked_bodies[:3] == [1028, 1028, 1028]
        removed = [c[2] for c in host.driver.calls if c[0] == "cache_remove"]
        assert sorted(removed) == sorted(e.mac for e in queued)
        assert len(server.accept_times) == 1  # never reset, never reconnected
    finally:
        await plugin.stop()
