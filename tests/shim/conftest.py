"""Fixtures for the shim's packet-level tests: drivers on one MemoryUnderlay, a fake varpd."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from tests.shim.shimnet import A_IP, B_IP, DEV, MAC_A1, MAC_B1, FakeVarpd, start_node
from varpd.shim import Datagram, MemoryUnderlay, OverlayDriver, Point


@pytest.fixture
def underlay() -> MemoryUnderlay:
    return MemoryUnderlay()


@pytest.fixture
def captured(underlay: MemoryUnderlay) -> list[Datagram]:
    return underlay.capture()


@pytest.fixture
async def pair(
    nursery: trio.Nursery, underlay: MemoryUnderlay
) -> tuple[OverlayDriver, OverlayDriver]:
    """Node A (10.0.0.1, VNIC A1) and node B (10.0.0.2, VNIC B1), DYNAMIC, no varpd."""
    a = await start_node(nursery, underlay, A_IP)
    b = await start_node(nursery, underlay, B_IP)
    a.add_vnic(DEV, MAC_A1)
    b.add_vnic(DEV, MAC_B1)
    return a, b


@pytest.fixture
def varpd_for(nursery: trio.Nursery) -> Callable[[OverlayDriver, dict[bytes, Point]], FakeVarpd]:
    def start(driver: OverlayDriver, answers: dict[bytes, Point]) -> FakeVarpd:
        fake = FakeVarpd(driver, answers)
        nursery.start_soon(fake.run)
        return fake

    return start
