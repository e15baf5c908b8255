"""`NeighWriter`: fdb and neighbour writes on a real vxlan device, in force when send returns."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import trio

from lab import netns
from varpd.linux.neighwrite import NeighWriter

pytestmark = [pytest.mark.netns, pytest.mark.linux]


@pytest.fixture
def vxlan_ns() -> Iterator[str]:
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    lab = netns.Namespaces(tag="nw", prefix="pnw")
    netns.sweep("pnw")
    try:
        ns = lab.ns("a", ipv6=True)
        netns.run("ip", "-n", ns, "link", "add", "vx0", "type", "vxlan", "id", "42",
                  "local", "10.9.0.1", "dstport", "4789", "nolearning")  # fmt: skip
        netns.run("ip", "-n", ns, "link", "set", "vx0", "up")
        yield ns
    finally:
        lab.close()


def _ifindex(ns: str) -> int:
    return json.loads(netns.run("ip", "-j", "-n", ns, "link", "show", "vx0").stdout)[0]["ifindex"]


def _fdb(ns: str) -> dict[str, dict]:
    out = netns.run("bridge", "-j", "-n", ns, "fdb", "show", "dev", "vx0").stdout
    return {e["mac"]: e for e in json.loads(out or "[]") if "dst" in e}


def _neigh(ns: str) -> dict[str, str]:
    out = netns.run("ip", "-j", "-n", ns, "neigh", "show", "dev", "vx0").stdout
    return {e["dst"]: e.get("lladdr") for e in json.loads(out or "[]")}


async def test_writes_are_in_the_kernel_when_send_returns_and_failures_are_reported(
    vxlan_ns: str,
) -> None:
    errors: list[tuple[str, str]] = []
    with netns.in_netns(vxlan_ns):
        writer = NeighWriter(lambda what, text: errors.append((what, text)))
    idx = _ifindex(vxlan_ns)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            writer.fdb_replace("fdb a", idx, "02:00:00:00:00:0a", "10.9.0.2", 4790)
            writer.neigh_replace("neigh a", idx, "192.168.9.10", "02:00:00:00:00:0a")
            writer.neigh_replace("neigh a6", idx, "fd00::a", "02:00:00:00:00:0a")
            writer.fdb_replace("drop b", idx, "02:00:00:00:00:0b", None, None)
            # no await in between: the kernel did each write inside its send
            fdb, neigh = _fdb(vxlan_ns), _neigh(vxlan_ns)
            assert fdb["02:00:00:00:00:0a"]["dst"] == "10.9.0.2"
            assert fdb["02:00:00:00:00:0a"].get("port") == 4790
            assert "permanent" in fdb["02:00:00:00:00:0a"]["state"]
            assert fdb["02:00:00:00:00:0b"]["dst"] == "0.0.0.0"
            assert neigh == {"192.168.9.10": "02:00:00:00:00:0a", "fd00::a": "02:00:00:00:00:0a"}
            writer.fdb_replace("fdb a moved", idx, "02:00:00:00:00:0a", "10.9.0.3", None)
            assert _fdb(vxlan_ns)["02:00:00:00:00:0a"]["dst"] == "10.9.0.3"
            writer.fdb_delete("del a", idx, "02:00:00:00:00:0a")
            writer.neigh_delete("del n", idx, "192.168.9.10")
            writer.fdb_delete("del gone", idx, "02:00:00:00:00:0c")  # absent: not a failure
            writer.neigh_replace("no device", 999_999, "192.168.9.11", "02:00:00:00:00:0d")
            with trio.fail_after(5):
                while writer.pending:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        writer.close()
    assert "02:00:00:00:00:0a" not in _fdb(vxlan_ns)
    assert "192.168.9.10" not in _neigh(vxlan_ns)
    assert [what for what, _ in errors] == ["no device"], errors
    assert writer.failed == 1 and writer.lost_acks == 0


def test_acks_in_one_datagram_are_matched_by_sequence() -> None:
    errors: list[tuple[str, str]] = []
    writer = NeighWriter(lambda what, text: errors.append((what, text)))
    try:
        writer.pending = {7: ("seven", False), 8: ("eight", True), 9: ("nine", False)}
        import struct

        def ack(seq: int, code: int) -> bytes:
            body = struct.pack("=i", code) + bytes(16)
            return struct.pack("=IHHII", 16 + len(body), 2, 0, seq, 0) + body

        writer.take_acks(ack(7, 0) + ack(8, -2) + ack(9, -19))
        assert writer.pending == {}
        assert [what for what, _ in errors] == ["nine"]  # ENOENT on a delete is fine
        assert "No such device" in errors[0][1]
    finally:
        writer.close()
