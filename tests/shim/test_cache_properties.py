"""Random sequences of misses, answers and cache administration keep the cache's invariants:
every frame is sent, dropped (and counted) or still queued; frames to one MAC leave in order;
at most one lookup per MAC is outstanding."""

from __future__ import annotations

import math

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from tests.shim.shimnet import A_IP, DEV, MAC_A1, B, C, frame
from varpd.shim import MemoryUnderlay, OverlayDriver, TargetMode

MACS = [bytes.fromhex(f"0200000000{i:02x}") for i in (1, 2)]
POINTS = [B, C]
DROP_COUNTERS = (
    "tx_drop_cache",
    "tx_drop_queue_full",
    "tx_drop_lookup_queue_full",
    "tx_drop_lookup",
)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 1)),
        st.tuples(st.just("send"), st.integers(0, 1)),
        st.tuples(st.just("send"), st.integers(0, 1)),
        st.tuples(st.just("lookup")),
        st.tuples(st.just("respond"), st.integers(0, 3), st.integers(0, 1)),
        st.tuples(st.just("drop"), st.integers(0, 3)),
        st.tuples(st.just("set"), st.integers(0, 1), st.integers(0, 2)),
        st.tuples(st.just("remove"), st.integers(0, 1)),
        st.tuples(st.just("flush")),
    ),
    max_size=80,
)


def run_scenario(steps: list[tuple]) -> None:
    async def scenario() -> None:
        underlay = MemoryUnderlay()
        captured = underlay.capture()
        a = OverlayDriver(underlay)
        a.create_device(DEV, 1)
        a.set_prop(DEV, "mtu", 8900)  # 8 KB frames: 16 of them fill an entry's queue
        a.set_prop(DEV, "vxlan/listen_ip", A_IP)
        a.associate(DEV, 1, TargetMode.DYNAMIC)
        await a.activate(DEV)
        guest = a.add_vnic(DEV, MAC_A1).port
        held = []
        sent = 0
        for step in steps:
            op = step[0]
            if op == "send":
                data = frame(MAC_A1, MACS[step[1]], sent.to_bytes(4, "big") + bytes(8000))
                sent += 1
                await guest.send(data)
            elif op == "lookup":
                with trio.CancelScope(deadline=-math.inf):
                    held.append(await a.next_lookup())
            elif op in ("respond", "drop") and held:
                req = held.pop(step[1] % len(held))
                if op == "respond":
                    a.respond(req.req_id, POINTS[step[2]])
                else:
                    a.drop(req.req_id)
            elif op == "set":
                if step[2] == 2:
                    a.cache_set(DEV, MACS[step[1]], None, drop=True)
                else:
                    a.cache_set(DEV, MACS[step[1]], POINTS[step[2]])
            elif op == "remove":
                try:
                    a.cache_remove(DEV, MACS[step[1]])
                except Exception as exc:
                    assert getattr(exc, "code", None) == "ENOENT"
            elif op == "flush":
                a.cache_flush(DEV)

            counters = a.status(DEV).counters
            queued = sum(len(e.frames) for e in a.device(DEV).cache.entries.values())
            dropped = sum(counters[k] for k in DROP_COUNTERS)
            assert counters["tx_frames"] == len(captured)
            assert len(captured) + dropped + queued == sent
            outstanding = [e.mac for e in a.misses.outstanding.values()]
            assert len(outstanding) == len(set(outstanding))
            assert {r.req_id for r in held} == set(a.misses.outstanding)
        for mac in MACS:
            inners = [bytes(VXLAN(d.payload)[Ether]) for d in captured if d.payload[8:14] == mac]
            seqs = [int.from_bytes(inner[42:46], "big") for inner in inners]
            assert seqs == sorted(seqs)

    trio.run(scenario)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_random_cache_operations_keep_invariants(steps):
    run_scenario(steps)
