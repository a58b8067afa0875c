from dataclasses import replace

import pytest

from detector.core.decide import DecisionContext, combine, decide, decide_many
from detector.core.features import FEATURE_NAMES
from detector.core.lists import ListIndex, make_entry
from detector.core.policy import load_policy, parse_policy
from detector.core.records import (
    Action,
    CallbackRequest,
    Counts,
    Enrichment,
    Hit,
    IpCounts,
    IpInfo,
    ModelResult,
    PhoneInfo,
    RangeCounts,
)

POLICY = load_policy()
GB_MOBILE = PhoneInfo("+447400123456", True, True, True, "GB", 44, "MOBILE", "+447400123")
GB_IP = IpInfo("81.2.69.142", 4, "global", country="GB", asn=64500)
REQ = CallbackRequest("r1", 1795341600.0, "+447400123456", "81.2.69.142")


TWO_NUMBERS = IpCounts(ip_distinct_numbers_24h=2)


def phone(**kw):
    return replace(GB_MOBILE, **kw)


def ip(**kw):
    return replace(GB_IP, **kw)


CASES = [
    # name, phone, ip, counts, authenticated, action, silent, first reason
    ("clean", GB_MOBILE, GB_IP, Counts(), False, "allow", False, None),
    ("invalid", phone(valid=False, number_type="INVALID"), GB_IP, Counts(), False, "block", False, "invalid_number"),
    ("premium", phone(e164="+449098790879", number_type="PREMIUM_RATE"), GB_IP, Counts(), False, "block", True,
     "denied_prefix"),
    ("premium_not_prefix_listed", phone(e164="+441234567890", number_type="PREMIUM_RATE"), GB_IP, Counts(), False,
     "block", True, "number_type_premium_rate"),
    ("irsf_destination", phone(e164="+252901234567", region="SO", country_code=252), ip(country="SO"), Counts(),
     False, "block", True, "denied_prefix"),
    ("not_allowed_country", phone(e164="+5511912345678", region="BR", country_code=55), ip(country="BR"), Counts(),
     False, "block", False, "destination_not_allowed"),
    ("voip", phone(number_type="VOIP"), GB_IP, Counts(), False, "deflect", False, "number_type_voip"),
    ("tor", GB_MOBILE, ip(tor_exit=True), Counts(), False, "deflect", False, "anonymous_ip"),
    ("tor_authenticated", GB_MOBILE, ip(tor_exit=True), Counts(), True, "allow", False, "anonymous_ip"),
    ("vpn_alone_weighs", GB_MOBILE, ip(anonymous_vpn=True), Counts(), False, "allow", False, "vpn_ip"),
    ("vpn_and_foreign_ip", GB_MOBILE, ip(anonymous_vpn=True, country="NG"), Counts(ip=TWO_NUMBERS), False, "deflect",
     False, "geo_mismatch"),
    ("hosting", GB_MOBILE, ip(hosting=True), Counts(), False, "deflect", False, "hosting_ip"),
    ("geo_mismatch", GB_MOBILE, ip(country="NG"), Counts(ip=TWO_NUMBERS), False, "deflect", False, "geo_mismatch"),
    # a traveller abroad asking for their own number: the first number from that IP only weighs
    ("geo_mismatch_first_number", GB_MOBILE, ip(country="NG"), Counts(ip=IpCounts(ip_distinct_numbers_24h=1)), False,
     "allow", False, "geo_mismatch"),
    ("pending", GB_MOBILE, GB_IP, Counts(rng=RangeCounts(pending=True)), False, "block", True, "duplicate_pending"),
    ("velocity_number", GB_MOBILE, GB_IP, Counts(rng=RangeCounts(number_15m=8)), False, "block", True,
     "velocity_number"),
    ("velocity_number_at_limit", GB_MOBILE, GB_IP, Counts(rng=RangeCounts(number_15m=7)), False, "allow", False,
     None),
    # Shared IPs (carrier NAT, offices) produce these: they deflect, never block silently alone.
    ("numbers_per_ip", GB_MOBILE, GB_IP, Counts(ip=IpCounts(ip_distinct_numbers_1h=4)), False, "deflect", False,
     "many_numbers_per_ip"),
    ("numbers_per_shared_ip_relaxed", GB_MOBILE, GB_IP,
     Counts(ip=IpCounts(ip_distinct_numbers_1h=30, ip_distinct_numbers_24h=100, ip_shared=1)), False, "allow",
     False, None),
    ("numbers_per_shared_ip_past_relaxed_limit", GB_MOBILE, GB_IP,
     Counts(ip=IpCounts(ip_distinct_numbers_1h=151, ip_shared=1)), False, "deflect", False, "many_numbers_per_ip"),
    ("velocity_ip_deflects", GB_MOBILE, GB_IP, Counts(ip=IpCounts(ip_15m=11)), False, "deflect", False,
     "velocity_ip"),
    ("recombined_ips_and_numbers", GB_MOBILE, GB_IP,
     Counts(ip=IpCounts(ip_distinct_numbers_24h=3), rng=RangeCounts(number_distinct_ips_24h=3)), False, "deflect",
     False, "ip_number_recombination"),
    ("shared_ip_and_soft_signals_never_block", GB_MOBILE, ip(country="NG", anonymous_vpn=True),
     Counts(ip=IpCounts(ip_15m=40, ip_distinct_numbers_1h=9, ip_distinct_countries_24h=7)), False, "deflect",
     False, "many_countries_per_ip"),
    ("range_pumping", GB_MOBILE, GB_IP, Counts(rng=RangeCounts(range_distinct_ips_24h=9)), False, "block", True,
     "range_many_ips"),
    ("combined_soft_signals_deflect", phone(number_type="VOIP"), ip(country="NG", tor_exit=True, hosting=True),
     Counts(), False, "deflect", False, "anonymous_ip"),
    ("private_ip_is_noted_not_blocked", GB_MOBILE, ip(scope="private", country=None), Counts(), False, "allow",
     False, "ip_not_global"),
]


