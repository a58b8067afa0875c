"""Pre-check for the web tier: should the page offer a callback to this visitor at all?

``GET /v1/precheck?ip=...`` (see :mod:`detector.stream.precheck`) answers from what the detector
already knows of the visitor's IP, without creating a request or counting anything: the rules
that need only the IP, evaluated as :func:`detector.core.decide.decide` would for the visitor's
*next* request (the IP's counts plus one, a new number), combined the same way
(:func:`~detector.core.decide.combine`), then agent capacity. ``show_callback`` is true when that
next request would be allowed.

What is judged (codes as in decisions):

* deny lists: ``denylist_ip``, ``denylist_cidr``, ``denylist_asn``, ``denylist_country`` (the IP's
  country); an allow entry for the IP wins, as in decisions;
* IP data: ``anonymous_ip``, ``vpn_ip``, ``hosting_ip``, ``ip_not_global``;
* IP velocity from the ``ip`` table: ``velocity_ip``, ``many_numbers_per_ip``,
  ``many_countries_per_ip`` (with the shared-IP relaxation);
* surges: ``global_surge`` and ``country_surge`` of the destination country (the ``country``
  parameter, else the IP's country), and the SOC's forced under-attack modes;
* ``unauthenticated`` when the policy acts on it; ``agent_capacity`` at the current tier.

Number rules (type, destination, prefix, number and range velocity, pending callbacks) need the
number and are judged when the request arrives; the model does too. Monitor-mode rules never hide
the callback. A hidden callback is a deflection, never a verdict: the request path still decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from detector.core import population as pop
from detector.core import windows as w
from detector.core.decide import (
    VELOCITY_RULES,
    DecisionContext,
    _hit,
    capacity_deflects,
    combine,
    population_hits,
)
from detector.core.records import (
    Action,
    CallbackRequest,
    Counts,
    Enrichment,
    Hit,
    IpCounts,
    IpInfo,
    PhoneInfo,
)
from detector.core.state import IpState, shared_ip

IP_VELOCITY_RULES = tuple(r for r in VELOCITY_RULES if r[1].startswith("ip_"))


@dataclass(frozen=True, slots=True)
class PrecheckResult:
    """The answer: offer the callback or not, and the reason codes (most important first)."""

    show_callback: bool
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"show_callback": self.show_callback, "reasons": list(self.reasons)}


def next_ip_counts(ip: IpInfo, value: IpState | None, now: float, ctx: DecisionContext
                   ) -> IpCounts:
    """The IP-side counts the visitor's next request would have at ``now``: the stored counts
    plus one, for a new number in a range and country already seen (the strictest case for the
    shared-IP evidence). ``value`` is the ``ip`` table's value for the IP (None: not seen in
    24 h). Reads only, writes nothing."""
    if value is None:
        value = IpState()
    c15, c1h, c24 = w.count_read(value.requests, now)
    n1h, n24 = w.distinct_read(value.numbers, now)
    _, k24 = w.distinct_read(value.countries, now)
    _, r24 = w.distinct_read(value.ranges, now)
    c15, c1h, c24, n1h, n24 = c15 + 1, c1h + 1, c24 + 1, n1h + 1, n24 + 1
    enr = Enrichment(_NO_PHONE, ip)
    shared = shared_ip(enr, c15, c1h, n24, k24, ctx.policy.shared_ip, r24)
    return IpCounts(c15, c1h, c24, n1h, n24, k24, 1 if c24 == 1 else 0, 1 if shared else 0)


_NO_PHONE = PhoneInfo(None, False, False, False, None, None, "UNKNOWN", None)


def precheck_hits(ip: IpInfo, authenticated: bool, counts: IpCounts, ctx: DecisionContext, *,
                  view: pop.PopulationView, country: str | None, now: float) -> list[Hit]:
    """Every IP-only rule that would fire for the visitor's next request (see the module doc)."""
    pol = ctx.policy
    hits: list[Hit] = []

    def add(code: str, rule_code: str | None = None) -> None:
        hits.append(_hit(code, pol.rules[rule_code or code], authenticated, pol))

    denied, allowed = ctx.lists.match(None, None, ip.ip, ip.country, ip.asn, now=now)
    if not allowed:
        for kind in denied:
            add(f"denylist_{kind}", "denylist")
    if ip.tor_exit or ip.public_proxy or ip.residential_proxy:
        add("anonymous_ip")
    elif ip.anonymous_vpn:
        add("vpn_ip")
    if ip.hosting:
        add("hosting_ip")
    if ip.scope != "global":
        add("ip_not_global")
    unauth = pol.rules["unauthenticated"]
    if not authenticated and (unauth.weight > 0 or unauth.action != Action.ALLOW):
        add("unauthenticated")
    fired: set[str] = set()
    relaxed: tuple[str, ...] = pol.shared_ip.relaxed if counts.ip_shared else ()
    for key, attr, code in IP_VELOCITY_RULES:
        limit = pol.velocity[key] * (pol.shared_ip.factor if key in relaxed else 1)
        if code not in fired and getattr(counts, attr) > limit:
            fired.add(code)
            add(code)
    region = country or ip.country
    surge = pop.read(view, (pop.GLOBAL,), now, region, pol.population)
    req = CallbackRequest("precheck", now, "", ip.ip, authenticated=authenticated)
    phone = PhoneInfo(None, False, False, False, region, None, "UNKNOWN", None)
    hits.extend(population_hits(req, Enrichment(phone, ip), Counts(counts, pop=surge), ctx))
    return hits


def precheck(ip: IpInfo, authenticated: bool, value: IpState | None,
             ctx: DecisionContext, *, view: pop.PopulationView, country: str | None,
             now: float) -> PrecheckResult:
    """Whether to offer the callback to a visitor from ``ip`` (see the module doc)."""
    counts = next_ip_counts(ip, value, now, ctx)
    hits = [h for h in precheck_hits(ip, authenticated, counts, ctx, view=view, country=country,
                                     now=now) if not h.monitored]
    action, _, risk, reasons = combine(hits, ctx.policy)
    if action == Action.ALLOW and capacity_deflects(authenticated, counts.ip_fresh == 1, risk, ctx,
                                                    now):
        rule = ctx.policy.rules["agent_capacity"]
        if rule.mode != "monitor" and rule.action == Action.DEFLECT:
            action = Action.DEFLECT
            reasons.insert(0, "agent_capacity")
    return PrecheckResult(action == Action.ALLOW, tuple(reasons))
