"""Dead state deleted in event time, a slice of keys at a time.

A value whose ``expires`` (see :mod:`detector.stream.tables`) is at or before the sweep time is
deleted from memory with a tombstone on its changelog partition; a value of a partition this
worker no longer owns is dropped from memory (its new owner has it). ``seen`` decisions expire
:data:`~detector.stream.ledger.SEEN_TTL_S` after their request's time. Sweeps read the 8-byte
head of each value, never unpack it, and the :class:`Sweeper` works through a slice of keys per
tick, so a table of millions of keys never stalls the loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from detector import metrics
from detector.core import state
from detector.core.clock import sweep_time
from detector.stream.stores import TableStore, iter_slice
from detector.stream.tables import Keys, Write, read_head, sweep_keys

SWEEP_INTERVAL_S = 30.0  # a full sweep pass starts at most this often ...
SWEEP_TICK_S = 0.5  # ... and proceeds a slice of keys per tick:
SWEEP_SLICE = 2000  # at least this many, more for big tables (a pass in SWEEP_INTERVAL_S) ...
SWEEP_SLICE_MAX = 20_000  # ... but never more than this (~20 ms of the loop per tick)
CORE_TABLES = ("ip", "number", "pair", "range")


def owned_partitions(rt: Any) -> dict[str, set[int]]:
    """table -> the partitions this worker owns (its stage's input partitions)."""
    by_range = rt.active.get("by_range", set())
    return {"ip": rt.active.get("by_ip", set()), "number": by_range, "pair": by_range,
            "range": by_range, "seen": by_range}


def sweep_tables(rt: Any, now: float, only: dict[str, Keys] | None = None) -> list[Write]:
    """Delete dead keys of this worker's partitions (core tables when nothing in them can count;
    ``seen`` after its TTL) and keys of partitions it no longer owns; ``only`` limits it to some
    keys. Returns the tombstones to send."""
    owned = owned_partitions(rt)
    writes: list[Write] = []
    for name in CORE_TABLES:
        st = rt.state_tables[name]
        keys = None if only is None else only.get(name, [])
        writes += sweep_keys(st.table, st.backend, keys, now, owned[name], st.busy)
    keys = None if only is None else only.get("seen", [])
    writes += rt.decisions.sweep(keys, now, owned["seen"])
    return writes


def sweep_now(rt: Any) -> float:
    """The time sweeps run at: the newest event time, but never past the wall clock plus the
    allowed future skew (one far-future event must not make every live key look dead)."""
    return sweep_time(newest_event=rt.max_ts, wall=time.time(),
                      max_future_skew=rt.settings.max_future_skew_s)


class Sweeper:
    """Sweeps a slice of keys per tick; a full pass starts at most every SWEEP_INTERVAL_S."""

    def __init__(self, rt: Any, slice_size: int = SWEEP_SLICE) -> None:
        self.rt = rt
        self.min_slice = self.slice_size = slice_size
        # (table, its keys at the pass's start: a list for the memory store, read lazily from
        # the databases for RocksDB)
        self.queue: list[tuple[str, Iterator[tuple[bytes, int | None]]]] = []
        self.pass_started = float("-inf")
        self.pending = 0  # numbers with an outstanding callback seen in the current pass

    def _stores(self) -> dict[str, TableStore]:
        return {**{n: self.rt.state_tables[n].backend for n in CORE_TABLES},
                "seen": self.rt.decisions.backend}

    def tick(self, now: float) -> list[Write]:
        wall = time.monotonic()
        if not self.queue:
            if wall - self.pass_started < SWEEP_INTERVAL_S:
                return []
            self.pass_started = wall
            metrics.OUTSTANDING.set(self.pending)
            self.pending = 0
            stores = self._stores()
            self.queue = [(name, st.scan()) for name, st in reversed(stores.items())]
            total = sum(st.count() for st in stores.values())
            ticks = SWEEP_INTERVAL_S / SWEEP_TICK_S
            self.slice_size = min(max(self.min_slice, int(total / ticks) + 1),
                                  max(self.min_slice, SWEEP_SLICE_MAX))
            self.rt.decisions.forget_sent()
        only: dict[str, Keys] = {}
        budget = self.slice_size
        while self.queue and budget > 0:
            name, keys = self.queue[-1]
            batch = iter_slice(keys, budget)
            if len(batch) < budget:
                self.queue.pop()
            budget -= len(batch)
            only.setdefault(name, []).extend(batch)
        numbers = self.rt.state_tables["number"].backend
        for key, where in only.get("number", ()):
            raw = numbers.get(key, where)
            if raw is not None and read_head(raw)[0] >= 0:
                until = state.pending_until(raw, _payload_pos(raw))
                if until is not None and until > now:
                    self.pending += 1
        return sweep_tables(self.rt, now, only)


def _payload_pos(raw: bytes) -> int:
    from detector.stream.tables import unpack_value

    return unpack_value(raw)[2]
