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

Where the C extension ``detector.core._popcount`` is built (``pip install`` with a C compiler;
the README's setup does it), every scope's buckets live in it and each request is counted and
read in one call: the same buckets and the same arithmetic, summed directly instead of through
the running totals and memos below (~30% of a replay's CPU in Python). The Python code here is
the reference, and the fallback where the extension is absent (``PopulationView(native=False)``):
tests/unit/test_population_native.py drives both with the same writes and compares every read.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from detector.core.frozen import fast_new

MINUTE, HOUR = 60, 3600
MINUTES_KEPT = 136  # > 130: the baseline reads the two hours before the last 10 minutes
BASELINE_BLOCKS = 12  # 10-minute blocks of history whose median is the baseline
PAST_MINUTES = 10 * BASELINE_BLOCKS + 9  # minutes before the current one that a surge reads
HOURS_KEPT = 26
GLOBAL = "*"

try:  # the request scopes in C (core/_popcount.c); this module's Python code is the reference
    from detector.core import _popcount
except ImportError:  # not built (no C compiler at install): the Python code below, same results
    _popcount = None  # type: ignore[assignment]
NATIVE = _popcount is not None


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


@fast_new
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


if _popcount is not None:  # count_read builds these records itself (their slots, in order)
    _popcount.set_counts_type(PopulationCounts, PopulationCounts.__slots__)  # type: ignore[attr-defined]


class _Scope:
    """One scope's buckets, and what reads derived from them (rebuilt from the buckets whenever
    a write lands where they summed: a late delta, an out-of-order event, an eviction)."""

    __slots__ = ("minutes", "hours", "newest_minute", "newest_hour", "minutes_sorted", "hours_sorted",
                 "pn", "pf", "pbase", "ptop", "hmemo_at", "hmemo", "memo_at", "memo_key", "memo",
                 "typ_key", "typ", "watch", "block")

    def __init__(self) -> None:
        self.minutes: dict[int, list[int]] = {}  # minute -> [requests, fresh]
        self.hours: dict[int, list[int]] = {}  # hour -> [requests, fresh]
        # The newest bucket ever written (only the oldest is evicted, so the newest stays).
        self.newest_minute = self.newest_hour = 0
        # Bucket keys are kept ascending (checked on insert, re-sorted only after an out-of-order
        # bucket), so the oldest bucket, the one evicted, is the first: no scan.
        self.minutes_sorted = self.hours_sorted = True
        # Running totals of the minute buckets: ``pn[i]`` / ``pf[i]`` = requests / fresh requests
        # of every minute bucket before minute ``pbase + i`` (from an arbitrary origin), known up
        # to minute ``ptop = pbase + len(pn) - 1`` (-1: none). A window of complete minutes is one
        # subtraction, and reading the next minute appends one entry instead of re-summing ~130
        # buckets. A write at minute b < ptop cuts the totals after b (a write before ``pbase``
        # shifts every total by the same amount: differences stay exact).
        self.pn: list[int] = []
        self.pf: list[int] = []
        self.pbase = 0
        self.ptop = -1
        # Sums of the hour buckets before the hour ``hmemo_at`` (:func:`_hour_sums`).
        self.hmemo_at = -1
        self.hmemo = (0, 0, 0, 0)
        # What a surge reads from before the minute ``memo_at`` with (start minute, min
        # baseline) ``memo_key`` (:func:`_surge_past`).
        self.memo_at = -1
        self.memo_key: tuple[int, float] = (0, 0.0)
        self.memo: tuple[int, int, int, float] = (0, 0, 0, 0.0)
        # A spend scope's typical hour (core/spend.py) at (hour, start minute) ``typ_key``.
        self.typ_key: tuple[int, int] | None = None
        self.typ = 0
        # A write at a minute below ``watch`` may change something derived above (at least the
        # largest minute any of them summed up to): one comparison per write in the usual case.
        self.watch = -1
        # A block scope's (its level's touched blocks, ``view.blocks[(region, "B5")]``, prefix).
        self.block: tuple[dict[str, int], str] | None = None

    def forget_derived(self) -> None:
        """Drop every running total and memo (they are rebuilt from the buckets on the next
        read): what a read returns must not change (tests compare)."""
        self.pn, self.pf, self.ptop, self.hmemo_at, self.memo_at, self.typ_key = [], [], -1, -1, -1, None
        self.watch = -1

    def changed(self, b: int, *, evicted: bool = False) -> None:
        """The minute bucket ``b`` changed (a write below ``watch``, or ``evicted``: the oldest
        bucket went): drop what summed it. The running totals after ``b`` all moved by the same
        amount, so the totals on one side of ``b`` stay exact: the later side when no read
        at ``ptop`` reaches back to ``b``, else the earlier one."""
        if self.pbase <= b < self.ptop:
            if b < self.ptop - PAST_MINUTES:
                cut = b - self.pbase + 1
                del self.pn[:cut]
                del self.pf[:cut]
                self.pbase = b + 1
            else:
                keep = b - self.pbase + 1
                del self.pn[keep:]
                del self.pf[keep:]
                self.ptop = b
        if evicted:  # the hour buckets did not change; the surge memo read PAST_MINUTES minutes
            if self.memo_at - PAST_MINUTES <= b < self.memo_at:
                self.memo_at = -1
            return
        if b < self.memo_at:  # the memo read minutes and (the baseline's day) hours before it
            self.memo_at = -1
        h = b // 60
        if self.hmemo_at - 24 <= h < self.hmemo_at:
            self.hmemo_at = -1
        if self.typ_key is not None and self.typ_key[0] - 24 <= h < self.typ_key[0]:
            self.typ_key = None
        self.watch = max(self.ptop, self.memo_at, 60 * self.hmemo_at,
                         60 * self.typ_key[0] if self.typ_key is not None else -1)

    def hour_evicted(self, g: int) -> None:
        """The hour bucket ``g`` went (the oldest): drop what summed it (the sums read the 24
        hours before their hour)."""
        if self.hmemo_at - 24 <= g < self.hmemo_at:
            self.hmemo_at = -1
        self.memo_at = -1  # (its baseline may read the day's hours; a new hour's minute anyway)
        if self.typ_key is not None and self.typ_key[0] - 24 <= g < self.typ_key[0]:
            self.typ_key = None


def _new_bucket(buckets: dict[int, list[int]], b: int, cell: list[int], newest: int,
                in_order: bool, kept: int) -> tuple[int, bool, int | None]:
    """Add bucket ``b`` (not in ``buckets``) holding ``cell``; beyond ``kept`` buckets, evict
    the oldest. Returns the newest bucket, whether the keys are in ascending order, and the
    bucket evicted (or None)."""
    if b < newest:
        in_order = False
    else:
        newest = b
    buckets[b] = cell
    if len(buckets) <= kept:
        return newest, in_order, None
    return newest, True, _evict(buckets, in_order)


def _evict(buckets: dict[int, list[int]], in_order: bool) -> int:
    """Remove and return the oldest bucket (``in_order``: the keys are ascending, so it is the
    first; else the dict is re-sorted first, so it is in order again)."""
    if not in_order:
        ordered = sorted(buckets.items())
        buckets.clear()
        buckets.update(ordered)
    gone = next(iter(buckets))
    del buckets[gone]
    return gone


_HEADS: dict[tuple[str, tuple[int, ...]], tuple[str, tuple[tuple[int, str], ...]]] = {}


def scopes(e164: str | None, region: str | None, policy: PopulationPolicy) -> tuple[str, ...]:
    """The scopes a request to ``e164`` counts in: everything, its country and its blocks.

    >>> from detector.core.policy import load_policy
    >>> scopes("+447700900123", "GB", load_policy().population)
    ('*', 'C:GB', 'B5:GB:+4477009', 'B6:GB:+447700')
    """
    if not e164 or not region:
        return (GLOBAL,)
    heads = _HEADS.get((region, policy.block_digits))
    if heads is None:  # the keys' fixed parts, once per region (a few hundred at most)
        if len(_HEADS) > 4096:
            _HEADS.clear()
        heads = _HEADS[(region, policy.block_digits)] = (
            f"C:{region}", tuple((k, f"B{k}:{region}:") for k in policy.block_digits))
    country, blocks = heads
    digits = len(e164) - 1
    if digits < policy.min_national_digits:
        return (GLOBAL, country)
    out = [GLOBAL, country]
    for k, head in blocks:
        if digits - k >= 3:
            out.append(head + e164[:-k])
    return tuple(out)


class PopulationView:
    """Counts per scope, from this process's requests and the deltas merged from other workers.

    Also tracks, per (country, block size), which blocks were touched in the last 24 h (the
    denominator of concentration), and the first minute it saw (so that a baseline is computed
    from the history there is, from the first minutes of a deployment)."""

    def __init__(self, *, deltas: bool = True, native: bool | None = None) -> None:
        self.scopes: dict[str, _Scope] = {}
        self.blocks: dict[tuple[str, str], dict[str, int]] = {}  # (region, "B5") -> prefix -> hour
        self.pending: dict[tuple[str, int], list[int]] = {}  # unpublished (scope, minute) deltas
        self.start_minute: int | None = None
        self.deltas = deltas  # False: nobody takes deltas (one process counts everything, replay)
        # The scopes in C (core/_popcount.c) when it is built (``native`` None) or asked for;
        # ``scopes`` (the Python reference's) then stays empty.
        if native is None:
            native = NATIVE
        elif native and _popcount is None:
            raise RuntimeError("detector.core._popcount is not built (pip install -e . with a C compiler)")
        self.native: Any = _popcount.Store(self.blocks) if native else None
        self._params: tuple[PopulationPolicy | None, tuple[float, ...]] = (None, ())

    def __len__(self) -> int:
        return len(self.scopes) + (len(self.native) if self.native is not None else 0)

    def scope(self, key: str) -> Any:
        """The scope of ``key`` (a :class:`_Scope`, or the C store's read-only one), or None."""
        if self.native is not None:
            return self.native.get(key)
        return self.scopes.get(key)

    def scope_keys(self) -> list[str]:
        """Every scope's key."""
        return list(self.scopes) + (self.native.keys() if self.native is not None else [])

    def count_read(self, keys: tuple[str, ...], mask: int, ts: float, fresh: bool,
                   region: str | None, policy: PopulationPolicy) -> PopulationCounts:
        """Count the request in the scopes ``keys[i]`` whose bit ``i`` is set in ``mask``
        (:meth:`observe`), then ``read(self, keys, ts, region, policy)``: one call into C where
        the scopes are there (the same operations on the same counts, core/_popcount.c)."""
        store = self.native
        if store is None or self.deltas:
            if mask:
                self.observe(tuple(k for i, k in enumerate(keys) if mask >> i & 1), ts, fresh=fresh)
            return read(self, keys, ts, region, policy)
        return _count_read_native(self, store, keys, mask, ts, fresh, region, policy)

    def observe(self, keys: Sequence[str], ts: float, *, fresh: bool, n: int = 1) -> None:
        """Count one request (and record it as a delta for :meth:`take_delta`). Spend scopes
        (``$...``, core/spend.py) count ``n`` units of allowed spend, and the request as "fresh"."""
        minute = int(ts) // MINUTE
        f = 1 if fresh else 0
        if self.start_minute is None or minute < self.start_minute:
            self.start_minute = minute
        add = self._add
        for key in keys:
            add(key, minute, n, f)
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
            m = int(minute)
            if self.start_minute is None or m < self.start_minute:
                self.start_minute = m
            self._add(str(key), m, int(n), int(fresh))

    def mark_start(self, ts: float) -> None:
        """Declare that counting started at ``ts`` (history before it is unknown, not zero)."""
        minute = int(ts) // MINUTE
        if self.start_minute is None or minute < self.start_minute:
            self.start_minute = minute

    def _add(self, key: str, minute: int, n: int, fresh: int) -> None:
        """Count in one scope (the caller moved ``start_minute``)."""
        if self.native is not None:
            self.native.add(key, minute, n, fresh)
            return
        sc = self.scopes.get(key)
        if sc is None:
            sc = self.scopes[key] = _Scope()
            if key[0] == "B":
                level, region, prefix = key.split(":", 2)
                seen = self.blocks.get((region, level))
                if seen is None:
                    seen = self.blocks[(region, level)] = {}
                sc.block = (seen, prefix)
        cell = sc.minutes.get(minute)
        if cell is not None:  # (the common case inline: a scope's minute holds many requests)
            cell[0] += n
            cell[1] += fresh
        else:  # bounded by count, never aged against one event's time
            sc.newest_minute, sc.minutes_sorted, gone = _new_bucket(
                sc.minutes, minute, [n, fresh], sc.newest_minute, sc.minutes_sorted, MINUTES_KEPT)
            if gone is not None and gone < sc.watch:
                sc.changed(gone, evicted=True)
        hour = minute // 60
        cell = sc.hours.get(hour)
        if cell is not None:
            cell[0] += n
            cell[1] += fresh
        else:
            sc.newest_hour, sc.hours_sorted, gone = _new_bucket(
                sc.hours, hour, [n, fresh], sc.newest_hour, sc.hours_sorted, HOURS_KEPT)
            if gone is not None:
                sc.hour_evicted(gone)
        if minute < sc.watch:  # a bucket something derived has summed
            sc.changed(minute)
        block = sc.block
        if block is not None and block[0].get(block[1], -1) < hour:
            block[0][block[1]] = hour

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
        return len(dead) + (self.native.prune(hour) if self.native is not None else 0)


def _totals(sc: _Scope, m: int) -> int:
    """Bring the scope's running minute totals up to minute ``m`` (see :class:`_Scope`) and return
    the index of ``m`` in them: ``sc.pn[i] - sc.pn[i - k]`` is the requests of the ``k`` minutes
    before ``m``, for any k <= :data:`PAST_MINUTES`. Rebuilt from the buckets when the totals
    do not reach back that far or are far behind (a gap, a read back in time)."""
    base, top = sc.pbase, sc.ptop
    if top < 0 or m - PAST_MINUTES < base or m - top > PAST_MINUTES:
        base = m - PAST_MINUTES
        dn = [0] * PAST_MINUTES
        df = [0] * PAST_MINUTES
        for b, cell in sc.minutes.items():
            if base <= b < m:
                dn[b - base] = cell[0]
                df[b - base] = cell[1]
        sc.pn = list(accumulate(dn, initial=0))
        sc.pf = list(accumulate(df, initial=0))
        sc.pbase, sc.ptop = base, m
        if m > sc.watch:
            sc.watch = m
        return PAST_MINUTES
    if top < m:
        pn, pf, minutes = sc.pn, sc.pf, sc.minutes
        gap = m - top
        if 2 * gap > len(minutes):  # a scope read now and then: place its buckets, then add up
            dn = [0] * gap
            df = [0] * gap
            for b, cell in minutes.items():
                if top <= b < m:
                    dn[b - top] = cell[0]
                    df[b - top] = cell[1]
            pn.extend(accumulate(dn, initial=pn[-1]))
            pf.extend(accumulate(df, initial=pf[-1]))
            del pn[-gap - 1]  # the initial value, already there
            del pf[-gap - 1]
        else:
            n, f = pn[-1], pf[-1]
            for x in range(top, m):
                got = minutes.get(x)
                if got is not None:
                    n += got[0]
                    f += got[1]
                pn.append(n)
                pf.append(f)
        sc.ptop = m
        if m > sc.watch:
            sc.watch = m
        if len(pn) > 2 * PAST_MINUTES:  # keep the lists short (memory): drop totals no read
            cut = len(pn) - PAST_MINUTES - 11  # reaches (a read up to 10 minutes back still does)
            del pn[:cut]
            del pf[:cut]
            sc.pbase = base = base + cut
    return m - base


def _hour_sums(sc: _Scope, h: int) -> tuple[int, int, int, int]:
    """(requests, fresh) of the hours h-23 .. h-1, requests of h-24 .. h-1 and of h-24 alone,
    memoized for the hour ``h``: no request of a later minute of the hour changes them."""
    if sc.hmemo_at != h:
        n23 = f23 = n24 = yest = 0
        lo = h - 24
        for b, cell in sc.hours.items():
            if lo <= b < h:
                n24 += cell[0]
                if b == lo:
                    yest = cell[0]
                else:
                    n23 += cell[0]
                    f23 += cell[1]
        sc.hmemo = (n23, f23, n24, yest)
        sc.hmemo_at = h
        if 60 * h > sc.watch:
            sc.watch = 60 * h
    return sc.hmemo


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
    return _baseline(sc, _totals(sc, m), m, start_minute, min_baseline)


def _baseline(sc: _Scope, i: int, m: int, start_minute: int, min_baseline: float) -> float:
    """:func:`baseline_10m` from the running totals (``i``: the index of ``m``, :func:`_totals`)."""
    pn = sc.pn
    blocks = []
    for k in range(1, BASELINE_BLOCKS + 1):
        if m - 10 * k - 9 < start_minute:
            break  # before the deployment started: unknown, not zero
        blocks.append(pn[i - 10 * k + 1] - pn[i - 10 * k - 9])  # minutes m-10k-9 .. m-10k
    base = min_baseline
    if blocks:  # the (lower) median: up to an hour of surge among 12 blocks is not the baseline
        blocks.sort()
        base = max(base, float(blocks[(len(blocks) - 1) // 2]))
    if m - start_minute >= 24 * 60:  # a day of history: its mean, and the same hour yesterday
        _, _, day, yesterday = _hour_sums(sc, m // 60)
        base = max(base, day / 144.0, yesterday / 6.0)
    return base


def _surge(sc: _Scope | None, m: int, start_minute: int, min_baseline: float, factor: float,
           policy: PopulationPolicy) -> tuple[int, float, bool]:
    """(count over the last 10 min, that / baseline, surging) of one scope at the minute ``m``."""
    if sc is None:
        return 0, 0.0, False
    if sc.memo_at == m and sc.memo_key == (start_minute, min_baseline):
        c10p, c2p, earlier, base = sc.memo
    else:
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
    if sc.memo_at == m and sc.memo_key == (start_minute, min_baseline):
        return sc.memo
    i = _totals(sc, m)
    pn = sc.pn
    sc.memo = (
        pn[i] - pn[i - 9],  # m-9 .. m-1
        pn[i] - pn[i - 1],  # m-1
        pn[i - 9] - pn[i - 29],  # m-29 .. m-10
        _baseline(sc, i, m, start_minute, min_baseline),
    )
    sc.memo_at, sc.memo_key = m, (start_minute, min_baseline)
    if m > sc.watch:
        sc.watch = m
    return sc.memo


def _day_hour(sc: _Scope, m: int, h: int) -> tuple[int, int, int, int]:
    """(requests, fresh) over the 24 h and (requests, fresh) over the 60 minutes ending with the
    request's hour ``h`` and minute ``m``: the running totals and the hour memo plus the live
    buckets (a scope with few buckets, like most number blocks, is summed directly)."""
    hours, minutes = sc.hours, sc.minutes
    if len(hours) + len(minutes) <= 16:
        n24 = f24 = n1h = f1h = 0
        lo = h - 23
        for b, bucket in hours.items():
            if lo <= b <= h:
                n24 += bucket[0]
                f24 += bucket[1]
        lo = m - 59
        for b, bucket in minutes.items():
            if lo <= b <= m:
                n1h += bucket[0]
                f1h += bucket[1]
        return n24, f24, n1h, f1h
    i = _totals(sc, m)
    n1h = sc.pn[i] - sc.pn[i - 59]
    f1h = sc.pf[i] - sc.pf[i - 59]
    n24, f24, _, _ = _hour_sums(sc, h)
    cell = hours.get(h)
    if cell is not None:
        n24 += cell[0]
        f24 += cell[1]
    cell = minutes.get(m)
    if cell is not None:
        n1h += cell[0]
        f1h += cell[1]
    return n24, f24, n1h, f1h


def surging_scopes(view: PopulationView, ts: float, policy: PopulationPolicy
                   ) -> dict[tuple[str, str], tuple[float, bool]]:
    """``{("global", "-") | ("country", "GB"): (surge factor, surging)}`` at ``ts``, for gauges."""
    start = view.start_minute if view.start_minute is not None else int(ts) // MINUTE
    out: dict[tuple[str, str], tuple[float, bool]] = {}
    store = view.native
    if store is not None:
        m = int(ts) // MINUTE
        for key in store.keys():
            if key == GLOBAL:
                _, f, on = store.surge(key, m, start, policy.global_min_baseline_10m,
                                       _campaign_factor(policy.campaigns, GLOBAL, ts),
                                       policy.surge_enter, policy.surge_exit, policy.surge_short_min)
                out[("global", "-")] = (f, on)
            elif key.startswith("C:") and len(key) == 4 and key[2:].isalpha():
                _, f, on = store.surge(key, m, start, policy.country_min_baseline_10m,
                                       _campaign_factor(policy.campaigns, key[2:], ts),
                                       policy.surge_enter, policy.surge_exit, policy.surge_short_min)
                out[("country", key[2:])] = (f, on)
        return out
    for key, sc in view.scopes.items():
        if key == GLOBAL:
            _, f, on = _surge(sc, int(ts) // MINUTE, start, policy.global_min_baseline_10m,
                              _campaign_factor(policy.campaigns, GLOBAL, ts), policy)
            out[("global", "-")] = (f, on)
        elif key.startswith("C:") and len(key) == 4 and key[2:].isalpha():
            _, f, on = _surge(sc, int(ts) // MINUTE, start, policy.country_min_baseline_10m,
                              _campaign_factor(policy.campaigns, key[2:], ts), policy)
            out[("country", key[2:])] = (f, on)
    return out


def read(view: PopulationView, keys: Sequence[str], ts: float, region: str | None,
         policy: PopulationPolicy) -> PopulationCounts:
    """The population signals for a request counted in ``keys`` at ``ts`` (see the module doc)."""
    if view.native is not None:  # the C store's count_read, counting nothing
        return _count_read_native(view, view.native, tuple(keys), 0, ts, False, region, policy)
    m = int(ts) // MINUTE
    start = view.start_minute if view.start_minute is not None else m
    campaigns = policy.campaigns
    get = view.scopes.get
    g10, gf, gs = _surge(get(GLOBAL), m, start, policy.global_min_baseline_10m,
                         _campaign_factor(campaigns, GLOBAL, ts) if campaigns else 1.0, policy)
    if region is None:
        return PopulationCounts(g10, gf, gs)
    country = get(f"C:{region}")
    c10, cf, cs = _surge(country, m, start, policy.country_min_baseline_10m,
                         _campaign_factor(campaigns, region, ts) if campaigns else 1.0, policy)
    h = int(ts) // HOUR
    c24, _, c1h, _ = _day_hour(country, m, h) if country is not None else (0, 0, 0, 0)
    best_n, best_conc, best_share = 0, 0.0, 0.0
    concentrated = surging_prefix = False
    child24 = child1h = -1  # the request's sub-block at the next finer level (scopes() order)
    floor24, floor1h, factor = policy.prefix_floor_24h, policy.prefix_floor_1h, policy.concentration_factor
    child_share, fresh_share = policy.child_share, policy.fresh_share
    for key in keys:
        if key[0] != "B":
            continue
        sc = get(key)
        if sc is None:
            continue
        touched = max(len(sc.block[0]), 1) if sc.block is not None else 1
        n24, f24, n1h, f1h = _day_hour(sc, m, h)
        # A block is this request's business only if the request's own sub-block holds a fair
        # share of it: a pump in one 100,000-number block must not condemn its 900,000 neighbours.
        mine24 = child24 < 0 or child24 >= max(2.0, child_share * n24)
        mine1h = child1h < 0 or child1h >= max(2.0, child_share * n1h)
        child24, child1h = n24, n1h
        conc = n24 / max(c24 / touched, 1.0)
        share = f24 / n24 if n24 else 0.0
        if conc > best_conc and mine24:
            best_n, best_conc, best_share = n24, conc, share
        if mine24 and n24 >= floor24 and conc >= factor and share >= fresh_share:
            concentrated = True
        if (mine1h and n1h >= floor1h and n1h / max(c1h / touched, 1.0) >= factor
                and f1h / n1h >= fresh_share):
            surging_prefix = True
    return PopulationCounts(g10, gf, gs, c10, cf, cs, best_n, round(best_conc, 3),
                            round(best_share, 3), concentrated, surging_prefix)


def _count_read_native(view: PopulationView, store: Any, keys: tuple[str, ...], mask: int,
                       ts: float, fresh: bool, region: str | None, policy: PopulationPolicy
                       ) -> PopulationCounts:
    """:meth:`PopulationView.count_read` in C (core/_popcount.c): it counts the scopes of
    ``mask`` and returns the PopulationCounts :func:`read` would (``mask`` 0: a read)."""
    m = int(ts) // MINUTE
    start = view.start_minute
    if mask and (start is None or m < start):
        view.start_minute = start = m
    cached, params = view._params
    if cached is not policy:
        params = _native_params(view, policy)
    campaigns = policy.campaigns
    counts: PopulationCounts = store.count_read(
        keys, mask, m, m // 60, 1 if fresh else 0, m if start is None else start,
        f"C:{region}" if region is not None else None,
        _campaign_factor(campaigns, GLOBAL, ts) if campaigns else 1.0,
        _campaign_factor(campaigns, region, ts) if campaigns and region is not None else 1.0,
        params)
    return counts


def _native_params(view: PopulationView, policy: PopulationPolicy) -> tuple[float, ...]:
    """The policy's figures the C store reads, as a tuple (cached in the view per policy)."""
    params = (float(policy.global_min_baseline_10m), float(policy.country_min_baseline_10m),
              float(policy.surge_enter), float(policy.surge_exit), float(policy.surge_short_min),
              float(policy.prefix_floor_24h), float(policy.prefix_floor_1h),
              float(policy.concentration_factor), float(policy.child_share),
              float(policy.fresh_share))
    view._params = (policy, params)
    return params


def surge_threshold_note(policy: PopulationPolicy) -> str:
    """One line for logs and ``explain``: how surges are judged."""
    return (f"surge at >= {policy.surge_enter:g}x baseline (ends below {policy.surge_exit:g}x); "
            f"block concentration >= {policy.concentration_factor:g}x expected, "
            f">= {policy.prefix_floor_24h} requests, >= {math.floor(policy.fresh_share * 100)}% fresh IPs")
