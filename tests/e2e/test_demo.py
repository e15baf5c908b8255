"""``portolan demo`` as a user runs it: a subprocess, its output and its exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = ("arp", "ping", "move", "firewall", "metrics")


def run_demo(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portolan.cli.main", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def summary_rows(stdout: str) -> dict[str, str]:
    """step -> result (OK/FAIL/SKIP) from the summary table's first line of each row."""
    table = stdout.split("== summary", 1)[1].split("RESULT:", 1)[0]
    rows = {}
    for line in table.splitlines():
        words = line.split()
        if words and words[0] in STEPS:
            rows[words[0]] = words[-1]
    return rows


def test_demo_runs_every_step_and_exits_zero():
    result = run_demo()
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "RESULT: all steps OK" in out
    rows = summary_rows(out)
    assert set(rows) == set(STEPS)
    assert all(status in ("OK", "SKIP") for status in rows.values()), rows
    assert rows["arp"] == rows["ping"] == rows["move"] == rows["metrics"] == "OK"
    # It said what happened as it happened: the proxy ARP, a VL2 lookup answered by portolan,
    # encapsulated delivery, the shootdown after the move.
    assert "upcall to varpd (proxy ARP)" in out
    assert "VL2 answer from portolan" in out
    assert "VXLAN vni 12340 cn-a -> cn-c" in out
    assert "shootdown VL2; cache entry of" in out
    assert "shootdown VL3: re-resolved with portolan" in out
    # The banner names every /metrics endpoint; without --keep they are gone at the end, so
    # the run does not end by listing them.
    banner = out.split("== setup: VNICs", 1)[0]
    assert banner.count("/metrics") == 4
    assert "metrics endpoints:" not in out
    assert out.rstrip().endswith("RESULT: all steps OK")


def test_quiet_prints_the_summary_only():
    result = run_demo("--quiet")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert out.startswith("== summary\n"), out[:200]
    assert out.rstrip().endswith("RESULT: all steps OK")
    assert "http://" not in out and "portolan demo:" not in out and "shell" not in out
    assert [line for line in out.splitlines() if line.startswith("==")] == ["== summary"]


def test_firewall_step_runs():
    result = run_demo("--quiet")
    assert summary_rows(result.stdout)["firewall"] == "OK", result.stdout


def test_a_step_that_did_not_happen_fails_the_run():
    # The move is not told to portolan: cn-a keeps B at cn-b and the echo is lost.
    result = run_demo("--quiet", "--fail-step", "move")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "RESULT: FAIL (move" in out
    rows = summary_rows(out)
    assert rows["move"] == "FAIL"
    assert rows["arp"] == rows["ping"] == "OK"


def test_a_guest_that_does_not_answer_fails_the_ping_step():
    result = run_demo("--quiet", "--fail-step", "ping")
    assert result.returncode == 1
    assert summary_rows(result.stdout)["ping"] == "FAIL"


def _netns_unavailable() -> str | None:
    from lab import netns
    from lab.demo import netns_unavailable

    why = netns_unavailable()
    if why is None:
        why = netns.unavailable()
    return why


def test_the_same_scenario_runs_on_namespaces_taps_and_udp():
    why = _netns_unavailable()
    if why is not None:
        pytest.skip(f"--netns: {why}")
    result = run_demo("--netns")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "RESULT: all steps OK" in out
    rows = summary_rows(out)
    assert rows["arp"] == rows["ping"] == rows["move"] == rows["metrics"] == "OK"
    if rows["firewall"] == "OK":
        # the blocked datagram is reported as such, not as a missing value
        assert "inbound drops +" in out and "; no echo" in out
    assert "echo: None" not in out
