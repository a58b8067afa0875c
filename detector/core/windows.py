"""Event-time sliding counts that a plain key-value table can hold (dict in replay, Faust table in
the stream), with exact, deterministic semantics, bounded memory and a compact binary form.

**Counts** (:class:`Window`): tumbling sub-windows of one minute (the last 60 kept) and one hour
(the last 24 kept), summed at read time. A *15-minute count at t* is the sum of the minute bucket
holding t and the 14 before it; *1 h* is 60 minute buckets; *24 h* is the hour bucket holding t
and the 23 before it. Replay and stream use these functions on the same values, so they agree
exactly.

**Distinct counts** (:data:`Distinct`): ``{member: last_seen}``; the distinct count over H at t
counts the members last seen in ``(t - H, t]``. Members are integers (64-bit keyed hashes, see
:func:`detector.core.pii.hash_int`, or a short code such as a region's :func:`code_int`).
Members older than the longest horizon are dropped on write and at most ``cap`` members are kept
(oldest evicted), so a flood saturates at ``cap`` instead of growing.

**Binary form** (:func:`pack_window`, :func:`pack_distinct` and their inverses): a table keeps
its values packed (a few bytes per bucket or member instead of a Python object each) and the
same bytes go to the changelog; a value is unpacked only while a batch works on it.

>>> v = None
>>> for t in (0, 30, 61, 3000, 3700):
...     v = count_add(v, t)
>>> count_read(v, 3700)
(2, 2, 5)
>>> d = distinct_add(None, 1, 0.0)
>>> d = distinct_add(d, 2, 4000.0)
>>> distinct_read(d, 4000.0)
(1, 2)
>>> buf = bytearray()
>>> pack_window(v, buf)
>>> unpack_window(bytes(buf), 0)[0] == v
True
"""

from __future__ import annotations

import struct
from array import array
from functools import lru_cache

MINUTE, HOUR = 60, 3600
MINUTE_BUCKETS_KEPT = 60
HOUR_BUCKETS_KEPT = 24
DAY = 86_400
DISTINCT_CAP = 5_000

Distinct = dict[int, float]  # member -> last seen (event time, epoch seconds)


class Window:
    """Events counted per minute bucket and per hour bucket (bucket = epoch seconds // 60 or
    // 3600), oldest first, as parallel lists of bucket ids and counts."""

    __slots__ = ("minutes", "minute_counts", "hours", "hour_counts")

    def __init__(self, minutes: list[int] | None = None, minute_counts: list[int] | None = None,
                 hours: list[int] | None = None, hour_counts: list[int] | None = None) -> None:
        self.minutes = minutes if minutes is not None else []
        self.minute_counts = minute_counts if minute_counts is not None else []
        self.hours = hours if hours is not None else []
        self.hour_counts = hour_counts if hour_counts is not None else []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Window) and (
            self.minutes, self.minute_counts, self.hours, self.hour_counts
        ) == (other.minutes, other.minute_counts, other.hours, other.hour_counts)

    def __repr__(self) -> str:
        return (f"Window(minutes={list(zip(self.minutes, self.minute_counts, strict=True))}, "
                f"hours={list(zip(self.hours, self.hour_counts, strict=True))})")

    def copy(self) -> Window:
        return Window(self.minutes[:], self.minute_counts[:], self.hours[:], self.hour_counts[:])


def _bump(ids: list[int], counts: list[int], b: int, keep: int) -> None:
    if ids and ids[-1] == b:
        counts[-1] += 1
    elif not ids or ids[-1] < b:
        ids.append(b)
        counts.append(1)
    else:  # out-of-order event: insert in place (rare)
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] == b:
                counts[i] += 1
                break
            if ids[i] < b:
                ids.insert(i + 1, b)
                counts.insert(i + 1, 1)
                break
        else:
            ids.insert(0, b)
            counts.insert(0, 1)
    oldest_kept = ids[-1] - keep
    cut = 0
    while cut < len(ids) and ids[cut] <= oldest_kept:
        cut += 1
    if cut:
        del ids[:cut]
        del counts[:cut]


