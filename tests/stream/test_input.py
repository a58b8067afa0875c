"""Bad input through the Faust agents: specific dead-letter reasons, event time vs the clock, and
a far-future request that must not make the sweep delete live state."""

from __future__ import annotations

import json
import logging
import time

import pytest

from detector.stream.app import sweep_now, sweep_tables
from tests.stream.test_agents import PARTITIONS, make_harness, request, running

pytestmark = pytest.mark.asyncio

Y2099 = 4_070_908_800.0  # 2099-01-01T00:00:00Z


def _huge_nesting(depth: int) -> bytes:
    return b'{"request_id": "x", "a": ' + b"[" * depth + b"]" * depth + b"}"


BAD = [
    (b"\xff\xfe\xfd", "malformed_json"),
    (b'{"request_id": "r", "ts": ' + b"9" * 5000 + b', "phone_number": "+1", "ip": "1.1.1.1"}',
     "malformed_json"),
    (b'{"request_id": "r", "ts": 1e400, "phone_number": "+1", "ip": "1.1.1.1"}', "malformed_json"),
    (b'{"request_id": "r", "ts": NaN, "phone_number": "+1", "ip": "1.1.1.1"}', "malformed_json"),
    (json.dumps({"request_id": "r", "ts": -5, "phone_number": "+1", "ip": "1.1.1.1"}).encode(),
     "invalid_field"),
    (json.dumps({"request_id": "r", "ts": "9" * 5000, "phone_number": "+1", "ip": "1.1.1.1"}).encode(),
     "invalid_field"),
    (json.dumps({"request_id": "r" * 1_000_000, "ts": 1.8e9, "phone_number": "+1", "ip": "1.1.1.1"})
     .encode(), "message_too_large"),
    (_huge_nesting(100_000), "message_too_large"),
    (_huge_nesting(5_000), "malformed_json"),
]


