"""End-to-end fixtures: ``portolan serve`` as a real process on free ports.

`portolan_process` starts ``python -m portolan.cli.main serve`` with every listener on
127.0.0.1 port 0 and a fresh SQLite store, reads its ``READY svp=... api=... metrics=...`` line
and yields a `PortolanProcess` with the bound addresses. The process is SIGTERMed (then
killed) at teardown; stderr is kept in a file so a failing test can show it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60.0


def portolan_argv(*args: str) -> list[str]:
    """The command line of the ``portolan`` entry point, run with this interpreter."""
    return [sys.executable, "-m", "portolan.cli.main", *args]


def run_portolan(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None):
    """Run a ``portolan`` command to completion; returns the CompletedProcess (text)."""
    return subprocess.run(
        portolan_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )


def parse_ready(line: str) -> dict[str, tuple[str, int]]:
    words = line.split()
    assert words and words[0] == "READY", f"not a READY line: {line!r}"
    out = {}
    for word in words[1:]:
        name, _, addr = word.partition("=")
        host, _, port = addr.rpartition(":")
        out[name] = (host.strip("[]"), int(port))
    return out


@dataclass
class PortolanProcess:
    proc: subprocess.Popen
    store_url: str
    addresses: dict[str, tuple[str, int]]
    stderr_path: Path
    argv: list[str] = field(default_factory=list)

    @property
    def svp(self) -> tuple[str, int]:
        return self.addresses["svp"]

    @property
    def metrics(self) -> tuple[str, int]:
        return self.addresses["metrics"]

    @property
    def api(self) -> tuple[str, int]:
        return self.addresses["api"]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_portolan(tmp_path: Path, extra: Sequence[str] = (), store_url: str | None = None):
    store_url = store_url or f"sqlite:{tmp_path / 'portolan.db'}"
    argv = portolan_argv(
        "serve",
        "--store",
        store_url,
        "--svp-listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        *extra,
    )
    stderr_path = tmp_path / f"portolan-serve-{time.monotonic_ns()}.err"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO_ROOT)
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line or line.startswith("READY"):
            break
    if not line.startswith("READY"):
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"portolan serve printed no READY line (exit {proc.returncode}):\n"
            + stderr_path.read_text(errors="replace")
        )
    return PortolanProcess(proc, store_url, parse_ready(line), stderr_path, argv)


@pytest.fixture
def portolan_process(tmp_path: Path) -> Iterator[PortolanProcess]:
    process = start_portolan(tmp_path)
    try:
        yield process
    finally:
        process.terminate()