@pytest.mark.parametrize(("name", "ph", "ipi", "counts", "auth", "action", "silent", "first"), CASES,
                         ids=[c[0] for c in CASES])
def test_rule_table(name, ph, ipi, counts, auth, action, silent, first):
    ctx = DecisionContext(POLICY, ListIndex.from_policy(dict(POLICY.deny), dict(POLICY.allow)))
    d = decide(replace(REQ, authenticated=auth), Enrichment(ph, ipi), counts, ctx, decided_at=1.0)
    assert (str(d.action), d.silent) == (action, silent), d.reasons
    assert (d.reasons[0] if d.reasons else None) == first
    assert 0.0 <= d.risk <= 1.0


def test_combined_risk_blocks_only_with_a_corroborating_signal():
    # velocity_pair made a weight-only rule: with soft signals the risk passes block_at, and
    # velocity_pair (not a soft code) corroborates, so the combined risk may block.
    pol = parse_policy({"rules": {"velocity_pair": {"action": "allow", "silent": False, "weight": 0.8}}})
    enr = Enrichment(phone(number_type="VOIP"), ip(country="NG", hosting=True))
    ctx = DecisionContext(pol)
    d = decide(REQ, enr, Counts(rng=RangeCounts(pair_1h=6)), ctx, decided_at=0)
    assert (d.action, d.silent, d.reasons[0]) == (Action.BLOCK, True, "combined_risk")
    d = decide(REQ, enr, Counts(), ctx, decided_at=0)
    assert (d.action, d.silent) == (Action.DEFLECT, False)


def test_deny_list_blocks_silently_and_allow_list_overrides():
    lists = ListIndex([make_entry("deny", "ip", "81.2.69.142")])
    ctx = DecisionContext(POLICY, lists)
    d = decide(REQ, Enrichment(GB_MOBILE, GB_IP), Counts(), ctx, decided_at=0.0)
    assert (d.action, d.silent, d.reasons) == (Action.BLOCK, True, ("denylist_ip",))
    lists.add(make_entry("allow", "number", "+447400123456"))
    d = decide(REQ, Enrichment(GB_MOBILE, GB_IP), Counts(), ctx, decided_at=0.0)
    assert d.action is Action.ALLOW


def test_unauthenticated_rule_can_be_switched_on():
    pol = parse_policy({"rules": {"unauthenticated": {"action": "deflect", "weight": 0.3}}})
    ctx = DecisionContext(pol)
    assert decide(REQ, Enrichment(GB_MOBILE, GB_IP), Counts(), ctx, decided_at=0).action is Action.DEFLECT
    authed = replace(REQ, authenticated=True)
    assert decide(authed, Enrichment(GB_MOBILE, GB_IP), Counts(), ctx, decided_at=0).action is Action.ALLOW


