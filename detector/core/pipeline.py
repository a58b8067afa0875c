"""The embedded (replay) path: both stages, the decision and its commit, on in-memory stores.

The Faust adapters call the same functions stage by stage (``enrich``, ``ip_stage``,
``range_stage``, ``decide``, ``range_commit``); :class:`Detector` calls them in one go.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from detector.core import state
from detector.core.clock import EventClock
from detector.core.decide import DecisionContext, decide
from detector.core.errors import InvalidField, MissingField
from detector.core.ipintel import IpIntel
from detector.core.lists import ListEntry, make_entry
from detector.core.phone import enrich_phone, routing_key
from detector.core.policy import Policy
from detector.core.records import (
    OUTCOMES,
    Action,
    CallbackRequest,
    Counts,
    Decision,
    Enrichment,
    IpCounts,
    Outcome,
)


def enrich(req: CallbackRequest, intel: IpIntel, policy: Policy) -> Enrichment:
    """Phone and IP enrichment of one request."""
    return Enrichment(
        phone=enrich_phone(req.phone_number, req.country_hint, policy.range_digits),
        ip=intel.lookup(req.ip),
    )


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


@dataclass
class Detector:
    """In-memory detector: feed it requests in timestamp order, get one decision each."""

    ctx: DecisionContext
    intel: IpIntel = field(default_factory=IpIntel)
    ip_stores: state.IpStores = field(default_factory=state.IpStores)
    range_stores: state.RangeStores = field(default_factory=state.RangeStores)
    seen: dict[str, float] = field(default_factory=dict)
    sweep_every_s: float = 6 * 3600.0  # event time between sweeps of dead keys
    clock: EventClock = field(default_factory=EventClock)  # the sweeps' time (see core.clock)
    learned_deny_interval_s: float = DEFAULT_LEARNED_DENY_INTERVAL_S
    _last_sweep: float = 0.0

    def process(self, req: CallbackRequest, *, decided_at: float | None = None) -> Decision:
        enr = enrich(req, self.intel, self.ctx.policy)
        ip_counts: IpCounts = state.ip_stage(self.ip_stores, req, enr, key=self.ctx.pii_key)
        upd = state.range_stage(self.range_stores, req, enr, range_routing_key(req, enr),
                                 key=self.ctx.pii_key)
        decision = decide(
            req,
            enr,
            Counts(ip_counts, upd.counts),
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
        now = self.clock.observe(req.ts)  # one far-future request cannot make live keys look dead
        if abs(now - self._last_sweep) > self.sweep_every_s:
            self.sweep(now)
        return decision

    def apply_outcome(self, outcome: Outcome) -> ListEntry | None:
        enr_phone = enrich_phone(outcome.phone_number, None, self.ctx.policy.range_digits)
        nkey = enr_phone.e164 or "?" + "".join(c for c in outcome.phone_number if c.isdigit())
        entry = learn_from_outcome(self.range_stores, outcome, nkey, self.ctx.policy,
                                   deny_interval_s=self.learned_deny_interval_s)
        if entry is not None:
            self.ctx.lists.add(entry)
        return entry

    def sweep(self, now: float) -> int:
        """Drop state that can no longer count (bounded memory)."""
        self._last_sweep = now
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
