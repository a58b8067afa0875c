import io
import json

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.core.decide import DecisionContext
from detector.core.ipintel import IpIntel
from detector.core.parse import parse_request
from detector.core.pipeline import Detector, parse_outcome
from detector.core.policy import load_policy
from detector.core.records import Action
from detector.replay import replay

POLICY = load_policy()
T0 = 1795341600.0
NUMBERS = ["+447400123456", "+447400123457", "+33612345678", "+449098790879", "+252901234567", "+44 1", "abc"]
IPS = ["81.2.69.142", "81.2.69.143", "185.220.101.5", "10.0.0.1", "2a02:c7f::1"]


def detector(ip_dbs=None):
    intel = IpIntel.from_paths(ip_dbs["country"], ip_dbs["asn"], ip_dbs["anonymous"]) if ip_dbs else IpIntel()
    return Detector(DecisionContext(POLICY), intel)


def req(i, number, ip, dt=0.0, **kw):
    return parse_request({"request_id": f"r{i}", "ts": T0 + dt, "phone_number": number, "ip": ip, **kw})


requests_strategy = st.lists(
    st.tuples(st.sampled_from(NUMBERS), st.sampled_from(IPS), st.floats(0, 3 * 86400), st.booleans()),
    min_size=1, max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(requests_strategy)
def test_invariants_one_decision_risk_bounds_silent_only_when_stopped(items):
    lines = [json.dumps({"request_id": f"r{i}", "ts": T0 + dt, "phone_number": n, "ip": ip,
                         "authenticated": auth}) for i, (n, ip, dt, auth) in enumerate(items)]
    lines.insert(len(lines) // 2, "{broken")
    out, rej = io.StringIO(), io.StringIO()
    summary = replay(lines, detector(), out=out, rejects=rej)
    decisions = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [d["request_id"] for d in decisions].count("r0") == 1
    assert sorted(d["request_id"] for d in decisions) == sorted(f"r{i}" for i in range(len(items)))
    assert summary.decisions == len(items) and summary.rejects == 1
    assert json.loads(rej.getvalue())["line"] == len(items) // 2 + 1
    for d in decisions:
        assert 0.0 <= d["risk"] <= 1.0
        assert not (d["silent"] and d["action"] == "allow")
        assert d["reasons"] == list(dict.fromkeys(d["reasons"]))


def test_decisions_follow_the_schema(ip_dbs):
    schema = json.loads(open("detector/schemas/decision.schema.json").read())
    det = detector(ip_dbs)
    for i, (n, ip) in enumerate(zip(NUMBERS, IPS * 2, strict=False)):
        jsonschema.validate(det.process(req(i, n, ip, dt=i)).to_dict(), schema)


def test_one_outstanding_callback_per_number_and_ttl():
    det = detector()
    first = det.process(req(1, "+447400123456", "81.2.69.142"))
    second = det.process(req(2, "+447400123456", "81.2.69.143", dt=60))
    assert first.action is Action.ALLOW
    assert (second.action, second.silent, second.reasons[0]) == (Action.BLOCK, True, "duplicate_pending")
    later = det.process(req(3, "+447400123456", "81.2.69.142", dt=POLICY.pending_ttl + 1))
    assert later.action is Action.ALLOW


def test_dialer_outcome_clears_pending_and_spam_is_learned():
    det = detector()
    det.process(req(1, "+447400123456", "81.2.69.142"))
    assert det.apply_outcome(parse_outcome({"request_id": "r1", "phone_number": "+447400123456",
                                            "outcome": "completed", "ts": T0 + 30})) is None
    assert det.process(req(2, "+447400123456", "81.2.69.142", dt=60)).action is Action.ALLOW
    entry = det.apply_outcome(parse_outcome({"request_id": "r2", "phone_number": "+447400123456",
                                             "outcome": "agent_marked_spam", "ts": T0 + 90}))
    assert entry is not None and entry.source == "learned" and entry.expires_at == T0 + 90 + 7 * 86400
    d = det.process(req(3, "+447400123456", "81.2.69.142", dt=120))
    assert (d.action, d.reasons[0]) == (Action.BLOCK, "denylist_number")


def test_repeated_machine_answers_deny_the_number():
    det = detector()
    entries = [det.apply_outcome(parse_outcome({"request_id": f"x{i}", "phone_number": "+447400123456",
                                                "outcome": "machine", "ts": T0 + i})) for i in range(3)]
    assert entries[:2] == [None, None] and entries[2].reason == "machine_answers_3_in_24h"


def test_counts_by_ip_number_pair_and_range(ip_dbs):
    det = detector(ip_dbs)
    d = None
    for i in range(5):
        d = det.process(req(i, f"+44740012345{i}", "81.2.69.142", dt=i * 10))
    c = d.counts
    assert (c["ip_15m"], c["ip_distinct_numbers_1h"], c["range_1h"], c["range_distinct_numbers_24h"]) == (5, 5, 5, 5)
    assert (c["number_15m"], c["pair_1h"]) == (1, 1)
    assert "many_numbers_per_ip" in d.reasons


def test_state_is_swept_and_memory_bounded():
    det = detector()
    for i in range(200):
        det.process(req(i, f"+4474001{i:05d}", f"81.2.{i % 250}.1", dt=i))
    assert det.state_sizes()["pair"] == 200
    det.process(req(999, "+447400199999", "81.2.69.1", dt=3 * 86400))
    det.sweep(T0 + 3 * 86400)
    assert det.state_sizes() == {"ip": 1, "number": 1, "pair": 1, "range": 1}


class _CountingModel:
    """A deterministic stand-in scorer that records its batch sizes (the real ForestScorer is
    tested in test_model; here only the batching and its order matter)."""

    version = "count-1"

    def __init__(self):
        self.batches = []

    def score_batch(self, xs):
        from detector.core.records import ModelResult

        self.batches.append(len(xs))
        return [ModelResult(self.version, min(sum(x) / 1000.0, 1.0), sum(x) > 600.0) for x in xs]

    def score(self, x):
        return self.score_batch([x])[0]


@settings(max_examples=40, deadline=None)
@given(requests_strategy, st.integers(1, 8))
def test_process_many_equals_process_one_by_one(items, batch):
    """Batched deciding (replay) gives exactly the decisions of deciding one at a time, also when
    requests on one number follow each other (the outstanding-callback dependency) and across
    the sweep."""
    reqs = sorted((req(i, n, ip, dt, authenticated=a) for i, (n, ip, dt, a) in enumerate(items)),
                  key=lambda r: r.ts)
    one = Detector(DecisionContext(POLICY, model=_CountingModel()), IpIntel(), sweep_every_s=3600.0)
    many_model = _CountingModel()
    many = Detector(DecisionContext(POLICY, model=many_model), IpIntel(), sweep_every_s=3600.0)
    expected = [one.process(r) for r in reqs]
    got = list(many.process_many(reqs, batch=batch))
    assert got == expected
    assert one.range_stores == many.range_stores and one.ip_stores == many.ip_stores
    # each request is one row; one on a number already in the batch is a second row (pending)
    assert len(reqs) <= sum(many_model.batches) <= 2 * len(reqs)
    assert max(many_model.batches) <= 2 * batch


@settings(max_examples=40, deadline=None)
@given(requests_strategy, st.integers(1, 8))
def test_process_many_equals_process_one_by_one_out_of_time_order(items, batch):
    """The same out of time order (an allowed request's mark may then not hold for a later one
    with an earlier ts: that request is scored when it is decided)."""
    reqs = [req(i, n, ip, dt, authenticated=a) for i, (n, ip, dt, a) in enumerate(items)]
    one = Detector(DecisionContext(POLICY, model=_CountingModel()), IpIntel(), sweep_every_s=3600.0)
    many = Detector(DecisionContext(POLICY, model=_CountingModel()), IpIntel(), sweep_every_s=3600.0)
    expected = [one.process(r) for r in reqs]
    assert list(many.process_many(reqs, batch=batch)) == expected
    assert one.range_stores == many.range_stores and one.ip_stores == many.ip_stores


def test_process_many_a_pending_mark_that_goes_away_within_a_batch():
    """Out of time order a request counted as pending can find the mark gone when it is decided:
    a redelivery (its own mark does not hold for it) with an earlier ts is allowed, and its
    mark expires before the next request's ts. That request is scored then, as not pending."""
    ttl = POLICY.pending_ttl
    first = req(0, "+447400123456", "81.2.69.142", 500.0, authenticated=True)
    again = req(0, "+447400123456", "81.2.69.142", 0.0, authenticated=True)  # same id, earlier
    later = req(1, "+447400123456", "81.2.69.142", ttl + 100.0, authenticated=True)
    one = Detector(DecisionContext(POLICY, model=_CountingModel()), IpIntel())
    model = _CountingModel()
    many = Detector(DecisionContext(POLICY, model=model), IpIntel())
    expected = [one.process(r) for r in (first, again, later)]
    got = list(many.process_many([first])) + list(many.process_many([again, later]))
    assert got == expected
    assert [d.action for d in expected[:2]] == ["allow", "allow"]
    assert expected[2].counts["pending"] is False
    assert model.batches[-1] == 1  # the third request, scored again as it was decided
    assert one.range_stores == many.range_stores


def test_process_many_batches_independent_requests():
    model = _CountingModel()
    det = Detector(DecisionContext(POLICY, model=model), IpIntel())
    reqs = [req(i, f"+4474001234{i:02d}", "81.2.69.142", i) for i in range(50)]
    assert len(list(det.process_many(reqs, batch=64))) == 50
    assert model.batches == [1, 49]  # the first request triggers the first sweep, as process() would
    reqs = [req(100 + i, "+33612345678", "81.2.69.150", 100 + i) for i in range(3)]
    assert all("duplicate_pending" in d.reasons for d in list(det.process_many(reqs))[1:])
    # one batch: the two that follow a request on their number are also scored as pending
    assert model.batches[2:] == [5]


def test_process_many_decides_a_number_in_order_within_a_batch():
    """Requests on one number in one batch: each sees the outstanding-callback mark that the
    decisions before it left (allowed -> the next is pending; blocked -> the mark stays as it was)."""
    one = Detector(DecisionContext(POLICY, model=_CountingModel()), IpIntel())
    many = Detector(DecisionContext(POLICY, model=_CountingModel()), IpIntel())
    reqs = [req(i, "+447400123456" if i % 3 else "+33612345678", f"81.2.69.{i % 5}", i * 400.0,
                authenticated=i % 2 == 0) for i in range(40)]
    expected = [one.process(r) for r in reqs]
    assert list(many.process_many(reqs, batch=64)) == expected
    assert {d.counts["pending"] for d in expected} == {True, False}
    assert one.range_stores == many.range_stores


def test_replay_serializes_the_dataclass_as_its_wire_dict():
    """replay writes orjson.dumps(decision): byte for byte the wire dict (Decision.to_dict)."""
    import orjson

    det = Detector(DecisionContext(POLICY, model=_CountingModel()), IpIntel())
    reqs = [req(i, NUMBERS[i % len(NUMBERS)], IPS[i % len(IPS)], i * 60.0, authenticated=i % 2 == 0)
            for i in range(30)]
    for d in det.process_many(reqs):
        assert orjson.dumps(d) == orjson.dumps(d.to_dict())


def test_replay_pauses_the_collector_collects_as_the_heap_doubles_and_restores_it():
    """collector_paused: no automatic collection while replaying; a full collection once the
    objects made since the last one exceed max(floor, the survivors of the last one); on exit
    what was made is in the oldest generation (not traversed again by the next young
    collection) and the collector's state is as before."""
    import gc

    from detector import replay as replay_module

    assert gc.isenabled()
    collected = []
    gc.callbacks.append(cb := lambda phase, info: phase == "stop" and collected.append(info))
    try:
        with replay_module.collector_paused(floor=20_000) as check:
            assert not gc.isenabled()
            keep = [[i] for i in range(30_000)]  # 30,000 new lists: over the floor
            check()
            assert [c["generation"] for c in collected] == [2]
            check()  # nothing new since: no second collection
            more = [[i] for i in range(10_000)]
            check()  # 10,000 new, fewer than the 30,000+ that survived: still one
            assert len(collected) == 1
        assert gc.isenabled() and gc.get_count()[0] < 1_000  # moved on, not left young
    finally:
        gc.callbacks.remove(cb)
    assert len(keep) + len(more) == 40_000
    det = Detector(DecisionContext(POLICY, model=_CountingModel()), IpIntel())
    lines = [json.dumps(req(i, NUMBERS[i % len(NUMBERS)], IPS[i % len(IPS)], i * 60.0).to_dict())
             for i in range(35)]
    assert replay_module.replay(lines, det, out=io.StringIO()).decisions == 35 and gc.isenabled()
    gc.disable()
    try:  # a caller that had it off gets it back off
        replay_module.replay(lines[:3], Detector(DecisionContext(POLICY), IpIntel()))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_replay_makes_no_reference_cycles_even_on_unparsable_numbers():
    """With the collector paused, replay relies on reference counting: what it drops must not
    be held by a cycle. phonenumbers keeps the exception it catches in a local of its own frame
    (exception -> traceback -> frame -> exception), and that frame reaches its callers, i.e.
    the replay's whole state; the cycle is broken where the exception is caught."""
    import gc

    from detector.core import phone

    lines = [json.dumps(req(i, ("+999 1234567", "+1 abc", NUMBERS[i % len(NUMBERS)])[i % 3],
                            IPS[i % len(IPS)], i * 60.0).to_dict()) for i in range(60)]
    phone._cached.cache_clear()
    gc.collect()
    gc.disable()
    try:
        det = Detector(DecisionContext(POLICY, model=_CountingModel()), IpIntel())
        summary = replay(lines, det, out=io.StringIO())
        assert summary.decisions == 60 and summary.by_reason["invalid_number"] >= 40
        del det
        assert gc.collect() == 0
    finally:
        gc.enable()


def _checked_sweeps(monkeypatch):
    """Make every ExpiryIndex sweep assert that it deletes exactly what a full scan deletes."""
    from detector.core import state

    orig = state.ExpiryIndex.sweep
    calls = []

    def sweep(self, store, now):
        want_dead = {k for k, v in store.items() if state.expires_at(v) <= now}
        before = set(store)
        n = orig(self, store, now)
        assert before - set(store) == want_dead and n == len(want_dead)
        calls.append(n)
        return n

    monkeypatch.setattr(state.ExpiryIndex, "sweep", sweep)
    return calls


OUTCOME_KINDS = ["completed", "machine", "agent_marked_spam", "no_answer"]
MANY_NUMBERS = [*NUMBERS, *(f"+4474001{i:05d}" for i in range(12))]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(MANY_NUMBERS), st.sampled_from(IPS), st.floats(0, 4 * 86400),
                          st.sampled_from([None, None, None, *OUTCOME_KINDS]), st.booleans(),
                          st.floats(-2 * 86400, 0), st.sampled_from(MANY_NUMBERS)),
                min_size=1, max_size=80),
       st.sampled_from([1800.0, 7200.0, 6 * 3600.0]))
