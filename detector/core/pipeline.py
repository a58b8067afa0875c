"""The embedded (replay) path: both stages, the decision and its commit, on in-memory stores.

The Faust adapters call the same functions stage by stage (``enrich``, ``ip_stage``,
``range_stage``, ``decide``, ``range_commit``); :class:`Detector` calls them in one go.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from detector.core import population, state
from detector.core.decide import DecisionContext, decide, decide_many
from detector.core.errors import InvalidField, MissingField
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
    counted = (keys[:2] if quiet else ()) + (keys[2:] if rng.number_24h == 1 else ())
    if counted:
        view.observe(counted, req.ts, fresh=bool(ip_counts.ip_fresh))
    return population.read(view, keys, req.ts, ph.region, policy.population)


def range_routing_key(req: CallbackRequest, enr: Enrichment) -> str:
    """The key of the range stage (co-partitions number, pair and range)."""
    return routing_key(enr.phone, req.phone_number)


def parse_outcome(obj: dict[str, Any]) -> Outcome:
    """Validate a dialer outcome message."""
    for name in ("request_id", "phone_number", "outcome"):
        if obj.get(name) is None:
            raise MissingField(name)
        if not isinstance(obj[name], str):
            raise InvalidField(name, "a string", obj[name])
    if obj["outcome"] not in OUTCOMES:
        raise InvalidField("outcome", f"one of {', '.join(OUTCOMES)}", obj["outcome"])
    from detector.core.parse import parse_ts

    ts = parse_ts(obj["ts"]) if obj.get("ts") is not None else time.time()
    dur = obj.get("duration_s", 0.0) or 0.0
    if isinstance(dur, bool) or not isinstance(dur, int | float) or dur < 0:
        raise InvalidField("duration_s", "a non-negative number of seconds", dur)
    return Outcome(obj["request_id"], obj["phone_number"], obj["outcome"], ts, float(dur))


def learn_from_outcome(
    stores: state.RangeStores, outcome: Outcome, nkey: str, policy: Policy
) -> ListEntry | None:
    """Clear the number's outstanding callback; return a deny entry learned from the floor, if any."""
    state.clear_pending(stores, nkey, outcome.request_id)
    if nkey.startswith("?"):
        return None
    if outcome.outcome == "agent_marked_spam":
        return make_entry(
            "deny",
            "number",
            nkey,
            reason="agent_marked_spam",
            expires_at=outcome.ts + policy.spam_deny_seconds,
            added_at=outcome.ts,
            source="learned",
        )
    if outcome.outcome == "machine":
        n = state.record_machine(stores, nkey, outcome.ts)
        if n >= policy.machine_threshold:
            return make_entry(
                "deny",
                "number",
                nkey,
                reason=f"machine_answers_{n}_in_24h",
                expires_at=outcome.ts + policy.machine_deny_seconds,
                added_at=outcome.ts,
                source="learned",
            )
    return None


@dataclass
class Detector:
    """In-memory detector: feed it requests in timestamp order, get one decision each."""

    ctx: DecisionContext
    intel: IpIntel = field(default_factory=IpIntel)
    ip_stores: state.IpStores = field(default_factory=state.IpStores)
    range_stores: state.RangeStores = field(default_factory=state.RangeStores)
    seen: dict[str, float] = field(default_factory=dict)
    population: PopulationView = field(default_factory=PopulationView)
    sweep_every_s: float = 6 * 3600.0  # event time between sweeps of dead keys
    _last_sweep: float = 0.0

    def process(self, req: CallbackRequest, *, decided_at: float | None = None) -> Decision:
        policy = self.ctx.policy
        enr = enrich(req, self.intel, policy)
        ip_counts: IpCounts = state.ip_stage(self.ip_stores, req, enr, policy.shared_ip)
        upd = state.range_stage(self.range_stores, req, enr, range_routing_key(req, enr))
        pop = count_population(self.population, req, enr, ip_counts, upd.counts, policy)
        decision = decide(
            req,
            enr,
            Counts(ip_counts, upd.counts, pop),
            self.ctx,
            decided_at=req.ts if decided_at is None else decided_at,
        )
        state.range_commit(
            self.range_stores,
            upd,
            req,
            allowed=decision.action == Action.ALLOW,
            pending_ttl=self.ctx.policy.pending_ttl,
        )
        if req.ts - self._last_sweep > self.sweep_every_s:
            self.sweep(req.ts)
        return decision

    def process_many(self, reqs: Iterable[CallbackRequest], *, batch: int = 256) -> Iterator[Decision]:
        """:meth:`process` for each request (timestamp order), deciding up to ``batch`` at once
        with one model call. Same decisions, in the same order: a request waits for the decision
        of an undecided one on the same number (its outstanding-callback mark), as the stream's
        range stage does, and the sweep runs where :meth:`process` would run it."""
        todo: list[tuple[CallbackRequest, Enrichment, Counts, state.RangeUpdate]] = []
        keys: set[str] = set()  # number keys and request ids of ``todo``
        policy = self.ctx.policy
        for req in reqs:
            enr = enrich(req, self.intel, policy)
            if todo and (req.request_id in keys or state.number_key(enr, req.phone_number) in keys):
                yield from self._decide(todo)
                keys.clear()
            ip_counts = state.ip_stage(self.ip_stores, req, enr, policy.shared_ip)
            upd = state.range_stage(self.range_stores, req, enr, range_routing_key(req, enr))
            pop = count_population(self.population, req, enr, ip_counts, upd.counts, policy)
            todo.append((req, enr, Counts(ip_counts, upd.counts, pop), upd))
            keys.add(upd.number_key)
            keys.add(req.request_id)
            sweep = req.ts - self._last_sweep > self.sweep_every_s
            if sweep or len(todo) >= batch:
                yield from self._decide(todo)
                keys.clear()
                if sweep:
                    self.sweep(req.ts)
        yield from self._decide(todo)

    def _decide(
        self, todo: list[tuple[CallbackRequest, Enrichment, Counts, state.RangeUpdate]]
    ) -> list[Decision]:
        """Decide ``todo`` with one model call, commit each in order, and empty ``todo``."""
        if not todo:
            return []
        decisions = decide_many([(r, e, c) for r, e, c, _ in todo], self.ctx, decided_at=0.0,
                                decided_ats=[r.ts for r, _, _, _ in todo])
        ttl = self.ctx.policy.pending_ttl
        for (req, _, _, upd), d in zip(todo, decisions, strict=True):
            state.range_commit(self.range_stores, upd, req, allowed=d.action == Action.ALLOW,
                               pending_ttl=ttl)
        todo.clear()
        return decisions

    def apply_outcome(self, outcome: Outcome) -> ListEntry | None:
        enr_phone = enrich_phone(outcome.phone_number, None, self.ctx.policy.range_digits)
        nkey = enr_phone.e164 or "?" + "".join(c for c in outcome.phone_number if c.isdigit())
        entry = learn_from_outcome(self.range_stores, outcome, nkey, self.ctx.policy)
        if entry is not None:
            self.ctx.lists.add(entry)
        return entry

    def sweep(self, now: float) -> int:
        """Drop state that can no longer count (bounded memory)."""
        self._last_sweep = now
        self.population.prune(now)
        return sum(
            state.sweep(s, now)
            for s in (
                self.ip_stores.ip,
                self.range_stores.number,
                self.range_stores.pair,
                self.range_stores.range,
            )
        )

    def state_sizes(self) -> dict[str, int]:
        return {
            "ip": len(self.ip_stores.ip),
            "number": len(self.range_stores.number),
            "pair": len(self.range_stores.pair),
            "range": len(self.range_stores.range),
        }
