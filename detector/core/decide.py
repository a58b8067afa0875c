"""The single decision function: rules (policy + lists + counts) and the model, to a Decision.

``decide`` is what the replay path and the Faust range stage both call, so they cannot drift.

Action: the most severe action demanded by any rule hit (block > deflect > allow), escalated by
the combined risk (noisy-or of the hits' weights) crossing ``risk.deflect_at`` / ``risk.block_at``.
``silent`` is set only for non-allow decisions where a hit demanding that action is silent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from detector.core.capacity import CapacityGate, deflects, trust_class
from detector.core.features import denied_prefix, features, geo_mismatch
from detector.core.lists import ListIndex
from detector.core.pii import random_key
from detector.core.policy import Policy, Rule
from detector.core.rates import RateDeck, packaged_rate_deck
from detector.core.records import (
    Action,
    CallbackRequest,
    Counts,
    Decision,
    Enrichment,
    Hit,
    ModelResult,
)
from detector.core.spend import price_decision
from detector.core.state import pii_hash

SEVERITY = {Action.ALLOW: 0, Action.DEFLECT: 1, Action.BLOCK: 2}

# (velocity threshold key, counts attribute, reason code)
VELOCITY_RULES: tuple[tuple[str, str, str], ...] = (
    ("number_15m", "number_15m", "velocity_number"),
    ("number_1h", "number_1h", "velocity_number"),
    ("number_24h", "number_24h", "velocity_number"),
    ("ip_15m", "ip_15m", "velocity_ip"),
    ("ip_1h", "ip_1h", "velocity_ip"),
    ("ip_24h", "ip_24h", "velocity_ip"),
    ("pair_1h", "pair_1h", "velocity_pair"),
    ("pair_24h", "pair_24h", "velocity_pair"),
    ("range_1h", "range_1h", "velocity_range"),
    ("range_24h", "range_24h", "velocity_range"),
    ("ip_distinct_numbers_1h", "ip_distinct_numbers_1h", "many_numbers_per_ip"),
    ("ip_distinct_numbers_24h", "ip_distinct_numbers_24h", "many_numbers_per_ip"),
    ("number_distinct_ips_1h", "number_distinct_ips_1h", "many_ips_per_number"),
    ("number_distinct_ips_24h", "number_distinct_ips_24h", "many_ips_per_number"),
    ("range_distinct_ips_24h", "range_distinct_ips_24h", "range_many_ips"),
    ("range_distinct_numbers_24h", "range_distinct_numbers_24h", "range_many_numbers"),
    ("ip_distinct_countries_24h", "ip_distinct_countries_24h", "many_countries_per_ip"),
)


class Scorer(Protocol):
    """An anomaly model: feature vector in, :class:`ModelResult` out (anomaly higher = riskier)."""

    version: str

    def score(self, x: list[float]) -> ModelResult: ...


@dataclass
class DecisionContext:
    """Everything ``decide`` needs besides the request: policy, lists, models, hashing key."""

    policy: Policy
    lists: ListIndex = field(default_factory=ListIndex)
    model: Scorer | None = None
    shadow: Scorer | None = None
    use_rules: bool = True  # evaluation switches: rules only / model only / both
    use_model: bool = True
    # The PII hash key. Never a known default: a context built without one gets the process's
    # random key (its hashes match no other process's); runtime.build_context passes the configured one.
    pii_key: bytes = field(default_factory=random_key, repr=False)
    # The rate deck (core/rates.py, DETECTOR_RATE_DECK) pricing decisions for core/spend.py.
    rates: RateDeck | None = field(default_factory=packaged_rate_deck, repr=False)
    # The dialers' queue state (agent capacity); None: capacity is not watched (always normal).
    capacity: CapacityGate | None = None


def _hit(
    code: str, rule: Rule, authenticated: bool, policy: Policy, weight: float | None = None
) -> Hit:
    wgt = rule.weight if weight is None else weight
    action = rule.action
    if authenticated and code in policy.relaxed_codes:
        wgt *= policy.auth_weight_factor
        action = Action.ALLOW
    return Hit(code, wgt, action, rule.silent, rule.mode == "monitor")


def rule_hits(
    req: CallbackRequest,
    enr: Enrichment,
    counts: Counts,
    ctx: DecisionContext,
    count_map: dict[str, Any] | None = None,
) -> list[Hit]:
    """Every rule that fires for this request, in evaluation order."""
    pol = ctx.policy
    auth = req.authenticated
    hits: list[Hit] = []

    def add(code: str, rule_code: str | None = None) -> None:
        hits.append(_hit(code, pol.rules[rule_code or code], auth, pol))

    ph, ip = enr.phone, enr.ip
    denied, allowed = ctx.lists.match(ph.e164, ph.region, ip.ip, ip.country, ip.asn, now=req.ts)
    if not ph.valid:
        add("invalid_number")
    if not allowed:
        for kind in denied:
            add(f"denylist_{kind}", "denylist")
        if ph.valid and ph.region not in pol.allowed_countries:
            add("destination_not_allowed")
        if denied_prefix(ph.e164, pol):
            add("denied_prefix")
    if ph.valid:
        type_rule = pol.number_types.get(ph.number_type)
        if type_rule is not None:
            hits.append(_hit(f"number_type_{ph.number_type.lower()}", type_rule, auth, pol))
    if ip.tor_exit or ip.public_proxy or ip.residential_proxy:
        add("anonymous_ip")
    elif ip.anonymous_vpn:
        # Consumer VPNs are common among real customers; alone they weigh, with others they act.
        add("vpn_ip")
    if ip.hosting:
        add("hosting_ip")
    if ip.scope != "global":
        add("ip_not_global")
    if geo_mismatch(enr):
        hit = _hit("geo_mismatch", pol.rules["geo_mismatch"], auth, pol)
        if ip.country in pol.allowed_countries or counts.ip.ip_distinct_numbers_24h <= 1:
            # Cross-border customers and travellers inside the served area, and a traveller
            # abroad asking for their own number (the first number from that IP): weight, not
            # action. A foreign IP asking for several numbers deflects.
            hit = Hit(hit.code, hit.weight, Action.ALLOW, hit.silent, hit.monitored)
        hits.append(hit)
    unauth = pol.rules["unauthenticated"]
    if not auth and (unauth.weight > 0 or unauth.action != Action.ALLOW):
        add("unauthenticated")
    if counts.rng.pending:
        add("duplicate_pending")
    c = count_map if count_map is not None else counts.to_dict()
    fired: set[str] = set()
    for attr, code, limit in _velocity_limits(pol)[1 if counts.ip.ip_shared else 0]:
        if code not in fired and c[attr] > limit:
            fired.add(code)
            add(code)
    if min(counts.ip.ip_distinct_numbers_24h, counts.rng.number_distinct_ips_24h) >= pol.recombination_min:
        add("ip_number_recombination")
    hits.extend(population_hits(req, enr, counts, ctx))
    return hits


_LIMITS: dict[int, tuple[Policy, tuple[tuple[str, str, float], ...], tuple[tuple[str, str, float], ...]]] = {}


def _velocity_limits(
    pol: Policy,
) -> tuple[tuple[tuple[str, str, float], ...], tuple[tuple[str, str, float], ...]]:
    """(counts attribute, reason code, limit) of each velocity rule, for a requester that is not
    and one that is a shared IP (its per-IP limits multiplied by ``shared_ip.factor``); computed
    once per policy object."""
    hit = _LIMITS.get(id(pol))
    if hit is None or hit[0] is not pol:
        def limits(relaxed: tuple[str, ...]) -> tuple[tuple[str, str, float], ...]:
            return tuple((attr, code, pol.velocity[key] * (pol.shared_ip.factor if key in relaxed else 1))
                         for key, attr, code in VELOCITY_RULES)

        if len(_LIMITS) > 16:
            _LIMITS.clear()
        hit = _LIMITS[id(pol)] = (pol, limits(()), limits(pol.shared_ip.relaxed))
    return hit[1], hit[2]


def population_hits(
    req: CallbackRequest, enr: Enrichment, counts: Counts, ctx: DecisionContext
) -> list[Hit]:
    """Under-attack mode and block pumping, from the population counts and the SOC's overrides.

    A surging country (or everything) deflects unauthenticated requests in it (authenticated
    users keep their callback: the codes are in ``[auth] relaxed_codes``); a surging or
    concentrated number block is blocked silently (deflected for authenticated users)."""
    pol, pop, ph = ctx.policy, counts.pop, enr.phone
    forced = ctx.lists.surge_overrides(ph.e164, ph.region, now=req.ts)
    surging = {
        "global_surge": forced.get("global", pop.global_surging),
        "country_surge": forced.get("country", pop.country_surging) if ph.region else False,
        "prefix_surge": forced.get("prefix", pop.prefix_surging),
        "prefix_concentration": pop.prefix_concentrated and forced.get("prefix", True),
    }
    out = []
    for code, on in surging.items():
        if not on:
            continue
        hit = _hit(code, pol.rules[code], req.authenticated, pol)
        if req.authenticated and code in pol.auth_deflect_codes and hit.action == Action.BLOCK:
            hit = Hit(code, hit.weight * pol.auth_weight_factor, Action.DEFLECT, False, hit.monitored)
        out.append(hit)
    return out


def capacity_deflects(authenticated: bool, new_ip: bool, risk: float, ctx: DecisionContext,
                      now: float) -> bool:
    """Whether agent-capacity protection takes this (otherwise allowed) callback away at ``now``:
    the dialers' queue is over capacity and the request's trust class is deflected at the
    current tier (see :mod:`detector.core.capacity`). False when the queue state is stale."""
    gate = ctx.capacity
    if gate is None:
        return False
    pol = ctx.policy.capacity
    tier = gate.level(now, pol).tier
    return tier > 0 and deflects(tier, trust_class(authenticated, new_ip, risk, pol))


def combine(hits: list[Hit], policy: Policy) -> tuple[Action, bool, float, list[str]]:
    """(action, silent, risk, reasons) from hits. Reasons: most severe action first, then weight."""
    keep = 1.0
    for h in hits:
        keep *= 1.0 - min(max(h.weight, 0.0), 1.0)
    risk = round(1.0 - keep, 6)
    action = Action.ALLOW
    for h in hits:
        if SEVERITY[h.action] > SEVERITY[action]:
            action = h.action
    ordered = sorted(hits, key=lambda h: (-SEVERITY[h.action], -h.weight, h.code))
    reasons = list(
        dict.fromkeys(h.code for h in ordered if h.weight > 0 or h.action != Action.ALLOW)
    )
    silent = any(h.silent and h.action == action for h in hits) and action != Action.ALLOW
    # A silent block needs corroboration: soft signals (which innocent populations produce) may
    # add up to a deflection, never to a block on their own.
    corroborated = any(h.code not in policy.soft_codes and h.weight > 0 for h in hits)
    if risk >= policy.block_at and action != Action.BLOCK and corroborated:
        action, silent = Action.BLOCK, True
        reasons.insert(0, "combined_risk")
    elif risk >= policy.deflect_at and action == Action.ALLOW:
        action, silent = Action.DEFLECT, False
        reasons.insert(0, "combined_risk")
    return action, silent, risk, reasons


def decide(
    req: CallbackRequest,
    enr: Enrichment,
    counts: Counts,
    ctx: DecisionContext,
    *,
    decided_at: float,
) -> Decision:
    """Decide one request. Pure: same inputs, same decision (``decided_at`` is passed in)."""
    return decide_many([(req, enr, counts)], ctx, decided_at=decided_at)[0]


def decide_many(
    items: Sequence[tuple[CallbackRequest, Enrichment, Counts]],
    ctx: DecisionContext,
    *,
    decided_at: float,
    decided_ats: Sequence[float] | None = None,
) -> list[Decision]:
    """Decide several requests with one model call; each gets exactly the decision :func:`decide`
    gives it alone (the packed forest scores a row identically in any batch). The requests must
    be independent: none of their counts may depend on another's decision (the stream batches
    requests for different numbers, since only a number's outstanding-callback mark does).
    ``decided_ats`` (one per item) overrides ``decided_at`` (replay stamps each with its event time)."""
    n = len(items)
    results: list[ModelResult | None] = [None] * n
    shadows: list[ModelResult | None] = [None] * n
    maps = [counts.to_dict() for _, _, counts in items]
    if n and (ctx.model is not None or ctx.shadow is not None):
        xs = [features(req, enr, counts, ctx.policy, maps[i])
              for i, (req, enr, counts) in enumerate(items)]
        results, shadows = score_rows(xs, ctx)
    ats = decided_ats if decided_ats is not None else [decided_at] * n
    return [decide_scored(req, enr, counts, ctx, ats[i], results[i], shadows[i], maps[i])
            for i, (req, enr, counts) in enumerate(items)]


def score_rows(
    xs: list[list[float]], ctx: DecisionContext
) -> tuple[list[ModelResult | None], list[ModelResult | None]]:
    """The model's and the shadow model's results for feature rows ``xs`` (one call each; None
    where there is no such model). A row scores identically in any batch."""
    none: list[ModelResult | None] = [None] * len(xs)
    results = list(_score_all(ctx.model, xs)) if ctx.model is not None and xs else none
    shadows = list(_score_all(ctx.shadow, xs)) if ctx.shadow is not None and xs else none
    return results, shadows


def _score_all(model: Scorer, xs: list[list[float]]) -> Sequence[ModelResult | None]:
    batch = getattr(model, "score_batch", None)  # ForestScorer has one; a plain Scorer may not
    return batch(xs) if batch is not None else [model.score(x) for x in xs]


def decide_scored(
    req: CallbackRequest,
    enr: Enrichment,
    counts: Counts,
    ctx: DecisionContext,
    decided_at: float,
    result: ModelResult | None,
    shadow: ModelResult | None,
    count_map: dict[str, Any] | None = None,
) -> Decision:
    """:func:`decide` with the model's (and shadow's) result for this request already computed
    (:func:`score_rows` on its :func:`~detector.core.features.features` row). ``count_map``:
    ``counts.to_dict()`` if the caller has it (the decision keeps it as its ``counts``)."""
    if count_map is None:
        count_map = counts.to_dict()
    hits = rule_hits(req, enr, counts, ctx, count_map) if ctx.use_rules else []
    if shadow is not None:
        base = result or ModelResult(version="none", anomaly=0.0, is_anomalous=False)
        result = ModelResult(
            base.version,
            base.anomaly,
            base.is_anomalous,
            base.top_features,
            shadow.version,
            shadow.anomaly,
        )
    if ctx.model is not None and ctx.use_model and result is not None and result.is_anomalous:
        rule = ctx.policy.rules["anomalous_pattern"]
        hits.append(
            _hit(
                "anomalous_pattern",
                rule,
                req.authenticated,
                ctx.policy,
                weight=rule.weight * result.anomaly,
            )
        )
    monitored: list[str] = []
    if any(h.monitored for h in hits):  # monitor mode: reported, kept out of action and risk
        monitored = list(dict.fromkeys(h.code for h in hits if h.monitored))
        hits = [h for h in hits if not h.monitored]
    action, silent, risk, reasons = combine(hits, ctx.policy)
    cost_per_min, expected_cost, currency = price_decision(enr, risk, ctx)  # core/spend.py
    if action == Action.ALLOW and capacity_deflects(req.authenticated, counts.ip.ip_fresh == 1,
                                                    risk, ctx, decided_at):
        rule = ctx.policy.rules["agent_capacity"]
        if rule.mode == "monitor":
            monitored.append("agent_capacity")
        elif rule.action == Action.DEFLECT:
            action, silent = Action.DEFLECT, False
            reasons.insert(0, "agent_capacity")
    model_block = None
    if result is not None:
        model_block = {
            "version": result.version if ctx.model is not None else None,
            "anomaly": round(result.anomaly, 6),
            "is_anomalous": result.is_anomalous,
            "top_features": list(result.top_features),
            "shadow_version": result.shadow_version,
            "shadow_anomaly": None
            if result.shadow_anomaly is None
            else round(result.shadow_anomaly, 6),
        }
    return Decision(
        request_id=req.request_id,
        action=action,
        silent=silent,
        risk=risk,
        reasons=tuple(reasons),
        enrichment=enr.to_dict(),
        counts=count_map,
        policy_version=ctx.policy.version,
        model_version=ctx.model.version if ctx.model is not None else None,
        decided_at=decided_at,
        request_ts=req.ts,
        ip_hash=pii_hash(req.ip, ctx.pii_key),
        model=model_block,
        monitored_reasons=tuple(monitored),
        cost_per_min=cost_per_min,
        expected_cost=expected_cost,
        currency=currency,
    )
