"""The single decision function: rules (policy + lists + counts) and the model, to a Decision.

``decide`` is what the replay path and the Faust range stage both call, so they cannot drift.

Action: the most severe action demanded by any rule hit (block > deflect > allow), escalated by
the combined risk (noisy-or of the hits' weights) crossing ``risk.deflect_at`` / ``risk.block_at``.
``silent`` is set only for non-allow decisions where a hit demanding that action is silent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import gt, itemgetter
from typing import Any, Protocol

from detector.core.capacity import CapacityGate, deflects, trust_class
from detector.core.features import denied_prefix, features
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
    """Every rule that fires for this request, in evaluation order.

    A rule's :class:`Hit` depends only on the policy, its code and whether the requester is
    authenticated, so each is made once per policy (:class:`_RuleTable`) and shared."""
    pol = ctx.policy
    auth = req.authenticated
    table = _rule_table(pol)
    memo = table.hits[auth]
    hits: list[Hit] = []
    ph, ip = enr.phone, enr.ip
    valid = ph.valid
    lists = ctx.lists
    if lists.matches_nothing:
        denied: list[str] = []
        allowed = False
    else:
        denied, allowed = lists.match(ph.e164, ph.region, ip.ip, ip.country, ip.asn, now=req.ts)
    if not valid:
        hits.append(memo["invalid_number"])
    if not allowed:
        for kind in denied:
            hits.append(memo[f"denylist_{kind}"])
        if valid and ph.region not in pol.allowed_countries:
            hits.append(memo["destination_not_allowed"])
        if denied_prefix(ph.e164, pol):
            hits.append(memo["denied_prefix"])
    if valid:
        type_hit = memo.number_type(ph.number_type)
        if type_hit is not None:
            hits.append(type_hit)
    if ip.tor_exit or ip.public_proxy or ip.residential_proxy:
        hits.append(memo["anonymous_ip"])
    elif ip.anonymous_vpn:
        # Consumer VPNs are common among real customers; alone they weigh, with others they act.
        hits.append(memo["vpn_ip"])
    if ip.hosting:
        hits.append(memo["hosting_ip"])
    if ip.scope != "global":
        hits.append(memo["ip_not_global"])
    if ip.country and ph.region and ip.country != ph.region:  # geo_mismatch(enr)
        if ip.country in pol.allowed_countries or counts.ip.ip_distinct_numbers_24h <= 1:
            # Cross-border customers and travellers inside the served area, and a traveller
            # abroad asking for their own number (the first number from that IP): weight, not
            # action. A foreign IP asking for several numbers deflects.
            hits.append(memo.as_allow("geo_mismatch"))
        else:
            hits.append(memo["geo_mismatch"])
    if not auth and table.unauthenticated:
        hits.append(memo["unauthenticated"])
    if counts.rng.pending:
        hits.append(memo["duplicate_pending"])
    values = table.velocity_values(count_map if count_map is not None else counts.to_dict())
    limits = table.limits[1 if counts.ip.ip_shared else 0]
    if any(map(gt, values, limits)):  # rare: most requests are under every limit
        fired: set[str] = set()
        for value, limit, code in zip(values, limits, table.velocity_codes, strict=True):
            if value > limit and code not in fired:
                fired.add(code)
                hits.append(memo[code])
    if min(counts.ip.ip_distinct_numbers_24h, counts.rng.number_distinct_ips_24h) >= pol.recombination_min:
        hits.append(memo["ip_number_recombination"])
    hits.extend(population_hits(req, enr, counts, ctx))
    return hits


class _HitMemo(dict[str, Hit]):
    """Reason code -> the :class:`Hit` its rule gives, for one policy and one value of
    ``authenticated``; each made on first use (a policy without a rule fails as before: when
    the rule fires)."""

    __slots__ = ("policy", "auth", "_types", "_allow", "_population")

    def __init__(self, policy: Policy, auth: bool) -> None:
        super().__init__()
        self.policy, self.auth = policy, auth
        self._types: dict[str, Hit | None] = {}
        self._allow: dict[str, Hit] = {}
        self._population: dict[tuple[bool, bool, bool, bool], tuple[Hit, ...]] = {}

    def __missing__(self, code: str) -> Hit:
        rule = self.policy.rules["denylist" if code.startswith("denylist_") else code]
        hit = self[code] = _hit(code, rule, self.auth, self.policy)
        return hit

    def number_type(self, number_type: str) -> Hit | None:
        """The hit of the policy's rule for numbers of this type, None when there is none."""
        if number_type not in self._types:
            rule = self.policy.number_types.get(number_type)
            self._types[number_type] = None if rule is None else _hit(
                f"number_type_{number_type.lower()}", rule, self.auth, self.policy)
        return self._types[number_type]

    def as_allow(self, code: str) -> Hit:
        """``code``'s hit with its weight but no action of its own."""
        hit = self._allow.get(code)
        if hit is None:
            h = self[code]
            hit = self._allow[code] = Hit(h.code, h.weight, Action.ALLOW, h.silent, h.monitored)
        return hit

    def population(self, on: tuple[Any, Any, Any, Any]) -> tuple[Hit, ...]:
        """The hits of the under-attack codes (``_POPULATION_CODES``) whose entry in ``on`` is
        true. An authenticated requester is deflected where the rule blocks, if the code is in
        ``auth_deflect_codes``."""
        key = (bool(on[0]), bool(on[1]), bool(on[2]), bool(on[3]))
        hits = self._population.get(key)
        if hits is None:
            out = []
            for code, fired in zip(_POPULATION_CODES, key, strict=True):
                if fired:
                    pol, h = self.policy, self[code]
                    if self.auth and code in pol.auth_deflect_codes and h.action == Action.BLOCK:
                        h = Hit(code, h.weight * pol.auth_weight_factor, Action.DEFLECT, False,
                                h.monitored)
                    out.append(h)
            hits = self._population[key] = tuple(out)
        return hits


