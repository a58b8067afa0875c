"""The embedded (replay) path: both stages, the decision and its commit, on in-memory stores.

The Faust adapters call the same functions stage by stage (``enrich``, ``ip_stage``,
``range_stage``, ``decide``, ``range_commit``); :class:`Detector` calls them in one go.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from detector.core import population, spend, state
from detector.core.clock import EventClock
from detector.core.decide import DecisionContext, decide, decide_scored, score_rows
from detector.core.errors import InvalidField, MissingField
from detector.core.features import FEATURE_NAMES, features
from detector.core.ipintel import IpIntel
from detector.core.lists import ListEntry, make_entry
from detector.core.phone import enrich_phone, routing_key
from detector.core.policy import Policy
from detector.core.population import PopulationCounts, PopulationView
from detector.core.records import (
    OUTCOMES,
    Action,
    CallbackRequest,
    Counts,
    Decision,
    Enrichment,
    IpCounts,
    ModelResult,
    Outcome,
    RangeCounts,
)


def enrich(req: CallbackRequest, intel: IpIntel, policy: Policy) -> Enrichment:
    """Phone and IP enrichment of one request."""
    return Enrichment(
        phone=enrich_phone(req.phone_number, req.country_hint, policy.range_digits),
        ip=intel.lookup(req.ip),
    )


def count_population(
    view: PopulationView, req: CallbackRequest, enr: Enrichment, ip_counts: IpCounts,
    rng: RangeCounts, policy: Policy,
) -> PopulationCounts:
    """Count a request in the population and read the population signals for it.

    Only *quiet* requests count in the surge scopes (everything, its country): the first request
    for the number in an hour, not from an anonymiser or a datacentre. What per-key rules already
    see (a number hammered, a flood from hosting addresses) must not put a whole country in
    under-attack mode, and a customer's retry is not a second customer. Number blocks count
    distinct numbers (a number's first request of the day): harassing one number is not
    pumping its block. Invalid numbers count nowhere."""
    ph = enr.phone
    if not ph.valid:
        return population.read(view, (), req.ts, None, policy.population)
    keys = population.scopes(ph.e164, ph.region, policy.population)
    ip = enr.ip
    quiet = rng.number_1h == 1 and not (ip.hosting or ip.tor_exit or ip.public_proxy)
    # counted in keys[:2] (everything, its country) if quiet, in keys[2:] (its blocks) if new
    mask = (3 if quiet else 0) | ((1 << len(keys)) - 4 if rng.number_24h == 1 else 0)
    return view.count_read(keys, mask, req.ts, bool(ip_counts.ip_fresh), ph.region,
                           policy.population)


def range_routing_key(req: CallbackRequest, enr: Enrichment) -> str:
    """The key of the range stage (co-partitions number, pair and range)."""
    return routing_key(enr.phone, req.phone_number)


MAX_DURATION_S = 7 * 86400.0


def parse_outcome(obj: dict[str, Any] | bytes | str) -> Outcome:
    """Validate a dialer outcome message (a decoded object or its raw bytes).

    Raises only :class:`~detector.core.errors.InputError` (and its children) on bad input."""
    from detector.core.parse import MAX_ID_LEN, MAX_PHONE_LEN, decode_json, parse_ts

    if not isinstance(obj, dict):
        obj = decode_json(obj)
    for name, limit in (("request_id", MAX_ID_LEN), ("phone_number", MAX_PHONE_LEN),
                        ("outcome", 32)):
        if obj.get(name) is None:
            raise MissingField(name)
        if not isinstance(obj[name], str):
            raise InvalidField(name, "a string", obj[name])
        if not obj[name].strip() or len(obj[name]) > limit:
            raise InvalidField(name, f"a non-empty string of at most {limit} characters", obj[name])
    if obj["outcome"] not in OUTCOMES:
        raise InvalidField("outcome", f"one of {', '.join(OUTCOMES)}", obj["outcome"])
    ts = parse_ts(obj["ts"]) if obj.get("ts") is not None else time.time()
    dur = obj.get("duration_s", 0.0) or 0.0
    expected = f"a number of seconds from 0 to {MAX_DURATION_S:.0f}"
    if isinstance(dur, bool) or not isinstance(dur, int | float):
        raise InvalidField("duration_s", expected, dur)
    if (isinstance(dur, int) and not 0 <= dur <= MAX_DURATION_S) or not 0 <= dur <= MAX_DURATION_S:
        raise InvalidField("duration_s", expected, dur)  # NaN fails the second comparison too
    return Outcome(obj["request_id"].strip(), obj["phone_number"].strip(), obj["outcome"], ts,
                   float(dur))


DEFAULT_LEARNED_DENY_INTERVAL_S = 3600.0


def learn_from_outcome(
    stores: state.RangeStores, outcome: Outcome, nkey: str, policy: Policy,
    *, deny_interval_s: float = DEFAULT_LEARNED_DENY_INTERVAL_S,
) -> ListEntry | None:
    """Clear the number's outstanding callback; return a deny entry learned from the floor, if any."""
    return learn(stores, outcome, nkey, policy, deny_interval_s=deny_interval_s)[0]


def learn(
    stores: state.RangeStores, outcome: Outcome, nkey: str, policy: Policy,
    *, deny_interval_s: float = DEFAULT_LEARNED_DENY_INTERVAL_S,
) -> tuple[ListEntry | None, bool]:
    """:func:`learn_from_outcome` plus whether a deny was due but rate-limited: at most one
    learned deny per number per ``deny_interval_s`` (whoever can write outcomes cannot churn a
    number's entry; the limit lives in the number's table value, key ``ld``)."""
    state.clear_pending(stores, nkey, outcome.request_id)
    if nkey.startswith("?"):
        return None, False
    entry = None
    if outcome.outcome == "agent_marked_spam":
        entry = make_entry(
            "deny",
            "number",
            nkey,
            reason="agent_marked_spam",
            expires_at=outcome.ts + policy.spam_deny_seconds,
            added_at=outcome.ts,
            source="learned",
        )
    elif outcome.outcome == "machine":
        n = state.record_machine(stores, nkey, outcome.ts)
        if n >= policy.machine_threshold:
            entry = make_entry(
                "deny",
                "number",
                nkey,
                reason=f"machine_answers_{n}_in_24h",
                expires_at=outcome.ts + policy.machine_deny_seconds,
                added_at=outcome.ts,
                source="learned",
            )
    if entry is None:
        return None, False
    if not state.learned_deny_due(stores, nkey, outcome.ts, deny_interval_s):
        return None, True
    return entry, False


# Requests decided at once by :meth:`Detector.process_many` (replay, backtest, evaluate: offline,
# where only throughput counts). 1,024 measured 3-5% less CPU per request than 256 on a 2-day
# replay (the model's numpy steps and the batch's set-up amortized over more rows); 2,048 and
# 4,096 no better. The decisions do not depend on it (tests/unit/test_pipeline.py).
BATCH = 1024


@dataclass(slots=True)
class _Staged:
    """A counted request waiting in :meth:`Detector.process_many`'s batch for its decision."""

    req: CallbackRequest
    enr: Enrichment
    counts: Counts
    update: state.RangeUpdate
    dependent: bool  # an earlier request of the batch is on the same number


_PENDING = FEATURE_NAMES.index("pending")


@dataclass
class Detector:
    """In-memory detector: feed it requests in timestamp order, get one decision each."""

    ctx: DecisionContext
    intel: IpIntel = field(default_factory=IpIntel)
    ip_stores: state.IpStores = field(default_factory=state.IpStores)
    range_stores: state.RangeStores = field(default_factory=state.RangeStores)
    seen: dict[str, float] = field(default_factory=dict)
    population: PopulationView = field(default_factory=lambda: PopulationView(deltas=False))
    sweep_every_s: float = 6 * 3600.0  # event time between sweeps of dead keys
    clock: EventClock = field(default_factory=EventClock)  # the sweeps' time (see core.clock)
    learned_deny_interval_s: float = DEFAULT_LEARNED_DENY_INTERVAL_S
    _last_sweep: float = 0.0
    _sweeps: int = 0
    # which keys of ip, number, pair and range the sweeps must look at (see state.ExpiryIndex):
    # the stores are written only by this object's methods, which file or mark what they write
    _expiry: tuple[state.ExpiryIndex, ...] = field(
        default_factory=lambda: tuple(state.ExpiryIndex() for _ in range(4)), repr=False)

    def process(self, req: CallbackRequest, *, decided_at: float | None = None) -> Decision:
        policy = self.ctx.policy
        enr = enrich(req, self.intel, policy)
        ip_counts: IpCounts = state.ip_stage(self.ip_stores, req, enr, policy.shared_ip,
                                             key=self.ctx.pii_key)
        rkey = range_routing_key(req, enr)
        upd = state.range_stage(self.range_stores, req, enr, rkey, key=self.ctx.pii_key)
        b = state.counted_bucket(req.ts)
        for index, k in zip(self._expiry, (req.ip, upd.number_key, upd.pair_key, rkey), strict=True):
            index.bucket(b)[k] = None
        pop = count_population(self.population, req, enr, ip_counts, upd.counts, policy)
        decision = decide(
            req,
            enr,
            Counts(ip_counts, upd.counts, pop),
            self.ctx,
            decided_at=req.ts if decided_at is None else decided_at,
        )
        decision = spend.settle(decision, req, enr, self.ctx, self.population)  # spend breakers
        state.range_commit(
            self.range_stores,
            upd,
            req,
            allowed=decision.action == Action.ALLOW,
            pending_ttl=self.ctx.policy.pending_ttl,
        )
        now = self.clock.observe(req.ts)  # one far-future request cannot make live keys look dead
        if abs(now - self._last_sweep) > self.sweep_every_s:
            self.sweep(now)
        return decision

    def process_many(self, reqs: Iterable[CallbackRequest], *, batch: int = BATCH) -> Iterator[Decision]:
        """:meth:`process` for each request (timestamp order), deciding up to ``batch`` at once
        with one model call. Same decisions, in the same order, and the sweep runs where
        :meth:`process` would run it.

        A request's only input that depends on an earlier request's *decision* is its number's
        outstanding-callback mark (``pending``: set when an earlier request on the number was
        allowed). Everything else is counted at once: the number's counts are staged in its
        table as each request is counted, so a later request on the same number in the batch
        counts on top of them. A request whose number already has an undecided request in the
        batch is scored both ways (pending or not, one feature apart); the batch is then decided
        in order, each request reading the mark its predecessors' decisions left, exactly as one
        at a time (:meth:`_decide`). Only a repeated request id (a redelivery, which must not see
        its own mark) waits for the batch before it."""
        todo: list[_Staged] = []
        rids: set[str] = set()  # request ids of ``todo``
        numbers: set[str] = set()  # number keys of ``todo``
        policy = self.ctx.policy
        key = self.ctx.pii_key
        ip_stores, range_stores, number_store = self.ip_stores, self.range_stores, self.range_stores.number
        shared = policy.shared_ip
        filed, filed_sweeps = -1, -1  # expiry bucket of the sets below (see state.ExpiryIndex)
        ip_due: dict[str, None] = {}
        num_due = pair_due = rng_due = ip_due
        for req in reqs:
            if req.request_id in rids:
                yield from self._decide(todo)
                rids.clear()
                numbers.clear()
            enr = enrich(req, self.intel, policy)
            ip_counts = state.ip_stage(ip_stores, req, enr, shared, key=key)
            rkey = range_routing_key(req, enr)
            upd = state.range_stage(range_stores, req, enr, rkey, key=key)
            number_store[upd.number_key] = upd.number_value  # staged: counts now, mark at commit
            b = state.counted_bucket(req.ts)
            if b != filed or self._sweeps != filed_sweeps:  # a sweep takes due buckets away
                filed, filed_sweeps = b, self._sweeps
                ip_due, num_due, pair_due, rng_due = (ix.bucket(b) for ix in self._expiry)
            ip_due[req.ip] = None
            num_due[upd.number_key] = None
            pair_due[upd.pair_key] = None
            rng_due[rkey] = None
            pop = count_population(self.population, req, enr, ip_counts, upd.counts, policy)
            todo.append(_Staged(req, enr, Counts(ip_counts, upd.counts, pop), upd,
                                upd.number_key in numbers))
            numbers.add(upd.number_key)
            rids.add(req.request_id)
            now = self.clock.observe(req.ts)  # as process(): one far-future request moves nothing
            sweep = abs(now - self._last_sweep) > self.sweep_every_s
            if sweep or len(todo) >= batch:
                yield from self._decide(todo)
                rids.clear()
                numbers.clear()
                if sweep:
                    self.sweep(now)
        yield from self._decide(todo)

    def _decide(self, todo: list[_Staged]) -> list[Decision]:
        """Decide ``todo`` with one model call, commit each in order, and empty ``todo``.

        Each request's ``pending`` is the mark its number holds after the requests before it were
        committed (the value staged with its counts carries the mark from before the batch, which
        only a request of this batch can have replaced)."""
        if not todo:
            return []
        ctx = self.ctx
        scored = ctx.model is not None or ctx.shadow is not None
        results: list[ModelResult | None] = []
        shadows: list[ModelResult | None] = []
        flipped: dict[int, int] = {}  # todo index -> row of its other-pending variant
        maps = [s.counts.to_dict() for s in todo]
        xs: list[list[float]] = []
        if scored:
            xs = [features(s.req, s.enr, s.counts, ctx.policy, maps[i]) for i, s in enumerate(todo)]
            for i, s in enumerate(todo):
                # Only an allowed earlier request of the batch changes the mark, and its mark holds
                # for this later one (a later or equal ts, another id): a request counted as
                # pending stays pending, so only one counted as not pending is scored both ways.
                # (Out of time order it may not: that rare row is scored when it is decided.)
                if s.dependent and not s.counts.rng.pending:
                    x = list(xs[i])
                    x[_PENDING] = 1.0
                    flipped[i] = len(xs)
                    xs.append(x)
            results, shadows = score_rows(xs, ctx)
        ttl = ctx.policy.pending_ttl
        store = self.range_stores.number
        marks: dict[str, Any] = {}  # number key -> its mark after the requests committed so far
        decisions = []
        for i, s in enumerate(todo):
            req, upd, counts = s.req, s.update, s.counts
            nkey, value = upd.number_key, upd.number_value
            mark = marks[nkey] if nkey in marks else value.pending
            count_map = maps[i]
            result, shadow = (results[i], shadows[i]) if scored else (None, None)
            if s.dependent and state.is_pending(mark, req.ts, req.request_id) != counts.rng.pending:
                counts = Counts(counts.ip, replace(counts.rng, pending=not counts.rng.pending),
                                counts.pop)
                count_map = counts.to_dict()
                if scored:
                    row = flipped.get(i)
                    if row is not None:
                        result, shadow = results[row], shadows[row]
                    else:  # a pending mark gone within the batch: requests out of time order
                        x = list(xs[i])
                        x[_PENDING] = 1.0 if counts.rng.pending else 0.0
                        (result,), (shadow,) = score_rows([x], ctx)
            d = decide_scored(req, s.enr, counts, ctx, req.ts, result, shadow, count_map)
            d = spend.settle(d, req, s.enr, ctx, self.population)  # spend breakers, in commit order
            if d.action == Action.ALLOW:
                mark = state.Pending(req.ts + ttl, req.request_id)
            value.pending = mark
            marks[nkey] = mark
            store[nkey] = value
            decisions.append(d)
        todo.clear()
        return decisions

    def apply_outcome(self, outcome: Outcome) -> ListEntry | None:
        enr_phone = enrich_phone(outcome.phone_number, None, self.ctx.policy.range_digits)
        nkey = enr_phone.e164 or "?" + "".join(c for c in outcome.phone_number if c.isdigit())
        entry = learn_from_outcome(self.range_stores, outcome, nkey, self.ctx.policy,
                                   deny_interval_s=self.learned_deny_interval_s)
        self._expiry[1].mark(nkey)  # its expiry may have moved back (a cleared callback)
        if entry is not None:
            self.ctx.lists.add(entry)
        return entry

    def sweep(self, now: float) -> int:
        """Drop state that can no longer count (bounded memory): exactly the keys a full scan
        (``state.sweep``) drops, looking only at those that can be dead (``state.ExpiryIndex``)."""
        self._last_sweep = now
        self._sweeps += 1
        self.population.prune(now)
        return sum(
            index.sweep(s, now)
            for index, s in zip(self._expiry, (
                self.ip_stores.ip,
                self.range_stores.number,
                self.range_stores.pair,
                self.range_stores.range,
            ), strict=True)
        )

    def state_sizes(self) -> dict[str, int]:
        return {
            "ip": len(self.ip_stores.ip),
            "number": len(self.range_stores.number),
            "pair": len(self.range_stores.pair),
            "range": len(self.range_stores.range),
        }
