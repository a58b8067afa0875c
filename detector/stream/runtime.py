"""What a worker's stages share: settings, the decision context, topics, tables, batches."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka.partitioner import murmur2

from detector import metrics
from detector.config import Settings
from detector.core.decide import DecisionContext
from detector.core.errors import UntrustedEntry
from detector.core.ipintel import IpIntel
from detector.core.lists import SOURCES, ListEntry
from detector.core.policy import Policy
from detector.core.population import PopulationView
from detector.core.signing import REJECT_REASONS, Signer, Verifier
from detector.stream import codec, guard
from detector.stream.ledger import STAGE_INPUTS, DecisionStore
from detector.stream.tables import StateTable, Write

log = logging.getLogger("detector.stream")

Publish = Callable[..., Awaitable[Any]]
Message = tuple[Any, bytes | None, bytes | None, int | None]  # channel, key, value, partition


@dataclass
class StreamRuntime:
    """Everything the agents share: settings, policy, lists, IP data, model, topics, tables."""

    settings: Settings
    ctx: DecisionContext
    intel: IpIntel
    model_watcher: Any = None
    publish: Publish | None = None  # set by make_app; tests replace it to capture sends
    max_ts: float = 0.0  # highest event time seen (drives the sweep)
    lists_ready: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int | None = None  # consumer generation the stages are prepared for
    gate_offsets: bool = True  # order each stage's input (off in test_context: its offsets
    #                            count per agent, not per partition)
    gates: dict[str, Any] = field(default_factory=dict)  # stage input -> its OffsetGate
    delivery: Any = None  # ledger.StageDelivery
    ip: Any = None  # the ip stage (ip_stage.IpStage)
    batcher: Any = None  # the range stage (range_stage.RangeStage)
    topics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)  # Faust tables by name
    state_tables: dict[str, StateTable] = field(default_factory=dict)  # ip, number, pair, range
    decisions: DecisionStore | None = None  # the seen table and the sent ids (ledger)
    active: dict[str, set[int]] = field(default_factory=dict)  # topic -> assigned partitions

    ip_partitions: int = 0  # partitions of by-ip when callback-requests has as many, else 0
    partition_counts: tuple[int, int] | None = None  # (callback-requests, by-ip), last read
    population: PopulationView = field(default_factory=PopulationView)  # see stream/population.py
    verifier: Verifier = field(default_factory=Verifier)  # trusted list keys (none: refuse all)
    signer: Signer | None = None  # this worker's key for learned entries (None: not published)
    watch: guard.StageWatch = field(default_factory=guard.StageWatch)  # progress per stage
    probe: guard.BrokerProbe = field(default_factory=guard.BrokerProbe)  # broker reachable?
    diagnose: Callable[[], list[str]] | None = None  # why Kafka deliveries wait (for the log)
    capacity: Any = None  # the queue-state reader's state (stream/capacity.py)
    # How decisions reach the decisions topic: FencedDecisions (one transactional producer per
    # owned by-range partition) or DirectDecisions; set by make_app (delivery.py).
    decisions_out: Any = None

    @property
    def policy(self) -> Policy:
        return self.ctx.policy

    def ip_partition(self, ip_key: bytes) -> int:
        """The by-ip partition of a key (the producer's murmur2 partitioner); -1 when requests
        and by-ip are not co-partitioned (different partition counts)."""
        n = self.ip_partitions
        return (murmur2(ip_key) & 0x7FFFFFFF) % n if n else -1

    def context(self) -> DecisionContext:
        """The decision context with the current model (hot-reloaded by the watcher)."""
        if self.model_watcher is None:
            return self.ctx
        self.ctx.model = self.model_watcher.current()
        self.ctx.shadow = self.model_watcher.shadow()
        return self.ctx

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   partition: int | None = None) -> Any:
        assert self.publish is not None
        return await self.publish(self.topics[topic], key, value, partition)

    async def publish_write(self, w: Write) -> Any:
        """Send one changelog message (a table write or a tombstone); its delivery future."""
        assert self.publish is not None
        return await self.publish(w.table.changelog_topic, w.key, w.value, w.partition)

    async def send_writes(self, writes: list[Write]) -> list[Any]:
        """Send table writes (and tombstones) to their changelogs, in order; their delivery
        futures. A persistent store (:class:`~detector.stream.stores.RocksTableStore`) is told
        each acknowledged offset: only then does the write reach its local database."""
        assert self.publish is not None
        futs = []
        for w in writes:
            fut = await self.publish(w.table.changelog_topic, w.key, w.value, w.partition)
            if w.store is not None and w.store.persistent and hasattr(fut, "add_done_callback"):
                fut.add_done_callback(functools.partial(_acknowledged, w))
            futs.append(fut)
        return futs

    async def send_all(self, messages: list[Message]) -> list[Any]:
        """Send messages in order; their delivery futures."""
        assert self.publish is not None
        return [await self.publish(*m) for m in messages]

    @staticmethod
    def changelog(writes: list[Write]) -> list[Message]:
        return [(w.table.changelog_topic, w.key, w.value, w.partition) for w in writes]

    async def flush_batches(self) -> None:
        """Flush the ip stage's and the range stage's pending batches (rebalance, stop)."""
        if self.ip is not None:
            await self.ip.flush()
        if self.batcher is not None:
            await self.batcher.flush()

    def update_assignment(self, app: Any) -> None:
        try:
            assigned = app.consumer.assignment()
        except Exception:
            return
        names = {self.topics[k].get_topic_name(): k for k in STAGE_INPUTS}
        active: dict[str, set[int]] = {k: set() for k in STAGE_INPUTS}
        for tp in assigned:
            if tp.topic in names:
                active[names[tp.topic]].add(tp.partition)
        self.active = active

    # -- lists

    def apply_list_message(self, key: bytes | None, value: bytes | None, source: str = "topic") -> None:
        """Apply one ``detector-lists`` message to the in-memory index if its signature verifies
        (see :mod:`detector.core.signing`); otherwise count it by reason and log the reason only
        (the key and the entry carry an IP or a number)."""
        try:
            v = self.verifier.verify(key, value, now=time.time())
        except UntrustedEntry as exc:
            prefix = ":".join((key or b"").decode("utf-8", "replace").split(":")[:2])[:20]
            log.warning("lists: refused a %s entry (%s)", prefix or "unkeyed", exc.reason)
            metrics.LIST_REJECTED.labels(metrics.bounded(exc.reason, REJECT_REASONS)).inc()
            return
        if v.op == "remove":
            self.ctx.lists.remove(v.entry.key)
        else:
            self.ctx.lists.add(v.entry)
        metrics.LIST_CHANGES.labels(v.op, metrics.bounded(v.entry.source, SOURCES)).inc()

    def learned_entry_wire(self, entry: ListEntry) -> bytes | None:
        """A learned entry signed with this worker's key, or None when it has none."""
        if self.signer is None:
            return None
        return codec.dumps(self.signer.sign(entry, signed_at=time.time()))

    def update_list_gauges(self) -> None:
        metrics.LIST_ENTRIES.clear()
        for (action, kind), n in self.ctx.lists.counts().items():
            metrics.LIST_ENTRIES.labels(action, kind).set(n)


def _acknowledged(w: Write, fut: asyncio.Future[Any]) -> None:
    """A changelog write was acknowledged: hand it to its persistent store with its offset (a
    failed delivery crashes the worker: guard.watch_delivery)."""
    if fut.cancelled() or fut.exception() is not None:
        return
    assert w.store is not None
    try:
        w.store.delivered(w.key, w.value, w.partition, int(fut.result().offset))
    except Exception as exc:  # e.g. a full disk: the local database would fall behind silently
        guard.crash(f"table store: could not write an acknowledged change to disk "
                    f"({type(exc).__name__}: {exc})")
