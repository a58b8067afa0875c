"""Hostile input: every message type rejects anything as an InputError naming the field, never
another exception; replay goes on past any bad line; the PII key and metric labels are checked."""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.cli import main
from detector.config import load_settings
from detector.core import state
from detector.core.decide import DecisionContext
from detector.core.errors import ConfigError, InputError, InvalidField
from detector.core.ipintel import IpIntel
from detector.core.lists import entry_from_dict
from detector.core.parse import check_event_time, parse_request
from detector.core.pii import hash_id
from detector.core.pipeline import Detector, parse_outcome
from detector.core.policy import load_policy
from detector.runtime import check_pii_key

POLICY = load_policy()
T0 = 1795341600.0
Y2099 = 4_070_908_800.0


def valid(**over):
    d = {"request_id": "r1", "ts": T0, "phone_number": "+442079460018", "ip": "81.2.69.142"}
    d.update(over)
    return d


# --------------------------------------------------------------- every field, hostile values

HOSTILE = [10**400, -(10**400), float("nan"), float("inf"), -1, -1.5, "9" * 5000, "x" * 1_000_000,
           [], {}, True, None, "", " ", "\x00", "\ud800", [[[[]]]], 1e308, 2**63, 0]


@pytest.mark.parametrize("field", ["request_id", "ts", "phone_number", "ip", "country_hint",
                                   "user_id", "session_id", "user_agent", "authenticated"])
@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: type(v).__name__ + str(len(repr(v)) if not isinstance(v, int) or abs(v) < 10**30 else "big"))
def test_request_field_hostile_values_raise_input_error_naming_the_field(field, value):
    try:
        parse_request(valid(**{field: value}))
    except InputError as exc:
        assert exc.field in (None, field) and len(str(exc)) < 300
        if exc.field is not None:
            assert field in str(exc)


@pytest.mark.parametrize("field", ["request_id", "phone_number", "outcome", "ts", "duration_s"])
@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: type(v).__name__)
def test_outcome_field_hostile_values_raise_input_error(field, value):
    obj = {"request_id": "r", "phone_number": "+442079460018", "outcome": "machine", "ts": T0,
           "duration_s": 3}
    obj[field] = value
    try:
        o = parse_outcome(obj)
    except InputError as exc:
        assert len(str(exc)) < 300
    else:
        assert math.isfinite(o.duration_s) and math.isfinite(o.ts)


@pytest.mark.parametrize("field", ["action", "kind", "value", "reason", "expires_at", "added_at",
                                   "source"])
@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: type(v).__name__)
def test_list_entry_field_hostile_values_raise_input_error(field, value):
    obj = {"action": "deny", "kind": "number", "value": "+442079460018", "reason": "r",
           "expires_at": T0, "added_at": T0, "source": "soc"}
    obj[field] = value
    try:
        e = entry_from_dict(obj)
    except InputError as exc:
        assert len(str(exc)) < 300
    else:
        assert e.source in ("soc", "policy", "learned")


def test_list_entry_source_is_an_enum_so_no_number_reaches_a_metric_label():
    with pytest.raises(InvalidField, match="source"):
        entry_from_dict({"action": "deny", "kind": "number", "value": "+447700900123",
                         "source": "+447700900123"})


def test_huge_integer_timestamp_is_invalid_field_not_overflow():
    with pytest.raises(InvalidField, match="'ts'"):
        parse_request(valid(ts=10**400))
    with pytest.raises(InvalidField, match="'ts'"):
        parse_request(valid(ts="9" * 5000))


@pytest.mark.parametrize("raw", [
    b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"ts": ' + b"9" * 5000 + b"}",
    b'{"ts": 1e400}', b'{"a": NaN}', b"x" * 2_000_000, b"", b"   ", "\ud800", b"null", b"[]",
    b'"s"', b"1" * 5000,
])
def test_raw_bytes_that_are_not_a_request_are_input_errors(raw):
    with pytest.raises(InputError):
        parse_request(raw)
    with pytest.raises(InputError):
        parse_outcome(raw)


def test_event_time_check_both_sides_and_off_when_zero():
    now = time.time()
    check_event_time(now + 299, now, max_future_s=300, max_past_s=86400)
    with pytest.raises(InputError) as exc:
        check_event_time(now + 301, now, max_future_s=300, max_past_s=86400)
    assert exc.value.kind == "event_time_out_of_range"
    with pytest.raises(InputError):
        check_event_time(now - 86401, now, max_future_s=300, max_past_s=86400)
    check_event_time(Y2099, now, max_future_s=0, max_past_s=0)


