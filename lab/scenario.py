"""A scenario: steps, each with what is expected and what was observed, and their summary.

`Events` prints one timestamped line per event (wall clock, seconds since start, source,
text) and is also the `lab.cluster.Cluster` log; `Scenario.step` runs one step body, which
fills a `StepResult` (observed text, status OK | FAIL | SKIP); a body that raises
`LabError` fails its step with the error as the observation. `Scenario.print_summary` prints
the table and the RESULT line; `Scenario.ok` is true when no step failed.

Sabotage (for tests): a scenario may name steps whose action it can leave out
(``sabotage``: step -> what is left out) so that their verification must fail.
"""

from __future__ import annotations

import signal
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TextIO

import trio

from lab.frames import summarize
from lab.spec import LabError
from protocol.addr import format_mac
from varpd.shim.types import Point


def ms(seconds: float) -> str:
    """Milliseconds, with the precision a reader needs."""
    value = seconds * 1000
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


class Events:
    """Prints one line per event (wall clock, seconds since start, source, text) while
    ``enabled``, and narration (banners, section headers) with `say` while ``narrate``;
    ``say(..., always=True)`` (the summary, what ``--keep`` offers) prints regardless."""

    def __init__(self, out: TextIO, *, enabled: bool = True, narrate: bool = True) -> None:
        self.out = out
        self.enabled = enabled
        self.narrate = narrate
        self.t0 = time.monotonic()
        self.macs: dict[bytes, str] = {}
        self.ips: dict[str, str] = {}
        self.underlay: dict[bytes, str] = {}
        self._printed = False

    def __call__(self, source: str, text: str) -> None:
        if not self.enabled:
            return
        now = time.time()
        clock = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        self._print(f"{clock} +{time.monotonic() - self.t0:6.3f}s  {source:<8} {text}")

    def say(self, text: str = "", *, always: bool = False) -> None:
        if self.narrate or always:
            # a blank line separates blocks, but never opens the output
            self._print(text if self._printed else text.lstrip("\n"))

    def _print(self, line: str) -> None:
        print(line, file=self.out)
        self.out.flush()
        self._printed = True

    def mac(self, mac: bytes) -> str:
        name = self.macs.get(mac)
        return f"{format_mac(mac)} ({name})" if name else format_mac(mac)

    def point(self, point: Point | None) -> str:
        if point is None:
            return "drop"
        text = str(point)
        node = self.underlay.get(point.ip)
        return f"{text} ({node})" if node else text

    def frame(self, frame: bytes) -> str:
        s = summarize(frame)
        if s.kind == "arp-request":
            return f"ARP who-has {s.dst_ip} tell {s.src_ip}"
        if s.kind == "arp-reply":
            return f"ARP reply {s.src_ip} is-at {s.detail}"
        if s.kind == "garp":
            return f"gratuitous ARP {s.src_ip} is-at {s.detail}"
        if s.kind in ("echo-request", "echo-reply"):
            return f"ICMP {s.kind.replace('-', ' ')} {s.src_ip} > {s.dst_ip} {s.detail}"
        if s.kind == "udp":
            sport, _, dport = s.detail.partition(">")
            return f"UDP {s.src_ip}:{sport} > {s.dst_ip}:{dport}"
        return f"{self.mac(s.src_mac)} > {self.mac(s.dst_mac)} {s.detail}"


@dataclass
class StepResult:
    step: str
    expected: str
    observed: str = "not run"
    seconds: float = 0.0
    status: str = "FAIL"  # OK | FAIL | SKIP

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


class Scenario:
    """Steps run in order and their summary."""

    def __init__(
        self,
        events: Events,
        *,
        fail_step: str | None = None,
        sabotage: dict[str, str] | None = None,
    ) -> None:
        self.events = events
        self.fail_step = fail_step
        self.sabotage = sabotage or {}
        self.results: list[StepResult] = []

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    async def step(
        self, name: str, expected: str, body: Callable[[StepResult], Awaitable[None]]
    ) -> None:
        result = StepResult(name, expected)
        self.results.append(result)
        self.events.say(f"\n== {name}: {expected}")
        if self.fail_step == name:
            self.events.say(f"   (sabotaged for testing: {self.sabotage[name]})")
        t0 = time.perf_counter()
        try:
            await body(result)
        except LabError as exc:
            result.status, result.observed = "FAIL", str(exc)
        result.seconds = time.perf_counter() - t0
        self.events("demo", f"{name}: {result.status} ({result.observed})")

    def print_summary(self) -> None:
        def say(text: str = "") -> None:
            self.events.say(text, always=True)

        say("\n== summary")
        headers = ("step", "expected", "observed", "time", "result")
        limits = (10, 34, 58, 7, 6)
        rows = [
            (r.step, r.expected, r.observed, f"{r.seconds:.2f}s", r.status) for r in self.results
        ]
        widths = [
            min(limit, max(len(h), *(len(row[i]) for row in rows)))
            for i, (h, limit) in enumerate(zip(headers, limits, strict=True))
        ]
        say("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        say("  ".join("-" * w for w in widths))
        for row in rows:
            cells = [textwrap.wrap(c, w) or [""] for c, w in zip(row, widths, strict=True)]
            for i in range(max(len(c) for c in cells)):
                line = [c[i] if i < len(c) else "" for c in cells]
                say("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())
        failed = [r.step for r in self.results if not r.ok]
        say("")
        say(f"RESULT: {'FAIL (' + ', '.join(failed) + ')' if failed else 'all steps OK'}")


async def wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return
