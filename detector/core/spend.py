"""Cost at risk and spend circuit breakers (policy ``[spend]``, README "Money").

**Expected cost.** ``decide`` prices every decision with the rate deck (:func:`price_decision`,
:mod:`detector.core.rates`):
``cost_per_min`` is the deck's rate for the number (longest prefix; None for a number that is not
valid or that no line matches) and the expected cost of calling it back is::

    expected_minutes = risk * pumped_minutes + (1 - risk) * legit_minutes
    expected_cost    = cost_per_min * expected_minutes

``legit_minutes`` is what a legitimate callback bills on average (unanswered ones included) and
``pumped_minutes`` how long a pumped call is held: until the dialer hangs up (its maximum call
duration). ``risk`` is the decision's combined risk in [0, 1], read as the chance the request is a
pump. Money *allowed* is the expected cost of allowed decisions, money *avoided* that of stopped
ones (what they would have cost if called back).

**Spend circuit breakers.** Allowed expected spend is counted per *spend scope* in the population
counters (so every worker sees every worker's spend within ~1.1 s, :mod:`detector.stream.population`):
``$C:<country>`` (the destination country) and ``$P:<prefix>`` (the rate deck's line the number
falls in, and every ``[[spend.budgets]]`` prefix it starts with). Spend is kept in integer units of
1/10,000 of the currency (sums are exact in any order, so replay and stream agree exactly). Each
scope has a budget per hour (the last 60 minutes) and per day (the last 24 hours): configured in
``[[spend.budgets]]``, else a default derived from the scope's own baseline::

    typical_hour = median allowed spend per hour over the complete hours of the last 24 (0 if none)
    hour budget  = max(floor_hour, hour_factor * typical_hour)       x campaign boost (last hour)
    day budget   = max(floor_day,  day_factor * 24 * typical_hour)   x campaign boost (last day)

(floors per country and per prefix; the median keeps up to 12 hours of pumping out of the baseline;
campaign boost: 1 + (factor - 1) x the share of the window a declared campaign covers,
:func:`campaign_boost`).
When a scope's spend is at or over a budget, an allowed request to it gets ``spend_budget_exceeded``
and is deflected (or blocked, per rule or per budget; an authenticated customer is deflected, never
blocked) until spend in the window falls below the budget again: the breaker caps spend at the
budget per window. The breaker acts after the decision, request by request in commit order, on
requests the rules allowed: only allowed spend counts, and a batch decides as one request at a
time would (:func:`settle`). The SOC holds a breaker closed, raises it or forces it open with signed
``budget`` list entries (:meth:`detector.core.lists.ListIndex.budget_overrides`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import phonenumbers

from detector.core.errors import ConfigError, PolicyError, _shown
from detector.core.population import MINUTE, Campaign, PopulationView, _hour_sums, _Scope, _totals
from detector.core.records import Action

if TYPE_CHECKING:  # pragma: no cover
    from detector.core.decide import DecisionContext
    from detector.core.lists import ListIndex
    from detector.core.rates import RateDeck
    from detector.core.records import CallbackRequest, Decision, Enrichment

SPEND_UNIT = 10_000  # spend is counted in 1/10,000 of the currency unit (integers: exact sums)
CODE = "spend_budget_exceeded"
COUNTRY, PREFIX = "$C:", "$P:"
SEVERITY = {Action.ALLOW: 0, Action.DEFLECT: 1, Action.BLOCK: 2}


@dataclass(frozen=True, slots=True)
class Budget:
    """A configured budget of one scope (a country code or an E.164 prefix), in money.
    ``None``: that window's default (derived) budget. ``action``: None = the rule's action."""

    scope: str
    per_hour: float | None = None
    per_day: float | None = None
    action: Action | None = None


@dataclass(frozen=True, slots=True)
class SpendPolicy:
    """The ``[spend]`` policy section (see ``default_policy.toml``)."""

    currency: str = "EUR"
    legit_minutes: float = 4.0
    pumped_minutes: float = 60.0
    hour_factor: float = 10.0
    day_factor: float = 3.0
    country_floor_hour: float = 150.0
    country_floor_day: float = 1000.0
    prefix_floor_hour: float = 100.0
    prefix_floor_day: float = 600.0
    budgets: tuple[Budget, ...] = ()
    countries: Mapping[str, Budget] = field(default_factory=dict)  # derived from budgets
    prefixes: Mapping[str, Budget] = field(default_factory=dict)
    prefix_lengths: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class BreakerState:
    """One spend scope's breaker at a time: money spent (allowed, expected) and budgets."""

    key: str  # "$C:GB" | "$P:+4470"
    spend_1h: float
    limit_1h: float
    spend_24h: float
    limit_24h: float
    open: bool
    source: str  # default | policy | soc (an override applied)
    action: Action | None  # the budget's own action (None: the rule's)

    @property
    def kind(self) -> str:
        return "country" if self.key.startswith(COUNTRY) else "prefix"

    @property
    def scope(self) -> str:
        return self.key[3:]

    @property
    def ratio(self) -> float:
        """Spend over budget, the larger of the two windows (>= 1: the breaker is open)."""
        return max(self.spend_1h / self.limit_1h if self.limit_1h > 0 else 0.0,
                   self.spend_24h / self.limit_24h if self.limit_24h > 0 else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "kind": self.kind, "spend_1h": round(self.spend_1h, 4),
                "limit_1h": round(self.limit_1h, 4), "spend_24h": round(self.spend_24h, 4),
                "limit_24h": round(self.limit_24h, 4), "open": self.open, "source": self.source}