# --------------------------------------------------------------- property-based: arbitrary JSON

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
REQUEST_KEYS = ["request_id", "ts", "phone_number", "ip", "country_hint", "user_id", "session_id",
                "user_agent", "authenticated"]
OUTCOME_KEYS = ["request_id", "phone_number", "outcome", "ts", "duration_s"]
ENTRY_KEYS = ["action", "kind", "value", "reason", "expires_at", "added_at", "source"]


def objects(keys):
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), json_values, max_size=10)


def _only_input_errors(fn, value):
    try:
        fn(value)
    except InputError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(objects(REQUEST_KEYS), json_values))
def test_arbitrary_json_request_raises_only_input_errors(obj):
    _only_input_errors(parse_request, obj if isinstance(obj, dict) else json.dumps(obj, allow_nan=True))
    raw = json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")
    _only_input_errors(parse_request, raw)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(objects(OUTCOME_KEYS), json_values))
def test_arbitrary_json_outcome_raises_only_input_errors(obj):
    _only_input_errors(parse_outcome, json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass"))
    if isinstance(obj, dict):
        _only_input_errors(parse_outcome, obj)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(objects(ENTRY_KEYS), json_values))
def test_arbitrary_json_list_entry_raises_only_input_errors(obj):
    from detector.stream import codec

    _only_input_errors(codec.list_entry_from_wire, json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_input_errors(raw):
    from detector.stream import codec

    for fn in (parse_request, parse_outcome, codec.list_entry_from_wire):
        _only_input_errors(fn, raw)


# --------------------------------------------------------------- replay keeps going

def test_replay_rejects_bad_lines_with_line_number_and_decides_the_rest(tmp_path):
    good = [json.dumps(valid(request_id=f"g{i}", ts=T0 + i)).encode() for i in range(3)]
    bad = [b"\xff\xfe not utf-8", b'{"request_id": "x", "ts": ' + b"9" * 5000 + b"}",
           json.dumps(valid(request_id="big", ts=10**400)).encode(),
           b"[" * 100_000 + b"]" * 100_000, json.dumps(valid(request_id="x" * 1_000_000)).encode(),
           json.dumps(valid(request_id="neg", ts=-1)).encode()]
    lines = [good[0], *bad[:3], good[1], *bad[3:], good[2]]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out, rej = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    assert main(["replay", str(src), "-o", str(out), "--rejects", str(rej), "--no-model"]) == 0
    assert [json.loads(x)["request_id"] for x in out.read_text().splitlines()] == ["g0", "g1", "g2"]
    rejects = [json.loads(x) for x in rej.read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4, 6, 7, 8]
    assert all(r["error_kind"] in ("malformed_json", "invalid_field", "message_too_large")
               for r in rejects)


def test_replay_check_event_time_rejects_requests_far_from_the_wall_clock(tmp_path):
    now = time.time()
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(valid(request_id=r, ts=t)) for r, t in
                             (("ok", now), ("future", Y2099), ("old", now - 3 * 86400))) + "\n")
    out, rej = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    assert main(["replay", str(src), "-o", str(out), "--rejects", str(rej), "--no-model",
                 "--check-event-time"]) == 0
    assert [json.loads(x)["request_id"] for x in out.read_text().splitlines()] == ["ok"]
    assert {json.loads(x)["error_kind"] for x in rej.read_text().splitlines()} == {"event_time_out_of_range"}


# --------------------------------------------------------------- sweep clock in the replay Detector

def test_a_2099_request_does_not_make_the_replay_detector_sweep_live_state():
    det = Detector(DecisionContext(POLICY), IpIntel(), sweep_every_s=60.0)
    for i in range(5):
        det.process(parse_request(valid(request_id=f"r{i}", ts=T0 + 100 * i, ip=f"81.2.69.{i}")))
    sizes = det.state_sizes()
    det.process(parse_request(valid(request_id="attack", ts=Y2099, phone_number="+442079460099")))
    for name, n in det.state_sizes().items():
        assert n >= sizes[name], (name, det.state_sizes(), sizes)  # nothing of the day was swept
    d = det.process(parse_request(valid(request_id="r5", ts=T0 + 600, ip="81.2.69.9")))
    assert d.counts["number_15m"] == 6  # the count did not restart at 1


