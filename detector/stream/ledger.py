"""Delivery bookkeeping in one place, and the one de-duplication story.

Kafka delivers at least once: after a crash, a rebalance or a freeze, a stage can see a message
again (its offset was not committed), and an upstream stage can send the same request again in a
new message (it was redelivered itself). The detector makes every effect of a request happen
once with four rules, each kept by one piece of this module:

1. **In order, no holes** (:class:`StageDelivery`, with :class:`~detector.stream.delivery.OffsetGate`).
   Per stage input partition, the next offset to process, reset at each assignment from the
   group's committed offset. A stage processes that offset, acks one it already processed (a
   redelivery within the generation), and holds a later one while it reads the skipped ones
   again. The consumer commits only acked offsets that follow the committed one.
2. **Counted once** (watermarks, :mod:`detector.stream.tables`). Each table value carries, per
   source of its stage's input, the highest offset it counted, in the same changelog message
   as the counts. A message at or below the watermark is not counted again; the counts it saw
   the first time are given back (one less where a value already held it). Sources: the range
   stage's tables count ``by-range`` offsets (source 0); the ``ip`` table counts
   ``callback-requests`` offsets per partition, separately for requests counted in ingest and
   requests that took the ``by-ip`` hop (:func:`ip_source`; the two paths interleave).
3. **Decided once** (:class:`DecisionStore`, table ``seen``). The range stage stores each
   decision under its request id, waits until Kafka has acknowledged the stored copies and the
   counts, then sends the decisions, then acks its input. A request that arrives again (same or
   new message) gets its stored decision: never a second, different one. Once the stored
   decision is swept (:data:`SEEN_TTL_S` of event time), a late copy whose id is still in
   ``sent`` is neither counted nor decided (a backlog runs through an hour of event time fast).
4. **Sent once** (:class:`DecisionStore` ``sent``). A decision is sent only if this worker has
   not sent it and it is not on ``callback-decisions`` already: at each assignment the worker
   first fences the previous owners of its new ``by-range`` partitions (rule 5), then reads the
   request ids of the last :data:`SENT_LOOKBACK_S` of that topic, committed records only
   (:meth:`DecisionStore.load_sent`), since the previous owner may have crashed after sending.
   A worker that cannot read them exits (:func:`load_sent_or_exit`) rather than re-send.
5. **Fenced** (:class:`~detector.stream.delivery.FencedDecisions`). Each batch's decisions go
   out in one Kafka transaction per ``by-range`` partition, by that partition's own
   transactional producer, so a worker frozen past the session timeout cannot publish what its
   successor re-sends: the successor's producer fences it before the successor loads the sent
   ids. Events of partitions revoked meanwhile are left unsent and unacked to their new owner.

Acks (all stages): an event is acked only after everything it caused is handed to the producer
(range stage: after its decision is sent), and Faust's commit flushes the producer before it
commits, so a committed offset never has an effect still in memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from detector import metrics
from detector.stream import faust_internals, guard
from detector.stream.delivery import Admit, OffsetGate, start_offsets
from detector.stream.io import partition_counts, stop_consumer, topic_partitions
from detector.stream.kafka_security import client_kwargs
from detector.stream.stores import MemoryTableStore, TableStore
from detector.stream.tables import Keys, Write, pack_value, sweep_keys, unpack_value

log = logging.getLogger("detector.stream")

SEEN_TTL_S = 3600.0  # event-time seconds a decision is kept for redeliveries
SENT_LOOKBACK_S = 900.0  # on assignment: request ids decided in the last 15 min are "sent"
STAGE_INPUTS = {"requests": "ingest", "outcomes": "outcome", "by_ip": "ip", "by_range": "range"}
#               ^ the topics the agents consume -> the stage (agent) consuming it
DIRECT = 1 << 16  # ip-table source of requests counted in ingest (+ the requests partition)


def ip_source(partition: int, *, direct: bool) -> int:
    """The ``ip`` table's watermark source of a ``callback-requests`` partition: requests
    counted in ingest and requests that took the ``by-ip`` hop are ordered separately."""
    return DIRECT + partition if direct else partition


# --------------------------------------------------------------------------- decided and sent once


class DecisionStore:
    """Table ``seen``: request id -> the decision made for it (kept :data:`SEEN_TTL_S` of event
    time), and the request ids whose decision is known to be on ``callback-decisions``."""

    def __init__(self, table: Any, store: TableStore | None = None) -> None:
        self.table = table
        self.backend: TableStore = store if store is not None else MemoryTableStore(table)
        self.pending: dict[str, tuple[int, int, float, bytes]] = {}  # rid -> partition, offset, ts, raw
        # Request ids sent, per wall-clock minute (whole minutes are forgotten at once). Python's
        # hash of the id: 64 bits, in memory only, so a busy worker keeps ~60 bytes per id.
        self._sent: dict[int, set[int]] = {}

    # -- stored decisions

    def stored(self, request_id: str, partition: int | None = None) -> tuple[int, bytes] | None:
        """(by-range offset, decision JSON) stored for ``request_id`` (on by-range partition
        ``partition`` when known), or None."""
        p = self.pending.get(request_id)
        if p is not None:
            return p[1], p[3]
        raw = self.backend.get(request_id.encode("utf-8", "surrogatepass"), partition)
        if raw is None:
            return None
        try:
            _, marks, pos = unpack_value(raw)
        except ValueError:
            return None
        return marks.get(0, -1), raw[pos:]

    def store(self, request_id: str, partition: int, offset: int, ts: float, decision: bytes) -> None:
        """Keep a decision (made from the by-range message at ``offset``) for this batch's flush."""
        self.pending[request_id] = (partition, offset, ts, decision)

    def take_writes(self) -> list[Write]:
        out = []
        store = self.backend
        for rid, (partition, offset, ts, raw) in self.pending.items():
            kb = rid.encode("utf-8", "surrogatepass")
            value = pack_value(partition, ts + SEEN_TTL_S, {0: offset}, raw)
            store.put(kb, value, partition)
            out.append(Write(self.table, kb, value, partition, store))
        self.pending = {}
        return out

    def busy(self, key: bytes) -> bool:
        return key.decode("utf-8", "surrogatepass") in self.pending

    # -- sent

    def mark_sent(self, request_id: str, now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // 60)
        bucket = self._sent.get(minute)
        if bucket is None:
            bucket = self._sent[minute] = set()
        bucket.add(hash(request_id))

    def was_sent(self, request_id: str) -> bool:
        h = hash(request_id)
        return any(h in bucket for bucket in self._sent.values())

    def forget_sent(self, now: float | None = None, lookback_s: float = SENT_LOOKBACK_S) -> None:
        """Forget ids sent before the lookback (wall clock)."""
        cutoff = int(((time.time() if now is None else now) - lookback_s) // 60)
        for minute in [m for m in self._sent if m < cutoff]:
            del self._sent[minute]

    def clear_sent(self) -> None:
        self._sent.clear()

    def sent_count(self) -> int:
        return sum(len(b) for b in self._sent.values())

    async def load_sent(self, settings: Any, lookback_s: float = SENT_LOOKBACK_S) -> int:
        """Mark as sent the request ids of the decisions on ``callback-decisions`` of the last
        ``lookback_s`` (committed records, message keys only, nothing parsed), so a redelivered
        request whose decision is already out is not sent again. Raises when it cannot read
        them (see :func:`load_sent_or_exit`)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        s = settings
        consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None,
                                    enable_auto_commit=False, fetch_max_wait_ms=50,
                                    isolation_level="read_committed", **client_kwargs(s))
        n = 0
        t0 = time.monotonic()
        try:
            await consumer.start()
            parts = await topic_partitions(consumer, s.topic_decisions)
            tps = [TopicPartition(s.topic_decisions, p) for p in sorted(parts)]
            if tps:
                consumer.assign(tps)
                since = int((time.time() - lookback_s) * 1000)
                starts = await consumer.offsets_for_times({tp: since for tp in tps})
                end = await consumer.end_offsets(tps)
                for tp in tps:
                    start = starts.get(tp)
                    consumer.seek(tp, start.offset if start is not None else end[tp])
                now = time.time()
                deadline = time.monotonic() + guard.PREPARE_TIMEOUT_S
                while not all([await consumer.position(tp) >= end[tp] for tp in tps]):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"still reading after {guard.PREPARE_TIMEOUT_S:.0f} s")
                    for recs in (await consumer.getmany(timeout_ms=200, max_records=10000)).values():
                        for rec in recs:
                            if rec.key is not None:
                                self.mark_sent(rec.key.decode("utf-8", "replace"), now)
                                n += 1
            log.info("decisions: %d recent request ids loaded in %.2f s", n, time.monotonic() - t0)
        finally:
            await stop_consumer(consumer)
        return n

    async def load_sent_or_exit(self, settings: Any, attempts: int = 3) -> int:
        """:meth:`load_sent`, bounded and retried; a worker that cannot read the ids already
        decided exits (a restart tries again) rather than re-send decisions the dialer has."""
        for attempt in range(1, attempts + 1):
            try:
                return await asyncio.wait_for(self.load_sent(settings),
                                              guard.PREPARE_TIMEOUT_S + 5.0)
            except Exception as exc:
                log.warning("decisions: could not load the recent request ids (attempt %d of %d: "
                            "%s)", attempt, attempts, type(exc).__name__)
                await asyncio.sleep(1.0)
        guard.crash("decisions: could not read the request ids already decided")
        return 0

    def sweep(self, keys: Keys | None, now: float, owned: set[int]) -> list[Write]:
        """Drop decisions past their TTL (tombstones) and those of partitions not owned. Their
        ids stay in ``sent`` until :meth:`forget_sent` (wall clock): a copy of such a request that
        arrives later (see :func:`~detector.stream.range_stage.range_one`) is then known to be
        decided and counted already."""
        return sweep_keys(self.table, self.backend, keys, now, owned, self.busy)


# --------------------------------------------------------------------------- in order, no holes


class StageDelivery:
    """The offset gate of each stage input and the per-generation preparation."""

    def __init__(self, app: Any, rt: Any) -> None:
        self.app = app
        self.rt = rt
        self.gates = {key: OffsetGate(rt.topics[key].get_topic_name()) for key in STAGE_INPUTS}
        self.lock = asyncio.Lock()

    async def prepare(self, generation: int) -> None:
        """Before processing in a new generation: lists caught up, decisions producers of revoked
        partitions stopped, pending batches flushed, previous owners of new partitions fenced,
        each stage's gate set to the group's committed offsets, recent decision ids loaded."""
        app, rt, s = self.app, self.rt, self.rt.settings
        async with self.lock:
            if rt.generation == generation:
                return
            # A worker frozen past the session timeout exits before its sender sends anything
            # queued before the freeze (guard.FreezeWatch).
            faust_internals.check_before_sends(faust_internals.aiokafka_producer(app),
                                               guard.FREEZE.check)
            if not rt.lists_ready.is_set():
                try:
                    await asyncio.wait_for(rt.lists_ready.wait(), timeout=30.0)
                except TimeoutError:
                    log.warning("lists: not caught up after 30 s; deciding without them")
                    rt.lists_ready.set()
            rt.update_assignment(app)
            owned = rt.active.get("by_range", set())
            await rt.decisions_out.release(owned)  # revoked: left unsent and unacked ...
            await rt.flush_batches()  # ... the rest of the last batches completes
            from detector.stream.sweep import owned_partitions

            owned_by = owned_partitions(rt)  # unacknowledged writes of revoked partitions are
            for name, st in rt.state_tables.items():  # forgotten (their new owner has them)
                st.backend.retain(owned_by[name])
            rt.decisions.backend.retain(owned_by["seen"])
            await rt.decisions_out.assign(owned)  # fences the previous owners of new partitions
            gates = self.gates
            await self.read_partition_counts()
            if rt.gate_offsets:
                assigned = {gates[k].topic: rt.active.get(k, set()) for k in STAGE_INPUTS}
                try:
                    starts = await asyncio.wait_for(
                        start_offsets(s.kafka_bootstrap, app.conf.id, list(assigned), assigned,
                                      **client_kwargs(s)),
                        guard.PREPARE_TIMEOUT_S)
                except Exception as exc:
                    log.warning("offsets: could not read the committed offsets (%r); each stage "
                                "starts where the consumer delivers", exc)
                    starts = {}
                for gate in gates.values():
                    gate.reset(starts.get(gate.topic, {}))
            # Partitions may come with uncommitted offsets whose decisions are already on the
            # topic (the previous owner crashed after sending them). Read after the fence above:
            # a previous owner can commit no decision any more that this does not see.
            await rt.decisions.load_sent_or_exit(s)
            rt.generation = generation

    async def read_partition_counts(self, attempts: int = 3) -> None:
        """``rt.ip_partitions``: whether ingest counts a request keyed by its IP itself (see
        :func:`~detector.stream.ingest.ingest_one`). Every worker must make the same choice for
        the same request, or a partition that moves between workers is counted under both of
        the ip table's sources (twice): so the counts come from the cluster's metadata, and a
        worker that cannot read them keeps the last ones it read or exits."""
        rt = self.rt
        topics = [self.gates["requests"].topic, self.gates["by_ip"].topic]
        for attempt in range(1, attempts + 1):
            try:
                counts = await asyncio.wait_for(partition_counts(rt.settings, topics),
                                                guard.PREPARE_TIMEOUT_S)
                n_req, n_ip = counts[topics[0]], counts[topics[1]]
                if n_req and n_ip:
                    ip_partitions = n_ip if n_req == n_ip else 0
                    if (n_req, n_ip) != rt.partition_counts:
                        log.info("ip stage: %s has %d partitions, %s %d: %s", topics[0], n_req,
                                 topics[1], n_ip,
                                 "a request keyed by its IP is counted in ingest (no hop)"
                                 if ip_partitions else "every request takes the by-ip hop")
                    rt.ip_partitions, rt.partition_counts = ip_partitions, (n_req, n_ip)
                    return
                log.warning("ip stage: no partition count for %s yet (attempt %d of %d)",
                            " or ".join(t for t in topics if not counts[t]), attempt, attempts)
            except Exception as exc:
                log.warning("ip stage: could not read the partition counts (attempt %d of %d: "
                            "%s)", attempt, attempts, type(exc).__name__)
            await asyncio.sleep(1.0)
        if rt.partition_counts is None:
            guard.crash("ip stage: could not read the partition counts of its input topics")

    async def admitted(self, event: Any, key: str) -> bool:
        """Whether the stage processes this event now (see :class:`OffsetGate`); an event
        already processed is acked here."""
        app, rt = self.app, self.rt
        if rt.generation != app.consumer_generation_id:
            await self.prepare(app.consumer_generation_id)
        if not rt.gate_offsets:
            return True
        m = event.message
        gate = self.gates[key]
        verdict = gate.admit(m.partition, m.offset)
        if verdict is Admit.PROCESS:
            return True
        if verdict is Admit.SKIP:
            metrics.DUPLICATES.labels(STAGE_INPUTS[key]).inc()
            event.ack()
        elif verdict is Admit.SEEK:
            expected = gate.expected(m.partition)
            assert expected is not None
            log.warning("%s[%d]: got offset %d, expected %d: reading %d-%d again",
                        gate.topic, m.partition, m.offset, expected, expected, m.offset - 1)
            metrics.REREADS.labels(STAGE_INPUTS[key]).inc()
            from faust.types import TP

            try:
                await asyncio.wait_for(app.consumer.seek_wait({TP(m.topic, m.partition): expected}),
                                       guard.PREPARE_TIMEOUT_S)
            except Exception as exc:  # e.g. revoked meanwhile: the next assignment resets the gate
                log.warning("%s[%d]: seek to %d failed: %r", gate.topic, m.partition, expected, exc)
                gate.forget_hole(m.partition)  # the next event past the hole seeks again
        return False


Ack = Callable[[], Any]
