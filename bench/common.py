"""Helpers shared by the benchmarks: processes, a pipelined SVP load generator, statistics,
tables and result files.

The load generator is built so that it is not what limits the measurement: every connection
is driven by its own OS process (``multiprocessing``, fork) with a blocking socket, requests
are pre-encoded into one buffer and sent as slices of it, and replies are counted by size
(every reply of a benchmark has a fixed size) instead of being decoded. Each process keeps
``window`` requests in flight: every reply received is replaced by a new request.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# Processes


@dataclass
class ServerProcess:
    """A child process that printed ``READY name=host:port ...``."""

    proc: subprocess.Popen[str]
    addresses: dict[str, tuple[str, int]]

    def address(self, name: str) -> tuple[str, int]:
        host, port = self.addresses[name]
        return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), port

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def parse_ready_line(line: str) -> dict[str, tuple[str, int]]:
    """``READY svp=127.0.0.1:1 api=[::1]:2`` -> {"svp": ("127.0.0.1", 1), "api": ("::1", 2)}."""
    words = line.split()
    if not words or words[0] != "READY":
        raise ValueError(f"not a READY line: {line!r}")
    out = {}
    for word in words[1:]:
        name, _, addr = word.partition("=")
        host, _, port = addr.rpartition(":")
        out[name] = (host.strip("[]"), int(port))
    return out


def start_ready_process(
    argv: Sequence[str], *, timeout: float = 120.0, env: dict[str, str] | None = None
) -> ServerProcess:
    """Start argv, wait for its READY line on stdout (other lines are skipped)."""
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise RuntimeError(f"{shlex.join(argv)} exited with {proc.returncode} before READY")
        if line.startswith("READY"):
            return ServerProcess(proc, parse_ready_line(line))
    proc.kill()
    raise RuntimeError(f"{shlex.join(argv)} printed no READY line within {timeout:g}s")


# ------------------------------------------------------------------------------------------
# Pipelined SVP load


@dataclass(frozen=True)
class LoadSpec:
    """What every client process sends: ``frames`` (all the same size), cycled."""

    frames: Sequence[bytes]
    reply_size: int
    connections: int = 4
    window: int = 64
    warmup: float = 0.5
    duration: float = 3.0


def _client_worker(
    address: tuple[str, int],
    requests: bytes,
    frame_size: int,
    reply_size: int,
    window: int,
    t_begin: float,
    t_end: float,
    result: Any,
) -> None:
    """One connection, `window` requests in flight; counts replies in [t_begin, t_end)."""
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = memoryview(requests)
    total_frames = len(requests) // frame_size
    pos = 0

    def send(n: int) -> None:
        nonlocal pos
        while n:
            k = min(n, total_frames - pos)
            sock.sendall(view[pos * frame_size : (pos + k) * frame_size])
            pos = (pos + k) % total_frames
            n -= k

    received_bytes = 0
    counted = 0
    outstanding = window
    send(window)
    recv = sock.recv
    now = time.perf_counter
    stopping = False
    while True:
        data = recv(1 << 20)
        if not data:
            raise RuntimeError("server closed the connection during the benchmark")
        before = received_bytes // reply_size
        received_bytes += len(data)
        got = received_bytes // reply_size - before
        outstanding -= got
        t = now()
        if t_begin <= t < t_end:
            counted += got
        if t >= t_end:
            stopping = True
        if stopping:
            if outstanding == 0:
                break
        elif got:
            send(got)
            outstanding += got
    sock.close()
    result.put(counted)


def run_pipelined(address: tuple[str, int], spec: LoadSpec) -> dict[str, float]:
    """Drive address with spec.connections processes; return {"rate": replies/s, ...}."""
    frame_size = len(spec.frames[0])
    if any(len(f) != frame_size for f in spec.frames):
        raise ValueError("every request frame of a load must have the same size")
    requests = b"".join(spec.frames)
    ctx = mp.get_context("fork")
    result = ctx.Queue()
    t_begin = time.perf_counter() + 0.3 + spec.warmup
    t_end = t_begin + spec.duration
    procs = [
        ctx.Process(
            target=_client_worker,
            args=(
                address,
                requests,
                frame_size,
                spec.reply_size,
                spec.window,
                t_begin,
                t_end,
                result,
            ),
            daemon=True,
        )
        for _ in range(spec.connections)
    ]
    for p in procs:
        p.start()
    counts = [result.get(timeout=spec.warmup + spec.duration + 60) for _ in procs]
    for p in procs:
        p.join(10)
    total = sum(counts)
    return {
        "replies": total,
        "seconds": spec.duration,
        "rate": total / spec.duration,
        "connections": spec.connections,
        "window": spec.window,
    }


def latency_one_in_flight(
    address: tuple[str, int], frames: Sequence[bytes], reply_size: int, samples: int
) -> dict[str, float]:
    """Round-trip times (µs) with one request in flight at a time."""
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    now = time.perf_counter_ns
    n = len(frames)
    try:
        for i in range(samples + 100):
            frame = frames[i % n]
            t0 = now()
            sock.sendall(frame)
            got = 0
            while got < reply_size:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError("server closed the connection during the latency run")
                got += len(data)
            if i >= 100:  # the first hundred warm things up
                times.append((now() - t0) / 1000)
    finally:
        sock.close()
    return {
        "p50_us": percentile(times, 50),
        "p99_us": percentile(times, 99),
        "samples": len(times),
    }


def exchange_one(address: tuple[str, int], frame: bytes, timeout: float = 10.0) -> bytes:
    """Send one frame and return the reply frame (header's size decides its length)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(frame)
        buf = b""
        while len(buf) < 16 or len(buf) < 16 + int.from_bytes(buf[4:8], "big"):
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("server closed the connection")
            buf += data
        return buf


# ------------------------------------------------------------------------------------------
# Statistics, tables, results


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, file: Any = None) -> None:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    out = file or sys.stdout
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in text:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)), file=out)


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write bench/results/<name>.json with the machine description and a timestamp."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_description(),
        **data,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
