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

import enum
import logging
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
