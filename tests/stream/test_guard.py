"""Liveness pieces without a broker: stall detection, broker probe state, bounded waits on
deliveries, the crash path, the stop deadline, the log rate limit, internal-error descriptions."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from detector import metrics
from detector.stream import failures, guard, lograte


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Crashed(Exception):
    pass


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise Crashed(code)

    monkeypatch.setattr(guard, "_exit", fake_exit)
    return codes


def gauge(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get()) if labels else float(metric._value.get())


def test_a_stage_with_input_and_no_progress_is_stalled_until_it_progresses(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    watch = guard.StageWatch(stall_after=30.0, clock=clock)
    clock.t += 100  # idle for 100 s: not stalled, age 0
    assert watch.check({}) == {}
    assert gauge(metrics.STAGE_PROGRESS_AGE, "range") == 0
    clock.t += 20
    assert watch.check({"range": "3 events in an undecided batch"}) == {}
    clock.t += 15  # 35 s with input, no progress
    stalled = watch.check({"range": "3 events in an undecided batch"})
    assert list(stalled) == ["range"] and "no progress for 35 s" in stalled["range"]
    assert gauge(metrics.STAGE_STALLED, "range") == 1 and gauge(metrics.STAGE_STALLED, "ip") == 0
    assert gauge(metrics.STAGE_PROGRESS_AGE, "range") == 35
    assert any("range stage: no progress" in r.getMessage() for r in caplog.records)
    watch.progress("range")
    clock.t += 1
    assert watch.check({"range": "1 events in an undecided batch"}) == {}
    assert gauge(metrics.STAGE_STALLED, "range") == 0


def test_broker_probe_turns_unreachable_after_ten_seconds_without_an_answer() -> None:
    clock = Clock()
    probe = guard.BrokerProbe(clock=clock)
    clock.t += 5
    assert probe.record(False, "KafkaConnectionError") and probe.problem() is None
    clock.t += 6
    assert not probe.record(False, "KafkaConnectionError")
    assert "unreachable for 11 s (KafkaConnectionError)" in (probe.problem() or "")
    assert gauge(metrics.BROKER_REACHABLE) == 0
    assert probe.record(True) and probe.problem() is None
    assert gauge(metrics.BROKER_REACHABLE) == 1


def test_probe_once_records_a_failed_metadata_request() -> None:
    class DeadClient:
        def get_random_node(self) -> int:
            return 1

        async def send(self, node: int, request: Any) -> None:
            raise ConnectionRefusedError

    clock = Clock()
    probe = guard.BrokerProbe(clock=clock)
    clock.t += 11
    assert asyncio.run(probe.probe_once(DeadClient(), "t")) is False
    assert probe.last_error == "ConnectionRefusedError"


def test_a_failed_delivery_crashes_the_worker(exits: list[int]) -> None:
    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        guard.watch_delivery(fut)
        fut.set_exception(TimeoutError("expired"))
        await asyncio.sleep(0)  # the done callback runs (the real _exit never returns)

    asyncio.run(main())
    assert exits == [guard.EXIT_DELIVERY_FAILED]


def test_a_failed_delivery_while_stopping_is_only_logged(
        exits: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard, "_deadline", object())  # SIGTERM received

    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        guard.watch_delivery(fut)
        fut.set_exception(RuntimeError("producer closed"))
        await asyncio.sleep(0)

    asyncio.run(main())
    assert exits == []


def test_a_successful_delivery_does_nothing(exits: list[int]) -> None:
    async def main() -> None:
        fut = asyncio.get_running_loop().create_future()
        guard.watch_delivery(fut)
        fut.set_result(None)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert exits == []


def test_wait_delivered_warns_while_waiting_then_gives_up(
        exits: list[int], caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        never = asyncio.get_running_loop().create_future()
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        await guard.wait_delivered([never, done], stage="range", what="changelog writes",
                                   diagnose=lambda: ["t-pair-changelog[1]"], warn_every=0.02,
                                   give_up_after=0.05)

    with pytest.raises(Crashed):
        asyncio.run(main())
    assert exits == [guard.EXIT_DELIVERY_FAILED]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 4, warnings  # one per warn_every until give_up_after
    assert "1 of 1 changelog writes not acknowledged" in warnings[0]
    assert "no leader known for t-pair-changelog[1]" in warnings[0]


def test_wait_delivered_returns_when_everything_is_acknowledged() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(3)]
        for i, f in enumerate(futs):
            loop.call_later(0.01 * i, f.set_result, None)
        await guard.wait_delivered(futs, stage="range", what="changelog writes", warn_every=1.0)

    asyncio.run(main())


def test_stop_deadline_exits_even_if_the_graceful_stop_hangs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    codes: list[int] = []
    monkeypatch.setattr(guard, "_exit", codes.append)
    monkeypatch.setattr(guard, "_deadline", None)
    guard.start_shutdown_deadline(0.05)
    guard.start_shutdown_deadline(0.05)  # a second signal does not start a second timer
    deadline = time.monotonic() + 5
    while not codes and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert codes == [guard.EXIT_SHUTDOWN_DEADLINE]


# --- log rate limit ----------------------------------------------------------------------------


def record(name: str, msg: str, level: int = logging.WARNING, *args: Any) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, None)


def test_rate_limit_bounds_a_flood_and_reports_what_it_dropped() -> None:
    clock = Clock()
    flt = lograte.RateLimitFilter(per_key=5, total=50, window=10.0, clock=clock)
    before = gauge(metrics.LOG_SUPPRESSED)
    passed = 0
    for _second in range(10):  # 1,500 lines/s for 10 s, three templates, varying arguments
        for i in range(1500):
            passed += flt.filter(record("aiokafka", ["Unable connect to node %s", "Got error %s",
                                                     "Heartbeat failed %s"][i % 3], logging.ERROR,
                                        str(i)))
        clock.t += 1.0
    assert passed == 15  # 5 per template per 10 s window
    assert gauge(metrics.LOG_SUPPRESSED) - before == 15000 - 15
    rec = record("aiokafka", "Unable connect to node %s", logging.ERROR, "x")
    assert flt.filter(rec)  # a new window
    assert "[14985 similar log lines suppressed before this]" in rec.getMessage()
    assert flt.filter(record("detector", "fatal", logging.CRITICAL))  # never dropped


def test_rate_limit_caps_distinct_messages_too() -> None:
    flt = lograte.RateLimitFilter(per_key=5, total=20, window=10.0, clock=Clock())
    assert sum(flt.filter(record("faust", f"distinct {i}")) for i in range(500)) == 20
    # the detector's own lines are capped per template only: Faust's start-up burst does not
    # hide a stage's warning
    assert flt.filter(record("detector.stream", "range: %s", logging.WARNING, "x"))
    assert sum(flt.filter(record("detector.stream", "range: %s", logging.WARNING, str(i)))
               for i in range(10)) == 4


def test_install_puts_one_filter_on_every_root_handler() -> None:
    logger = logging.getLogger("detector.test.lograte")
    logger.handlers = [logging.NullHandler(), logging.NullHandler()]
    flt = lograte.install(logger)
    assert flt is not None and all(flt in h.filters for h in logger.handlers)
    assert lograte.install(logger) is flt


# --- internal errors -----------------------------------------------------------------------------


def test_describe_names_type_and_line_never_the_message() -> None:
    secret = "+447700900123 from 81.2.69.160"
    try:
        raise ValueError(f"bad number {secret}")
    except ValueError as exc:
        text = failures.describe(exc)
    assert text.startswith("ValueError at ") and "test_guard.py:" in text
    assert "test_describe_names_type_and_line_never_the_message" in text
    assert "447700900123" not in text and "81.2.69.160" not in text


def test_kafka_errors_are_not_request_errors() -> None:
    from aiokafka.errors import KafkaTimeoutError

    assert failures.is_kafka_error(KafkaTimeoutError())
    assert not failures.is_kafka_error(KeyError("x"))


def test_freeze_watch_exits_after_a_gap_longer_than_the_session_timeout(exits: list[int]) -> None:
    clock = Clock()
    watch = guard.FreezeWatch(freeze_after=10.0, clock=clock)
    watch.check()  # not running (no app tasks, as in test_context): never exits
    clock.t += 60
    watch.check()
    assert exits == []
    watch.last_tick = clock.t
    clock.t += 9.5  # a long wait on Kafka still ticks: fine
    watch.check()
    clock.t += 10.5  # SIGSTOP for 10.5 s: the group may have moved the partitions
    with pytest.raises(Crashed):
        watch.check()
    assert exits == [guard.EXIT_DELIVERY_FAILED]


def test_a_freeze_counts_from_the_last_heartbeat_that_may_precede_it() -> None:
    """The group expires a session SESSION_TIMEOUT_S after the last heartbeat, which may have
    been sent up to one heartbeat interval before the freeze began."""
    assert guard.FREEZE_AFTER_S <= guard.SESSION_TIMEOUT_S - guard.HEARTBEAT_INTERVAL_S
    assert guard.FreezeWatch().freeze_after == guard.FREEZE_AFTER_S


def test_a_partition_with_lag_and_no_progress_stalls_its_stage_even_while_others_move() -> None:
    clock = Clock()
    watch = guard.StageWatch(stall_after=30.0, clock=clock)
    tp = ("by-range", 0)
    assert watch.partition_stuck_for(tp, 100, lag=50) == 0.0
    clock.t += 20
    assert watch.partition_stuck_for(tp, 100, lag=50) == 20.0
    clock.t += 15
    assert watch.partition_stuck_for(tp, 100, lag=50) == 35.0
    watch.progress("range")  # partition 1 keeps the stage as a whole moving ...
    stalled = watch.check({"range": "50 messages waiting on by-range"},
                          {"range": "by-range[0] at offset 100, 50 behind for 35 s"})
    assert "by-range[0]" in stalled["range"]  # ... partition 0 is stalled all the same
    assert gauge(metrics.STAGE_STALLED, "range") == 1
    assert watch.partition_stuck_for(tp, 101, lag=49) == 0.0  # it took a record: moving again
    assert watch.partition_stuck_for(tp, 101, lag=0) == 0.0 and tp not in watch.partition_since
    assert watch.check({}) == {}


async def _no_ends(rt: Any, tps: Any) -> dict[Any, int]:
    return {}


def test_check_stages_rereads_a_partition_once_then_reports_it_stalled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from faust.types import TP

    from detector.stream.delivery import OffsetGate

    clock = Clock()
    calls: list[tuple[str, Any]] = []

    class Consumer:
        _paused_partitions: set[Any] = set()
        _buffered_partitions: set[Any] = set()
        _active_partitions: set[Any] = {TP("by-range", 1)}  # partition 0 is not fetched

        def assignment(self) -> set[Any]:
            return {TP("by-range", 0), TP("by-range", 1)}

        def highwater(self, tp: Any) -> int:
            return 90

        def resume_partitions(self, tps: Any) -> None:
            calls.append(("resume", sorted(tps)))

        async def seek_wait(self, offsets: Any) -> None:
            calls.append(("seek", dict(offsets)))

    gate = OffsetGate("by-range")
    gate.reset({0: 100, 1: 7})
    rt = SimpleNamespace(watch=guard.StageWatch(stall_after=30.0, clock=clock),
                         gates={"by_range": gate}, active={"by_range": {0, 1}},
                         probe=SimpleNamespace(reachable=True), batcher=None)
    app = SimpleNamespace(consumer=Consumer())

    async def ends(rt: Any, tps: Any) -> dict[Any, int]:
        return {("by-range", 0): 150, ("by-range", 1): 7}

    monkeypatch.setattr(guard, "_end_offsets", ends)
    stage_of = {"by_range": "range"}
    assert asyncio.run(guard.check_stages(app, rt, stage_of)) == {}
    clock.t += 11
    rt.watch.progress("range")  # partition 1 has nothing waiting; the stage itself is fine
    assert asyncio.run(guard.check_stages(app, rt, stage_of)) == {}  # not stalled yet, but ...
    assert calls == [("resume", [TP("by-range", 0)]), ("seek", {TP("by-range", 0): 100})]  # re-read
    clock.t += 20
    rt.watch.progress("range")
    stalled = asyncio.run(guard.check_stages(app, rt, stage_of))
    assert stalled["range"].startswith("range stage: no progress on by-range[0] at offset 100, 50 behind")
    assert "not fetched" in stalled["range"]
    assert len(calls) == 2  # once: a partition still stuck after that stays visible, no loop
    monkeypatch.setattr(guard, "_end_offsets", _no_ends)  # the broker does not answer:
    assert asyncio.run(guard.check_stages(app, rt, stage_of)) == {}  # nothing judged
