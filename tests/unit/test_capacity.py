"""Agent-capacity protection (detector/core/capacity.py): the queue-state contract and its
signature, pressure, tiers with hysteresis, stale state failing open, the decision rule, the
policy checks, and replay with queue states."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from detector.core.capacity import (
    PRESSURE_MAX,
    REJECT_REASONS,
    CapacityGate,
    CapacityPolicy,
    QueueState,
    QueueStateSigner,
    QueueStateVerifier,
    deflects,
    next_tier,
    parse_queue_state,
    pressure,
    trust_class,
)
from detector.core.decide import DecisionContext, decide
from detector.core.errors import InputError, PolicyError, UntrustedEntry
from detector.core.ipintel import IpIntel
from detector.core.pipeline import Detector
from detector.core.policy import load_policy, parse_policy
from detector.core.records import Action, Counts, Enrichment, IpCounts, RangeCounts
from detector.replay import load_queue_states, replay
from tests.unit.test_decide import GB_IP, GB_MOBILE, REQ, ip, phone

T = 1795341600.0
POL = CapacityPolicy()
KEY = Ed25519PrivateKey.generate()
SIGNER = QueueStateSigner(KEY)
SCHEMA = Path(__file__).resolve().parents[2] / "detector" / "schemas" / "queue-state.schema.json"


def state(waiting: int, agents: int = 5, handle: float = 240.0, ts: float = T, dialer: str = "lon-1",
          within: float | None = None) -> QueueState:
    return QueueState(dialer, ts, waiting, agents, handle, within)


# --------------------------------------------------------------------------- the message


def test_parse_queue_state_accepts_the_contract_and_explains_what_is_wrong() -> None:
    s = parse_queue_state(b'{"dialer_id": "lon-1", "ts": "2026-11-22T10:00:00Z", '
                          b'"callbacks_waiting": 12, "agents_available": 4, "avg_handle_s": 300}')
    assert s == QueueState("lon-1", T, 12, 4, 300.0, None)
    assert parse_queue_state({**s.to_dict(), "serve_within_s": 600}).serve_within_s == 600.0
    bad = [({"dialer_id": None}, "required field 'dialer_id' is missing"),
           ({"dialer_id": "a b"}, "field 'dialer_id': expected 1-64 letters"),
           ({"callbacks_waiting": -1}, "field 'callbacks_waiting': expected an integer in [0, 1e+07]"),
           ({"callbacks_waiting": 2.5}, "field 'callbacks_waiting': expected an integer"),
           ({"agents_available": True}, "field 'agents_available': expected an integer"),
           ({"avg_handle_s": 0}, "field 'avg_handle_s': expected a number in [1, 86400]"),
           ({"serve_within_s": "soon"}, "field 'serve_within_s': expected a number"),
           ({"ts": 1.8e12}, "field 'ts': expected epoch seconds")]
    for change, message in bad:
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("+", r"\+")):
            parse_queue_state({**s.to_dict(), **change})
    with pytest.raises(InputError, match="at most 2,048"):
        parse_queue_state(b'{"dialer_id": "' + b"x" * 3000 + b'"}')


def test_the_json_schema_describes_what_the_parser_accepts() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    wire = SIGNER.sign(state(10, within=600.0))
    jsonschema.validate(wire, schema)
    jsonschema.validate(state(10).to_dict(), schema)  # sig is required by workers, not by the shape
    for change in ({"callbacks_waiting": -1}, {"avg_handle_s": 0}, {"dialer_id": ""}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**wire, **change}, schema)
        with pytest.raises(InputError):
            parse_queue_state({**wire, **change})


def test_a_signed_state_verifies_and_every_tampering_is_refused_with_its_reason() -> None:
    v = QueueStateVerifier([KEY.public_key()])
    wire = SIGNER.sign(state(10))
    assert v.verify(b"lon-1", json.dumps(wire).encode(), now=T) == state(10)

    def reason(key: bytes | None, value: object, verifier: QueueStateVerifier | None = None,
               now: float = T) -> str:
        with pytest.raises(UntrustedEntry) as info:
            v = verifier if verifier is not None else QueueStateVerifier([KEY.public_key()])
            v.verify(key, value, now=now)  # type: ignore[arg-type]
        assert info.value.reason in REJECT_REASONS
        return info.value.reason

    assert reason(b"lon-1", state(10).to_dict()) == "unsigned"
    assert reason(b"lon-1", {**wire, "callbacks_waiting": 0}) == "bad_signature"
    assert reason(b"lon-1", {**wire, "serve_within_s": 3600}) == "bad_signature"
    assert reason(b"par-1", wire) == "key_mismatch"
    other = QueueStateVerifier([Ed25519PrivateKey.generate().public_key()])
    assert reason(b"lon-1", wire, other) == "unknown_key"
    assert reason(b"lon-1", wire, QueueStateVerifier()) == "unknown_key"  # no dialer key configured
    assert reason(b"lon-1", SIGNER.sign(state(10, ts=T + 3600))) == "signed_in_future"
    assert reason(b"lon-1", b"{not json") == "malformed"
    assert reason(b"lon-1", None) == "malformed"
    assert reason(b"lon-1", b"[]") == "malformed"
    assert reason(b"lon-1", {**wire, "sig": {"alg": "ed25519", "kid": "0" * 16, "sig": "!!"}}) == "malformed"
    short = base64.b64encode(b"x" * 10).decode()
    assert reason(b"lon-1", {**wire, "sig": {**wire["sig"], "sig": short}}) == "malformed"
    # replays: the same or an older state of the dialer is refused once a newer one was applied
    v.verify(b"lon-1", SIGNER.sign(state(3, ts=T + 5)), now=T + 5)
    with pytest.raises(UntrustedEntry, match="not newer"):
        v.verify(b"lon-1", wire, now=T + 5)
    assert v.verify(None, SIGNER.sign(state(3, ts=T + 6, dialer="par-1")), now=T + 6).dialer_id == "par-1"


# --------------------------------------------------------------------------- pressure and tiers


def test_pressure_is_waiting_over_what_agents_serve_in_time() -> None:
    # 5 agents x 300 s / 240 s = 6.25 callbacks within 5 minutes
    assert pressure([state(10)], POL) == 1.6
    assert pressure([state(0)], POL) == 0.0
    assert pressure([state(10, within=600.0)], POL) == 0.8  # the dialer's own target
    assert pressure([state(3, agents=0)], POL) == PRESSURE_MAX
    # dialers add up: one idle site absorbs another's queue
    assert pressure([state(10), state(0, agents=5, dialer="par-1")], POL) == 0.8


def test_tiers_rise_at_once_and_fall_with_hysteresis_one_at_a_time() -> None:
    tier, seen = 0, []
    for p in (0.5, 1.0, 1.2, 1.6, 3.5, 2.8, 2.0, 1.4, 1.2, 1.1, 0.9, 0.74, 0.2):
        tier = next_tier(tier, p, POL)
        seen.append(tier)
    assert seen == [0, 1, 1, 2, 3, 3, 2, 2, 2, 1, 1, 0, 0]
    assert next_tier(3, 0.1, POL) == 0  # a drained queue steps all the way down


def test_trust_classes_and_who_each_tier_deflects() -> None:
    assert trust_class(False, True, 0.0, POL) == "low"
    assert trust_class(False, False, 0.35, POL) == "low"
    assert trust_class(False, False, 0.1, POL) == "unauthenticated"
    assert trust_class(True, True, 0.9, POL) == "authenticated"
    assert [[deflects(t, c) for t in range(4)] for c in ("low", "unauthenticated", "authenticated")] == [
        [False, True, True, True], [False, False, True, True], [False, False, False, True]]


def test_stale_state_fails_open_and_a_fresh_one_starts_from_normal() -> None:
    gate = CapacityGate()
    assert gate.level(T, POL).stale and gate.level(T, POL).tier == 0  # nothing received yet
    gate.apply(state(30), POL)  # pressure 4.8: tier 3
    assert gate.level(T + 59, POL).tier == 3
    lvl = gate.level(T + 61, POL)
    assert (lvl.tier, lvl.stale) == (0, True)
    # after an outage the bar does not resume where it was: 1.2 is tier 1 from normal
    gate.apply(state(8, ts=T + 200), POL)
    assert gate.level(T + 200, POL).tier == 1


def test_a_silent_dialer_drops_out_of_the_sum() -> None:
    gate = CapacityGate()
    gate.apply(state(0, agents=20, dialer="big"), POL)
    gate.apply(state(10, ts=T + 10), POL)
    assert gate.level(T + 10, POL).tier == 0  # the big site's agents absorb the queue
    gate.apply(state(10, ts=T + 90), POL)  # "big" silent for 90 s > stale_after_s
    assert set(gate.states) == {"lon-1"} and gate.level(T + 90, POL).tier == 2


def test_a_dialer_clock_ahead_does_not_keep_its_state_fresh() -> None:
    gate = CapacityGate()
    gate.apply(state(30, ts=T + 250), POL, received_at=T)  # dialer clock 250 s ahead
    assert gate.level(T + 59, POL).tier == 3
    assert gate.level(T + 61, POL).stale


# --------------------------------------------------------------------------- decisions


def ctx_at(waiting: int, *, policy: object = None, agents: int = 5) -> DecisionContext:
    pol = policy or load_policy()
    gate = CapacityGate()
    gate.apply(state(waiting, agents=agents), pol.capacity)  # type: ignore[union-attr]
    return DecisionContext(policy=pol, capacity=gate)  # type: ignore[arg-type]


NEW_IP = Counts(ip=IpCounts(ip_15m=1, ip_1h=1, ip_24h=1, ip_fresh=1))
KNOWN_IP = Counts(ip=IpCounts(ip_15m=1, ip_1h=2, ip_24h=5, ip_fresh=0))
AUTH = replace(REQ, authenticated=True)
CLEAN = Enrichment(GB_MOBILE, GB_IP)


def test_tier_1_deflects_low_trust_requests_only() -> None:
    ctx = ctx_at(8)  # pressure 1.28: tier 1
    d = decide(REQ, CLEAN, NEW_IP, ctx, decided_at=T)
    assert (d.action, d.silent, d.reasons, d.risk) == (Action.DEFLECT, False, ("agent_capacity",), 0.0)
    assert decide(REQ, CLEAN, KNOWN_IP, ctx, decided_at=T).action == Action.ALLOW
    vpn = decide(REQ, Enrichment(GB_MOBILE, ip(anonymous_vpn=True)), KNOWN_IP, ctx, decided_at=T)
    assert vpn.action == Action.DEFLECT and vpn.reasons == ("agent_capacity", "vpn_ip")  # risk 0.35
    assert decide(AUTH, CLEAN, NEW_IP, ctx, decided_at=T).action == Action.ALLOW


def test_tier_2_deflects_every_unauthenticated_request_tier_3_customers_too() -> None:
    ctx2, ctx3 = ctx_at(12), ctx_at(30)
    assert decide(REQ, CLEAN, KNOWN_IP, ctx2, decided_at=T).reasons == ("agent_capacity",)
    assert decide(AUTH, CLEAN, KNOWN_IP, ctx2, decided_at=T).action == Action.ALLOW
    d = decide(AUTH, CLEAN, KNOWN_IP, ctx3, decided_at=T)
    assert (d.action, d.silent, d.reasons) == (Action.DEFLECT, False, ("agent_capacity",))


def test_capacity_never_touches_a_request_stopped_for_fraud_and_never_blocks() -> None:
    ctx = ctx_at(1000, agents=0)  # tier 3
    premium = decide(REQ, Enrichment(phone(e164="+449098790879", number_type="PREMIUM_RATE"), GB_IP),
                     NEW_IP, ctx, decided_at=T)
    assert premium.action == Action.BLOCK and "agent_capacity" not in premium.reasons
    voip = decide(REQ, Enrichment(phone(number_type="VOIP"), GB_IP), NEW_IP, ctx, decided_at=T)
    assert voip.action == Action.DEFLECT and "agent_capacity" not in voip.reasons
    pending = decide(REQ, CLEAN, Counts(rng=RangeCounts(pending=True)), ctx, decided_at=T)
    assert pending.action == Action.BLOCK and pending.silent and "agent_capacity" not in pending.reasons


def test_stale_state_decides_as_normal() -> None:
    ctx = ctx_at(30)
    assert decide(AUTH, CLEAN, KNOWN_IP, ctx, decided_at=T + 30).action == Action.DEFLECT
    assert decide(AUTH, CLEAN, KNOWN_IP, ctx, decided_at=T + 61).action == Action.ALLOW
    assert decide(REQ, CLEAN, NEW_IP, DecisionContext(policy=load_policy()), decided_at=T).action == "allow"


def test_monitor_mode_reports_and_allow_switches_it_off() -> None:
    mon = ctx_at(30, policy=parse_policy({"rules": {"agent_capacity": {"mode": "monitor"}}}))
    d = decide(REQ, CLEAN, NEW_IP, mon, decided_at=T)
    assert d.action == Action.ALLOW and d.monitored_reasons == ("agent_capacity",) and not d.reasons
    off = ctx_at(30, policy=parse_policy({"rules": {"agent_capacity": {"action": "allow"}}}))
    d = decide(REQ, CLEAN, NEW_IP, off, decided_at=T)
    assert d.action == Action.ALLOW and not d.monitored_reasons


def test_policy_refuses_a_capacity_rule_that_blocks_or_is_silent_and_bad_tiers() -> None:
    for over, message in (
            ({"rules": {"agent_capacity": {"action": "block"}}}, "capacity never blocks"),
            ({"rules": {"agent_capacity": {"silent": True}}}, "never silent"),
            ({"rules": {"agent_capacity": {"weight": 0.4}}}, "not a risk signal"),
            ({"capacity": {"tiers": [2.0, 1.5, 3.0]}}, "capacity.tiers: expected 3 increasing"),
            ({"capacity": {"tiers": [1.0, 2.0]}}, "capacity.tiers"),
            ({"capacity": {"exit_ratio": 1.5}}, r"capacity.exit_ratio: expected a number in \[0.05, 1\]"),
            ({"capacity": {"stale_afer_s": 5}}, "unknown key 'stale_afer_s'")):
        with pytest.raises(PolicyError, match=message):
            parse_policy(over)
    pol = parse_policy({"capacity": {"tiers": [0.8, 2, 4], "serve_within_s": 120}})
    assert pol.capacity.tiers == (0.8, 2.0, 4.0) and pol.capacity.serve_within_s == 120.0
    assert "agent_capacity" in load_policy().reason_codes()


# --------------------------------------------------------------------------- replay


def _requests(n: int, start: float, step: float) -> list[bytes]:
    """Quiet traffic: one request per number range and IP (fresh IPs: low trust), slow enough
    that no population surge fires."""
    return [json.dumps({"request_id": f"r{i}", "ts": start + i * step,
                        "phone_number": f"+4420{3000 + i:04d}{i % 10}123",
                        "ip": f"81.2.{i // 200}.{i % 200 + 1}"}).encode() for i in range(n)]


def test_replay_takes_queue_states_and_deflects_only_while_over_capacity() -> None:
    lines = _requests(100, T, 30.0)  # request i at T + 30 i
    # a state every 30 s (at T + 30 j + 15): overloaded for j in 30..49, drained after; overloaded
    # again for j in 78..80, then the dialer goes silent: stale 60 s after its last state
    states = [state(40 if 30 <= j < 50 or j >= 78 else 2, ts=T + 30 * j + 15) for j in range(-1, 81)]
    det = Detector(DecisionContext(policy=load_policy()), IpIntel())
    got: dict[int, tuple[str, tuple[str, ...]]] = {}
    replay(lines, det, queue_states=states,
           on_decision=lambda r, d: got.__setitem__(int(r.request_id[1:]), (d.action, d.reasons)))
    deflected = sorted(i for i, (a, reasons) in got.items() if reasons == ("agent_capacity",))
    assert deflected == [*range(31, 51), *range(79, 83)]
    assert all(got[i][0] == "allow" for i in set(got) - set(deflected)), got
    # without queue states: the queue is normal throughout
    summary = replay(lines, Detector(DecisionContext(policy=load_policy()), IpIntel()))
    assert summary.by_action == {"allow": 100}


def test_replay_queue_state_file_errors_name_the_line() -> None:
    good = json.dumps(state(3).to_dict())
    assert load_queue_states([good.encode(), b"", good]) == [state(3), state(3)]
    with pytest.raises(InputError, match=r"q.jsonl:2: field 'agents_available'"):
        load_queue_states([good, json.dumps({**state(3).to_dict(), "agents_available": -2})], "q.jsonl")
