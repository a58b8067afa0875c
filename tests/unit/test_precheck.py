"""The web tier's pre-check (detector/core/precheck.py): the IP-only rules, judged for the
visitor's next request from the stored state, without counting anything."""

from __future__ import annotations

import copy

from detector.core import state
from detector.core.capacity import CapacityGate, QueueState
from detector.core.decide import DecisionContext, decide
from detector.core.ipintel import IpIntel
from detector.core.lists import ListIndex, make_entry
from detector.core.pipeline import Detector, enrich
from detector.core.policy import load_policy, parse_policy
from detector.core.population import PopulationView, scopes
from detector.core.precheck import next_ip_counts, precheck
from detector.core.records import CallbackRequest, Counts
from tests.unit.test_decide import GB_IP, ip

T = 1795341600.0
POLICY = load_policy()


def check(ip_info=GB_IP, *, auth=False, value=None, ctx=None, view=None, country=None, now=T):
    ctx = ctx or DecisionContext(policy=POLICY)
    return precheck(ip_info, auth, value, ctx, view=view or PopulationView(), country=country, now=now)


def ip_value(n: int, *, numbers: int | None = None, start: float = T - 300, step: float = 10.0
             ) -> state.IpState:
    """The ``ip`` table value after ``n`` requests from GB_IP (``numbers`` distinct numbers)."""
    stores = state.IpStores()
    for i in range(n):
        k = i % (numbers or n)
        req = CallbackRequest(f"r{i}", start + i * step, f"+44790{k:07d}", GB_IP.ip)
        state.ip_stage(stores, req, enrich(req, IpIntel(), POLICY), POLICY.shared_ip, key=b"k" * 32)
    return stores.ip[GB_IP.ip]


def test_a_clean_new_ip_is_shown_the_callback() -> None:
    r = check()
    assert r.to_dict() == {"show_callback": True, "reasons": []}


def test_deny_lists_hide_it_and_an_allow_entry_wins() -> None:
    deny = ListIndex([make_entry("deny", "ip", GB_IP.ip, reason="t"),
                      make_entry("deny", "asn", "64500", reason="t")])
    r = check(ctx=DecisionContext(policy=POLICY, lists=deny))
    assert not r.show_callback and set(r.reasons) == {"denylist_ip", "denylist_asn"}
    cidr = ListIndex([make_entry("deny", "cidr", "81.2.69.0/24", reason="t")])
    assert check(ctx=DecisionContext(policy=POLICY, lists=cidr)).reasons == ("denylist_cidr",)
    both = ListIndex([*deny.entries(), make_entry("allow", "ip", GB_IP.ip, reason="customer")])
    assert check(ctx=DecisionContext(policy=POLICY, lists=both)).show_callback
    number = ListIndex([make_entry("deny", "number", "+447400123456", reason="t")])
    assert check(ctx=DecisionContext(policy=POLICY, lists=number)).show_callback  # needs a number


def test_anonymity_and_hosting_hide_it_unless_authenticated() -> None:
    tor = check(ip(tor_exit=True))
    assert not tor.show_callback and tor.reasons == ("anonymous_ip",)
    assert check(ip(tor_exit=True), auth=True).show_callback  # relaxed for customers
    assert check(ip(hosting=True)).reasons == ("hosting_ip",)
    vpn = check(ip(anonymous_vpn=True))
    assert vpn.show_callback and vpn.reasons == ("vpn_ip",)  # weighs, does not act alone
    both = check(ip(anonymous_vpn=True, hosting=True))
    assert not both.show_callback


def test_ip_velocity_is_judged_for_the_next_request_from_the_table_without_writing() -> None:
    value = ip_value(10, numbers=1)  # 10 requests in 15 min: the 11th would exceed ip_15m = 10
    before = copy.deepcopy(value)
    r = check(value=value)
    assert not r.show_callback and r.reasons[0] == "velocity_ip"
    assert value == before  # nothing counted
    assert check(value=ip_value(9, numbers=1)).show_callback
    assert check(value=value, auth=True).show_callback  # velocity_ip is relaxed for customers
    # three distinct numbers in the hour: a fourth would be many_numbers_per_ip
    assert check(value=ip_value(3)).reasons[0] == "many_numbers_per_ip"
    counts = next_ip_counts(GB_IP, ip_value(3), T, DecisionContext(policy=POLICY))
    assert (counts.ip_15m, counts.ip_distinct_numbers_1h, counts.ip_fresh) == (4, 4, 0)
    # old state no longer counts: an hour later the 15-minute window is empty
    assert check(value=value, now=T + 3600).show_callback


