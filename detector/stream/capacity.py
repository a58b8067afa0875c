"""Agent capacity in the stream: every worker follows the dialers' queue-state topic.

The dialer publishes its queue state, signed (:mod:`detector.core.capacity`), on
``<app>-queue-state`` (``DETECTOR_TOPIC_QUEUE_STATE``; 1 partition, key = ``dialer_id``, the
internal topics' retention, :func:`detector.stream.retention.queue_state_config`). Every worker
reads the whole partition without a consumer group (like the lists topic), starting
:data:`READ_BACK_S` back, verifies each message and applies it to its
:class:`~detector.core.capacity.CapacityGate` (``rt.ctx.capacity``), which ``decide`` reads: all
workers read the same messages in the same order, so they share one tier. A refused message
(unsigned, forged, unknown key, replayed) is counted by reason and logged by reason only, never
applied; the reader goes on.

:func:`publish_queue_state` is the dialer's side (``detector queue-state publish``, and the
simulated dialer of the tests).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from detector import metrics
from detector.config import Settings
from detector.core.capacity import (
    REJECT_REASONS,
    CapacityGate,
    QueueState,
    QueueStateSigner,
    QueueStateVerifier,
)
from detector.core.errors import UntrustedEntry
from detector.stream import codec, retention

log = logging.getLogger("detector.stream.capacity")

READ_BACK_S = 900.0  # history read at start: older states are stale under any sane stale_after_s
GAUGE_INTERVAL_S = 1.0


def queue_state_topic(settings: Settings) -> str:
    """``DETECTOR_TOPIC_QUEUE_STATE``, by default ``<app_id>-queue-state``."""
    return settings.topic_queue_state or f"{settings.app_id}-queue-state"


@dataclass
class CapacityStream:
    """The worker's side: the verifier of dialer keys and the gate it feeds."""

    verifier: QueueStateVerifier
    gate: CapacityGate = field(default_factory=CapacityGate)
    messages: int = 0

    def apply_message(self, rt: Any, key: bytes | None, value: bytes | None, *,
                      now: float | None = None) -> bool:
        """Verify one message and apply it; False (counted, logged by reason) when refused."""
        now = time.time() if now is None else now
        try:
            state = self.verifier.verify(key, value, now=now)
        except UntrustedEntry as exc:
            log.warning("capacity: refused a queue-state message (%s)", exc.reason)
            metrics.QUEUE_STATE_REJECTED.labels(metrics.bounded(exc.reason, REJECT_REASONS)).inc()
            return False
        self.gate.apply(state, rt.policy.capacity, received_at=now)
        metrics.QUEUE_STATES.inc()
        update_gauges(rt, now)
        return True


def install(app: Any, rt: Any, settings: Settings) -> None:
    """Declare the topic, the reader task and the gauges on ``app`` (called by ``make_app``)."""
    from detector.keys import dialer_verifier

    stream = rt.capacity = CapacityStream(dialer_verifier(settings))
    rt.ctx.capacity = stream.gate
    topic = app.topic(queue_state_topic(settings), partitions=1, internal=True,
                      config=retention.queue_state_config(settings), key_type=bytes,
                      value_type=bytes, key_serializer="raw", value_serializer="raw")
    rt.topics["queue_state"] = topic

    @app.task
    async def queue_state_reader() -> None:
        await read_queue_states_forever(app, rt, topic.get_topic_name())

    @app.timer(GAUGE_INTERVAL_S)
    async def capacity_gauges() -> None:
        update_gauges(rt, time.time())

    for reason in REJECT_REASONS:  # every series exists from the start, at 0
        metrics.QUEUE_STATE_REJECTED.labels(reason)
    for mode in ("enforce", "monitor"):
        metrics.CAPACITY_DEFLECTIONS.labels(mode)
    update_gauges(rt, time.time())


def update_gauges(rt: Any, now: float) -> None:
    """Tier, pressure, dialers and staleness at ``now`` (the tier is 0 while stale: fail open)."""
    gate: CapacityGate = rt.ctx.capacity
    level = gate.level(now, rt.policy.capacity)
    metrics.CAPACITY_TIER.set(level.tier)
    metrics.CAPACITY_PRESSURE.set(level.pressure)
    metrics.CAPACITY_STALE.set(1 if level.stale else 0)
    metrics.CAPACITY_DIALERS.set(len(gate.states))
    newest = gate.newest()
    metrics.CAPACITY_STATE_AGE.set(-1 if newest is None else max(now - newest, 0.0))


async def read_queue_states_forever(app: Any, rt: Any, topic: str) -> None:
    """Follow ``topic`` from READ_BACK_S ago, applying every verified queue state (every worker,
    no consumer group)."""
    from detector.stream.io import open_broadcast_reader, stop_consumer

    consumer = await open_broadcast_reader(app, rt, topic, READ_BACK_S, "capacity")
    try:
        stream: CapacityStream = rt.capacity
        while not app.should_stop:
            batch = await consumer.getmany(timeout_ms=200, max_records=1000)
            for msgs in batch.values():
                for m in msgs:
                    stream.messages += 1
                    try:
                        stream.apply_message(rt, m.key, m.value)
                    except Exception as exc:  # a bug must not stop the reader: count, go on
                        log.error("capacity: could not apply a queue state (%s)", type(exc).__name__)
                        metrics.QUEUE_STATE_REJECTED.labels("malformed").inc()
    finally:
        await stop_consumer(consumer)


# --------------------------------------------------------------------------- the dialer's side


async def apublish_queue_state(settings: Settings, state: QueueState, signer: QueueStateSigner | None,
                               *, raw: bytes | None = None) -> dict[str, Any] | None:
    """Sign ``state`` and send it to the queue-state topic, keyed by its ``dialer_id``, with the
    Kafka timestamp = its ``ts``. ``signer`` None sends it unsigned (tests of the refusal);
    ``raw`` sends those bytes instead (tests of malformed input). Returns the wire dict."""
    from aiokafka import AIOKafkaProducer

    from detector.stream.kafka_security import client_kwargs
    from detector.stream.kafka_security import start as start_client

    wire = state.to_dict() if signer is None else signer.sign(state)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                **client_kwargs(settings))
    await start_client(producer, settings, "queue-state")
    try:
        await producer.send_and_wait(queue_state_topic(settings), key=state.dialer_id.encode("utf-8"),
                                     value=raw if raw is not None else codec.dumps(wire),
                                     timestamp_ms=int(state.ts * 1000))
    finally:
        await producer.stop()
    return wire


def publish_queue_state(settings: Settings, state: QueueState,
                        signer: QueueStateSigner | None) -> dict[str, Any] | None:
    return asyncio.run(apublish_queue_state(settings, state, signer))