def test_incremental_sweeps_delete_exactly_what_full_scans_delete(items, every):
    """The replay Detector's sweeps look only at keys that can be dead (state.ExpiryIndex) and
    delete exactly the keys a full scan would: with requests in and out of order (the clock moves
    back), dialer outcomes that clear callbacks, count machines and set learned denies (also late
    ones), and sweeps between batches."""
    import pytest

    from detector.core.records import Outcome

    items = sorted(items, key=lambda it: it[2])
    with pytest.MonkeyPatch.context() as mp:
        calls = _checked_sweeps(mp)
        det = Detector(DecisionContext(POLICY), IpIntel(), sweep_every_s=every)
        batch = []
        for i, (n, ip, dt, outcome, one, late, other) in enumerate(items):
            if i % 7 == 3:
                dt += late  # out of order
            r = req(i, n, ip, dt, authenticated=one)
            if outcome is not None:
                list(det.process_many(batch, batch=5))
                batch = []
                det.apply_outcome(Outcome(f"r{i // 2}", n if i % 2 else other, outcome,
                                          T0 + dt + (late if one else 60.0)))
            if one and i % 3 == 0:
                list(det.process_many(batch, batch=5))
                batch = []
                det.process(r)
            else:
                batch.append(r)
        list(det.process_many(batch, batch=5))
        for now in (T0 + 2 * 86400, T0 + 6 * 86400):
            det.sweep(now)
        assert sum(calls) > 0 or len(items) < 2


