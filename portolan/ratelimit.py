"""Rate-limited logging: one line per kind of trouble per interval, not one per occurrence.

Theory of operation
-------------------
A daemon that logs a WARNING for every malformed connection, every failed store read or every
refused ``accept`` lets one misbehaving client (or one outage) write millions of lines. Here
each *kind* of event (a short string the caller picks: ``"bad_crc"``, ``"store"``,
``"over_limit"``) may log ``burst`` lines per ``interval`` seconds; later ones in the same
interval are counted and dropped, and the first line let through after them says how many
were held back. The exact figures live in the metrics counters, which callers keep bumping for
every event; the log only has to tell an operator that something is going on and what it
looks like.

- `LogLimiter` is what our own code calls: ``limiter.warning(kind, msg, *args)``.
- `RateLimitFilter` is a `logging.Filter` for loggers we do not own (trio's accept loop logs
  an EMFILE traceback every 0.1 s while the process is out of file descriptors); it keys on the
  record's logger name and message template and strips the traceback of the lines it lets
  through after the first one.

Invariants: no I/O besides the logging call itself, no locks (one trio thread uses it), memory
bounded by the number of distinct kinds (callers use a small fixed set; the filter keys on
message templates, which are constants in the code that logs). Lifecycle: created with its
owner (one per server object, or installed once on a logger at start), never closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

DEFAULT_INTERVAL = 10.0


class _Window:
    __slots__ = ("start", "passed", "held")

    def __init__(self, start: float, held: int = 0) -> None:
        self.start = start
        self.passed = 0
        self.held = held  # dropped since the last line that got through


class LogLimiter:
    """At most ``burst`` log lines per kind per ``interval`` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = DEFAULT_INTERVAL,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def allow(self, kind: str) -> tuple[bool, int]:
        """(may this line be logged, how many lines of this kind were held back before it)."""
        now = self.clock()
        window = self._windows.get(kind)
        if window is None or now - window.start >= self.interval:
            window = _Window(now, window.held if window is not None else 0)
            self._windows[kind] = window
        if window.passed >= self.burst:
            window.held += 1
            return False, 0
        window.passed += 1
        held, window.held = window.held, 0
        return True, held

    def log(self, level: int, kind: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log ``msg % args`` unless this kind is over its budget; True if it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        ok, held = self.allow(kind)
        if not ok:
            return False
        if held:
            msg += " (%d more like this in the last %gs not logged)"
            args = (*args, held, self.interval)
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def warning(self, kind: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.WARNING, kind, msg, *args, **kwargs)

    def error(self, kind: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        return self.log(logging.ERROR, kind, msg, *args, **kwargs)


class RateLimitFilter(logging.Filter):
    """A filter for someone else's logger: one record per (logger, message template) per
    ``interval``; the traceback is kept on the first record only."""

    def __init__(
        self,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._limiter = LogLimiter(logging.getLogger(__name__), interval=interval, clock=clock)
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}\0{record.msg}"
        ok, held = self._limiter.allow(key)
        if not ok:
            return False
        if key in self._seen:
            record.exc_info = None
            record.exc_text = None
        self._seen.add(key)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last " + (
                f"{self._limiter.interval:g}s not logged)"
            )
        return True
