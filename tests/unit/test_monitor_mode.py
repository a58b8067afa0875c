"""Monitor mode per rule, and policy hot reload (PolicyWatcher)."""

import os
import time

import pytest

from detector import metrics
from detector.core.decide import DecisionContext, decide
from detector.core.errors import PolicyError
from detector.core.lists import ListIndex, make_entry
from detector.core.policy import load_policy, parse_policy
from detector.core.records import Counts, Decision, Enrichment, IpCounts, RangeCounts, decision_from_dict
from detector.policy_watch import PolicyWatcher
from tests.unit.test_decide import GB_IP, GB_MOBILE, REQ, ip, phone

VELOCITY = Counts(rng=RangeCounts(number_15m=20))


NO_COUNTS = Counts()


def _decide(policy, enr, counts=NO_COUNTS) -> Decision:
    return decide(REQ, enr, counts, DecisionContext(policy=policy), decided_at=REQ.ts)


@pytest.mark.parametrize(
    ("section", "code", "enr", "counts", "reason"),
    [
        ("rules", "velocity_number", Enrichment(GB_MOBILE, GB_IP), VELOCITY, "velocity_number"),
        ("rules", "anonymous_ip", Enrichment(GB_MOBILE, ip(tor_exit=True)), Counts(), "anonymous_ip"),
        ("number_types", "VOIP", Enrichment(phone(number_type="VOIP"), GB_IP), Counts(), "number_type_voip"),
        ("rules", "geo_mismatch", Enrichment(GB_MOBILE, ip(country="BR")),
         Counts(ip=IpCounts(ip_distinct_numbers_24h=2)), "geo_mismatch"),
    ],
)
def test_monitored_rule_is_reported_but_does_not_act(section, code, enr, counts, reason):
    enforced = _decide(load_policy(), enr, counts)
    assert reason in enforced.reasons and enforced.action != "allow"
    monitored = _decide(parse_policy({section: {code: {"mode": "monitor"}}}), enr, counts)
    assert monitored.monitored_reasons == (reason,)
    assert reason not in monitored.reasons
    assert monitored.action == "allow" and monitored.risk < enforced.risk
    clean = _decide(load_policy(), Enrichment(GB_MOBILE, GB_IP))
    assert (monitored.action, monitored.risk) == (clean.action, clean.risk)


def test_monitored_and_enforced_together():
    pol = parse_policy({"rules": {"anonymous_ip": {"mode": "monitor"}}})
    d = _decide(pol, Enrichment(phone(number_type="VOIP"), ip(tor_exit=True)))
    assert d.reasons[0] == "number_type_voip" and "anonymous_ip" not in d.reasons
    assert d.monitored_reasons == ("anonymous_ip",)


def test_denylist_in_monitor_mode():
    pol = parse_policy({"rules": {"denylist": {"mode": "monitor"}}})
    lists = ListIndex([make_entry("deny", "number", GB_MOBILE.e164, reason="t")])
    d = decide(REQ, Enrichment(GB_MOBILE, GB_IP), Counts(), DecisionContext(policy=pol, lists=lists),
               decided_at=REQ.ts)
    assert d.action == "allow" and d.monitored_reasons == ("denylist_number",)


def test_mode_is_validated():
    with pytest.raises(PolicyError, match=r"rules.velocity_ip.mode: expected one of enforce, monitor, got 'shadow'"):
        parse_policy({"rules": {"velocity_ip": {"mode": "shadow"}}})


def test_monitored_reasons_round_trip_and_schema():
    import json
    from pathlib import Path

    import jsonschema

    pol = parse_policy({"rules": {"anonymous_ip": {"mode": "monitor"}}})
    d = _decide(pol, Enrichment(GB_MOBILE, ip(tor_exit=True)))
    wire = d.to_dict()
    assert wire["monitored_reasons"] == ["anonymous_ip"]
    assert decision_from_dict(wire) == d
    schema = json.loads(Path("detector/schemas/decision.schema.json").read_text())
    jsonschema.validate(wire, schema)
    from detector.stream.codec import decision_to_wire

    assert decision_to_wire(d) == wire


def test_monitored_hits_metric_uses_known_codes_only():
    pol = load_policy()
    metrics.set_known_reasons(pol.reason_codes())
    before = metrics.REGISTRY.get_sample_value("detector_monitored_hits_total", {"reason": "anonymous_ip"}) or 0
    other = metrics.REGISTRY.get_sample_value("detector_monitored_hits_total", {"reason": "other"}) or 0
    d = {"action": "allow", "silent": False, "reasons": [], "risk": 0.0, "enrichment": {},
         "monitored_reasons": ["anonymous_ip", "+447700900123"]}
    metrics.observe_decision(d)
    assert metrics.REGISTRY.get_sample_value("detector_monitored_hits_total",
                                             {"reason": "anonymous_ip"}) == before + 1
    assert metrics.REGISTRY.get_sample_value("detector_monitored_hits_total", {"reason": "other"}) == other + 1
    assert {"denylist_number", "number_type_voip", "combined_risk", "velocity_ip"} <= pol.reason_codes()


def _write(path, text):
    path.write_text(text)
    t = time.time() + (1 + path.stat().st_mtime_ns % 7)  # a distinct mtime, whatever the fs granularity
    os.utime(path, (t, t))


def test_policy_watcher_reloads_and_rejects(tmp_path, caplog):
    path = tmp_path / "policy.toml"
    _write(path, 'version = "v1"\n')
    ctx = DecisionContext(policy=load_policy(path))
    watcher = PolicyWatcher(path, ctx)
    assert watcher.check() is None  # unchanged
    _write(path, 'version = "v2"\n[rules]\nanonymous_ip = { action = "deflect", weight = 0.5, mode = "monitor" }\n'
                 '[deny]\nnumbers = ["+447700900123"]\n')
    new = watcher.check()
    assert new is not None and ctx.policy.version == "v2"
    assert ctx.lists.match("+447700900123", "GB", "1.2.3.4", None, None, now=0)[0] == ["number"]
    d = decide(REQ, Enrichment(GB_MOBILE, ip(tor_exit=True)), Counts(), ctx, decided_at=REQ.ts)
    assert d.policy_version == "v2" and d.monitored_reasons == ("anonymous_ip",)

    failures = metrics.REGISTRY.get_sample_value("detector_policy_reload_failures_total") or 0
    _write(path, 'version = "v3"\n[velocity]\nnumber_15m = 0\n')
    with caplog.at_level("ERROR", logger="detector.policy"):
        assert watcher.check() is None
    assert ctx.policy.version == "v2"  # the old one keeps running
    assert "velocity.number_15m: expected a positive integer, got 0" in caplog.text
    assert metrics.REGISTRY.get_sample_value("detector_policy_reload_failures_total") == failures + 1

    _write(path, 'version = "v4"\n[ranges]\ntrailing_digits = 4\n')
    assert watcher.check() is None and ctx.policy.version == "v2"
    assert "trailing_digits" in (watcher.last_error or "")

    _write(path, 'version = "v5"\n')
    assert watcher.check() is not None and ctx.policy.version == "v5"
    assert ctx.lists.match("+447700900123", "GB", "1.2.3.4", None, None, now=0)[0] == []
