"""The lookup worker pool: bounded concurrency, one outcome per request, crash containment."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import trio
from scapy.layers.l2 import Ether

from varpd.plugins import PLUGINS
from varpd.plugins.base import Plugin, PropSpec
from varpd.shim.types import Point, TargetMode

A = "02:00:00:00:00:0a"


class GatePlugin(Plugin):
    """Holds every lookup until released; records the peak concurrency."""

    name: ClassVar[str] = "test-gate"
    mode: ClassVar[TargetMode] = TargetMode.DYNAMIC
    props: ClassVar[tuple[PropSpec, ...]] = ()
    release = trio.Event()
    inflight = 0
    peak = 0

    async def lookup(self, req: Any, reply: Any) -> None:
        cls = type(self)
        cls.inflight += 1
        cls.peak = max(cls.peak, cls.inflight)
        try:
            await cls.release.wait()
        finally:
            cls.inflight -= 1
        reply.respond(Point.of("10.0.0.2", 4789))


class CrashPlugin(Plugin):
    name: ClassVar[str] = "test-crash"
    mode: ClassVar[TargetMode] = TargetMode.DYNAMIC

    async def lookup(self, req: Any, reply: Any) -> None:
        if req.dst_mac[-1] == 1:
            raise RuntimeError("boom")
        if req.dst_mac[-1] == 2:
            reply.drop()
            reply.drop()  # a second outcome: refused, counted as an error
        if req.dst_mac[-1] == 3:
            await trio.sleep_forever()  # hangs: the lookup timeout drops it
        # otherwise: returns without an outcome


@pytest.fixture(autouse=True)
def test_plugins() -> None:
    PLUGINS.register(GatePlugin)
    PLUGINS.register(CrashPlugin)
    GatePlugin.release = trio.Event()
    GatePlugin.inflight = GatePlugin.peak = 0


async def dynamic(v: Any, search: str) -> Any:
    await v.create("o0", 1, search, props={"vxlan/listen_ip": "10.0.0.1"}, vnics=[{"mac": A}])
    await v.activate("o0")
    return v.vnic("o0", A).port


async def test_pool_runs_lookups_concurrently_up_to_its_size(
    make_varpd: Any, underlay: Any, until: Any, metric: Any
) -> None:
    captured = underlay.capture()
    async with make_varpd("a", lookup_workers=4) as v:
        port = await dynamic(v, "test-gate")
        for i in range(10):
            port.send_nowait(bytes(Ether(src=A, dst=f"02:00:00:00:01:{i:02x}") / b"x"))
        await until(lambda: GatePlugin.inflight == 4)
        await trio.sleep(0.1)
        assert GatePlugin.peak == 4  # bounded by the pool
        GatePlugin.release.set()
        await until(lambda: len(captured) == 10)
        assert metric(v, "varpd_lookups_total", plugin="test-gate", result="respond") == 10


async def test_plugin_crash_drops_and_is_counted(make_varpd: Any, until: Any, metric: Any) -> None:
    async with make_varpd("a", lookup_workers=2, lookup_timeout=0.2) as v:
        port = await dynamic(v, "test-crash")
        for last in (1, 2, 3, 4):
            port.send_nowait(bytes(Ether(src=A, dst=f"02:00:00:00:00:{last:02x}") / b"x"))

        def counted(result: str) -> float:
            return metric(v, "varpd_lookups_total", plugin="test-crash", result=result)

        await until(
            lambda: counted("error") == 2 and counted("timeout") == 1 and counted("no_answer") == 1
        )
        await until(lambda: v.show("o0")["device"]["counters"]["tx_drop_lookup"] == 4)
        # the daemon is still serving
        port.send_nowait(bytes(Ether(src=A, dst="02:00:00:00:00:01") / b"again"))
        await until(lambda: counted("error") == 3)


async def test_delete_cancels_inflight_lookups(make_varpd: Any, until: Any, metric: Any) -> None:
    async with make_varpd("a") as v:
        port = await dynamic(v, "test-gate")
        port.send_nowait(bytes(Ether(src=A, dst="02:00:00:00:01:01") / b"x"))
        await until(lambda: GatePlugin.inflight == 1)
        v.vnic("o0", A)  # still there
        await v.delete("o0")
        await until(lambda: GatePlugin.inflight == 0)
        assert v.list() == []
        assert metric(v, "varpd_lookups_total", plugin="test-gate", result="cancelled") == 1
