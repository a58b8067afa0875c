"""Event-time sliding counts that a plain key-value table can hold (dict in replay, Faust table in
the stream), with exact, deterministic semantics and bounded memory.

**Counts.** A value is ``{"m": [[minute, n], ...], "h": [[hour, n], ...]}``: tumbling sub-windows of
one minute (kept 60 min) and one hour (kept 24 h), summed at read time. A *15-minute count at t*
is the sum of the minute bucket holding t and the 14 before it; *1 h* is 60 minute buckets;
*24 h* is the hour bucket holding t and the 23 before it. Replay and stream use these functions on
the same values, so they agree exactly.

**Distinct counts.** A value is ``{member: last_seen}``; the distinct count over H at t counts the
members last seen in ``(t - H, t]``. Members older than the longest horizon are dropped on write and
at most ``cap`` members are kept (oldest evicted), so a flood saturates at ``cap`` instead of growing.

Values are JSON-friendly (lists, str keys) so a changelog can carry them.

>>> v = None
>>> for t in (0, 30, 61, 3000, 3700):
...     v = count_add(v, t)
>>> count_read(v, 3700)
(2, 2, 5)
>>> d = distinct_add(None, "a", 0.0)
>>> d = distinct_add(d, "b", 4000.0)
>>> distinct_read(d, 4000.0)
(1, 2)
"""

from __future__ import annotations

from typing import Any

MINUTE, HOUR = 60, 3600
MINUTE_BUCKETS_KEPT = 60
HOUR_BUCKETS_KEPT = 24
DAY = 86_400
DISTINCT_CAP = 5_000

CountValue = dict[str, list[list[int]]]
DistinctValue = dict[str, float]


def _bump(buckets: list[list[int]], b: int, keep: int) -> None:
    if buckets and buckets[-1][0] == b:
        buckets[-1][1] += 1
    elif not buckets or buckets[-1][0] < b:
        buckets.append([b, 1])
    else:  # out-of-order event: insert in place (rare)
        for i in range(len(buckets) - 1, -1, -1):
            if buckets[i][0] == b:
                buckets[i][1] += 1
                break
            if buckets[i][0] < b:
                buckets.insert(i + 1, [b, 1])
                break
        else:
            buckets.insert(0, [b, 1])
    newest = buckets[-1][0]
    cut = 0
    while cut < len(buckets) and buckets[cut][0] <= newest - keep:
        cut += 1
    if cut:
        del buckets[:cut]


def count_add(value: CountValue | None, ts: float) -> CountValue:
    """Count one event at ``ts`` (epoch seconds). Returns the (possibly new) value to store."""
    if value is None:
        value = {"m": [], "h": []}
    t = int(ts)
    _bump(value["m"], t // MINUTE, MINUTE_BUCKETS_KEPT)
    _bump(value["h"], t // HOUR, HOUR_BUCKETS_KEPT)
    return value


def _sum_since(buckets: list[list[int]], first: int, last: int) -> int:
    total = 0
    for b, n in reversed(buckets):
        if b < first:
            break
        if b <= last:
            total += n
    return total


def count_read(value: CountValue | None, ts: float) -> tuple[int, int, int]:
    """(15 min, 1 h, 24 h) counts at ``ts``."""
    if not value:
        return 0, 0, 0
    t = int(ts)
    m, h = t // MINUTE, t // HOUR
    # one backward pass over the (ascending) minute buckets for both 15 min and 1 h
    c15 = c60 = 0
    f15, f60 = m - 14, m - 59
    for b, n in reversed(value["m"]):
        if b < f60:
            break
        if b <= m:
            c60 += n
            if b >= f15:
                c15 += n
    return c15, c60, _sum_since(value["h"], h - 23, h)


def count_add_read(value: CountValue | None, ts: float) -> tuple[CountValue, int, int, int]:
    """:func:`count_add` then :func:`count_read` at the same ``ts``, in one call: (the value to
    store, 15 min, 1 h, 24 h)."""
    if value is None:
        value = {"m": [], "h": []}
    t = int(ts)
    m, h = t // MINUTE, t // HOUR
    minutes, hours = value["m"], value["h"]
    _bump(minutes, m, MINUTE_BUCKETS_KEPT)
    _bump(hours, h, HOUR_BUCKETS_KEPT)
    c15 = c60 = 0
    f15, f60 = m - 14, m - 59
    for b, n in reversed(minutes):
        if b < f60:
            break
        if b <= m:
            c60 += n
            if b >= f15:
                c15 += n
    return value, c15, c60, _sum_since(hours, h - 23, h)


def count_expired(value: CountValue | None, now: float) -> bool:
    """True when nothing in ``value`` can count at ``now`` or later (safe to delete the key)."""
    if not value or not value.get("h"):
        return True
    return value["h"][-1][0] <= int(now) // HOUR - HOUR_BUCKETS_KEPT


def distinct_add(
    value: DistinctValue | None,
    member: str,
    ts: float,
    *,
    horizon: float = DAY,
    cap: int = DISTINCT_CAP,
) -> DistinctValue:
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
    value: DistinctValue | None, ts: float, short: float = HOUR, long: float = DAY
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


def distinct_add_read(value: DistinctValue | None, member: str, ts: float
                      ) -> tuple[DistinctValue, int, int]:
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


def distinct_expired(value: DistinctValue | None, now: float, horizon: float = DAY) -> bool:
    return not value or max(value.values()) <= now - horizon


def expired(value: Any, now: float) -> bool:
    """Whether a stored state value of any kind here can be deleted at ``now``."""
    if isinstance(value, dict) and "m" in value and "h" in value:
        return count_expired(value, now)
    if isinstance(value, dict) and "until" in value:
        return float(value["until"]) <= now
    if isinstance(value, dict):
        return distinct_expired(value, now)
    return True
