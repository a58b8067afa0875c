"""The sink's Kafka side: ``callback-decisions`` and ``callback-outcomes`` into the decision log.

Each poll's records become rows written in one transaction (idempotent upserts by request id),
and only then are the offsets committed: a crash re-reads and re-writes the same rows, never
loses one. A message that is not a valid decision or outcome goes to the dead-letter topic with
its reason. The retention purge runs at start and every ``PURGE_EVERY_S``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from detector import metrics
from detector.config import Settings
from detector.core.errors import InputError, MalformedMessage
from detector.sink.rows import decision_row, outcome_row
from detector.sink.store import DecisionStore, open_store

log = logging.getLogger("detector.sink")
PURGE_EVERY_S = 3600.0


@dataclass
class SinkStats:
    decisions: int = 0
    outcomes: int = 0
    dead_letters: int = 0
    purged: int = 0


def purge(store: DecisionStore, settings: Settings, now: float | None = None) -> int:
    """Delete rows older than the retention setting; returns how many."""
    before = (time.time() if now is None else now) - settings.sink_retention_days * 86400.0
    n = store.purge(before)
    metrics.SINK_PURGED.inc(n)
    log.info("sink: purged %d rows older than %.0f days", n, settings.sink_retention_days)
    return n


async def run_sink(settings: Settings, *, stop: asyncio.Event | None = None,
                   group_id: str | None = None) -> SinkStats:
    """Consume until ``stop`` is set (or forever)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from detector.stream import codec

    stop = stop or asyncio.Event()
    key = settings.pii_hash_key.encode("utf-8")
    store = open_store(settings.sink_db)
    stats = SinkStats()
    topics = {settings.topic_decisions: "decision", settings.topic_outcomes: "outcome"}
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id or f"{settings.app_id}-sink", enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=200,
        isolation_level="read_committed",  # decisions come in transactions (see the README)
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    await producer.start()
    last_purge = 0.0
    try:
        while not stop.is_set():
            if time.monotonic() - last_purge > PURGE_EVERY_S:
                stats.purged += await asyncio.to_thread(purge, store, settings)
                last_purge = time.monotonic()
            batches = await consumer.getmany(timeout_ms=500, max_records=settings.sink_batch)
            decisions, outcomes = [], []
            for tp, records in batches.items():
                kind = topics[tp.topic]
                for m in records:
                    try:
                        obj = json.loads(m.value or b"")
                        if not isinstance(obj, dict):
                            raise MalformedMessage(f"expected a JSON object, got {type(obj).__name__}")
                        if kind == "decision":
                            decisions.append(decision_row(obj, key,
                                                          store_numbers=settings.sink_store_numbers))
                        else:
                            outcomes.append(outcome_row(obj, key))
                    except (InputError, ValueError, TypeError) as exc:
                        err_kind = exc.kind if isinstance(exc, InputError) else "malformed_json"
                        # The error names a field, never its value (it may be a number).
                        record = codec.dead_letter(kind=err_kind, error=str(exc), topic=tp.topic,
                                                   partition=tp.partition, offset=m.offset,
                                                   original=m.value, key=m.key)
                        await producer.send_and_wait(settings.topic_dead_letter, codec.dumps(record),
                                                     key=m.key)
                        metrics.DEAD_LETTERS.labels(tp.topic, err_kind).inc()
                        stats.dead_letters += 1
            if decisions or outcomes:
                await asyncio.to_thread(store.write, decisions, outcomes)
                metrics.SINK_ROWS.labels("decision").inc(len(decisions))
                metrics.SINK_ROWS.labels("outcome").inc(len(outcomes))
                stats.decisions += len(decisions)
                stats.outcomes += len(outcomes)
            if batches:
                await consumer.commit()  # only after the rows are durable
    finally:
        await consumer.stop()
        await producer.stop()
        store.close()
    return stats
