"""Population counters: traffic per destination country, per number block and overall.

Per-key counts (per IP, per number, per range) are quiet when an attack spreads over thousands of
IPs and numbers, and loud when innocent customers share one IP. Population counts see the sum:

* **scopes**: ``*`` (everything), ``C:<region>`` (destination country) and ``B<k>:<region>:<prefix>``
  (a block of 10^k numbers: the E.164 form minus its last *k* digits, e.g. ``B5:GB:+4477009`` holds the
  100,000 numbers +447700900000-+447700999999, the size an IRSF seller leases); and the spend
  scopes ``$C:<region>`` / ``$P:<prefix>`` of :mod:`detector.core.spend` (allowed expected spend in
  integer units instead of requests, allowed requests instead of fresh ones).
* each scope keeps minute buckets (the last :data:`MINUTES_KEPT`) and hour buckets (the last
  :data:`HOURS_KEPT`) of two counts: requests, and requests from *fresh* IPs (the IP's first
  request in 24 h). Buckets are bounded in number, never aged against one event's time: a request
  dated 2099 adds one far-future bucket that no present read sums, and evicts at most one old one.

Signals (:func:`read`), all pure functions of the counts at the request's time ``ts``:

* **surge** of a country or of everything: the last 10 minutes against a baseline, the largest
  of (a) the median 10-minute count of the two hours before the last 10 minutes (an hour of surge
  in that history does not become the baseline; before a deployment has that much history, what
  there is), (b) the mean 10-minute count of the last day and the same hour yesterday (once a
  day of history exists), (c) the policy's ``*_min_baseline_10m`` (a quiet scope does not fire on
  a handful of requests). A declared campaign multiplies the baseline by its factor. A scope
  enters its surge at ``surge_enter`` x baseline over the last 10 minutes, or over the last 2
  (a flood is caught within a minute; at least ``surge_short_min`` requests). *Hysteresis*: it
  stays in it while above ``surge_exit`` x baseline if the 20 minutes before the current 10 held
  an entering surge's volume, so it never enters on a ramp and ends by itself within ~10
  minutes of the flood's end.
* **concentration** of a block: its distinct numbers in 24 h (and 1 h) against what a spread-out
  population of the same country would put in one block: the country's count divided by the
  number of blocks of that size the country's traffic touched (at least 1). A block fires when it
  holds at least ``prefix_floor_*`` numbers, ``concentration_factor`` times its expected share,
  and most of them from fresh IPs (an office asking on its own DDI block from one NAT address is
  not a pump); a larger block only where the request's own smaller block holds ``child_share`` of
  it (a pump in one 100,000 block does not condemn its 900,000 neighbours).

In the stream every worker counts its own requests at once and merges the other workers' deltas,
published every second (:class:`PopulationView` ``merge``); the replay path counts every request
itself. Both read with the same function, so they agree exactly in replay order.

>>> from detector.core.policy import load_policy
>>> pol = load_policy().population
>>> view = PopulationView()
>>> for i in range(3):
...     view.observe(scopes("+447700900123", "GB", pol), 1795341600.0 + i, fresh=True)
>>> read(view, scopes("+447700900123", "GB", pol), 1795341602.0, "GB", pol).country_10m
3
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MINUTE, HOUR = 60, 3600
MINUTES_KEPT = 136  # > 130: the baseline reads the two hours before the last 10 minutes
BASELINE_BLOCKS = 12  # 10-minute blocks of history whose median is the baseline
PAST_MINUTES = 10 * BASELINE_BLOCKS + 9  # minutes before the current one that a surge reads
HOURS_KEPT = 26
GLOBAL = "*"


@dataclass(frozen=True, slots=True)
class Campaign:
    """A declared surge (a marketing campaign): ``country`` ("*" for all) expects ``factor`` x its
    usual traffic between ``start`` and ``end`` (epoch seconds)."""

    country: str
    start: float
    end: float
    factor: float


@dataclass(frozen=True, slots=True)
class PopulationPolicy:
    """The ``[population]`` policy section (see ``default_policy.toml``)."""

    block_digits: tuple[int, ...] = (5, 6)
    min_national_digits: int = 8
    surge_enter: float = 5.0
    surge_exit: float = 2.5
    surge_short_min: int = 20
    country_min_baseline_10m: float = 6.0
    global_min_baseline_10m: float = 12.0
    prefix_floor_24h: int = 12
    prefix_floor_1h: int = 6
    concentration_factor: float = 10.0
    fresh_share: float = 0.6
    child_share: float = 0.05
    campaigns: tuple[Campaign, ...] = ()


@dataclass(frozen=True, slots=True)
class PopulationCounts:
    """What the population said of one request (counts include the request). Higher = riskier."""

    global_10m: int = 0
    global_surge_factor: float = 0.0  # last 10 min / baseline
    global_surging: bool = False
    country_10m: int = 0
    country_surge_factor: float = 0.0
    country_surging: bool = False
    prefix_24h: int = 0  # the most concentrated block's count (24 h)
    prefix_concentration: float = 0.0  # its count / expected count for a block of its size
    prefix_fresh_share: float = 0.0
    prefix_concentrated: bool = False  # over floor, factor and fresh share (24 h)
    prefix_surging: bool = False  # the same over the last hour

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PopulationCounts.__slots__}


@dataclass(slots=True)
class _Scope:
    minutes: dict[int, list[int]] = field(default_factory=dict)  # minute -> [requests, fresh]
    hours: dict[int, list[int]] = field(default_factory=dict)  # hour -> [requests, fresh]
    newest_hour: int = 0
    # Sums over buckets *before* the minute ``memo_at`` (and its hour), which no request of that
    # minute changes; any write to an earlier minute (a late delta, an out-of-order event) drops it.
    memo_at: int = -1
    memo: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)
    block: tuple[tuple[str, str], str] | None = None  # ((region, "B5"), prefix) of a block scope
    # Spend scopes (core/spend.py): window sums rolled forward minute by minute; any write
    # before its minute (or an eviction) drops it.
    roll: list[int] | None = None


def _bump(buckets: dict[int, list[int]], b: int, n: int, fresh: int, keep: int) -> int | None:
    """Add to bucket ``b``; returns the old bucket that had to go, if one did (bounded by count,
    never aged against one event's time)."""
    cell = buckets.get(b)
    if cell is not None:
        cell[0] += n
        cell[1] += fresh
        return None
    buckets[b] = [n, fresh]
    if len(buckets) > keep:
        gone = min(buckets)
        del buckets[gone]
        return gone
    return None


def scopes(e164: str | None, region: str | None, policy: PopulationPolicy) -> tuple[str, ...]:
    """The scopes a request to ``e164`` counts in: everything, its country and its blocks.

    >>> from detector.core.policy import load_policy
    >>> scopes("+447700900123", "GB", load_policy().population)
    ('*', 'C:GB', 'B5:GB:+4477009', 'B6:GB:+447700')
    """
    if not e164 or not region:
        return (GLOBAL,)
    out = [GLOBAL, f"C:{region}"]
    digits = len(e164) - 1
    if digits >= policy.min_national_digits:
        for k in policy.block_digits:
            if digits - k >= 3:
                out.append(f"B{k}:{region}:{e164[:-k]}")
    return tuple(out)


class PopulationView:
    """Counts per scope, from this process's requests and the deltas merged from other workers.

    Also tracks, per (country, block size), which blocks were touched in the last 24 h (the
    denominator of concentration), and the first minute it saw (so that a baseline is computed
    from the history there is, from the first minutes of a deployment)."""

    def __init__(self, *, deltas: bool = True) -> None:
        self.scopes: dict[str, _Scope] = {}
        self.blocks: dict[tuple[str, str], dict[str, int]] = {}  # (region, "B5") -> prefix -> hour
        self.pending: dict[tuple[str, int], list[int]] = {}  # unpublished (scope, minute) deltas
        self.start_minute: int | None = None
        self.deltas = deltas  # False: nobody takes deltas (one process counts everything, replay)

    def __len__(self) -> int:
        return len(self.scopes)

    def observe(self, keys: Sequence[str], ts: float, *, fresh: bool, n: int = 1) -> None:
        """Count one request (and record it as a delta for :meth:`take_delta`). Spend scopes
        (``$...``, core/spend.py) count ``n`` units of allowed spend, and the request as "fresh"."""
        minute = int(ts) // MINUTE
        f = 1 if fresh else 0
        for key in keys:
            self._add(key, minute, n, f)
            if not self.deltas:
                continue
            cell = self.pending.get((key, minute))
            if cell is None:
                self.pending[(key, minute)] = [n, f]
            else:
                cell[0] += n
                cell[1] += f

    def take_delta(self) -> list[list[Any]]:
        """The counts observed since the last call, as ``[[scope, minute, n, fresh], ...]``, and
        forget them (the stream publishes them for the other workers)."""
        out = [[k, m, c[0], c[1]] for (k, m), c in self.pending.items()]
        self.pending = {}
        return out

    def merge(self, delta: Iterable[Sequence[Any]]) -> None:
        """Add another worker's delta (rows of :meth:`take_delta`)."""
        for key, minute, n, fresh in delta:
            self._add(str(key), int(minute), int(n), int(fresh))

    def mark_start(self, ts: float) -> None:
        """Declare that counting started at ``ts`` (history before it is unknown, not zero)."""
        minute = int(ts) // MINUTE
        if self.start_minute is None or minute < self.start_minute:
            self.start_minute = minute

    def _add(self, key: str, minute: int, n: int, fresh: int) -> None:
        if self.start_minute is None or minute < self.start_minute:
            self.start_minute = minute
        sc = self.scopes.get(key)
        if sc is None:
            sc = self.scopes[key] = _Scope()
            if key[0] == "B":
                level, region, prefix = key.split(":", 2)
                sc.block = ((region, level), prefix)
        hour = minute // 60
        gone_m = _bump(sc.minutes, minute, n, fresh, MINUTES_KEPT)
        gone_h = _bump(sc.hours, hour, n, fresh, HOURS_KEPT)
        if gone_m is not None or gone_h is not None or minute < sc.memo_at:  # a summed bucket changed
            sc.memo_at = -1
            sc.memo.clear()
        roll = sc.roll
        if roll is not None and (minute < roll[0] or (gone_m is not None and gone_m >= roll[0] - 60)
                                 or (gone_h is not None and gone_h >= roll[2] - 24)):
            sc.roll = None  # a bucket inside the rolled windows changed
        if hour > sc.newest_hour:
            sc.newest_hour = hour
        if sc.block is not None:
            level_key, prefix = sc.block
            seen = self.blocks.get(level_key)
            if seen is None:
                seen = self.blocks[level_key] = {}
            if seen.get(prefix, -1) < hour:
                seen[prefix] = hour

    def prune(self, now: float) -> int:
        """Forget scopes and touched blocks older than a day at ``now``: a clock the caller
        bounds (a single far-future event must not move it). Returns the scopes dropped."""
        hour = int(now) // HOUR
        dead = [k for k, sc in self.scopes.items() if sc.newest_hour <= hour - HOURS_KEPT]
        for k in dead:
            del self.scopes[k]
        for seen in self.blocks.values():
            for prefix in [p for p, h in seen.items() if h <= hour - 24]:
                del seen[prefix]
        return len(dead)


def _sum(buckets: Mapping[int, list[int]], first: int, last: int) -> tuple[int, int]:
    n = f = 0
    if len(buckets) <= last - first + 1:
        for b, cell in buckets.items():
            if first <= b <= last:
                n += cell[0]
                f += cell[1]
    else:
        for b in range(first, last + 1):
            found = buckets.get(b)
            if found is not None:
                n += found[0]
                f += found[1]
    return n, f


def _past_minutes(sc: _Scope, m: int) -> list[int]:
    """Requests per minute over the :data:`PAST_MINUTES` minutes before ``m`` (index 0 is
    ``m - PAST_MINUTES``), in one pass over the scope's (at most :data:`MINUTES_KEPT`) buckets."""
    first = m - PAST_MINUTES
    out = [0] * PAST_MINUTES
    for b, cell in sc.minutes.items():
        if first <= b < m:
            out[b - first] = cell[0]
    return out


def _campaign_factor(campaigns: Sequence[Campaign], region: str, ts: float) -> float:
    factor = 1.0
    for c in campaigns:
        if c.start <= ts < c.end and c.country in (region, GLOBAL):
            factor = max(factor, c.factor)
    return factor


def baseline_10m(sc: _Scope, ts: float, start_minute: int, min_baseline: float) -> float:
    """The usual number of requests per 10 minutes of a scope at ``ts`` (see the module doc):
    the median of the 10-minute blocks of the two hours before the last 10 minutes (up to an
    hour of surge in that history does not become the baseline), the day's mean and the same
    hour yesterday once a day of history exists, never below ``min_baseline``."""
    m = int(ts) // MINUTE
    return _baseline(sc, _past_minutes(sc, m), m, start_minute, min_baseline)


def _baseline(sc: _Scope, past: list[int], m: int, start_minute: int, min_baseline: float) -> float:
    """:func:`baseline_10m` from the minutes before ``m`` (:func:`_past_minutes`)."""
    blocks = []
    for k in range(1, BASELINE_BLOCKS + 1):
        first = m - 10 * k - 9
        if first < start_minute:
            break  # before the deployment started: unknown, not zero
        j = PAST_MINUTES - 10 * k - 9
        blocks.append(sum(past[j:j + 10]))
    base = min_baseline
    if blocks:  # the (lower) median: up to an hour of surge among 12 blocks is not the baseline
        blocks.sort()
        base = max(base, float(blocks[(len(blocks) - 1) // 2]))
    if m - start_minute >= 24 * 60:  # a day of history: its mean, and the same hour yesterday
        h = m // 60
        day, _ = _sum(sc.hours, h - 24, h - 1)
        yesterday, _ = _sum(sc.hours, h - 24, h - 24)
        base = max(base, day / 144.0, yesterday / 6.0)
    return base


def _surge(sc: _Scope | None, ts: float, start_minute: int, min_baseline: float, factor: float,
           policy: PopulationPolicy) -> tuple[int, float, bool]:
    """(count over the last 10 min, that / baseline, surging) of one scope at ``ts``."""
    if sc is None:
        return 0, 0.0, False
    m = int(ts) // MINUTE
    c10p, c2p, earlier, base = _surge_past(sc, m, start_minute, min_baseline)
    cell = sc.minutes.get(m)
    live = cell[0] if cell is not None else 0
    c10 = c10p + live
    base = base * factor
    ratio = c10 / base
    if ratio >= policy.surge_enter:
        return c10, round(ratio, 3), True
    # A flood is caught within a minute: the last two minutes at the same factor (and a floor).
    c2 = c2p + live
    if c2 >= max(policy.surge_short_min, policy.surge_enter * base / 5.0):
        return c10, round(max(ratio, 5.0 * c2 / base), 3), True
    # Hysteresis: still elevated, and the 20 minutes before the current 10 held at least an
    # entering surge's volume (so the mode holds a surge; it never enters on a ramp).
    surging = ratio >= policy.surge_exit and earlier >= policy.surge_enter * base
    return c10, round(ratio, 3), surging


def _surge_past(sc: _Scope, m: int, start_minute: int, min_baseline: float
                ) -> tuple[int, int, int, float]:
    """What :func:`_surge` reads from before the minute ``m``, memoized for that minute: the
    last 10 and last 2 minutes without the current one, the 20 minutes before the last 10, and
    the baseline (before the campaign factor)."""
    if sc.memo_at != m:
        sc.memo_at = m
        sc.memo.clear()
    key = ("s", start_minute, min_baseline)
    hit = sc.memo.get(key)
    if hit is None:
        past = _past_minutes(sc, m)
        hit = sc.memo[key] = (
            sum(past[-9:]),  # m-9 .. m-1
            past[-1],  # m-1
            sum(past[-29:-9]),  # m-29 .. m-10
            _baseline(sc, past, m, start_minute, min_baseline),
        )
    return hit  # type: ignore[return-value]


def _day_hour(sc: _Scope, m: int, h: int) -> tuple[int, int, int, int]:
    """(requests, fresh) over the 24 h and (requests, fresh) over the 60 minutes ending with the
    request's hour ``h`` and minute ``m``: the memoized part before them plus the live buckets
    (a scope with few buckets, like most number blocks, is summed directly)."""
    hours, minutes = sc.hours, sc.minutes
    if len(hours) + len(minutes) <= 16:
        n24 = f24 = n1h = f1h = 0
        for b, bucket in hours.items():
            if h - 23 <= b <= h:
                n24 += bucket[0]
                f24 += bucket[1]
        for b, bucket in minutes.items():
            if m - 59 <= b <= m:
                n1h += bucket[0]
                f1h += bucket[1]
        return n24, f24, n1h, f1h
    if sc.memo_at != m:
        sc.memo_at = m
        sc.memo.clear()
    hit = sc.memo.get(("d",))
    if hit is None:
        hit = sc.memo[("d",)] = _sum(sc.hours, h - 23, h - 1) + _sum(sc.minutes, m - 59, m - 1)
    n24, f24, n1h, f1h = hit
    cell = sc.hours.get(h)
    if cell is not None:
        n24 += cell[0]
        f24 += cell[1]
    cell = sc.minutes.get(m)
    if cell is not None:
        n1h += cell[0]
        f1h += cell[1]
    return n24, f24, n1h, f1h


def surging_scopes(view: PopulationView, ts: float, policy: PopulationPolicy
                   ) -> dict[tuple[str, str], tuple[float, bool]]:
    """``{("global", "-") | ("country", "GB"): (surge factor, surging)}`` at ``ts``, for gauges."""
    start = view.start_minute if view.start_minute is not None else int(ts) // MINUTE
    out: dict[tuple[str, str], tuple[float, bool]] = {}
    for key, sc in view.scopes.items():
        if key == GLOBAL:
            _, f, on = _surge(sc, ts, start, policy.global_min_baseline_10m,
                              _campaign_factor(policy.campaigns, GLOBAL, ts), policy)
            out[("global", "-")] = (f, on)
        elif key.startswith("C:") and len(key) == 4 and key[2:].isalpha():
            _, f, on = _surge(sc, ts, start, policy.country_min_baseline_10m,
                              _campaign_factor(policy.campaigns, key[2:], ts), policy)
            out[("country", key[2:])] = (f, on)
    return out


def read(view: PopulationView, keys: Sequence[str], ts: float, region: str | None,
         policy: PopulationPolicy) -> PopulationCounts:
    """The population signals for a request counted in ``keys`` at ``ts`` (see the module doc)."""
    start = view.start_minute if view.start_minute is not None else int(ts) // MINUTE
    campaigns = policy.campaigns
    g10, gf, gs = _surge(view.scopes.get(GLOBAL), ts, start, policy.global_min_baseline_10m,
                         _campaign_factor(campaigns, GLOBAL, ts) if campaigns else 1.0, policy)
    if region is None:
        return PopulationCounts(global_10m=g10, global_surge_factor=gf, global_surging=gs)
    country = view.scopes.get(f"C:{region}")
    c10, cf, cs = _surge(country, ts, start, policy.country_min_baseline_10m,
                         _campaign_factor(campaigns, region, ts) if campaigns else 1.0, policy)
    m, h = int(ts) // MINUTE, int(ts) // HOUR
    c24, _, c1h, _ = _day_hour(country, m, h) if country is not None else (0, 0, 0, 0)
    best = (0, 0.0, 0.0)
    concentrated = surging_prefix = False
    child24 = child1h = -1  # the request's sub-block at the next finer level (scopes() order)
    for key in keys:
        if key[0] != "B":
            continue
        sc = view.scopes.get(key)
        if sc is None:
            continue
        level_key = sc.block[0] if sc.block is not None else (region, key.split(":", 1)[0])
        touched = max(len(view.blocks.get(level_key, ())), 1)
        n24, f24, n1h, f1h = _day_hour(sc, m, h)
        # A block is this request's business only if the request's own sub-block holds a fair
        # share of it: a pump in one 100,000-number block must not condemn its 900,000 neighbours.
        mine24 = child24 < 0 or child24 >= max(2.0, policy.child_share * n24)
        mine1h = child1h < 0 or child1h >= max(2.0, policy.child_share * n1h)
        child24, child1h = n24, n1h
        conc = n24 / max(c24 / touched, 1.0)
        share = f24 / n24 if n24 else 0.0
        if conc > best[1] and mine24:
            best = (n24, conc, share)
        if (mine24 and n24 >= policy.prefix_floor_24h and conc >= policy.concentration_factor
                and share >= policy.fresh_share):
            concentrated = True
        if (mine1h and n1h >= policy.prefix_floor_1h
                and n1h / max(c1h / touched, 1.0) >= policy.concentration_factor
                and f1h / n1h >= policy.fresh_share):
            surging_prefix = True
    return PopulationCounts(
        global_10m=g10, global_surge_factor=gf, global_surging=gs,
        country_10m=c10, country_surge_factor=cf, country_surging=cs,
        prefix_24h=best[0], prefix_concentration=round(best[1], 3),
        prefix_fresh_share=round(best[2], 3), prefix_concentrated=concentrated,
        prefix_surging=surging_prefix,
    )


def surge_threshold_note(policy: PopulationPolicy) -> str:
    """One line for logs and ``explain``: how surges are judged."""
    return (f"surge at >= {policy.surge_enter:g}x baseline (ends below {policy.surge_exit:g}x); "
            f"block concentration >= {policy.concentration_factor:g}x expected, "
            f">= {policy.prefix_floor_24h} requests, >= {math.floor(policy.fresh_share * 100)}% fresh IPs")
