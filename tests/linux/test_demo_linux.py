"""``portolan demo --netns --backend linux``: the demo's scenario on the kernel data path."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from lab import netns
from tests.e2e.conftest import REPO_ROOT

pytestmark = [pytest.mark.netns, pytest.mark.linux]


def test_demo_runs_on_the_linux_backend() -> None:
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    argv = [sys.executable, "-m", "portolan.cli.main", "demo", "--netns", "--backend", "linux",
            "--quiet"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "RESULT: all steps OK" in out, out
    steps = ("arp", "ping", "move", "firewall", "metrics")
    if shutil.which("nft") is None:  # the step says why it skips
        steps = ("arp", "ping", "move", "metrics")
        assert "no `nft` command" in out, out
    for step in steps:
        assert any(line.startswith(step) and line.rstrip().endswith("OK") for line in
                   out.splitlines()), (step, out)  # fmt: skip