class FixedScorer:
    """A stand-in model with a fixed answer, to test how decide() uses a Scorer."""

    def __init__(self, anomaly, version="m1"):
        self.version, self.anomaly = version, anomaly

    def score(self, x):
        assert len(x) == len(FEATURE_NAMES)
        return ModelResult(self.version, self.anomaly, self.anomaly >= 0.6, ("log_range_24h",))


def test_model_adds_anomalous_pattern_and_is_recorded():
    ctx = DecisionContext(POLICY, model=FixedScorer(0.9), shadow=FixedScorer(0.2, "cand"))
    d = decide(REQ, Enrichment(GB_MOBILE, GB_IP), Counts(), ctx, decided_at=0)
    # The shipped policy: the model weighs (0.6 x anomaly) but never acts alone ...
    assert d.action is Action.ALLOW and d.reasons == ("anomalous_pattern",) and d.risk == pytest.approx(0.54)
    assert d.model_version == "m1"
    assert d.model["top_features"] == ["log_range_24h"] and d.model["shadow_version"] == "cand"
    # ... it tips another soft signal into a deflection (VPN 0.35 + model 0.54 -> 0.70) ...
    vpn = Enrichment(GB_MOBILE, ip(anonymous_vpn=True))
    assert decide(REQ, vpn, Counts(), ctx, decided_at=0).action is Action.DEFLECT
    ctx.use_model = False  # rules only: the model is scored but does not act
    assert decide(REQ, vpn, Counts(), ctx, decided_at=0).action is Action.ALLOW
    # ... and a policy may let it act alone.
    acting = parse_policy({"rules": {"anomalous_pattern": {"action": "deflect", "weight": 0.6}}})
    d = decide(REQ, Enrichment(GB_MOBILE, GB_IP), Counts(), DecisionContext(acting, model=FixedScorer(0.9)),
               decided_at=0)
    assert d.action is Action.DEFLECT and d.reasons == ("anomalous_pattern",)


def test_shadow_model_never_acts():
    ctx = DecisionContext(POLICY, shadow=FixedScorer(0.99, "cand"))
    d = decide(REQ, Enrichment(GB_MOBILE, GB_IP), Counts(), ctx, decided_at=0)
    assert d.action is Action.ALLOW and d.model["shadow_anomaly"] == 0.99 and d.model_version is None


class CountingScorer(FixedScorer):
    """Answers by the first feature, counts calls; scores batches like ForestScorer."""

    def __init__(self):
        super().__init__(0.0)
        self.calls = 0

    def score_batch(self, xs):
        self.calls += 1
        return [ModelResult(self.version, min(1.0, x[0] / 10.0), x[0] >= 6.0, ()) for x in xs]

    def score(self, x):
        return self.score_batch([x])[0]


def test_decide_many_is_decide_for_each_with_one_model_call():
    items = [(replace(REQ, request_id=f"r{i}", authenticated=i % 2 == 0), Enrichment(GB_MOBILE, GB_IP),
              Counts(IpCounts(i, i, i, 1, 1, 1))) for i in range(1, 12)]
    batch_ctx = DecisionContext(POLICY, model=CountingScorer(), shadow=FixedScorer(0.3, "cand"))
    one_ctx = DecisionContext(POLICY, model=CountingScorer(), shadow=FixedScorer(0.3, "cand"))
    many = decide_many(items, batch_ctx, decided_at=5.0)
    assert batch_ctx.model.calls == 1
    assert many == [decide(r, e, c, one_ctx, decided_at=5.0) for r, e, c in items]
    assert one_ctx.model.calls == len(items)
    assert {d.action for d in many} >= {Action.ALLOW, Action.DEFLECT}  # the scores mattered
    assert decide_many([], batch_ctx, decided_at=0.0) == []


def test_combine_orders_reasons_and_bounds_risk():
    hits = [Hit("b", 0.3, Action.DEFLECT), Hit("a", 0.9, Action.BLOCK, silent=True), Hit("c", 0.0, Action.ALLOW)]
    action, silent, risk, reasons = combine(hits, POLICY)
    assert (action, silent, reasons) == (Action.BLOCK, True, ["a", "b"])
    assert risk == pytest.approx(1 - 0.7 * 0.1)


def test_request_to_dict_is_asdict():
    from dataclasses import asdict

    full = replace(REQ, country_hint="GB", user_id="u1", authenticated=True, session_id="s", user_agent="ua")
    for r in (REQ, full):
        assert r.to_dict() == asdict(r) and list(r.to_dict()) == list(asdict(r))