@pytest.mark.parametrize(("raw", "kind"), BAD, ids=[k + str(i) for i, (_, k) in enumerate(BAD)])
async def test_hostile_requests_are_dead_lettered_with_their_own_reason(
    raw: bytes, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running(make_harness()) as h:
        await h.put("ingest", b"k", raw, 0)
        await h.wait(lambda: bool(h.sent[h.topic("dlq")]))
        dl = h.sent[h.topic("dlq")][0].json()
        assert dl["error_kind"] == kind, dl
        assert len(dl["error"]) < 300  # the reason is bounded whatever the input was
        now = time.time()
        assert (await h.decide(request("ok", now))) is not None  # the worker goes on
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_request_too_far_ahead_or_behind_the_clock_is_dead_lettered() -> None:
    now = time.time()
    async with running(make_harness(max_past_skew_s=86400.0)) as h:
        for rid, ts in (("future", now + 3600), ("past", now - 2 * 86400), ("y2099", Y2099)):
            n = len(h.sent[h.topic("dlq")])
            assert await h.decide(request(rid, ts)) is None
            dl = h.sent[h.topic("dlq")][n].json()
            assert dl["error_kind"] == "event_time_out_of_range", dl
        assert (await h.decide(request("in-range", now - 3600))) is not None


async def test_a_2099_request_does_not_make_the_sweep_delete_live_counts() -> None:
    now = time.time()
    # The future-skew check is off here, so the 2099 request reaches the tables and max_ts.
    async with running(make_harness(max_future_skew_s=0.0, max_past_skew_s=0.0)) as h:
        for i in range(3):
            d = await h.decide(request(f"r{i}", now - 300 + i, ip=f"81.2.69.{i}"))
            assert d is not None
        assert await h.decide(request("attack", Y2099, phone="+442079460099")) is not None
        assert h.rt.max_ts == Y2099
        h.rt.active = {"by_ip": set(range(PARTITIONS)), "by_range": set(range(PARTITIONS))}
        at = sweep_now(h.rt)
        assert at <= time.time() + 1
        before = {name: len(t.data) for name, t in h.rt.tables.items()}
        assert sweep_tables(h.rt, at) == []  # nothing swept
        assert {name: len(t.data) for name, t in h.rt.tables.items()} == before
        d = await h.decide(request("r3", now, ip="81.2.69.3"))
    assert d is not None and d["counts"]["number_15m"] == 4  # the count did not restart at 1


async def test_hostile_outcomes_are_dead_lettered_with_their_own_reason() -> None:
    async with running(make_harness()) as h:
        cases = [
            (b"\xff", "malformed_json"),
            (json.dumps({"request_id": "r", "phone_number": "+442079460018", "outcome": "machine",
                         "ts": 1.8e9, "duration_s": 10**400}).encode(), "malformed_json"),
            (json.dumps({"request_id": "r", "phone_number": "+442079460018", "outcome": "machine",
                         "ts": 1.8e9, "duration_s": -1}).encode(), "invalid_field"),
            (json.dumps({"request_id": "r", "phone_number": "+442079460018", "outcome": "nope",
                         "ts": 1.8e9}).encode(), "invalid_field"),
            (json.dumps({"request_id": "r", "phone_number": "+442079460018", "outcome": "machine",
                         "ts": Y2099}).encode(), "event_time_out_of_range"),
        ]
        for i, (raw, kind) in enumerate(cases):
            await h.put("outcome", None, raw, 0)
            await h.wait(lambda i=i: len(h.sent[h.topic("dlq")]) > i)
            assert h.sent[h.topic("dlq")][i].json()["error_kind"] == kind
        assert not h.sent[h.topic("by_range")]


def _rejected(reason: str) -> float:
    from detector import metrics

    return metrics.LIST_REJECTED.labels(reason)._value.get()


async def test_an_unsigned_allow_country_on_the_lists_topic_opens_nothing() -> None:
    from detector.core.lists import make_entry
    from detector.stream import codec
    from tests.stream.test_agents import SOC

    now = time.time()
    async with running(make_harness()) as h:
        before = _rejected("unsigned")
        entry = make_entry("allow", "country", "SO", reason="x", added_at=now)
        h.rt.apply_list_message(b"allow:country:SO", codec.dumps(entry.to_dict()))
        assert _rejected("unsigned") == before + 1
        # signed by this worker's key (a compromised worker): still refused
        worker_signed = h.rt.signer.sign(make_entry("allow", "country", "SO", source="learned"),
                                         signed_at=now)
        h.rt.apply_list_message(b"allow:country:SO", codec.dumps(worker_signed))
        d = await h.decide(request("so", now, phone="+252901234567"))
        assert d is not None and d["action"] == "block", d
        h.rt.apply_list_message(b"allow:country:SO", codec.dumps(SOC.sign(entry, signed_at=now)))
        assert len(h.rt.ctx.lists) == 1  # the SOC's signed entry is applied


async def test_learned_denies_from_outcomes_are_signed_and_rate_limited() -> None:
    from detector import metrics

    now = time.time()
    async with running(make_harness()) as h:
        limited = metrics.LEARNED.labels("rate_limited")._value.get()
        for i in range(3):
            n_rng = len(h.sent[h.topic("by_range")])
            raw = json.dumps({"request_id": f"r{i}", "phone_number": "+442079460018",
                              "outcome": "agent_marked_spam", "ts": now - 300 + i}).encode()
            await h.put("outcome", None, raw, 0)
            await h.wait(lambda n=n_rng: len(h.sent[h.topic("by_range")]) > n)
            await h.through("by_range", "range", n_rng)
            await h.wait(lambda: not h.rt.batcher.lock.locked() and len(h.rt.batcher) == 0)
        assert len(h.sent[h.topic("lists")]) == 1
        assert metrics.LEARNED.labels("rate_limited")._value.get() == limited + 2
        msg = h.sent[h.topic("lists")][0]
        assert h.rt.verifier.verify(msg.key, msg.value, now=now).role == "worker"


async def test_an_internal_failure_logs_no_message_content(caplog: pytest.LogCaptureFixture) -> None:
    from detector.stream import ingest as app_module

    async with running(make_harness()) as h:
        original = app_module.parse_request

        def boom(raw: bytes) -> object:
            raise KeyError("+442079460018 from 81.2.69.160")  # a bug quoting the input

        app_module.parse_request = boom  # type: ignore[assignment]
        try:
            with caplog.at_level(logging.INFO):
                await h.put("ingest", b"k", request("x", time.time()), 0)
                await h.wait(lambda: bool(h.sent[h.topic("dlq")]))
        finally:
            app_module.parse_request = original
        dl = h.sent[h.topic("dlq")][0].json()
    assert dl["error_kind"] == "internal_error" and "+44" not in dl["error"]
    assert "KeyError at " in caplog.text  # the type and where, never the message
    assert "+442079460018" not in caplog.text and "81.2.69.160" not in caplog.text
