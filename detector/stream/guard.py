"""Liveness of a worker: no silent hang, no silent loss, a bounded stop.

* **Deliveries.** Every message a stage sends is watched (:func:`watch_delivery`): if Kafka
  does not take it within the producer's timeout (``DELIVERY_TIMEOUT_S``, Faust's default is
  1,200 s), the worker exits at once (:func:`crash`, exit code 75) instead of letting Faust's
  next commit pass over the lost message; a restart resumes from the committed offsets, which
  the idempotent stages make safe (the same path as a SIGKILL). Waits on deliveries
  (:func:`wait_delivered`) log one line every ``WARN_EVERY_S`` while they last.
* **Stalls.** :class:`StageWatch` records each stage's last progress, and each input
  partition's (the offset its stage expects next, against the partition's end offset read from
  the broker every ``PROBE_INTERVAL_S``). A stage with input (consumer lag, or an undecided
  range batch) and no progress for ``STALL_AFTER_S``, or one input partition with lag whose
  stage has not taken a record from it for that long while other partitions move, is stalled:
  ``/healthz`` answers 503 with the reason, ``detector_stage_stalled{stage}`` is 1, and the log
  says what Faust's consumer does with the partition. A partition with lag and no record taken
  for ``REREAD_AFTER_S`` is resumed and re-read from the expected offset once
  (:func:`check_stages`): Faust's stream silently drops records fetched around a rebalance,
  and the offset gate sees such a hole only when a later record of the partition arrives.
* **Broker.** :class:`BrokerProbe` asks the broker for one topic's metadata every
  ``PROBE_INTERVAL_S``; no answer for ``UNREACHABLE_AFTER_S`` makes ``/healthz`` 503 and
  ``detector_broker_reachable`` 0.
* **Stop.** :func:`start_shutdown_deadline`: after SIGTERM the worker has ``SHUTDOWN_DEADLINE_S``
  to drain (Faust stops the agents, commits acked offsets, leaves the group); then it exits
  anyway. Whatever was not committed is redelivered to the next owner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from detector import metrics

log = logging.getLogger("detector.stream")

STAGES = ("ingest", "ip", "range", "outcome")
STALL_AFTER_S = 30.0
REREAD_AFTER_S = 10.0  # an input partition with lag and no record taken: read it again once
DELIVERY_TIMEOUT_S = 90.0  # producer request timeout: one produce request, one queued batch
WARN_EVERY_S = 10.0
PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 5.0
UNREACHABLE_AFTER_S = 10.0
SHUTDOWN_DEADLINE_S = 9.0
SHUTDOWN_FLUSH_WAIT_S = 4.0  # SIGTERM: how long a range flush in flight may finish its transactions
PREPARE_TIMEOUT_S = 30.0  # reading committed offsets, seeking: admin and consumer calls
SESSION_TIMEOUT_S = 10.0  # the consumer group's session timeout (make_app)
HEARTBEAT_INTERVAL_S = 2.0  # the consumer's heartbeat interval (make_app)
# A process that did not run for this long may have lost its partitions: the group expires a
# session SESSION_TIMEOUT_S after the last heartbeat, which may precede the freeze by an interval.
FREEZE_AFTER_S = SESSION_TIMEOUT_S - HEARTBEAT_INTERVAL_S - 1.0
EXIT_DELIVERY_FAILED = 75  # EX_TEMPFAIL: restart me
EXIT_SHUTDOWN_DEADLINE = 1

_exit: Callable[[int], Any] = os._exit  # tests replace it


def crash(reason: str, code: int = EXIT_DELIVERY_FAILED) -> None:
    """Exit now, without Faust's graceful stop (which would commit acked offsets whose output
    may be lost). A supervisor restarts the worker; it resumes from the committed offsets."""
    log.critical("%s: exiting with code %d so that a restart resumes from the committed offsets",
                 reason, code)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: S110 - best effort before exiting
            pass
    sys.stderr.flush()
    _exit(code)


def _on_delivered(fut: asyncio.Future[Any]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None and _deadline is not None:  # stopping: what was committed was flushed
        log.warning("stop: a message was not delivered (%s); its source is not committed and "
                    "will be redelivered", type(exc).__name__)
        return
    if exc is not None:
        # Runs before the task that waits on the same batch (e.g. Faust's commit after its
        # producer flush) resumes, so no commit can pass over this message.
        crash(f"Kafka did not accept a message ({type(exc).__name__})")


def watch_delivery(fut: Any) -> Any:
    """Crash the worker if this delivery future fails (see :func:`crash`); returns ``fut``."""
    add = getattr(fut, "add_done_callback", None)
    if add is not None:
        add(_on_delivered)
    return fut


async def wait_delivered(futs: Iterable[Any], *, stage: str, what: str,
                         diagnose: Callable[[], list[str]] | None = None,
                         warn_every: float = WARN_EVERY_S,
                         give_up_after: float = DELIVERY_TIMEOUT_S + 30.0) -> None:
    """Wait until Kafka acknowledged every future; one warning per ``warn_every`` while it does
    not, and :func:`crash` after ``give_up_after`` (the producer should have failed them before)."""
    pending = {f for f in futs if not f.done()}
    total = len(pending)
    t0 = time.monotonic()
    while pending:
        done, pending = await asyncio.wait(pending, timeout=warn_every)
        for f in done:
            f.result()  # a failure raised here was already handled by watch_delivery
        if not pending:
            break
        waited = time.monotonic() - t0
        metrics.KAFKA_WAITS.labels(what.replace(" ", "_")).inc()
        stuck = diagnose() if diagnose is not None else []
        log.warning("%s: %d of %d %s not acknowledged by Kafka after %.0f s%s", stage,
                    len(pending), total, what, waited,
                    f" (no leader known for {', '.join(stuck[:8])})" if stuck else "")
        if waited >= give_up_after:
            crash(f"{stage}: {len(pending)} {what} not acknowledged after {waited:.0f} s")
            return


# --------------------------------------------------------------------------- stalls


class StageWatch:
    """Last progress per stage and per input partition, and which stages are stalled (input
    but no progress)."""

    def __init__(self, stall_after: float = STALL_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_after = stall_after
        self.clock = clock
        now = clock()
        self.last: dict[str, float] = dict.fromkeys(STAGES, now)
        self.stalled: dict[str, str] = {}  # stage -> reason
        # (topic, partition) with lag -> (the offset its stage expects, since when)
        self.partition_since: dict[tuple[str, int], tuple[int, float]] = {}
        self.kicked: set[tuple[str, int]] = set()  # resumed and re-read once
        self.ends: Any = None  # the consumer that reads input end offsets (check_stages)
        for stage in STAGES:  # every series exists from the start
            metrics.STAGE_STALLED.labels(stage).set(0)
            metrics.STAGE_PROGRESS_AGE.labels(stage).set(0)
            metrics.INTERNAL_ERRORS.labels(stage)
        metrics.KAFKA_WAITS.labels("changelog_writes")

    def progress(self, stage: str) -> None:
        self.last[stage] = self.clock()

    def partition_stuck_for(self, tp: tuple[str, int], expected: int | None, lag: int) -> float:
        """Seconds the stage has expected the same offset of ``tp`` while it had ``lag``."""
        now = self.clock()
        prev = self.partition_since.get(tp)
        if lag <= 0 or expected is None:
            self.partition_since.pop(tp, None)
            self.kicked.discard(tp)
            return 0.0
        if prev is None or prev[0] != expected:
            self.partition_since[tp] = (expected, now)
            self.kicked.discard(tp)
            return 0.0
        return now - prev[1]

    def forget_partitions(self) -> None:
        """No fresh end offsets (broker unreachable, rebalancing): start the clocks again."""
        self.partition_since.clear()

    def check(self, inputs: dict[str, str],
              stuck_partitions: dict[str, str] | None = None) -> dict[str, str]:
        """``inputs``: stage -> what input it has ("" = none); ``stuck_partitions``: stage ->
        its input partitions with lag and no progress for ``stall_after``. Updates and returns
        the stalled stages with their reasons, and the metrics."""
        now = self.clock()
        stalled: dict[str, str] = {}
        stuck_partitions = stuck_partitions or {}
        for stage in STAGES:
            has = inputs.get(stage, "")
            if not has:  # idle counts as up to date
                self.last[stage] = now
            age = now - self.last[stage]
            metrics.STAGE_PROGRESS_AGE.labels(stage).set(round(age, 1))
            reasons = []
            if has and age >= self.stall_after:
                reasons.append(f"no progress for {age:.0f} s with {has}")
            if stuck_partitions.get(stage):
                reasons.append(f"no progress on {stuck_partitions[stage]}")
            if reasons:
                stalled[stage] = f"{stage} stage: " + "; ".join(reasons)
            metrics.STAGE_STALLED.labels(stage).set(1 if stage in stalled else 0)
        for stage, reason in stalled.items():
            if stage not in self.stalled:
                log.error("%s", reason)
        for stage in self.stalled:
            if stage not in stalled:
                log.warning("%s stage: progressing again", stage)
        self.stalled = stalled
        return stalled


async def check_stages(app: Any, rt: Any, stage_of: dict[str, str]) -> dict[str, str]:
    """Every PROBE_INTERVAL_S: which stages are stalled (:meth:`StageWatch.check`), per stage
    and per input partition. A partition is judged on its end offset read from the broker (the
    consumer's own high watermark is stale for a partition it stopped fetching); without an
    answer nothing is judged per partition. A stalled partition is resumed and re-read from the
    offset its stage expects, once (the offset gate drops what comes twice)."""
    from faust.types import TP

    from detector.stream import faust_internals

    watch: StageWatch = rt.watch
    tps = [(gate.topic, p) for key, gate in rt.gates.items() for p in rt.active.get(key, ())]
    ends = await _end_offsets(rt, tps) if tps and rt.probe.reachable else {}
    if not ends:
        watch.forget_partitions()
    stuck: dict[str, list[str]] = {}
    for key, gate in rt.gates.items():
        for p in rt.active.get(key, ()):
            tp = (gate.topic, p)
            end, expected = ends.get(tp), gate.expected(p)
            lag = end - expected if end is not None and expected is not None else 0
            age = watch.partition_stuck_for(tp, expected, lag) if ends else 0.0
            if age < min(REREAD_AFTER_S, watch.stall_after):
                continue
            state = faust_internals.partition_flow_state(app, TP(*tp))
            if age >= watch.stall_after:
                stuck.setdefault(stage_of[key], []).append(
                    f"{gate.topic}[{p}] at offset {expected}, {lag} behind for {age:.0f} s "
                    f"(consumer: {state})")
            if tp not in watch.kicked:
                # Faust's stream drops records it fetched around a rebalance (flow stopped or
                # an older generation, faust/streams.py) without acking them; when no later
                # record of the partition arrives, the offset gate never sees the hole.
                watch.kicked.add(tp)
                metrics.REREADS.labels(stage_of[key]).inc()
                log.warning("%s[%d]: no record taken for %.0f s with %d waiting (consumer: %s); "
                            "resuming it and reading again from offset %s", gate.topic, p, age,
                            lag, state, expected)
                try:
                    app.consumer.resume_partitions({TP(*tp)})
                    await asyncio.wait_for(app.consumer.seek_wait({TP(*tp): expected}), PROBE_TIMEOUT_S)
                except Exception as exc:  # rebalancing: the next assignment starts afresh
                    log.warning("%s[%d]: could not resume (%s)", gate.topic, p, type(exc).__name__)
    return watch.check(stage_inputs(app, rt, stage_of, ends),
                       {stage: "; ".join(v) for stage, v in stuck.items()})


async def _end_offsets(rt: Any, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """End offsets of the stages' input partitions, from a group-less consumer kept open
    (``{}`` when the broker does not answer within PROBE_TIMEOUT_S)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from detector.stream.kafka_security import client_kwargs

    watch: StageWatch = rt.watch
    try:
        if watch.ends is None:
            s = rt.settings
            consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None,
                                        enable_auto_commit=False, **client_kwargs(s))
            try:
                await asyncio.wait_for(consumer.start(), PROBE_TIMEOUT_S)
            except BaseException:
                await stop_end_offsets_consumer(consumer)
                raise
            watch.ends = consumer
        got = await asyncio.wait_for(
            watch.ends.end_offsets([TopicPartition(t, p) for t, p in tps]), PROBE_TIMEOUT_S)
        return {(tp.topic, tp.partition): int(o) for tp, o in got.items()}
    except Exception as exc:
        log.debug("end offsets unavailable: %r", exc)
        return {}