def test_a_sweep_between_batches_does_not_lose_keys_to_file(monkeypatch):
    """process_many files keys in the expiry index's current bucket; a sweep run by the caller
    between two of its yields takes due buckets away, and the keys counted after it are still
    found by later sweeps."""
    calls = _checked_sweeps(monkeypatch)
    det = Detector(DecisionContext(POLICY), IpIntel())
    reqs = [req(i, f"+4474001234{i:02d}", "81.2.69.142", dt=i) for i in range(4)]
    gen = det.process_many(reqs, batch=1)
    next(gen)
    next(gen)
    det.sweep(T0 + 2 * 86400)  # takes the bucket the generator was filing into
    list(gen)
    det.sweep(T0 + 3 * 86400)
    assert det.state_sizes() == {"ip": 0, "number": 0, "pair": 0, "range": 0} and calls


_T0 = 1.8e9
_seen = st.dictionaries(st.integers(0, 9), st.floats(_T0 - 3 * 86400, _T0), max_size=3)


@settings(max_examples=300)
@given(st.sampled_from(["ip", "number", "range"]), _seen, _seen, _seen,
       st.one_of(st.none(), st.floats(_T0 - 86400, _T0 + 7200)),
       st.lists(st.floats(_T0 - 3 * 86400, _T0), max_size=3),
       st.one_of(st.none(), st.floats(_T0 - 3 * 86400, _T0)), st.floats(_T0 - 3600, _T0 + 2 * 86400))