class _RuleTable:
    """What rule evaluation derives from a policy alone, once per policy object (policies are
    immutable; a reload is a new object): the rules' hits and the velocity limits."""

    __slots__ = ("policy", "hits", "unauthenticated", "velocity_values", "velocity_codes", "limits")

    def __init__(self, pol: Policy) -> None:
        self.policy = pol
        self.hits = (_HitMemo(pol, False), _HitMemo(pol, True))  # by ``authenticated``
        unauth = pol.rules["unauthenticated"]
        self.unauthenticated = unauth.weight > 0 or unauth.action != Action.ALLOW
        self.velocity_values = itemgetter(*(attr for _, attr, _ in VELOCITY_RULES))
        self.velocity_codes = tuple(code for _, _, code in VELOCITY_RULES)

        def limits(relaxed: tuple[str, ...]) -> tuple[float, ...]:
            return tuple(pol.velocity[key] * (pol.shared_ip.factor if key in relaxed else 1)
                         for key, _, _ in VELOCITY_RULES)

        # (not shared, shared IP: its per-IP limits multiplied by ``shared_ip.factor``)
        self.limits = (limits(()), limits(pol.shared_ip.relaxed))


_TABLES: dict[int, _RuleTable] = {}


def _rule_table(pol: Policy) -> _RuleTable:
    table = _TABLES.get(id(pol))
    if table is None or table.policy is not pol:
        if len(_TABLES) > 16:
            _TABLES.clear()
        table = _TABLES[id(pol)] = _RuleTable(pol)
    return table