async def stop_end_offsets_consumer(consumer: Any) -> None:
    try:
        await asyncio.wait_for(consumer.stop(), PROBE_TIMEOUT_S)
    except Exception as exc:  # stopping anyway
        log.debug("end offsets consumer: %r", exc)


def stage_inputs(app: Any, rt: Any, stage_of: dict[str, str],
                 ends: dict[tuple[str, int], int] | None = None) -> dict[str, str]:
    """stage -> a description of the input it has waiting ("" = none): consumer lag on its
    input partitions (end offset - the next offset its gate expects; ``ends`` from the broker,
    else the consumer's last seen high watermark), and for the range stage the events of an
    unflushed batch."""
    out: dict[str, str] = dict.fromkeys(STAGES, "")
    try:
        consumer = app.consumer
        from faust.types import TP

        for key, gate in rt.gates.items():
            lag = 0
            for p in rt.active.get(key, ()):
                hw = (ends or {}).get((gate.topic, p))
                if hw is None:
                    hw = consumer.highwater(TP(gate.topic, p))
                nxt = gate.expected(p)
                if hw is not None and nxt is not None and hw > nxt:
                    lag += int(hw) - nxt
            if lag:
                stage = stage_of[key]
                out[stage] = f"{lag} messages waiting on {gate.topic}"
    except Exception as exc:  # rebalancing: nothing reliable to say
        log.debug("stage inputs unavailable: %r", exc)
    batcher = getattr(rt, "batcher", None)
    if batcher is not None and len(batcher):
        out["range"] = f"{len(batcher)} events in an undecided batch" + (
            f"; {out['range']}" if out["range"] else "")
    return out


