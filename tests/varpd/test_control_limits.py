"""The control socket bounds its clients: a connection cap and an idle timeout.

Before, 200 clients each holding half of a 1 MiB frame made varpd hold ~200 MB, forever.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import trio

from protocol.control import Decoder, Reply, Request, encode_request
from varpd.control import IDLE_TIMEOUT, MAX_CONNECTIONS, serve_control
from varpd.metrics import VarpdMetrics


class FakeVarpd:
    """What the ``ping`` op needs (and a metrics registry)."""

    def __init__(self) -> None:
        self.metrics = VarpdMetrics()

    def info(self) -> dict[str, object]:
        return {"pid": 1}


async def connect(path: str) -> trio.SocketStream:
    return await trio.open_unix_socket(path)


async def ping(stream: trio.SocketStream, rid: int = 1) -> Reply:
    await stream.send_all(encode_request(Request(rid, "ping", {})))
    dec = Decoder()
    while True:
        data = await stream.receive_some(65536)
        assert data, "closed without an answer"
        dec.receive_data(data)
        msg = dec.next_message()
        if msg is not None:
            assert isinstance(msg, Reply)
            return msg


async def is_closed(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(5):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True
    return False


def closed_count(v: FakeVarpd, reason: str) -> float:
    value = v.metrics.registry.get_sample_value(
        "varpd_control_connections_closed_total", {"reason": reason}
    )
    return value or 0.0


def half_frame() -> bytes:
    """The first half of a 1 MiB request frame: the length says 1 MiB, half of it follows."""
    return struct.pack(">I", 1 << 20) + b"\x81" + b"\x00" * ((1 << 19) - 1)


async def test_defaults_bound_memory_and_time() -> None:
    assert MAX_CONNECTIONS * (1 << 20) <= 64 << 20
    assert 0 < IDLE_TIMEOUT <= 60


async def test_connections_beyond_the_cap_are_closed(tmp_path: Path, nursery: Any) -> None:
    v = FakeVarpd()
    path = await nursery.start(
        lambda **kw: serve_control(
            v, str(tmp_path / "c.sock"), max_connections=3, idle_timeout=60, **kw
        )
    )
    held = [await connect(path) for _ in range(3)]
    for s in held:
        await s.send_all(half_frame())
    extra = await connect(path)
    assert await is_closed(extra)
    assert closed_count(v, "limit") == 1
    # a slot frees up when a client goes; then a new client is served
    await held.pop().aclose()
    with trio.fail_after(10):
        while True:
            s = await connect(path)
            try:
                reply = await ping(s)
                break
            except (AssertionError, trio.BrokenResourceError):
                await trio.sleep(0.01)
            finally:
                await s.aclose()
    assert reply.ok and reply.result == {"pid": 1}


async def test_a_half_sent_frame_is_dropped_after_the_idle_timeout(
    tmp_path: Path, nursery: Any, autojump_clock: Any
) -> None:
    v = FakeVarpd()
    path = await nursery.start(
        lambda **kw: serve_control(v, str(tmp_path / "c.sock"), idle_timeout=30, **kw)
    )
    slow = await connect(path)
    await slow.send_all(half_frame()[:4096])
    silent = await connect(path)
    busy = await connect(path)
    assert (await ping(busy)).ok
    await trio.sleep(29)
    assert (await ping(busy, 2)).ok  # the timer restarts after each reply
    assert await is_closed(slow) and await is_closed(silent)
    assert closed_count(v, "idle") == 2
    await trio.sleep(31)
    assert await is_closed(busy)
