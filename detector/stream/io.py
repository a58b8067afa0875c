"""Plain aiokafka tools behind the CLI: create topics, produce requests, tail decisions, edit lists.

Every function takes :class:`Settings` (bootstrap servers and topic names) and is synchronous;
the ``a``-prefixed coroutines are the same for callers that already run an event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from detector.config import Settings
from detector.core.errors import InputError
from detector.core.lists import ListEntry, make_entry
from detector.core.parse import decode_json, parse_request, parse_ts
from detector.stream import codec, retention
from detector.stream.kafka_security import client_kwargs
from detector.stream.kafka_security import start as start_client

log = logging.getLogger("detector.stream.io")

TOPIC_ALREADY_EXISTS = 36


async def stop_consumer(consumer: Any) -> None:
    """``consumer.stop()`` without the CancelledError aiokafka 0.14 leaks from its own
    coordinator task (a group-less consumer); a real cancellation of the caller still propagates."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def topic_partitions(consumer: Any, topic: str, timeout: float = 10.0) -> set[int]:
    """Partitions of ``topic`` (a group-less consumer has no metadata for it until asked)."""
    from detector.stream.faust_internals import fetch_all_metadata

    deadline = time.monotonic() + timeout
    while True:
        metadata = await fetch_all_metadata(consumer)
        parts = metadata.partitions_for_topic(topic)
        if parts or time.monotonic() > deadline:
            return set(parts or ())
        await asyncio.sleep(0.2)


async def partition_counts(settings: Any, topics: list[str],
                           timeout: float = 10.0) -> dict[str, int]:
    """topic -> its number of partitions (0: no metadata), from the cluster's metadata through
    a group-less client. Not Faust's ``consumer.topic_partitions``: that reads the group
    coordinator's metadata snapshot, which a worker that is not the group's leader may not have
    (None: it then took every request keyed by IP through the by-ip hop while the leader counted
    the same partitions in ingest, and a partition moving between them was counted twice)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, **client_kwargs(settings))
    await consumer.start()
    try:
        return {t: len(await topic_partitions(consumer, t, timeout)) for t in topics}
    finally:
        await stop_consumer(consumer)


async def open_broadcast_reader(app: Any, rt: Any, topic: str, read_back_s: float,
                                what: str) -> Any:
    """A started group-less consumer on every partition of ``topic``, positioned ``read_back_s``
    before now (a partition with nothing that recent: at its end), for the topics every worker
    reads whole (population deltas, queue states). Waits until the stages are prepared (the
    topics exist) and retries while ``topic`` is not found; ``what`` names the reader in logs.
    The caller stops it with :func:`stop_consumer`."""
    s = rt.settings
    while rt.generation is None and not app.should_stop:  # stages prepared: topics exist
        await asyncio.sleep(0.5)
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_wait_ms=100, **client_kwargs(s))
    await consumer.start()
    try:
        parts: set[int] = set()
        while not parts and not app.should_stop:
            parts = set(await topic_partitions(consumer, topic, timeout=10.0) or ())
            if not parts:
                log.warning("%s: topic %s not found yet; retrying", what, topic)
                await asyncio.sleep(2.0)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        since = int((time.time() - read_back_s) * 1000)
        found = await consumer.offsets_for_times({tp: since for tp in tps})
        for tp in tps:
            at = found.get(tp)
            if at is None:
                await consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, at.offset)
    except BaseException:
        await stop_consumer(consumer)
        raise
    return consumer


def topic_specs(settings: Settings) -> dict[str, tuple[int, dict[str, str]]]:
    """Every topic the detector uses: name -> (partitions, config)."""
    from detector.stream.capacity import queue_state_topic

    s = settings
    n = s.partitions
    return {
        s.topic_requests: (n, retention.inputs_config(s)),
        s.topic_decisions: (n, retention.decisions_config(s)),
        s.topic_outcomes: (n, retention.inputs_config(s)),
        s.topic_dead_letter: (n, retention.dead_letter_config(s)),
        s.topic_lists: (1, retention.lists_config(s)),
        f"{s.app_id}-by-ip": (n, retention.internal_config(s)),
        f"{s.app_id}-by-range": (n, retention.internal_config(s)),
        queue_state_topic(s): (1, retention.queue_state_config(s)),  # the dialers' queue states
        # Faust creates these too; created here, they exist with their retention before it
        # starts (and an operator can create every topic with admin rights, the workers without).
        **{retention.changelog_topic(s, t): (n, retention.changelog_config(s))
           for t in retention.CHANGELOG_TABLES},
    }


async def acreate_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create the detector's topics that do not exist yet; returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=int(timeout * 1000), **client_kwargs(settings))
    await start_client(admin, settings, "topics")
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, parts, settings.replication, topic_configs=cfg)
            for name, (parts, cfg) in topic_specs(settings).items()
            if name not in existing
        ]
        created: list[str] = []
        if new:
            resp = await admin.create_topics(new, timeout_ms=int(timeout * 1000))
            for err in resp.to_object().get("topic_errors", []):
                code = err.get("error_code", 0)
                if code == 0:
                    created.append(err["topic"])
                elif code != TOPIC_ALREADY_EXISTS:
                    raise RuntimeError(f"cannot create topic {err.get('topic')}: error {code} "
                                       f"{err.get('error_message') or ''}")
        return created
    finally:
        await admin.close()


def create_topics(settings: Settings) -> list[str]:
    return asyncio.run(acreate_topics(settings))


MAX_PRODUCE_BYTES = 900 * 1024  # below Kafka's default 1 MB message limit


def _request_ts_ms(line: bytes) -> int | None:
    """Kafka timestamp (ms) of a request line: its ``ts``; None when it has none we can read."""
    try:
        obj = decode_json(line)
        return int(parse_ts(obj["ts"]) * 1000) if "ts" in obj else None
    except InputError:
        return None


def request_key(line: bytes) -> bytes | None:
    """The message key the web tier should set: the request's IP as the detector normalizes it
    (``::ffff:81.2.69.160`` -> ``81.2.69.160``). With it, the worker counts per IP where it
    consumes the request (no by-ip hop); None for a line that does not parse."""
    try:
        return parse_request(line).ip.encode("utf-8")
    except InputError:
        return None


async def aproduce(settings: Settings, jsonl_path: Path | str, rate: float | None = None,
                   *, key_by_ip: bool = True) -> int:
    """Send every non-blank line of ``jsonl_path`` to the requests topic as is (bad lines too:
    the worker dead-letters them), keyed by :func:`request_key` unless ``key_by_ip`` is false.
    Kafka timestamp = the request's ``ts``. ``rate``: messages/s. A line too large for a Kafka
    message is skipped and counted (its number logged, never its content)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5,
                                acks="all", enable_idempotence=True, **client_kwargs(settings))
    await start_client(producer, settings, "produce")
    n = skipped = 0
    t0 = time.monotonic()
    try:
        with Path(jsonl_path).open("rb") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                if len(line) > MAX_PRODUCE_BYTES:
                    skipped += 1
                    log.warning("produce: line %d not sent: %d bytes, more than a Kafka message "
                                "may hold (%d)", lineno, len(line), MAX_PRODUCE_BYTES)
                    continue
                if rate:
                    ahead = n / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                await producer.send(settings.topic_requests, value=line,
                                    key=request_key(line) if key_by_ip else None,
                                    timestamp_ms=_request_ts_ms(line))
                n += 1
        await producer.flush()
    finally:
        await producer.stop()
    if skipped:
        log.warning("produce: %d line(s) skipped (too large)", skipped)
    return n


