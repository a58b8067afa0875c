"""A bound on log volume: during a broker outage aiokafka and Faust log the same few lines
hundreds of times a second (measured: ~1,500 lines/s). :class:`RateLimitFilter` lets through at
most ``per_key`` lines per (logger, level, message template) and ``total`` lines of the libraries
per ``window`` seconds (the detector's own lines count per template only, so a burst of Faust's
start-up lines does not hide them); the first line let through after a suppression says how
many were dropped. CRITICAL lines always pass.

>>> f = RateLimitFilter(per_key=2, total=100, window=10.0, clock=lambda: 0.0)
>>> rec = lambda: logging.LogRecord("aiokafka", logging.ERROR, "", 0, "Unable connect to %s", ("node",), None)
>>> [f.filter(rec()) for _ in range(4)]
[True, True, False, False]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

MAX_KEYS = 2000


class RateLimitFilter(logging.Filter):
    def __init__(self, per_key: int = 5, total: int = 100, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.per_key = per_key
        self.total = total
        self.window = window
        self.clock = clock
        self._start = clock()
        self._counts: dict[tuple[str, int, str], int] = {}
        self._passed = 0
        self._dropped = 0
        self._dropped_before = 0  # in the previous window, reported by its first line after

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        now = self.clock()
        if now - self._start >= self.window:
            self._start = now
            self._dropped_before += self._dropped
            self._dropped = 0
            self._passed = 0
            self._counts.clear()
        msg = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        key = (record.name, record.levelno, msg[:200])
        n = self._counts.get(key, 0) + 1
        if len(self._counts) < MAX_KEYS or key in self._counts:
            self._counts[key] = n
        own = record.name.startswith("detector")  # few templates, each capped per key: only
        #                                          the libraries' floods count against the total
        if n > self.per_key or (self._passed >= self.total and not own):
            self._dropped += 1
            _count_suppressed()
            return False
        if not own:
            self._passed += 1
        if self._dropped_before:
            record.msg = f"{msg} [{self._dropped_before} similar log lines suppressed before this]"
            self._dropped_before = 0
        return True


def _count_suppressed() -> None:
    try:
        from detector import metrics

        metrics.LOG_SUPPRESSED.inc()
    except Exception:  # noqa: S110 - logging must never fail because of a metric
        pass


def install(logger: logging.Logger | None = None, **kwargs: float) -> RateLimitFilter | None:
    """Add one shared :class:`RateLimitFilter` to every handler of ``logger`` (default: root)
    that has none yet; returns it (None when there is no handler)."""
    logger = logger or logging.getLogger()
    existing = [f for h in logger.handlers for f in h.filters if isinstance(f, RateLimitFilter)]
    flt = existing[0] if existing else RateLimitFilter(**kwargs)  # type: ignore[arg-type]
    for handler in logger.handlers:
        if flt not in handler.filters:
            handler.addFilter(flt)
    return flt if logger.handlers else None
