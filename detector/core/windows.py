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
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from functools import lru_cache
from typing import cast

MINUTE, HOUR = 60, 3600
MINUTE_BUCKETS_KEPT = 60
HOUR_BUCKETS_KEPT = 24
DAY = 86_400
DISTINCT_CAP = 5_000

Distinct = dict[int, float]  # member -> last seen (event time, epoch seconds)


_new_ids = array("i").__copy__  # an empty array of bucket ids (int32, as in the binary form)
_new_counts = array("I").__copy__  # an empty array of counts (uint32)


class Window:
    """Events counted per minute bucket and per hour bucket (bucket = epoch seconds // 60 or
    // 3600), oldest first, as parallel arrays of bucket ids and counts.

    Arrays rather than lists: a window is four numbers per bucket that live for a day, and the
    garbage collector never looks into an array (it traversed each of a list-based window's four
    lists in every collection: the replay's largest collection cost), an array holds 4 bytes per
    number instead of a pointer to an int object, and the arrays are the binary form's bytes.

    A window of one event (:func:`count_first`: a new key; about 95% of all windows, since most
    keys are counted once) holds four one-item *tuples* instead: four arrays cost several times
    more to create. Reads are the same on both; a write turns them into arrays first
    (:func:`_mutable`), and the binary form is the same bytes."""

    __slots__ = ("minutes", "minute_counts", "hours", "hour_counts")

    minutes: Ids
    minute_counts: Ids
    hours: Ids
    hour_counts: Ids

    def __init__(self, minutes: Iterable[int] | None = None,
                 minute_counts: Iterable[int] | None = None,
                 hours: Iterable[int] | None = None, hour_counts: Iterable[int] | None = None) -> None:
        self.minutes = _new_ids() if minutes is None else array("i", minutes)
        self.minute_counts = _new_counts() if minute_counts is None else array("I", minute_counts)
        self.hours = _new_ids() if hours is None else array("i", hours)
        self.hour_counts = _new_counts() if hour_counts is None else array("I", hour_counts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Window) and all(
            tuple(a) == tuple(b) for a, b in zip(
                (self.minutes, self.minute_counts, self.hours, self.hour_counts),
                (other.minutes, other.minute_counts, other.hours, other.hour_counts), strict=True))

    def __repr__(self) -> str:
        return (f"Window(minutes={list(zip(self.minutes, self.minute_counts, strict=True))}, "
                f"hours={list(zip(self.hours, self.hour_counts, strict=True))})")

    def copy(self) -> Window:
        return Window(self.minutes, self.minute_counts, self.hours, self.hour_counts)


# bucket ids (ascending) or their counts: array("i") / array("I"), or a one-event window's tuples
Ids = array | tuple[int, ...]
_ONE = (1,)  # the counts of a one-event window (shared: tuples are never written to)
_new_window = Window.__new__