def produce(settings: Settings, jsonl_path: Path | str, rate: float | None = None,
            *, key_by_ip: bool = True) -> int:
    """Synchronous :func:`aproduce`; returns the number of messages sent."""
    return asyncio.run(aproduce(settings, jsonl_path, rate, key_by_ip=key_by_ip))


async def _read_topic(settings: Settings, topic: str, *, follow: bool, from_beginning: bool,
                      idle_s: float = 1.0) -> AsyncIterator[Any]:
    """Yield aiokafka records of every partition of ``topic`` (no consumer group). Committed
    records only: decisions are written in transactions (an aborted one is never a decision)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=100,
                                isolation_level="read_committed",
                                auto_offset_reset="earliest" if from_beginning else "latest",
                                **client_kwargs(settings))
    await start_client(consumer, settings, f"read {topic}")
    try:
        parts = await topic_partitions(consumer, topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        end = await consumer.end_offsets(tps)
        while True:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=5000)
            for records in batch.values():
                for rec in records:
                    yield rec
            if not follow and all([await consumer.position(tp) >= end[tp] for tp in tps]):
                return
    finally:
        await stop_consumer(consumer)


async def atail(settings: Settings, n: int | None = None, follow: bool = True, *,
                from_beginning: bool | None = None,
                dedup: bool = True) -> AsyncGenerator[dict[str, Any], None]:
    """Decisions from the decisions topic (first copy per ``request_id`` when ``dedup``)."""
    seen: set[str] = set()
    got = 0
    if n is not None and n <= 0:
        return
    start = (not follow) if from_beginning is None else from_beginning
    async for rec in _read_topic(settings, settings.topic_decisions, follow=follow,
                                 from_beginning=start):
        try:
            d = json.loads(rec.value)
        except (TypeError, ValueError):
            continue
        rid = d.get("request_id") if isinstance(d, dict) else None
        if dedup and rid is not None:
            if rid in seen:
                continue
            seen.add(rid)
        yield d
        got += 1
        if n is not None and got >= n:
            return


def tail(settings: Settings, n: int | None = None, follow: bool = True, *,
         from_beginning: bool | None = None, dedup: bool = True) -> Iterator[dict[str, Any]]:
    """Synchronous :func:`atail`. Without ``follow`` it reads the topic from the beginning to its
    current end; with ``follow`` it starts at the end (or the beginning if ``from_beginning``)."""
    loop = asyncio.new_event_loop()
    agen = atail(settings, n, follow, from_beginning=from_beginning, dedup=dedup)
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


async def _send_list(settings: Settings, key: str, value: bytes | None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                enable_idempotence=True, **client_kwargs(settings))
    await start_client(producer, settings, "lists")
    try:
        await producer.send_and_wait(settings.topic_lists, key=key.encode("utf-8"), value=value)
    finally:
        await producer.stop()


async def alists_add(settings: Settings, action: str, kind: str, value: str, *, reason: str = "",
                     ttl_s: float | None = None) -> ListEntry:
    """Publish an entry signed with the SOC key (``DETECTOR_SOC_PRIVATE_KEY``)."""
    from detector.keys import soc_signer

    signer = soc_signer(settings)  # before anything is sent: no key, clear error
    now = time.time()
    entry = make_entry(action, kind, value, reason=reason, added_at=now, source="soc",
                       expires_at=None if ttl_s is None else now + ttl_s)
    await _send_list(settings, entry.key, codec.dumps(signer.sign(entry, signed_at=now)))
    return entry


def lists_add(settings: Settings, action: str, kind: str, value: str, *, reason: str = "",
              ttl_s: float | None = None) -> ListEntry:
    """Publish a deny/allow entry (raises InvalidField for a bad action/kind/value)."""
    return asyncio.run(alists_add(settings, action, kind, value, reason=reason, ttl_s=ttl_s))


async def alists_remove(settings: Settings, action: str, kind: str, value: str) -> str:
    """Publish a signed removal record under the entry's key (workers do not trust a bare
    tombstone: anyone who can write the topic could send one). Compaction keeps the record."""
    from detector.keys import soc_signer

    signer = soc_signer(settings)
    now = time.time()
    entry = make_entry(action, kind, value, reason="removed", added_at=now, source="soc")
    await _send_list(settings, entry.key,
                     codec.dumps(signer.sign(entry, signed_at=now, op="remove")))
    return entry.key


def lists_remove(settings: Settings, action: str, kind: str, value: str) -> str:
    """Publish a signed removal of the entry; returns its key (``action:kind:value``)."""
    return asyncio.run(alists_remove(settings, action, kind, value))


async def alists_show(settings: Settings) -> list[ListEntry]:
    """Verified entries on the lists topic (latest per key, removed ones dropped); messages that
    do not verify against the configured keys are skipped and counted in a warning."""
    from detector.core.errors import UntrustedEntry
    from detector.keys import soc_signer, verifier

    trusted = verifier(settings, soc_signer=soc_signer(settings)
                       if settings.soc_private_key is not None else None)
    entries: dict[str, ListEntry] = {}
    refused: dict[str, int] = {}
    now = time.time()
    async for rec in _read_topic(settings, settings.topic_lists, follow=False, from_beginning=True,
                                 idle_s=0.5):
        try:
            v = trusted.verify(rec.key, rec.value, now=now)
        except UntrustedEntry as exc:
            refused[exc.reason] = refused.get(exc.reason, 0) + 1
            continue
        if v.op == "remove":
            entries.pop(v.entry.key, None)
        else:
            entries[v.entry.key] = v.entry
    if refused:
        log.warning("lists: %d message(s) refused: %s", sum(refused.values()),
                    ", ".join(f"{k}={n}" for k, n in sorted(refused.items())))
    return sorted(entries.values(), key=lambda e: e.key)


def lists_show(settings: Settings) -> list[ListEntry]:
    """Entries currently on the lists topic (latest per key, tombstoned ones removed), expired ones
    included (check ``entry.active(now)``)."""
    return asyncio.run(alists_show(settings))