# --------------------------------------------------------------------------- pricing


def expected_minutes(risk: float, policy: SpendPolicy) -> float:
    """Risk-weighted billed minutes of a callback (see the module doc).

    >>> expected_minutes(0.0, SpendPolicy()), expected_minutes(0.5, SpendPolicy())
    (4.0, 32.0)
    """
    p = min(max(risk, 0.0), 1.0)
    return p * policy.pumped_minutes + (1.0 - p) * policy.legit_minutes


def price(cost_per_min: float | None, risk: float, policy: SpendPolicy) -> int:
    """Expected cost in :data:`SPEND_UNIT` units (0 when the rate is unknown).

    >>> price(0.02, 0.0, SpendPolicy())  # 4 minutes at 0.02 a minute: 0.08
    800
    """
    if not cost_per_min:
        return 0
    return round(cost_per_min * expected_minutes(risk, policy) * SPEND_UNIT)


# --------------------------------------------------------------------------- scopes and budgets


def spend_scopes(e164: str | None, region: str | None, rate_prefix: str | None,
                 policy: SpendPolicy) -> tuple[str, ...]:
    """The spend scopes a request to ``e164`` spends in: its country, its rate-deck line, and
    every configured budget prefix it starts with.

    >>> spend_scopes("+447700900123", "GB", "+447", SpendPolicy(prefixes={"+4477": Budget("+4477")},
    ...                                                          prefix_lengths=(5,)))
    ('$C:GB', '$P:+447', '$P:+4477')
    """
    out: list[str] = []
    if region:
        out.append(COUNTRY + region)
    if rate_prefix is not None:
        out.append(PREFIX + rate_prefix)
    if e164 and policy.prefix_lengths:
        n = len(e164)
        for k in policy.prefix_lengths:
            if k <= n and e164[:k] in policy.prefixes:
                key = PREFIX + e164[:k]
                if key not in out:
                    out.append(key)
    return tuple(out)


@lru_cache(maxsize=4096)
def scope_region(key: str) -> str | None:
    """The country of a spend scope: its code, or a prefix's calling code's main region
    (``+4470`` -> GB, ``+1`` -> US, ``+882`` -> 001); None for the catch-all ``+``.

    >>> scope_region("$C:FR"), scope_region("$P:+4470"), scope_region("$P:+882"), scope_region("$P:+")
    ('FR', 'GB', '001', None)
    """
    if key.startswith(COUNTRY):
        return key[3:]
    digits = key[4:]
    for k in (1, 2, 3):
        if len(digits) >= k:
            region = phonenumbers.region_code_for_country_code(int(digits[:k]))
            if region != "ZZ":
                return str(region)
    return None