def test_the_replay_detector_still_sweeps_dead_state_in_event_time():
    det = Detector(DecisionContext(POLICY), IpIntel(), sweep_every_s=3600.0)
    det.process(parse_request(valid(request_id="a", ts=T0)))
    for i in range(400):  # a day and more of other traffic, every 5 minutes
        det.process(parse_request(valid(request_id=f"b{i}", ts=T0 + 300 * (i + 1),
                                        phone_number="+33142685300", ip="81.2.69.200")))
    assert "+442079460018" not in det.range_stores.number


# --------------------------------------------------------------- PII

def test_one_keyed_hash_for_every_identifier_and_long_keys_count():
    assert state.pii_hash("203.0.113.9", b"k") == hash_id("203.0.113.9", b"k")
    assert state.short_hash("203.0.113.9", b"k") == hash_id("203.0.113.9", b"k")
    long_a, long_b = b"a" * 64 + b"x", b"a" * 64 + b"y"  # differ after the 64-byte block
    assert hash_id("203.0.113.9", long_a) != hash_id("203.0.113.9", long_b)
    import hashlib
    import hmac
    assert hash_id("x", long_a) == hmac.new(long_a, b"x", hashlib.sha256).hexdigest()[:16]


KEYS = [b"", b"k", b"x" * 16, b"y" * 63, b"z" * 64, b"w" * 65, b"k" * 200, bytes(range(256))]


@settings(max_examples=200)
@given(st.sampled_from(KEYS), st.text(max_size=40))
def test_the_memoized_hash_is_hmac_sha256(key, text):
    """hash_int / hash_id (prepared SHA-256 pad states, memoized per key) are the first 8 bytes of
    hmac's HMAC-SHA256, for keys shorter, equal to and longer than the block, and any text (lone
    surrogates too), on a miss and on a hit."""
    import hashlib
    import hmac

    from detector.core.pii import hash_int

    want = hmac.new(key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()[:8]
    for _ in range(2):
        assert hash_id(text, key) == want.hex()
        assert hash_int(text, key) == int.from_bytes(want, "big")


@settings(max_examples=200)
@given(st.sampled_from(KEYS), st.lists(st.text(max_size=40), max_size=8))
def test_the_c_keyed_hash_and_the_python_reference_are_both_hmac_sha256(key, texts):
    """core/_keyed.c (OpenSSL's SHA-256, the default where built) and pii._Keyed (hashlib, the
    fallback) give hmac's first 8 bytes, on misses and hits, with a memo emptied when full."""
    import hashlib
    import hmac

    from detector.core import pii

    assert pii.NATIVE, "detector.core._keyed is not built: pip install -e . (C compiler, libssl-dev)"
    both = (pii._native.Keyed(key, 3), pii._Keyed(key))
    for text in texts * 2:
        want = int.from_bytes(hmac.new(key, text.encode("utf-8", "surrogatepass"),
                                       hashlib.sha256).digest()[:8], "big")
        assert [k.hash(text) for k in both] == [want, want]
    assert len(both[0]) <= 3


def test_decision_context_has_no_known_default_key():
    ctx = DecisionContext(POLICY)
    assert ctx.pii_key not in (b"detector-default-key", b"change-me-in-production")
    assert len(ctx.pii_key) >= 32


def test_worker_and_replay_refuse_the_default_key_without_dev_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DETECTOR_DEV_MODE", raising=False)
    monkeypatch.delenv("DETECTOR_PII_HASH_KEY", raising=False)
    with pytest.raises(ConfigError, match="DETECTOR_PII_HASH_KEY"):
        check_pii_key(load_settings(check_files=False), "a worker")
    with pytest.raises(ConfigError, match="shorter"):
        check_pii_key(load_settings(env={"DETECTOR_PII_HASH_KEY": "short"}), "a worker")
    check_pii_key(load_settings(env={"DETECTOR_PII_HASH_KEY": "x" * 32}), "a worker")
    check_pii_key(load_settings(env={"DETECTOR_DEV_MODE": "1"}), "a worker")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(valid()) + "\n")
    assert main(["replay", str(src), "--no-model"]) == 2
    assert "DETECTOR_PII_HASH_KEY" in capsys.readouterr().err
    assert main(["--dev", "replay", str(src), "--no-model", "-o", str(tmp_path / "o")]) == 0


