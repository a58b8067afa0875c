"""In-order, hole-free delivery for the stages, whatever Faust's consumer does around a rebalance.

The problem (faust-streaming 0.15.3, measured in tests/integration with SIGKILL restarts): Faust's
drain loop drops every record whose offset is below the last one it handed out, and it treats a
forward jump as a gap it may commit over. A seek (``perform_seek`` after recovery, or ours) while
a fetch is in flight delivers the stale, later records first; the re-read earlier records are
then dropped as "already read", the later ones are acked, and the commit passes over requests
that never reached the agent. In about 1 restart in 4, 50-1,200 requests were lost that way.

The fix does not depend on finding that race:

* :class:`DeliveryConsumer` (in :mod:`detector.stream.faust_internals`, with every other
  override of Faust's private API) delivers every record it fetches (no drop, no gap
  bookkeeping) and never commits past an offset that was not acked: an acked run only counts
  from the committed offset on.
* Each stage passes its events through an :class:`OffsetGate`: per partition, the next offset it
  must process, set at every assignment from the group's committed offset (or the log start).
  An event at that offset is processed; one below it was processed already (ack, nothing else);
  one above it means records were skipped, so the stage holds it (no processing, no ack) and
  seeks back to the expected offset. An offset that comes back as the first one after that seek
  is a real hole in the log (transaction markers), and the gate moves on.

So a stage processes each partition's offsets in order, exactly once per generation, and an
offset is committed only after the stage processed it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from detector.stream.faust_internals import (  # noqa: F401 - re-exported: the consumer side
    FETCH_MAX_WAIT_MS,
    FETCH_MIN_BYTES,
    DeliveryConsumer,
    DeliveryTransport,
)
from detector.stream.faust_internals import DeliverAll as _DeliverAll  # noqa: F401

log = logging.getLogger("detector.stream")


class Admit(enum.Enum):
    PROCESS = "process"  # the expected offset: process it, then ack it
    SKIP = "skip"  # processed before (a redelivery): ack it, nothing else
    HOLD = "hold"  # after a hole: neither process nor ack; the hole is being re-read
    SEEK = "seek"  # the first event after a hole: hold it and seek back to ``expected``


class OffsetGate:
    """The next offset one stage must process, per partition of its input topic.

    >>> g = OffsetGate("t")
    >>> g.reset({0: 5})
    >>> [g.admit(0, o).value for o in (5, 4, 7, 8, 6, 7)]
    ['process', 'skip', 'seek', 'hold', 'process', 'process']
    >>> [g.admit(0, o).value for o in (10, 11, 10, 11)]  # 8-9 missing: re-read, then a real hole
    ['seek', 'hold', 'process', 'process']
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.next: dict[int, int] = {}
        self._hole: dict[int, tuple[int, int]] = {}  # partition -> (expected, first offset after)

    def reset(self, starts: dict[int, int]) -> None:
        """A new assignment: partition -> offset to process next (committed or log start)."""
        self.next = dict(starts)
        self._hole.clear()

    def forget_hole(self, partition: int) -> None:
        """The seek back over a hole did not happen: treat the next later offset as a new hole."""
        self._hole.pop(partition, None)

    def expected(self, partition: int) -> int | None:
        return self.next.get(partition)

    def admit(self, partition: int, offset: int) -> Admit:
        expected = self.next.get(partition)
        if expected is None or offset == expected:  # None: start unknown, take what comes
            self.next[partition] = offset + 1
            self._hole.pop(partition, None)
            return Admit.PROCESS
        if offset < expected:
            return Admit.SKIP
        hole = self._hole.get(partition)
        if hole is None or hole[0] != expected:
            self._hole[partition] = (expected, offset)
            return Admit.SEEK
        if hole[1] == offset:  # the re-read started here again: nothing exists in between
            log.warning("%s[%d]: offsets %d-%d do not exist (transaction markers?); moving on",
                        self.topic, partition, expected, offset - 1)
            self.next[partition] = offset + 1
            del self._hole[partition]
            return Admit.PROCESS
        return Admit.HOLD