def test_the_answer_agrees_with_the_decision_of_the_next_request() -> None:
    """Decide a stream of requests from one IP; before each, the pre-check predicted whether the
    IP rules would let it through."""
    det = Detector(DecisionContext(policy=POLICY), IpIntel())
    for i in range(14):
        ts = T + i * 20
        value = det.ip_stores.ip.get(GB_IP.ip)
        predicted = check(value=value, now=ts, ctx=det.ctx, view=det.population)
        d = det.process(CallbackRequest(f"r{i}", ts, f"+44790{i:07d}", GB_IP.ip))
        ip_reasons = [r for r in d.reasons if r in ("velocity_ip", "many_numbers_per_ip",
                                                    "many_countries_per_ip")]
        assert predicted.show_callback == (not ip_reasons), (i, predicted, d.reasons)
        if ip_reasons:
            assert ip_reasons[0] in predicted.reasons


def test_a_surge_of_the_destination_country_hides_it_from_the_unauthenticated() -> None:
    forced = ListIndex([make_entry("deny", "surge", "GB", reason="soc")])
    ctx = DecisionContext(policy=POLICY, lists=forced)
    r = check(ctx=ctx)
    assert not r.show_callback and r.reasons == ("country_surge",)
    assert check(ctx=ctx, auth=True).show_callback
    assert check(ctx=ctx, country="FR").show_callback  # the site serves another country
    # a measured surge: the population view of the destination country
    view = PopulationView()
    for i in range(200):
        view.observe(scopes("+447400123456", "GB", POLICY.population), T - 300 + i, fresh=True)
    measured = check(view=view)
    assert not measured.show_callback and measured.reasons[0] == "country_surge"
    assert check(view=view, country="FR").reasons == ("global_surge",)  # weighs only
    assert check(view=view, country="FR").show_callback


def test_agent_capacity_hides_it_by_trust_tier() -> None:
    gate = CapacityGate()
    gate.apply(QueueState("lon-1", T, 8, 5, 240.0), POLICY.capacity)  # tier 1
    ctx = DecisionContext(policy=POLICY, capacity=gate)
    assert check(ctx=ctx).reasons == ("agent_capacity",)  # a new IP is low trust
    assert check(ctx=ctx, value=ip_value(2, numbers=1)).show_callback  # a known IP is not
    assert check(ctx=ctx, auth=True).show_callback
    gate.apply(QueueState("lon-1", T + 1, 30, 5, 240.0), POLICY.capacity)  # tier 3
    assert check(ctx=ctx, auth=True, now=T + 1).reasons == ("agent_capacity",)
    assert check(ctx=ctx, auth=True, now=T + 100).show_callback  # stale: fail open
    mon = DecisionContext(policy=parse_policy({"rules": {"agent_capacity": {"mode": "monitor"}}}),
                          capacity=gate)
    assert check(ctx=mon, now=T + 1).show_callback


def test_monitor_mode_rules_never_hide_it() -> None:
    pol = parse_policy({"rules": {"anonymous_ip": {"mode": "monitor"}}})
    assert check(ip(tor_exit=True), ctx=DecisionContext(policy=pol)).show_callback


def test_unauthenticated_rule_when_the_policy_requires_login() -> None:
    pol = parse_policy({"rules": {"unauthenticated": {"action": "deflect", "weight": 0.2}}})
    ctx = DecisionContext(policy=pol)
    assert check(ctx=ctx).reasons == ("unauthenticated",)
    assert check(ctx=ctx, auth=True).show_callback
    d = decide(CallbackRequest("r", T, "+447400123456", GB_IP.ip), enrich(
        CallbackRequest("r", T, "+447400123456", GB_IP.ip), IpIntel(), pol), Counts(), ctx,
        decided_at=T)
    assert "unauthenticated" in d.reasons
