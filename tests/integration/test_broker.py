"""The real Kafka broker from tools/kafka/kafka.sh works the way the detector needs.

Round-trip of keys/values/headers/explicit timestamps over a 4-partition topic,
key-stable partitioning, consumer-group offset commits (__consumer_offsets),
transactions (__transaction_state) and compacted topics.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.partitioner import murmur2
from kafka_broker import create_topics

pytestmark = pytest.mark.integration

N_MESSAGES = 100
N_PARTITIONS = 4
N_KEYS = 10
# Explicit CreateTime timestamps in the past: brokers reject timestamps too far
# in the future (log.message.timestamp.after.max.ms), not in the past.
BASE_TS_MS = 1_700_000_000_000
STEP_MS = 1_000
TEST_TIMEOUT_S = 60


def _message(i: int) -> tuple[bytes, bytes, int, list[tuple[str, bytes]]]:
    key = f"caller-{i % N_KEYS:02d}".encode()
    value = f'{{"seq": {i}, "payload": "msg-{i}"}}'.encode()
    return key, value, BASE_TS_MS + i * STEP_MS, [("seq", str(i).encode())]


async def _consume_exactly(
    bootstrap: str, topic: str, partitions: int, count: int, **consumer_kw: Any
) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **consumer_kw,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        while len(records) < count:
            batch = await consumer.getmany(timeout_ms=1000)
            for recs in batch.values():
                records.extend(recs)
        # Nothing beyond what was produced.
        extra = await consumer.getmany(timeout_ms=500)
        records.extend(r for recs in extra.values() for r in recs)
        return records
    finally:
        await consumer.stop()


async def _roundtrip(bootstrap: str, topic: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for i in range(N_MESSAGES):
            key, value, ts, headers = _message(i)
            futures.append(await producer.send(topic, value=value, key=key, timestamp_ms=ts, headers=headers))
        sent = await asyncio.gather(*futures)
    finally:
        await producer.stop()

    # The producer's view: every key went to one partition, the murmur2 one
    # (the Java client's default partitioner, so Java/Faust/aiokafka agree).
    produced_partition: dict[bytes, set[int]] = defaultdict(set)
    for i, meta in enumerate(sent):
        key = _message(i)[0]
        produced_partition[key].add(meta.partition)
        assert meta.partition == (murmur2(key) & 0x7FFFFFFF) % N_PARTITIONS
        # (meta.timestamp is per batch in aiokafka; timestamps are checked on consume)
    assert all(len(p) == 1 for p in produced_partition.values()), produced_partition
    assert len({next(iter(p)) for p in produced_partition.values()}) >= 2  # really spread

    records = await _consume_exactly(bootstrap, topic, N_PARTITIONS, N_MESSAGES)
    assert len(records) == N_MESSAGES

    got = {}
    for rec in records:
        seq = int(dict(rec.headers)["seq"])
        assert seq not in got, f"duplicate seq {seq}"
        got[seq] = rec
    assert sorted(got) == list(range(N_MESSAGES))

    consumed_partition: dict[bytes, set[int]] = defaultdict(set)
    for seq, rec in got.items():
        key, value, ts, headers = _message(seq)
        assert rec.key == key
        assert rec.value == value
        assert rec.timestamp == ts
        assert rec.timestamp_type == 0  # CreateTime, not LogAppendTime
        assert list(rec.headers) == headers
        assert rec.partition == sent[seq].partition
        assert rec.offset == sent[seq].offset
        consumed_partition[key].add(rec.partition)
    assert all(len(p) == 1 for p in consumed_partition.values()), consumed_partition

    # Per-partition order is send order.
    by_partition: dict[int, list[Any]] = defaultdict(list)
    for rec in records:
        by_partition[rec.partition].append(rec)
    for recs in by_partition.values():
        seqs = [int(dict(r.headers)["seq"]) for r in sorted(recs, key=lambda r: r.offset)]
        assert seqs == sorted(seqs)


def test_roundtrip_keys_values_timestamps_and_partitioning(
    kafka_bootstrap: str, fresh_topic_prefix: str
) -> None:
    topic = f"{fresh_topic_prefix}-events"
    create_topics(kafka_bootstrap, {topic: N_PARTITIONS})
    asyncio.run(asyncio.wait_for(_roundtrip(kafka_bootstrap, topic), TEST_TIMEOUT_S))


async def _group_commit(bootstrap: str, topic: str, group: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(20):
            await producer.send(topic, value=b"v%d" % i, key=b"k%d" % (i % 5))
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        seen = 0
        while seen < 20:
            batch = await consumer.getmany(timeout_ms=1000)
            seen += sum(len(v) for v in batch.values())
        await consumer.commit()
        assignment = consumer.assignment()
        assert assignment == {TopicPartition(topic, p) for p in range(2)}
        committed = {tp: await consumer.committed(tp) for tp in assignment}
        ends = await consumer.end_offsets(list(assignment))
        assert committed == ends
        assert sum(ends.values()) == 20
    finally:
        await consumer.stop()


def test_consumer_group_commits_offsets(kafka_bootstrap: str, fresh_topic_prefix: str) -> None:
    topic = f"{fresh_topic_prefix}-grp"
    create_topics(kafka_bootstrap, {topic: 2})
    asyncio.run(
        asyncio.wait_for(_group_commit(kafka_bootstrap, topic, f"{fresh_topic_prefix}-group"), TEST_TIMEOUT_S)
    )


async def _transactions(bootstrap: str, topic: str, txid: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=txid)
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, value=b"committed-1", key=b"a")
            await producer.send(topic, value=b"committed-2", key=b"b")
        await producer.begin_transaction()
        await producer.send(topic, value=b"aborted", key=b"c")
        await producer.abort_transaction()
    finally:
        await producer.stop()

    records = await _consume_exactly(bootstrap, topic, 1, 2, isolation_level="read_committed")
    assert sorted(r.value for r in records) == [b"committed-1", b"committed-2"]


def test_transactions_read_committed(kafka_bootstrap: str, fresh_topic_prefix: str) -> None:
    topic = f"{fresh_topic_prefix}-tx"
    create_topics(kafka_bootstrap, {topic: 1})
    asyncio.run(
        asyncio.wait_for(_transactions(kafka_bootstrap, topic, f"{fresh_topic_prefix}-tx"), TEST_TIMEOUT_S)
    )


async def _topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        resources = resp[0].to_object()["resources"]
        return {c["config_names"]: c["config_value"] for c in resources[0]["config_entries"]}
    finally:
        await admin.close()


def test_create_topics_compact_and_partitions(kafka_bootstrap: str, fresh_topic_prefix: str) -> None:
    compacted, plain = f"{fresh_topic_prefix}-table", f"{fresh_topic_prefix}-plain"
    create_topics(kafka_bootstrap, {compacted: 3, plain: 2}, compact={compacted})
    assert asyncio.run(_topic_configs(kafka_bootstrap, compacted))["cleanup.policy"] == "compact"
    assert asyncio.run(_topic_configs(kafka_bootstrap, plain))["cleanup.policy"] == "delete"

    async def partitions() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics([compacted, plain])}
        finally:
            await admin.close()

    assert asyncio.run(partitions()) == {compacted: 3, plain: 2}
    # Creating an existing topic fails unless exist_ok.
    create_topics(kafka_bootstrap, {plain: 2}, exist_ok=True)
    with pytest.raises(Exception, match="create_topics failed"):
        create_topics(kafka_bootstrap, {plain: 2})