def count_add(value: Window | None, ts: float) -> Window:
    """Count one event at ``ts`` (epoch seconds). Returns the (possibly new) value to store."""
    if value is None:
        value = Window()
    t = int(ts)
    _bump(value.minutes, value.minute_counts, t // MINUTE, MINUTE_BUCKETS_KEPT)
    _bump(value.hours, value.hour_counts, t // HOUR, HOUR_BUCKETS_KEPT)
    return value


def _sum_since(ids: list[int], counts: list[int], first: int, last: int) -> int:
    total = 0
    for i in range(len(ids) - 1, -1, -1):
        b = ids[i]
        if b < first:
            break
        if b <= last:
            total += counts[i]
    return total


def count_read(value: Window | None, ts: float) -> tuple[int, int, int]:
    """(15 min, 1 h, 24 h) counts at ``ts``."""
    if value is None or not value.hours:
        return 0, 0, 0
    t = int(ts)
    m, h = t // MINUTE, t // HOUR
    # one backward pass over the (ascending) minute buckets for both 15 min and 1 h
    c15 = c60 = 0
    f15, f60 = m - 14, m - 59
    ids, counts = value.minutes, value.minute_counts
    for i in range(len(ids) - 1, -1, -1):
        b = ids[i]
        if b < f60:
            break
        if b <= m:
            n = counts[i]
            c60 += n
            if b >= f15:
                c15 += n
    return c15, c60, _sum_since(value.hours, value.hour_counts, h - 23, h)


def count_add_read(value: Window | None, ts: float) -> tuple[Window, int, int, int]:
    """:func:`count_add` then :func:`count_read` at the same ``ts``, in one call: (the value to
    store, 15 min, 1 h, 24 h)."""
    if value is None:
        value = Window()
    t = int(ts)
    m, h = t // MINUTE, t // HOUR
    ids, counts = value.minutes, value.minute_counts
    _bump(ids, counts, m, MINUTE_BUCKETS_KEPT)
    _bump(value.hours, value.hour_counts, h, HOUR_BUCKETS_KEPT)
    c15 = c60 = 0
    f15, f60 = m - 14, m - 59
    for i in range(len(ids) - 1, -1, -1):
        b = ids[i]
        if b < f60:
            break
        if b <= m:
            n = counts[i]
            c60 += n
            if b >= f15:
                c15 += n
    return value, c15, c60, _sum_since(value.hours, value.hour_counts, h - 23, h)


def count_expires_at(value: Window | None) -> float:
    """The event time from which nothing in ``value`` can count any more."""
    if value is None or not value.hours:
        return float("-inf")
    return float((value.hours[-1] + HOUR_BUCKETS_KEPT) * HOUR)


def count_expired(value: Window | None, now: float) -> bool:
    """True when nothing in ``value`` can count at ``now`` or later (safe to delete the key)."""
    return count_expires_at(value) <= now


def distinct_add(
    value: Distinct | None,
    member: int,
    ts: float,
    *,
    horizon: float = DAY,
    cap: int = DISTINCT_CAP,
) -> Distinct:
    """Record ``member`` seen at ``ts``; drop members older than ``horizon``; keep at most ``cap``."""
    if value is None:
        value = {}
    prev = value.get(member)
    if prev is None or prev < ts:
        value[member] = ts
    if len(value) > 64 or len(value) > cap:
        cutoff = ts - horizon
        stale = [k for k, seen in value.items() if seen <= cutoff]
        for k in stale:
            del value[k]
        if len(value) > cap:
            for k, _ in sorted(value.items(), key=lambda kv: kv[1])[: len(value) - cap]:
                del value[k]
    return value


def distinct_read(
    value: Distinct | None, ts: float, short: float = HOUR, long: float = DAY
) -> tuple[int, int]:
    """(distinct over ``short``, distinct over ``long``) at ``ts``; counts members seen up to ``ts``."""
    if not value:
        return 0, 0
    s = lo = 0
    t_short, t_long = ts - short, ts - long
    for seen in value.values():
        if t_long < seen <= ts:
            lo += 1
            if seen > t_short:
                s += 1
    return s, lo


def distinct_add_read(value: Distinct | None, member: int, ts: float) -> tuple[Distinct, int, int]:
    """:func:`distinct_add` (default horizon and cap) then :func:`distinct_read` (1 h, 24 h) at
    the same ``ts``, in one call: (the value to store, distinct over 1 h, over 24 h)."""
    value = distinct_add(value, member, ts)
    s = lo = 0
    t_short, t_long = ts - HOUR, ts - DAY
    for seen in value.values():
        if t_long < seen <= ts:
            lo += 1
            if seen > t_short:
                s += 1
    return value, s, lo


def distinct_expires_at(value: Distinct | None, horizon: float = DAY) -> float:
    """The event time from which no member of ``value`` counts any more."""
    return max(value.values()) + horizon if value else float("-inf")


def distinct_expired(value: Distinct | None, now: float, horizon: float = DAY) -> bool:
    return distinct_expires_at(value, horizon) <= now


def code_int(code: str) -> int:
    """A short ASCII code (a region such as ``GB`` or ``001``) as a distinct-set member.

    >>> code_int("GB")
    18242
    """
    return int.from_bytes(code.encode("ascii", "replace")[:8], "big")


# --------------------------------------------------------------------------- binary form
# Little-endian. Window: u8 minute buckets, u8 hour buckets, then i32 minute ids, u32 counts,
# i32 hour ids, u32 counts. Distinct: u16 members, then u64 members, f64 last-seen times.


@lru_cache(maxsize=4096)
def _window_struct(nm: int, nh: int) -> struct.Struct:
    return struct.Struct(f"<BB{nm}i{nm}I{nh}i{nh}I")


_U8X2 = struct.Struct("<BB")
_U16 = struct.Struct("<H")


def pack_window(w: Window | None, out: bytearray) -> None:
    """Append the binary form of ``w`` (None: an empty window) to ``out``."""
    if w is None:
        out += b"\0\0"
        return
    nm, nh = len(w.minutes), len(w.hours)
    out += _window_struct(nm, nh).pack(nm, nh, *w.minutes, *w.minute_counts, *w.hours,
                                        *w.hour_counts)


def unpack_window(buf: bytes | memoryview, pos: int) -> tuple[Window, int]:
    """The window packed at ``pos`` and the position after it."""
    nm, nh = _U8X2.unpack_from(buf, pos)
    st = _window_struct(nm, nh)
    v = st.unpack_from(buf, pos)
    a, b, c = 2 + nm, 2 + 2 * nm, 2 + 2 * nm + nh
    return Window(list(v[2:a]), list(v[a:b]), list(v[b:c]), list(v[c:])), pos + st.size


def pack_distinct(d: Distinct | None, out: bytearray) -> None:
    """Append the binary form of ``d`` (None: an empty set) to ``out``."""
    if not d:
        out += b"\0\0"
        return
    out += _U16.pack(len(d))
    out += array("Q", d.keys()).tobytes()
    out += array("d", d.values()).tobytes()


def unpack_distinct(buf: bytes | memoryview, pos: int) -> tuple[Distinct, int]:
    """The distinct set packed at ``pos`` (a new dict) and the position after it."""
    (n,) = _U16.unpack_from(buf, pos)
    pos += 2
    if not n:
        return {}, pos
    members, seen = array("Q"), array("d")
    members.frombytes(buf[pos:pos + 8 * n])
    seen.frombytes(buf[pos + 8 * n:pos + 16 * n])
    return dict(zip(members, seen, strict=True)), pos + 16 * n