async def start_offsets(bootstrap: str, group: str, topics: list[str],
                        assigned: dict[str, set[int]], **kafka: Any) -> dict[str, dict[int, int]]:
    """topic -> partition -> the group's committed offset, or the log start if none (where a
    consumer with ``auto_offset_reset=earliest`` begins). ``kafka``: security options
    (:func:`detector.stream.kafka_security.client_kwargs`)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from detector.stream.io import stop_consumer

    tps = [TopicPartition(t, p) for t in topics for p in sorted(assigned.get(t, ()))]
    if not tps:
        return {}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                **kafka)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=tps)
        await consumer.start()
        begin = await consumer.beginning_offsets(tps)
    finally:
        await admin.close()
        await stop_consumer(consumer)
    out: dict[str, dict[int, int]] = {}
    for tp in tps:
        meta = committed.get(tp)
        offset = meta.offset if meta is not None and meta.offset >= 0 else begin[tp]
        out.setdefault(tp.topic, {})[tp.partition] = max(int(offset), int(begin[tp]))
    return out


# --------------------------------------------------------------------------- output: fenced decisions


DecisionBatch = dict[int, list[tuple[bytes, bytes]]]  # by-range partition -> (key, decision) pairs


class DirectDecisions:
    """Decisions straight through the app's producer (``DETECTOR_FENCE_DECISIONS=0``, and the
    broker-less agent tests): no fencing, every partition counts as owned."""

    def __init__(self, send: Callable[[bytes, bytes], Awaitable[Any]]) -> None:
        self._send = send

    def owns(self, partition: int) -> bool:
        return True

    async def assign(self, partitions: set[int]) -> None:
        return None

    async def release(self, keep: set[int]) -> None:
        return None

    async def send(self, batch: DecisionBatch) -> None:
        for items in batch.values():
            for key, value in items:
                await self._send(key, value)

    async def stop(self) -> None:
        return None


class FencedDecisions:
    """The range stage's decisions, each batch of one ``by-range`` partition in one Kafka
    transaction of that partition's own transactional producer (``<app>-decisions-<p>``).

    Why: a worker frozen past the session timeout (SIGSTOP, a paused VM, a long GC) or cut off
    from the group coordinator is a zombie: its partitions were given to another worker, which
    decides the same requests again, and whatever the zombie had queued goes out when it runs
    again (measured before this class: up to one batch of duplicate decision messages in 1 run
    of 8 of the SIGSTOP fault test). Kafka fences zombies by transactional id: the new owner of
    partition ``p`` starts a producer with the same id (:meth:`assign`), the broker aborts the
    zombie's open transaction and rejects everything the zombie sends afterwards
    (``ProducerFenced``: it exits, see :func:`guard.crash`). A dialer reading with
    ``isolation.level=read_committed`` therefore never sees a decision of a zombie that the
    partition's new owner did not know about: what the zombie committed before the fence is on
    the topic when the new owner loads the sent ids (``load_sent``, also read_committed), and
    nothing after the fence is ever committed.

    One producer per owned partition (Kafka's "exactly-once v1" scheme: aiokafka 0.14 has no
    consumer-group fencing of transactions, KIP-447). Faust's own ``processing_guarantee=
    "exactly_once"`` cannot be used: it picks the transactional producer by the *destination*
    partition of each send, which fails as soon as a message is re-keyed to a partition owned by
    another worker ("No transaction producer found") -- every request of this topology is.
    """

    def __init__(self, settings: Any, topic: str, *, factory: Callable[..., Any] | None = None,
                 wrap: Callable[[Any], None] | None = None) -> None:
        self.settings = settings
        self.topic = topic
        self._factory = factory or self._new_producer
        self._wrap = wrap  # applied to each producer before it starts (faust_internals hooks)
        self.producers: dict[int, Any] = {}

    def transactional_id(self, partition: int) -> str:
        return f"{self.settings.app_id}-decisions-{partition}"

    def _new_producer(self, transactional_id: str) -> Any:
        from aiokafka import AIOKafkaProducer

        from detector.stream import guard
        from detector.stream.kafka_security import client_kwargs

        s = self.settings
        return AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap, transactional_id=transactional_id,
            linger_ms=max(1, s.batch_ms // 6), request_timeout_ms=int(guard.DELIVERY_TIMEOUT_S * 1000),
            retry_backoff_ms=20, transaction_timeout_ms=TRANSACTION_TIMEOUT_MS, **client_kwargs(s))

    def owns(self, partition: int) -> bool:
        return partition in self.producers

    async def release(self, keep: set[int]) -> None:
        """Stop the producers of partitions this worker no longer owns (their events are left to
        the new owner: :meth:`owns` is False for them from now on)."""
        gone = [p for p in self.producers if p not in keep]
        for p in gone:
            producer = self.producers.pop(p)
            await _stop_quietly(producer, f"decisions producer of partition {p}")

    async def assign(self, partitions: set[int]) -> None:
        """Start (and so fence any previous owner of) the producer of each partition not owned
        yet; stop those of partitions no longer owned. Must complete before the decisions topic
        is read for the ids already sent, and before any event of the partition is processed."""
        from detector.stream import guard

        await self.release(partitions)
        new = sorted(p for p in partitions if p not in self.producers)
        if not new:
            return
        t0 = time.monotonic()
        started = await asyncio.gather(*(self._start(p) for p in new), return_exceptions=True)
        failed = [(p, r) for p, r in zip(new, started, strict=True) if isinstance(r, BaseException)]
        for p, r in zip(new, started, strict=True):
            if not isinstance(r, BaseException):
                self.producers[p] = r
        if failed:
            guard.crash("decisions: could not start the transactional producer of partition(s) "
                        f"{[p for p, _ in failed]} ({type(failed[0][1]).__name__})")
        log.info("decisions: transactional producers for partitions %s ready in %.2f s "
                 "(any previous owner fenced)", new, time.monotonic() - t0)

    async def _start(self, partition: int) -> Any:
        from detector.stream import guard

        producer = self._factory(self.transactional_id(partition))
        if self._wrap is not None:
            self._wrap(producer)
        try:
            await asyncio.wait_for(producer.start(), guard.PREPARE_TIMEOUT_S)
        except BaseException:
            await _stop_quietly(producer, f"decisions producer of partition {partition}")
            raise
        return producer

    async def send(self, batch: DecisionBatch) -> None:
        """One transaction per partition (concurrently); returns once every one is committed.
        A failure (fenced: another worker owns the partition now; or Kafka) exits the worker:
        the events are not acked, and their next owner decides or re-sends them."""
        from detector.stream import guard

        jobs = [asyncio.ensure_future(self._transaction(p, items)) for p, items in batch.items()
                if items]
        if not jobs:
            return
        try:
            await guard.wait_delivered(jobs, stage="range", what="decision transactions")
        except Exception as exc:
            fenced = type(exc).__name__ in ("ProducerFenced", "InvalidProducerEpoch")
            guard.crash("range: " + ("another worker owns a partition of this batch now: "
                                     "this worker was fenced" if fenced else
                                     f"a decision transaction failed ({type(exc).__name__})"))
            raise
        finally:
            for job in jobs:
                if not job.done():
                    job.cancel()

    async def _transaction(self, partition: int, items: list[tuple[bytes, bytes]]) -> None:
        producer = self.producers[partition]
        await producer.begin_transaction()
        for key, value in items:
            await producer.send(self.topic, value, key=key)
        await producer.commit_transaction()

    async def stop(self) -> None:
        await self.release(set())


TRANSACTION_TIMEOUT_MS = 60000  # a crashed worker's open transaction blocks read_committed
#                                 readers of the partitions it wrote until the next owner fences
#                                 it (at assignment) or this expires


async def _stop_quietly(producer: Any, what: str) -> None:
    try:
        await asyncio.wait_for(producer.stop(), 5.0)
    except Exception as exc:  # fenced or unreachable: nothing of it is committed any more
        log.info("%s: stopped (%s)", what, type(exc).__name__)