def test_a_sweeps_one_call_judgement_is_expires_at(kind, a, b, c, until, machine, learned, now):
    """state._rest_expired (what an ExpiryIndex sweep asks of a key whose count expired) is
    expires_at(v) <= now for the value without its requests window."""
    from detector.core import state
    from detector.core import windows as w

    if kind == "ip":
        v = state.IpState(w.Window(), a, b, c)
    elif kind == "range":
        v = state.RangeState(w.Window(), a, b)
    else:
        ma = None
        for t in machine:
            ma = w.count_add(ma, t)
        v = state.NumberState(w.Window(), a, None if until is None else state.Pending(until, "r"),
                              ma, learned)
    assert state._rest_expired(v, type(v), now) == (state.expires_at(v) <= now)


@settings(max_examples=100)
@given(st.lists(st.integers(0, 10**6), min_size=19, max_size=19),
       st.lists(st.floats(allow_nan=False), min_size=4, max_size=4),
       st.lists(st.booleans(), min_size=6, max_size=6))
def test_the_generated_count_map_is_the_records_fields_in_order(ints, floats, bools):
    """Counts.to_dict (one generated dict display) equals the reference (the records' fields by
    name, IP's, then range's, then population's), keys in the same order."""
    from detector.core import records
    from detector.core.population import PopulationCounts
    from detector.core.records import Counts, IpCounts, RangeCounts

    counts = Counts(IpCounts(*ints[:8]), RangeCounts(*ints[8:19], bools[0]),
                    PopulationCounts(ints[0], floats[0], bools[1], ints[1], floats[1], bools[2],
                                     ints[2], floats[2], floats[3], bools[3], bools[4]))
    got, want = counts.to_dict(), records._reference_to_dict(counts)
    assert got == want and list(got) == list(want) == list(records._COUNT_NAMES)