# --------------------------------------------------------------------------- broker


class BrokerProbe:
    """Is the broker answering? A one-topic metadata request every ``PROBE_INTERVAL_S``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last_ok = clock()
        self.last_error = ""
        self.reachable = True
        metrics.BROKER_REACHABLE.set(1)

    def record(self, ok: bool, error: str = "") -> bool:
        now = self.clock()
        if ok:
            self.last_ok = now
        else:
            self.last_error = error
        reachable = now - self.last_ok < UNREACHABLE_AFTER_S
        if reachable != self.reachable:
            if reachable:
                log.warning("kafka: broker reachable again")
            else:
                log.error("kafka: broker unreachable for %.0f s (%s)", now - self.last_ok, error)
        self.reachable = reachable
        metrics.BROKER_REACHABLE.set(1 if reachable else 0)
        return reachable

    def problem(self) -> str | None:
        if self.reachable:
            return None
        return (f"kafka broker unreachable for {self.clock() - self.last_ok:.0f} s "
                f"({self.last_error or 'no answer'})")

    async def probe_once(self, client: Any, topic: str) -> bool:
        from aiokafka.protocol.metadata import MetadataRequest

        try:
            node = client.get_random_node()
            if node is None:
                raise ConnectionError("no broker known")
            await asyncio.wait_for(client.send(node, MetadataRequest([topic])), PROBE_TIMEOUT_S)
        except Exception as exc:
            return self.record(False, type(exc).__name__)
        return self.record(True)


# --------------------------------------------------------------------------- freeze


class FreezeWatch:
    """Was this process frozen (SIGSTOP, a paused VM) for longer than the group's session timeout?

    Then the group may have given its partitions to another worker, which decides the same
    requests again: a decision this process computed before the freeze must not be sent after
    it (measured: SIGSTOP for 14 s gave two different decisions for one request). The main loop
    ticks every ``TICK_S``; no tick for ``freeze_after`` seconds means the process was frozen
    (Kafka waits do not stop the ticks; heartbeats run in the consumer's own thread), and the
    worker exits before sending anything more. A restart resumes from the committed offsets.
    The producers' senders call :meth:`check` before each produce request
    (:func:`faust_internals.check_before_sends`), so what was queued before the freeze does not
    go out either. Decisions do not depend on this check: they are fenced by Kafka
    (:class:`~detector.stream.delivery.FencedDecisions`); it keeps a zombie's table and
    internal-topic writes off the log, which fencing does not cover.
    """

    TICK_S = 0.5

    def __init__(self, freeze_after: float = FREEZE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.freeze_after = freeze_after
        self.clock = clock
        self.last_tick: float | None = None  # None: not running (tests without the app's tasks)

    def check(self) -> None:
        if self.last_tick is None:
            return
        gap = self.clock() - self.last_tick
        if gap >= self.freeze_after:
            crash(f"the process did not run for {gap:.0f} s (frozen?): its partitions may belong "
                  "to another worker now, so nothing decided before is sent")
        self.last_tick = self.clock()

    async def run(self) -> None:
        self.last_tick = self.clock()
        while True:
            await asyncio.sleep(self.TICK_S)
            self.check()


FREEZE = FreezeWatch()


# --------------------------------------------------------------------------- stop


_deadline: threading.Timer | None = None


def start_shutdown_deadline(seconds: float = SHUTDOWN_DEADLINE_S) -> None:
    """From now, the process exits within ``seconds`` whatever the graceful stop is waiting on."""
    global _deadline
    if _deadline is not None:
        return

    def expire() -> None:
        crash(f"stop: still draining after {seconds:.0f} s", EXIT_SHUTDOWN_DEADLINE)

    _deadline = threading.Timer(seconds, expire)
    _deadline.daemon = True
    _deadline.start()