def count_first(ts: float) -> Window:
    """A new window holding one event at ``ts`` (``count_add(None, ts)``, in its tuple form)."""
    t = int(ts)
    value = _new_window(Window)
    value.minutes = (t // MINUTE,)
    value.minute_counts = _ONE
    value.hours = (t // HOUR,)
    value.hour_counts = _ONE
    return value


def _mutable(value: Window) -> tuple[array, array, array, array]:
    """``value``'s four sequences as arrays (a one-event window's tuples turned into arrays)."""
    ids, counts, hids, hcounts = value.minutes, value.minute_counts, value.hours, value.hour_counts
    if type(counts) is tuple:
        ids = value.minutes = array("i", ids)
        counts = value.minute_counts = array("I", counts)
        hids = value.hours = array("i", hids)
        hcounts = value.hour_counts = array("I", hcounts)
    return ids, counts, hids, hcounts  # type: ignore[return-value]




def _bump(ids: array, counts: array, b: int, keep: int) -> None:
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
    if ids[0] <= oldest_kept:
        cut = bisect_right(ids, oldest_kept)  # ids ascending: the buckets <= oldest_kept
        del ids[:cut]
        del counts[:cut]


def count_add(value: Window | None, ts: float) -> Window:
    """Count one event at ``ts`` (epoch seconds). Returns the (possibly new) value to store."""
    if value is None:
        return count_first(ts)
    t = int(ts)
    ids, counts, hids, hcounts = _mutable(value)
    _bump(ids, counts, t // MINUTE, MINUTE_BUCKETS_KEPT)
    _bump(hids, hcounts, t // HOUR, HOUR_BUCKETS_KEPT)
    return value


def _sum_since(ids: Ids, counts: Ids, first: int, last: int) -> int:
    total = 0
    for i in range(len(ids) - 1, -1, -1):
        b = ids[i]
        if b < first:
            break
        if b <= last:
            total += counts[i]
    return total


def _minutes_read(ids: Ids, counts: Ids, m: int) -> tuple[int, int]:
    """(15 min, 1 h) counts at minute ``m``: one backward pass over the ascending buckets."""
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
    return c15, c60


def count_read(value: Window | None, ts: float) -> tuple[int, int, int]:
    """(15 min, 1 h, 24 h) counts at ``ts``."""
    if value is None or not value.hours:
        return 0, 0, 0
    t = int(ts)
    m, h = t // MINUTE, t // HOUR
    c15, c60 = _minutes_read(value.minutes, value.minute_counts, m)
    return c15, c60, _sum_since(value.hours, value.hour_counts, h - 23, h)


def count_add_read(value: Window | None, ts: float) -> tuple[Window, int, int, int]:
    """:func:`count_add` then :func:`count_read` at the same ``ts``, in one call: (the value to
    store, 15 min, 1 h, 24 h).

    When the event's buckets are the newest (events in order, the common case), every kept bucket
    is inside the window that ends there (older ones were dropped on the way), so the 1 h and
    24 h counts are the sums of all the counts, and the 15 min count that of a tail."""
    if value is None:  # a new key: its first event
        return count_first(ts), 1, 1, 1
    t = int(ts)
    m, h = t // MINUTE, t // HOUR
    if not (value.hours or value.minutes):  # an empty window: its first event
        value.minutes, value.minute_counts, value.hours, value.hour_counts = (m,), _ONE, (h,), _ONE
        return value, 1, 1, 1
    ids, counts, hids, hcounts = _mutable(value)
    if ids and ids[-1] == m and ids[0] > m - MINUTE_BUCKETS_KEPT:
        counts[-1] += 1  # the last event's minute: _bump with nothing to insert or drop
    else:
        _bump(ids, counts, m, MINUTE_BUCKETS_KEPT)
    if hids and hids[-1] == h and hids[0] > h - HOUR_BUCKETS_KEPT:
        hcounts[-1] += 1
    else:
        _bump(hids, hcounts, h, HOUR_BUCKETS_KEPT)
    if ids[-1] == m and ids[0] > m - 60:
        c60 = sum(counts)
        c15 = c60 if ids[0] > m - 15 else sum(counts[bisect_left(ids, m - 14):])
    else:
        c15, c60 = _minutes_read(ids, counts, m)
    if hids[-1] == h and hids[0] > h - 24:
        return value, c15, c60, sum(hcounts)
    return value, c15, c60, _sum_since(hids, hcounts, h - 23, h)


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
        if min(value.values()) <= cutoff:  # (a C-level pass; members rarely go stale)
            for k in [k for k, seen in value.items() if seen <= cutoff]:
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
    the same ``ts``, in one call: (the value to store, distinct over 1 h, over 24 h).

    Most sets hold one member (a number asked for from one address): that case is answered
    without a pass."""
    if value is None:
        value = {}
    prev = value.get(member)
    if prev is None or prev < ts:
        value[member] = ts
    n = len(value)
    if n == 1:  # only ``member``, seen at ``ts`` (counted) or after it (not yet)
        return (value, 1, 1) if prev is None or prev <= ts else (value, 0, 0)
    if n > 64:
        value = distinct_add(value, member, ts)  # drops stale members, keeps the cap
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


@lru_cache(maxsize=1024)  # region codes: a few hundred
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
_ONE_EVENT = _window_struct(1, 1)


# the arrays' memory is the binary form's bytes (little-endian int32 / uint32)
_ARRAYS_ARE_THE_FORM = (sys.byteorder == "little" and array("i").itemsize == 4
                        and array("I").itemsize == 4)


def pack_window(w: Window | None, out: bytearray) -> None:
    """Append the binary form of ``w`` (None: an empty window) to ``out``."""
    if w is None:
        out += b"\0\0"
        return
    nm, nh = len(w.minutes), len(w.hours)
    if type(w.minutes) is tuple:  # one event (count_first)
        out += _ONE_EVENT.pack(1, 1, w.minutes[0], w.minute_counts[0], w.hours[0], w.hour_counts[0])
        return
    if _ARRAYS_ARE_THE_FORM:  # (not a tuple: arrays)
        out += _U8X2.pack(nm, nh)
        out += cast(array, w.minutes)
        out += cast(array, w.minute_counts)
        out += cast(array, w.hours)
        out += cast(array, w.hour_counts)
        return
    out += _window_struct(nm, nh).pack(nm, nh, *w.minutes, *w.minute_counts, *w.hours,
                                        *w.hour_counts)


def _array(typecode: str, buf: bytes | memoryview, start: int, n: int) -> array:
    a = array(typecode)
    a.frombytes(buf[start:start + 4 * n])
    return a


def unpack_window(buf: bytes | memoryview, pos: int) -> tuple[Window, int]:
    """The window packed at ``pos`` and the position after it."""
    nm, nh = _U8X2.unpack_from(buf, pos)
    end = pos + 2 + 8 * (nm + nh)
    w = Window.__new__(Window)
    if _ARRAYS_ARE_THE_FORM:
        p = pos + 2
        w.minutes = _array("i", buf, p, nm)
        w.minute_counts = _array("I", buf, p + 4 * nm, nm)
        w.hours = _array("i", buf, p + 8 * nm, nh)
        w.hour_counts = _array("I", buf, p + 8 * nm + 4 * nh, nh)
        return w, end
    v = _window_struct(nm, nh).unpack_from(buf, pos)
    a, b, c = 2 + nm, 2 + 2 * nm, 2 + 2 * nm + nh
    w.minutes, w.minute_counts = array("i", v[2:a]), array("I", v[a:b])
    w.hours, w.hour_counts = array("i", v[b:c]), array("I", v[c:])
    return w, end


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