def _typical(sc: _Scope, h: int, start: int) -> int:
    values = []
    for b in range(h - 24, h):
        if b * 60 >= start:  # an hour the view saw from its start
            cell = sc.hours.get(b)
            values.append(cell[0] if cell is not None else 0)
    if not values:
        return 0
    values.sort()
    return values[(len(values) - 1) // 2]  # the lower median: half the hours may be a pump


def _windows(sc: _Scope, m: int, start: int) -> tuple[int, int, int]:
    """(spend of the minutes m-59..m-1, spend of the hours h-23..h-1, typical hour) of a spend
    scope at minute ``m``: the scope's running minute totals and hour sums (core/population.py:
    a few look-ups a minute instead of 80; integer sums, equal to summing the buckets whatever
    the order of writes), the typical hour memoized per (hour, start)."""
    i = _totals(sc, m)
    pn = sc.pn
    h = m // 60
    day = _hour_sums(sc, h)[0]
    if sc.typ_key != (h, start):
        sc.typ = _typical(sc, h, start)
        sc.typ_key = (h, start)
        if 60 * h > sc.watch:
            sc.watch = 60 * h
    return pn[i] - pn[i - 59], day, sc.typ


def _figures(view: PopulationView, key: str, ts: float) -> tuple[int, int, int] | None:
    """(allowed spend in the last 60 minutes, in the last 24 hours, typical hour) of a spend
    scope in units, or None when it has none: from the C store (core/_popcount.c) where the
    view has it, else from the scope's running totals (:func:`_windows`), the same figures."""
    m = int(ts) // MINUTE
    start = view.start_minute if view.start_minute is not None else m
    store = view.native
    if store is not None:
        got: tuple[int, int, int] | None = store.spend(key, m, start)
        return got
    sc = view.scopes.get(key)
    if sc is None:
        return None
    spend_h, spend_d, typ = _windows(sc, m, start)
    now_m, now_h = sc.minutes.get(m), sc.hours.get(m // 60)
    if now_m is not None:
        spend_h += now_m[0]
    if now_h is not None:
        spend_d += now_h[0]
    return spend_h, spend_d, typ


def typical_hour(view: PopulationView, key: str, ts: float) -> float:
    """Median allowed spend per hour (units) over the complete hours of the last 24 that the
    view has seen from their start (0 when there is none yet)."""
    got = _figures(view, key, ts)
    return 0.0 if got is None else float(got[2])


def window_spend(view: PopulationView, key: str, ts: float) -> tuple[int, int]:
    """(allowed spend in the last 60 minutes, in the last 24 hours) of a spend scope, in units."""
    got = _figures(view, key, ts)
    return (0, 0) if got is None else (got[0], got[1])


def campaign_boost(campaigns: Sequence[Campaign], region: str | None, ts: float, window_s: float) -> float:
    """How much declared campaigns raise a default budget over the window ``(ts - window_s, ts]``:
    ``1 + (factor - 1) x`` the share of the window the campaign covers (the largest over the
    campaigns of the region or ``*``). Its spend stays in the window after it ends, and so does
    the raise; a budget is not multiplied for a whole day by a 30-minute campaign.

    >>> c = Campaign("GB", 0.0, 1800.0, 30.0)
    >>> campaign_boost((c,), "GB", 1800.0, 3600.0), campaign_boost((c,), "GB", 5400.0, 3600.0)
    (15.5, 1.0)
    """
    if not region or not campaigns:
        return 1.0
    best = 1.0
    for c in campaigns:
        if c.country in (region, "*"):
            overlap = min(c.end, ts) - max(c.start, ts - window_s)
            if overlap > 0:
                best = max(best, 1.0 + (c.factor - 1.0) * overlap / window_s)
    return best


def _limits(view: PopulationView, key: str, ts: float, policy: SpendPolicy,
            campaigns: Sequence[Campaign], override: tuple[str, float] | None
            ) -> tuple[int, float, int, float, bool, str, Budget | None]:
    """:func:`breaker` in units, before the record: (spend 1 h, limit 1 h, spend 24 h, limit
    24 h, open, source, the configured budget)."""
    got = _figures(view, key, ts)  # window_spend and typical_hour in one go
    if got is None:
        spend_h = spend_d = 0
        typ = 0.0
    else:
        spend_h, spend_d, typ_units = got
        typ = float(typ_units)
    country = key.startswith(COUNTRY)
    configured = (policy.countries if country else policy.prefixes).get(key[3:])
    lim_h = lim_d = None
    if configured is not None:
        lim_h = None if configured.per_hour is None else configured.per_hour * SPEND_UNIT
        lim_d = None if configured.per_day is None else configured.per_day * SPEND_UNIT
    source = "policy" if configured is not None else "default"
    if lim_h is None or lim_d is None:
        floor_h, floor_d = ((policy.country_floor_hour, policy.country_floor_day) if country
                            else (policy.prefix_floor_hour, policy.prefix_floor_day))
        if lim_h is None:
            lim_h = max(floor_h * SPEND_UNIT, policy.hour_factor * typ)
            if campaigns:  # (a boost of 1.0 changes nothing)
                lim_h *= campaign_boost(campaigns, scope_region(key), ts, 3600.0)
        if lim_d is None:
            lim_d = max(floor_d * SPEND_UNIT, policy.day_factor * 24.0 * typ)
            if campaigns:
                lim_d *= campaign_boost(campaigns, scope_region(key), ts, 86400.0)
    is_open = spend_h >= lim_h or spend_d >= lim_d
    if override is not None:
        what, factor = override
        source = "soc"
        if what == "raise":
            lim_h, lim_d = lim_h * factor, lim_d * factor
            is_open = spend_h >= lim_h or spend_d >= lim_d
        else:
            is_open = what == "open"
    return spend_h, lim_h, spend_d, lim_d, is_open, source, configured


def _state(key: str, v: tuple[int, float, int, float, bool, str, Budget | None]) -> BreakerState:
    spend_h, lim_h, spend_d, lim_d, is_open, source, configured = v
    return BreakerState(key, spend_h / SPEND_UNIT, lim_h / SPEND_UNIT, spend_d / SPEND_UNIT,
                        lim_d / SPEND_UNIT, is_open, source,
                        configured.action if configured is not None else None)


def _ratio(v: tuple[int, float, int, float, bool, str, Budget | None]) -> float:
    """:attr:`BreakerState.ratio` of :func:`_limits`' values (the same float operations)."""
    limit_1h, limit_24h = v[1] / SPEND_UNIT, v[3] / SPEND_UNIT
    return max(v[0] / SPEND_UNIT / limit_1h if limit_1h > 0 else 0.0,
               v[2] / SPEND_UNIT / limit_24h if limit_24h > 0 else 0.0)


def breaker(view: PopulationView, key: str, ts: float, policy: SpendPolicy,
            campaigns: Sequence[Campaign] = (), override: tuple[str, float] | None = None) -> BreakerState:
    """The breaker of spend scope ``key`` at ``ts`` (see the module doc); ``override`` is the
    SOC's (:meth:`ListIndex.budget_overrides`): ("closed" | "open" | "raise", factor)."""
    return _state(key, _limits(view, key, ts, policy, campaigns, override))


def breakers(view: PopulationView, ts: float, policy: SpendPolicy, campaigns: Sequence[Campaign] = (),
             lists: ListIndex | None = None) -> list[BreakerState]:
    """Every spend scope's breaker at ``ts`` (for gauges and logs), with the SOC's overrides."""
    keys = [k for k in view.scope_keys() if k[0] == "$"]
    forced = lists.budget_overrides(keys, now=ts) if lists is not None else {}
    return [breaker(view, k, ts, policy, campaigns, forced.get(k)) for k in keys]


# --------------------------------------------------------------------------- the breaker step


def price_decision(enr: Enrichment, risk: float,
                   ctx: DecisionContext) -> tuple[float | None, float, str | None]:
    """(cost_per_min, expected_cost, currency) of a decision (``decide`` fills them in)."""
    deck = ctx.rates
    if deck is None:
        return None, 0.0, None
    ph = enr.phone
    rate = deck.lookup(ph.e164) if ph.valid else None
    if rate is None:
        return None, 0.0, deck.currency
    return rate.cost_per_min, price(rate.cost_per_min, risk, ctx.policy.spend) / SPEND_UNIT, deck.currency


REPORT_RATIO = 0.5  # an allowed decision names its tightest breaker from half its budget on


def settle(d: Decision, req: CallbackRequest, enr: Enrichment, ctx: DecisionContext,
           view: PopulationView | None) -> Decision:
    """Apply the spend breakers of an allowed decision's scopes: an open breaker makes it
    ``spend_budget_exceeded`` (deflected, or blocked per policy; an authenticated customer
    deflected); otherwise its expected spend (priced by ``decide``) is counted in ``view``.
    ``budget`` names the tightest breaker when it is open or at least half spent (or a SOC
    override applies).

    Call it once per decision, in commit order (the replay path and the range stage both do,
    before the outstanding-callback commit): the result does not depend on how requests were
    batched. Returns ``d`` itself when nothing changes (most decisions)."""
    if d.action != Action.ALLOW or not d.expected_cost or view is None or not ctx.use_rules:
        return d
    pol = ctx.policy
    sp: SpendPolicy = pol.spend
    ph = enr.phone
    rate = ctx.rates.lookup(ph.e164) if ctx.rates is not None else None
    units = round(d.expected_cost * SPEND_UNIT)
    keys = spend_scopes(ph.e164, ph.region, rate.prefix if rate is not None else None, sp)
    forced = ctx.lists.budget_overrides(keys, now=req.ts)
    campaigns = pol.population.campaigns
    # Each breaker's figures; a BreakerState (a record) only for the one the decision names.
    limits = [_limits(view, k, req.ts, sp, campaigns, forced.get(k) if forced else None) for k in keys]
    changes: dict[str, Any] = {}
    if any(v[4] for v in limits):
        opened = [i for i, v in enumerate(limits) if v[4]]
        rule = pol.rules[CODE]
        if rule.mode == "monitor":
            changes["monitored_reasons"] = (*d.monitored_reasons, CODE)
        else:
            action = rule.action
            for i in opened:
                configured = limits[i][6]
                if (configured is not None and configured.action is not None
                        and SEVERITY[configured.action] > SEVERITY[action]):
                    action = configured.action
            if action == Action.BLOCK and req.authenticated:
                action = Action.DEFLECT  # a customer we know is offered chat, never ignored
            if action != Action.ALLOW:
                changes.update(action=action, silent=rule.silent and action == Action.BLOCK,
                               reasons=(CODE, *d.reasons))
        top = max(opened, key=lambda i: _ratio(limits[i]))  # the first of the largest
        changes["budget"] = _state(keys[top], limits[top]).to_dict()
    elif limits:
        ratios = [_ratio(v) for v in limits]
        if forced or max(ratios) >= REPORT_RATIO:  # (the tightest's ratio is the largest)
            top = max(range(len(limits)), key=lambda i: (ratios[i], limits[i][5] == "soc"))
            changes["budget"] = _state(keys[top], limits[top]).to_dict()
    if "action" not in changes:
        view.observe(keys, req.ts, fresh=True, n=units)
    return dataclasses.replace(d, **changes) if changes else d


# --------------------------------------------------------------------------- policy section


def _num(where: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise PolicyError(f"{where}: expected a number in [{lo:g}, {hi:g}], got {_shown(value)}")
    return float(value)


def _budget(where: str, raw: Any) -> Budget:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: expected a table {{country | prefix, per_hour, per_day, action}}, "
                          f"got {_shown(raw)}")
    known = {"country", "prefix", "per_hour", "per_day", "action", "name"}
    extra = set(raw) - known
    if extra:
        raise PolicyError(f"{where}: unknown key(s) {sorted(extra)}; known: {sorted(known)}")
    country, prefix = raw.get("country"), raw.get("prefix")
    if (country is None) == (prefix is None):
        raise PolicyError(f"{where}: expected exactly one of country = \"GB\" or prefix = \"+4470\"")
    if country is not None:
        if not (isinstance(country, str) and len(country) == 2 and country.isascii() and country.isalpha()):
            raise PolicyError(f"{where}.country: expected an ISO alpha-2 code, got {_shown(country)}")
        scope = country.upper()
    else:
        digits = prefix[1:] if isinstance(prefix, str) else ""
        if (not isinstance(prefix, str) or not prefix.startswith("+") or not digits.isascii()
                or not digits.isdigit() or len(digits) > 15):
            raise PolicyError(f"{where}.prefix: expected '+' and 1 to 15 digits (E.164), "
                              f"got {_shown(prefix)}")
        scope = prefix
    per_hour = None if raw.get("per_hour") is None else _num(f"{where}.per_hour", raw["per_hour"], 0.0, 1e12)
    per_day = None if raw.get("per_day") is None else _num(f"{where}.per_day", raw["per_day"], 0.0, 1e12)
    if per_hour is None and per_day is None:
        raise PolicyError(f"{where}: expected per_hour and/or per_day (money, in spend.currency)")
    action = raw.get("action")
    if action is not None and action not in ("deflect", "block"):
        raise PolicyError(f"{where}.action: expected deflect or block, got {_shown(action)}")
    return Budget(scope, per_hour, per_day, None if action is None else Action(action))


def parse_spend_policy(raw: Mapping[str, Any]) -> SpendPolicy:
    """Validate the ``[spend]`` section (errors name ``spend.<key>``)."""
    d = SpendPolicy()
    known = {f.name for f in dataclasses.fields(SpendPolicy)} - {"countries", "prefixes", "prefix_lengths"}
    extra = set(raw) - known
    if extra:
        raise PolicyError(f"spend: unknown key(s) {sorted(extra)}; known: {sorted(known)}")
    currency = raw.get("currency", d.currency)
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isascii() \
            or not currency.isalpha() or not currency.isupper():
        raise PolicyError(f"spend.currency: expected an ISO 4217 code such as EUR, got {_shown(currency)}")
    values = {name: _num(f"spend.{name}", raw.get(name, getattr(d, name)), lo, hi) for name, lo, hi in (
        ("legit_minutes", 0.0, 1440.0), ("pumped_minutes", 0.0, 1440.0), ("hour_factor", 1.0, 1e6),
        ("day_factor", 1.0, 1e6), ("country_floor_hour", 0.0, 1e12), ("country_floor_day", 0.0, 1e12),
        ("prefix_floor_hour", 0.0, 1e12), ("prefix_floor_day", 0.0, 1e12))}
    raw_budgets = raw.get("budgets", [])
    if not isinstance(raw_budgets, list):
        raise PolicyError("spend.budgets: expected an array of tables [[spend.budgets]], "
                          f"got {_shown(raw_budgets)}")
    budgets = tuple(_budget(f"spend.budgets[{i}]", b) for i, b in enumerate(raw_budgets))
    countries: dict[str, Budget] = {}
    prefixes: dict[str, Budget] = {}
    for i, b in enumerate(budgets):
        table = prefixes if b.scope.startswith("+") else countries
        if b.scope in table:
            raise PolicyError(f"spend.budgets[{i}]: a second budget for {b.scope}")
        table[b.scope] = b
    return SpendPolicy(currency=currency, budgets=budgets, countries=countries, prefixes=prefixes,
                       prefix_lengths=tuple(sorted({len(p) for p in prefixes}, reverse=True)), **values)


def check_currency(policy: SpendPolicy, deck: RateDeck | None) -> None:
    """The rate deck's money and the policy's budgets must be in the same currency."""
    if deck is not None and deck.currency != policy.currency:
        raise ConfigError(f"rate deck {deck.source}: currency {deck.currency} differs from the policy's "
                          f"spend.currency {policy.currency} (budgets and floors are in "
                          f"{policy.currency}); set spend.currency = \"{deck.currency}\" and budgets in it")
