"""Fixtures of the kernel firewall tests: a lab bridge namespace (skipped without root/nft)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.linux.conftest import kcluster  # noqa: F401 - the linux backend's cluster fixture

from .lab import Lab, lab, unavailable


@pytest.fixture
def kernel_lab() -> Iterator[Lab]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with lab(3) as lb:
        yield lb
