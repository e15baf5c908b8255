"""Fixtures of the varpd tests: in-process daemons on a shared MemoryUnderlay, frame helpers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from varpd.config import parse_config
from varpd.daemon import Varpd
from varpd.shim.memory import MemoryUnderlay


@pytest.fixture
def underlay() -> MemoryUnderlay:
    return MemoryUnderlay()


@pytest.fixture
def make_varpd(
    tmp_path: Path, underlay: MemoryUnderlay
) -> Callable[..., contextlib.AbstractAsyncContextManager[Varpd]]:
    """``async with make_varpd("a", lookup_workers=2) as varpd:`` runs one daemon."""

    @contextlib.asynccontextmanager
    async def factory(name: str = "node", **extra: Any) -> AsyncIterator[Varpd]:
        doc: dict[str, Any] = {
            "state_dir": str(tmp_path / f"{name}-state"),
            "control_socket": "",
            "metrics": "",
            "lookup_workers": 3,
        }
        doc.update(extra)
        varpd = Varpd(parse_config(doc), underlay=underlay)
        async with trio.open_nursery() as nursery:
            await nursery.start(varpd.run)
            try:
                yield varpd
            finally:
                nursery.cancel_scope.cancel()

    return factory


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@pytest.fixture
def until() -> Callable[..., Any]:
    return wait_until


def sample(varpd: Varpd, metric: str, **labels: str) -> float:
    value = varpd.metrics.registry.get_sample_value(metric, labels)
    return 0.0 if value is None else value


@pytest.fixture
def metric() -> Callable[..., float]:
    return sample