def test_settings_repr_does_not_show_the_hash_key():
    s = load_settings(env={"DETECTOR_PII_HASH_KEY": "super-secret-value-123"})
    assert "super-secret" not in repr(s)


@pytest.mark.parametrize(("var", "value"), [
    ("DETECTOR_MAX_FUTURE_SKEW_S", "nan"), ("DETECTOR_MAX_PAST_SKEW_S", "-1"),
    ("DETECTOR_PARTITIONS", "9" * 5000), ("DETECTOR_DEV_MODE", "maybe"),
    ("DETECTOR_BATCH_MS", "x" * 1_000_000), ("DETECTOR_LEARNED_DENY_INTERVAL_S", "inf"),
])
def test_bad_settings_are_config_errors_naming_the_variable(var, value):
    with pytest.raises(ConfigError, match=var):
        load_settings(env={var: value}, check_files=False)


# --------------------------------------------------------------- policy file: unknown keys, hostile values

@pytest.mark.parametrize(("overrides", "needle"), [
    ({"risk": {"deflect": 0.1}}, "risk.deflect: unknown key 'deflect'; known: ['block_at', 'deflect_at', 'soft_codes']"),
    ({"number_types": {"PREMIUM": {"action": "block"}}}, "number_types.PREMIUM: unknown number type"),
    ({"number_types": {"VOIP": {"action": "block", "colour": 1}}}, "number_types.VOIP.colour"),
    ({"rules": {"geo_mismatch": {"weigth": 0.3}}}, "weigth"),
    ({"destinations": {"allowed": ["GB"]}}, "destinations.allowed: unknown key"),
    ({"learning": {"spam": 1}}, "learning.spam"),
    ({"deny": {"ip": ["1.2.3.4"]}}, "deny: unknown key(s) ['ip']"),
    ({"risk": 5}, "risk: expected a table"),
    ({"risk": {"deflect_at": float("nan")}}, "risk.deflect_at"),
    ({"risk": {"deflect_at": 10**400}}, "risk.deflect_at"),
    ({"auth": {"relaxed_codes": [[[["x"]]]]}}, "auth.relaxed_codes"),
])
def test_policy_typos_and_hostile_values_are_errors_naming_the_key(overrides, needle):
    from detector.core.errors import PolicyError
    from detector.core.policy import parse_policy

    with pytest.raises(PolicyError) as exc:
        parse_policy(overrides)
    assert needle in str(exc.value) and len(str(exc.value)) < 600


def test_policy_number_types_accept_every_phonenumbers_type_name():
    from detector.core.policy import parse_policy

    p = parse_policy({"number_types": {"voip": {"action": "block"}, "TOLL_FREE": {"action": "deflect"}}})
    assert p.number_types["VOIP"].action == "block" and "TOLL_FREE" in p.number_types


@pytest.mark.parametrize("text", ["[ranges]\ntrailing_digits = " + "9" * 5000,
                                  "[auth]\nrelaxed_codes = " + "[" * 100_000 + "]" * 100_000,
                                  "\xff\xfe"])
def test_hostile_policy_files_are_policy_errors(tmp_path, text):
    from detector.core.errors import PolicyError
    from detector.core.policy import load_policy

    f = tmp_path / "p.toml"
    f.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe")
    with pytest.raises(PolicyError):
        load_policy(f)


@pytest.mark.parametrize("line", [
    b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"ts": ' + b"9" * 5000 + b"}", b'{"ts": 1e400}',
    b'{"ts": "' + b"9" * 5000 + b'"}', b'{"ts": -5}', b"x" * 2_000_000, b"null", b'{"ts": [[[]]]}',
])
def test_produce_key_and_timestamp_never_raise_on_a_bad_line(line):
    from detector.stream.io import _request_ts_ms, request_key

    assert request_key(line) is None
    assert _request_ts_ms(line) is None


@pytest.mark.parametrize("content", [b"\xff\xfe\n", b"[" * 100_000 + b"]" * 100_000 + b"\n",
                                     b'{"action": "deny", "kind": "number", "value": "+44", "source": "+4479"}\n'])
def test_a_bad_lists_file_is_a_config_error_with_its_line(tmp_path, content):
    from detector.runtime import build_context

    f = tmp_path / "lists.jsonl"
    f.write_bytes(b"# header\n" + content)
    with pytest.raises(ConfigError, match="lists.jsonl:2"):
        build_context(load_settings(env={"DETECTOR_LISTS_FILE": str(f)}))