def population_hits(
    req: CallbackRequest, enr: Enrichment, counts: Counts, ctx: DecisionContext
) -> list[Hit]:
    """Under-attack mode and block pumping, from the population counts and the SOC's overrides.

    A surging country (or everything) deflects unauthenticated requests in it (authenticated
    users keep their callback: the codes are in ``[auth] relaxed_codes``); a surging or
    concentrated number block is blocked silently (deflected for authenticated users)."""
    pop, ph = counts.pop, enr.phone
    lists = ctx.lists
    if not lists.has_surge_entries and not (pop.global_surging or pop.country_surging
                                            or pop.prefix_surging or pop.prefix_concentrated):
        return []  # the usual case: no surge and no override
    forced = lists.surge_overrides(ph.e164, ph.region, now=req.ts)
    if forced:
        on = (
            forced.get("global", pop.global_surging),
            forced.get("country", pop.country_surging) if ph.region else False,
            forced.get("prefix", pop.prefix_surging),
            pop.prefix_concentrated and forced.get("prefix", True),
        )
    else:
        on = (pop.global_surging, pop.country_surging and bool(ph.region), pop.prefix_surging,
              pop.prefix_concentrated)
    return list(_rule_table(ctx.policy).hits[req.authenticated].population(on))


_POPULATION_CODES = ("global_surge", "country_surge", "prefix_surge", "prefix_concentration")


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
    top, action = 0, Action.ALLOW
    for h in hits:
        w = h.weight
        keep *= 1.0 - (0.0 if w < 0.0 else 1.0 if w > 1.0 else w)  # the weight clamped to [0, 1]
        severity = SEVERITY[h.action]
        if severity > top:
            top, action = severity, h.action
    risk = _RISKS.get(keep)
    if risk is None:  # round() is slow, and the same few combinations of hits recur
        if len(_RISKS) >= 4096:
            _RISKS.clear()
        risk = _RISKS[keep] = round(1.0 - keep, 6)
    # Filtered, then sorted: the same order as sorting first (a stable sort), on fewer hits.
    reasons: list[str] = []
    kept = [h for h in hits if h.weight > 0 or h.action != Action.ALLOW]
    for h in sorted(kept, key=_reason_order) if len(kept) > 1 else kept:
        if h.code not in reasons:
            reasons.append(h.code)
    silent = corroborated = False
    soft = policy.soft_codes
    for h in hits:
        if h.silent and h.action == action:
            silent = True
        # A silent block needs corroboration: soft signals (which innocent populations produce)
        # may add up to a deflection, never to a block on their own.
        if h.weight > 0 and h.code not in soft:
            corroborated = True
    silent = silent and action != Action.ALLOW
    if risk >= policy.block_at and action != Action.BLOCK and corroborated:
        action, silent = Action.BLOCK, True
        reasons.insert(0, "combined_risk")
    elif risk >= policy.deflect_at and action == Action.ALLOW:
        action, silent = Action.DEFLECT, False
        reasons.insert(0, "combined_risk")
    return action, silent, risk, reasons


_RISKS: dict[float, float] = {}  # product of the hits' (1 - weight) -> the rounded risk


def _reason_order(h: Hit) -> tuple[int, float, str]:
    return -SEVERITY[h.action], -h.weight, h.code


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
    for h in hits:
        if h.monitored:  # monitor mode: reported, kept out of action and risk
            monitored = list(dict.fromkeys(h.code for h in hits if h.monitored))
            hits = [h for h in hits if not h.monitored]
            break
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
    # Positional, in the field order of Decision (17 keywords cost more than building it).
    return Decision(
        req.request_id,  # request_id
        action,
        silent,
        risk,
        tuple(reasons),  # reasons
        enr.to_dict(),  # enrichment
        count_map,  # counts
        ctx.policy.version,  # policy_version
        ctx.model.version if ctx.model is not None else None,  # model_version
        decided_at,
        req.ts,  # request_ts
        pii_hash(req.ip, ctx.pii_key),  # ip_hash
        model_block,  # model
        tuple(monitored),  # monitored_reasons
        cost_per_min,
        expected_cost,
        currency,
    )
