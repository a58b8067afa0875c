"""The Faust app: topics, tables, agents, timers and web views around the pure core.

Topology (an enrichment chain; every table is fed by a stream keyed by the table's key, because
a Faust table's shard is the partition of the current event)::

    callback-requests ──ingest──> <app>-by-ip ──ip──> <app>-by-range ──range──> callback-decisions
      (key: IP, or any)  │        (key: IP)   table ip  (key: range)  tables number, pair,
                         ├─(key = IP on its by-ip partition: table ip   range, seen
                         │  counted in ingest, no by-ip hop)──────────> <app>-by-range
                         └─> callback-requests-dlq
    callback-outcomes ──outcome──> <app>-by-range (same topic, kind "out") ──range──> detector-lists
    detector-lists (compacted) ──lists reader (every worker, no group)──> ListIndex in memory

Faust assigns partition p of every topic with the same partition count to the same worker, so a
request keyed by its IP that sits on the partition the by-ip hop would choose is counted where it
is consumed (one Kafka hop instead of two); any other key takes the hop.

Delivery: at-least-once with idempotent stages, so a redelivered message changes nothing twice
and a request never gets two different decisions:

* every table value carries ``"_": {"p": partition, ...}`` plus a watermark: the ``ip`` table the
  highest ``callback-requests`` offset per source partition it counted (``"s"``; ``"d<p>"`` for
  requests counted in ingest, a separate ordering), the range-stage
  tables the highest ``by-range`` offset (``"o"``). A message at or below the watermark is not
  counted again. The watermark and the counts are one changelog message, so they cannot diverge.
* ``seen`` (range stage, key = request id) stores each decision. The range stage works in small
  batches (:class:`RangeBatcher`): it decides a batch with one model call (``decide_many``), the
  batch's table writes and stored decisions are acknowledged by Kafka before its decisions are
  sent, and its input offsets are acked only after that. So a
  decision on the wire always has its stored twin, and a redelivered request gets the stored
  decision, never a new one.
* Re-sending: a worker that is assigned partitions first fences their previous owner, then
  loads the request ids already on the decisions topic (message keys of the last
  SENT_LOOKBACK_S, committed records), and sends no decision whose id is among them.
* Fencing: each batch's decisions go out in one Kafka transaction per by-range partition, by that
  partition's own transactional producer (:class:`~detector.stream.delivery.FencedDecisions`),
  so a worker frozen past the session timeout cannot publish what its successor re-sends. (Faust's
  ``exactly_once`` does not work for this topology in faust-streaming 0.15.3: its transactional
  producer is chosen by the *destination* partition, so re-keying to a partition owned by
  another worker fails with "No transaction producer found".)

Ordering: every stage passes its events through an :class:`~detector.stream.delivery.OffsetGate`
(per partition, the next offset to process, reset at each assignment from the group's committed
offset), and the consumer commits only acked offsets that follow the committed one. Faust's own
drain loop could skip records after a seek during recovery and commit over them (requests lost
after a SIGKILL restart); see :mod:`detector.stream.delivery`.

Windows are the core's tumbling minute/hour sub-windows in plain table values (event time,
exact); a timer deletes dead keys with :func:`detector.core.state.sweep` (tombstones to the
changelog), a slice of keys per tick (:class:`Sweeper`), keeping memory bounded.

Table writes bypass ``table[key] = value``: :class:`EventView` writes the store and sends the
changelog message itself, with the partition explicit (so sweeps and batches work outside the
current event) and a delivery future to wait on. The changelog format is Faust's (JSON key and
value), so Faust's recovery restores the tables on start or rebalance.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

import faust
from aiokafka.partitioner import murmur2
from faust.types import TP

from detector import metrics
from detector.config import Settings
from detector.core import spend, state
from detector.core.clock import sweep_time
from detector.core.decide import DecisionContext, decide_many
from detector.core.errors import InputError, UntrustedEntry
from detector.core.ipintel import IpIntel
from detector.core.lists import SOURCES, ListEntry
from detector.core.parse import check_event_time, parse_request
from detector.core.phone import enrich_phone
from detector.core.pipeline import count_population, enrich, learn, parse_outcome, range_routing_key
from detector.core.policy import Policy
from detector.core.population import PopulationView
from detector.core.records import OUTCOMES, Action, CallbackRequest, Counts, Enrichment
from detector.core.signing import REJECT_REASONS, Signer, Verifier
from detector.stream import codec, failures, faust_internals, guard, retention
from detector.stream import population as pop_stream
from detector.stream.delivery import (
    Admit,
    DirectDecisions,
    FencedDecisions,
    OffsetGate,
    start_offsets,
)
from detector.stream.io import stop_consumer, topic_partitions
from detector.stream.kafka_security import client_kwargs, faust_credentials
from detector.stream.web_surface import CLOSED_WEB_SETTINGS

log = logging.getLogger("detector.stream")

SEEN_TTL_S = 3600.0  # event-time seconds a decision is kept for redelivery dedup
SENT_LOOKBACK_S = 900.0  # on assignment: request ids decided in the last 15 min are "sent"
SWEEP_INTERVAL_S = 30.0  # a full sweep pass starts at most this often ...
SWEEP_TICK_S = 0.5  # ... and proceeds SWEEP_SLICE keys per tick
SWEEP_SLICE = 2000
GAUGE_INTERVAL_S = 5.0
RANGE_BATCH = 500  # range stage: events per batch (one Kafka round trip per batch)
META = "_"  # table-value key of the adapter's metadata (partition, watermark)
STAGE_INPUTS = {"requests": "ingest", "outcomes": "outcome", "by_ip": "ip", "by_range": "range"}
#               ^ the topics the agents consume -> the stage (agent) consuming it

Publish = Callable[..., Awaitable[Any]]


# --------------------------------------------------------------------------- transport


class DetectorApp(faust_internals.DeliveryTransportMixin, faust_internals.ClosedWebMixin, faust.App):
    """A faust.App whose consumer is :class:`DeliveryConsumer` (short fetch waits, every record
    delivered, commits never past an unacked offset) and whose web server serves only the pages
    the app adds (/metrics, /healthz)."""

    rt: StreamRuntime


# --------------------------------------------------------------------------- table views


@dataclass
class Write:
    table: Any
    key: str
    value: Any  # None = tombstone
    partition: int
    raw: bytes | None = None  # the value already serialized (must equal codec.dumps(value))


class EventView(MutableMapping[str, Any]):
    """One event's view of a table: idempotent writes, explicit partition, deferred changelog.

    ``applied(value)`` says whether the stored value already includes this event (a redelivery);
    such a value is handed to the core as a deep copy and the core's write to it is dropped.
    ``stamp(value)`` adds the watermark. Writes go to the in-memory store at once and are queued in
    ``writes`` for the changelog (one message per key and flush: the latest value wins).
    """

    def __init__(self, table: Any, partition: int, applied: Callable[[dict[str, Any]], bool],
                 stamp: Callable[[dict[str, Any]], None], writes: dict[tuple[str, str], Write]) -> None:
        self._table = table
        self._data = table.data
        self._partition = partition
        self._applied = applied
        self._stamp = stamp
        self._writes = writes
        self._written: set[str] = set()
        self._frozen: set[str] = set()
        self.redelivered = False  # some value already included this event

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        value = self._data.get(key)
        if value is None:
            return default
        if key not in self._written and key not in self._frozen and self._applied(value):
            self._frozen.add(key)
            self.redelivered = True
        if key in self._frozen:
            return copy.deepcopy(value)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._frozen:
            return
        self._stamp(value)
        value[META]["p"] = self._partition
        self._data[key] = value
        self._written.add(key)
        self._writes[(self._table.name, key)] = Write(self._table, key, value, self._partition)

    def __delitem__(self, key: str) -> None:
        self._data.pop(key, None)
        self._writes[(self._table.name, key)] = Write(self._table, key, None, self._partition)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data.keys()))

    def __len__(self) -> int:
        return len(self._data)


def _meta(value: dict[str, Any]) -> dict[str, Any]:
    meta = value.get(META)
    if meta is None:
        meta = value[META] = {}
    return cast(dict[str, Any], meta)


class SweepView(MutableMapping[str, Any]):
    """What :func:`state.sweep` sees: this worker's live keys, metadata stripped; deletes tombstone."""

    def __init__(self, table: Any, partitions: set[int], writes: list[Write],
                 keys: list[str] | None = None) -> None:
        self._table = table
        self._data = table.data
        self._partitions = partitions
        self._writes = writes
        self._keys = keys  # None: every key

    def _mine(self, value: Any) -> bool:
        return isinstance(value, dict) and value.get(META, {}).get("p") in self._partitions

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        keys = list(self._data.keys()) if self._keys is None else self._keys
        get = self._data.get
        for key in keys:
            value = get(key)
            if value is None:
                continue
            if not self._mine(value):
                self._data.pop(key, None)  # a partition this worker no longer owns (rebalance)
                continue
            yield key, {k: v for k, v in value.items() if k != META}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:  # pragma: no cover - sweep never sets
        raise NotImplementedError

    def __delitem__(self, key: str) -> None:
        value = self._data.pop(key, None)
        if isinstance(value, dict):
            self._writes.append(Write(self._table, key, None, value[META]["p"]))

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self.items())

    def __len__(self) -> int:
        return sum(1 for _ in self.items())


# --------------------------------------------------------------------------- runtime


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
    sent: dict[str, float] = field(default_factory=dict)  # request id -> wall time it was sent
    generation: int | None = None  # consumer generation the stages are prepared for
    gate_offsets: bool = True  # order each stage's input (off in test_context: its offsets
    #                            count per agent, not per partition)
    gates: dict[str, OffsetGate] = field(default_factory=dict)  # stage input -> its gate
    batcher: Any = None  # the range stage's RangeBatcher
    topics: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    active: dict[str, set[int]] = field(default_factory=dict)  # topic -> assigned partitions

    ip_partitions: int = 0  # partitions of by-ip when callback-requests has as many, else 0
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

    async def flush_writes(self, writes: list[Write]) -> list[Any]:
        """Send queued table writes to their changelogs; returns the delivery futures."""
        futs = []
        for w in writes:
            futs.append(await self.publish_changelog(w))
        return futs

    async def publish_changelog(self, w: Write) -> Any:
        return await self.publish_raw_changelog(w, None if w.value is None else codec.dumps(w.value))

    async def publish_raw_changelog(self, w: Write, value: bytes | None) -> Any:
        assert self.publish is not None
        return await self.publish(w.table.changelog_topic, codec.dumps(w.key), value, w.partition)

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


def _stamp_offset(offset: int) -> Callable[[dict[str, Any]], None]:
    def stamp(value: dict[str, Any]) -> None:
        _meta(value)["o"] = offset
    return stamp


def _applied_offset(offset: int) -> Callable[[dict[str, Any]], bool]:
    def applied(value: dict[str, Any]) -> bool:
        meta = value.get(META) or {}
        return int(meta.get("o", -1)) >= offset
    return applied


def _stamp_source(src: str, src_offset: int) -> Callable[[dict[str, Any]], None]:
    def stamp(value: dict[str, Any]) -> None:
        marks = _meta(value).setdefault("s", {})
        marks[src] = max(int(marks.get(src, -1)), src_offset)
    return stamp


def _applied_source(src: str, src_offset: int) -> Callable[[dict[str, Any]], bool]:
    def applied(value: dict[str, Any]) -> bool:
        meta = value.get(META) or {}
        return int(meta.get("s", {}).get(src, -1)) >= src_offset
    return applied


# --------------------------------------------------------------------------- stage logic


async def ingest_one(rt: StreamRuntime, key: bytes | None, value: bytes | None, *, partition: int,
                     offset: int, timestamp: float | None) -> None:
    """Stage 0: validate one raw request; dead-letter it or forward it keyed by IP."""
    t0 = time.perf_counter()
    metrics.REQUESTS.inc()
    s = rt.settings
    try:
        if value is None:
            raise InputError("message has no value (tombstone); expected a JSON request")
        req = parse_request(value)
        check_event_time(req.ts, time.time(), max_future_s=s.max_future_skew_s,
                         max_past_s=s.max_past_skew_s)
    except InputError as exc:
        await _dead_letter(rt, exc.kind, str(exc), s.topic_requests, partition, offset, value, key,
                           timestamp)
        return
    except Exception as exc:  # never let one message stop the worker
        await failures.dead_letter_internal(rt, exc, stage="ingest", topic=s.topic_requests,
                                            partition=partition, offset=offset, original=value,
                                            key=key, timestamp=timestamp)
        return
    ip_key = req.ip.encode("utf-8")
    if key == ip_key and partition == rt.ip_partition(ip_key):
        # Keyed by IP by the web tier and on the partition the by-ip hop would pick: this worker
        # owns that partition of the ip table too (co-partitioned), so count here, no hop.
        await ip_stage(rt, req, None, src=f"d{partition}", src_offset=offset, kts=timestamp,
                       partition=partition)
        metrics.child(metrics.STAGE_SECONDS, "ingest_ip").observe(time.perf_counter() - t0)
        return
    env = {"r": codec.request_to_wire(req), "src": [partition, offset], "kts": timestamp}
    await rt.send("by_ip", ip_key, codec.dumps(env))
    metrics.child(metrics.STAGE_SECONDS, "ingest").observe(time.perf_counter() - t0)


async def _dead_letter(rt: StreamRuntime, kind: str, error: str, topic: str, partition: int,
                       offset: int, value: bytes | None, key: bytes | None,
                       timestamp: float | None) -> None:
    record = codec.dead_letter(kind=kind, error=error, topic=topic, partition=partition,
                               offset=offset, original=value, key=key, timestamp=timestamp)
    await rt.send("dlq", key, codec.dumps(record))
    metrics.DEAD_LETTERS.labels(topic, kind).inc()


async def ip_one(rt: StreamRuntime, value: bytes, *, partition: int) -> None:
    """Stage 1 (by-ip hop): decode a forwarded request and run :func:`ip_stage` on it."""
    t0 = time.perf_counter()
    env = codec.loads(value)
    req = codec.request_from_wire(env["r"])
    await ip_stage(rt, req, env["r"], src=str(int(env["src"][0])), src_offset=int(env["src"][1]),
                   kts=env.get("kts"), partition=partition)
    metrics.child(metrics.STAGE_SECONDS, "ip").observe(time.perf_counter() - t0)


async def ip_stage(rt: StreamRuntime, req: CallbackRequest, wire: dict[str, Any] | None, *, src: str,
                   src_offset: int, kts: float | None, partition: int) -> None:
    """Count the request per IP (exactly once per source message), forward it keyed by range.

    ``src`` names the source: the callback-requests partition, ``"d<p>"`` when counted in the
    ingest agent itself (a separate watermark: the two paths are ordered separately)."""
    rt.max_ts = max(rt.max_ts, req.ts)
    enr = enrich(req, rt.intel, rt.policy)
    writes: dict[tuple[str, str], Write] = {}
    view = EventView(rt.tables["ip"], partition, _applied_source(src, src_offset),
                     _stamp_source(src, src_offset), writes)
    counts = state.ip_stage(state.IpStores(ip=view), req, enr, rt.policy.shared_ip, key=rt.ctx.pii_key)
    if view.redelivered:
        metrics.DUPLICATES.labels("ip").inc()
        # The copy was counted once more than the stored value: undo that in what we forward.
        counts = dataclasses.replace(counts, ip_15m=max(counts.ip_15m - 1, 1),
                                     ip_1h=max(counts.ip_1h - 1, 1), ip_24h=max(counts.ip_24h - 1, 1),
                                     ip_fresh=1 if counts.ip_24h <= 2 else 0)
    await rt.flush_writes(list(writes.values()))
    out = {"k": "req", "r": wire if wire is not None else codec.request_to_wire(req),
           "ipc": codec.ip_counts_to_wire(counts), "kts": kts}
    await rt.send("by_range", range_routing_key(req, enr).encode("utf-8"), codec.dumps(out))


@dataclass
class RangeResult:
    """What one range-stage event produced: a decision to send and/or a list entry to publish."""

    decision: dict[str, Any] | None = None
    kts: float | None = None
    resend: bool = False
    entry: ListEntry | None = None
    raw: bytes | None = None  # the decision serialized
    dead_letter: dict[str, Any] | None = None  # an internal error: no decision, a dead letter
    partition: int = -1  # the by-range partition of the event (its decisions' fencing unit)


@dataclass
class Undecided:
    """A request counted by the range stage whose decision is still to be made (in a batch)."""

    req: CallbackRequest
    enr: Enrichment
    update: state.RangeUpdate
    counts: Counts
    stores: state.RangeStores
    partition: int
    offset: int
    result: RangeResult  # filled in by :func:`decide_pending`


def range_one(rt: StreamRuntime, env: dict[str, Any], *, partition: int, offset: int,
              writes: dict[tuple[str, str], Write], undecided: list[Undecided]) -> RangeResult:
    """Stage 2 (synchronous core part): count per number/pair/range; a new request is appended
    to ``undecided`` (decided, committed and stored by :func:`decide_pending`), a known one gets
    its stored decision. The caller decides pending requests first when this event depends on
    one of them (:meth:`RangeBatcher.depends`)."""
    t = rt.tables
    applied, stamp = _applied_offset(offset), _stamp_offset(offset)
    number = EventView(t["number"], partition, applied, stamp, writes)
    pair, rng = (EventView(t[n], partition, applied, stamp, writes) for n in ("pair", "range"))
    stores = state.RangeStores(number=number, pair=pair, range=rng)
    if env.get("k") == "out":
        return RangeResult(entry=_outcome(rt, env, stores))
    req = codec.request_from_wire(env["r"])
    rt.max_ts = max(rt.max_ts, req.ts)
    seen = t["seen"].data.get(req.request_id)
    if seen is not None and int(seen[META]["o"]) != offset:
        # The same request arrived again in another message (an upstream stage was redelivered):
        # its state was counted when its first message was processed. Re-send the stored decision.
        metrics.DUPLICATES.labels("range").inc()
        return RangeResult(decision=seen["d"], kts=env.get("kts"), resend=True)
    enr = enrich(req, rt.intel, rt.policy)
    upd = state.range_stage(stores, req, enr, range_routing_key(req, enr), key=rt.ctx.pii_key)
    if seen is None and (number.redelivered or pair.redelivered or rng.redelivered):
        # Counted before, decision not stored (a crash or a freeze between the changelog writes
        # of one batch): the stored values include this request already; do not count it twice.
        upd.counts = _uncount(upd.counts, number.redelivered, pair.redelivered, rng.redelivered)
    if seen is not None:  # this very message again (offset not committed before a crash)
        metrics.DUPLICATES.labels("range").inc()
        d = seen["d"]
        state.range_commit(stores, upd, req, allowed=d["action"] == Action.ALLOW,
                           pending_ttl=rt.policy.pending_ttl)
        return RangeResult(decision=d, kts=env.get("kts"), resend=True)
    result = RangeResult(kts=env.get("kts"))
    ipc = codec.ip_counts_from_wire(env["ipc"])
    pop = count_population(rt.population, req, enr, ipc, upd.counts, rt.policy)
    undecided.append(Undecided(req, enr, upd, Counts(ipc, upd.counts, pop),
                               stores, partition, offset, result))
    return result


def _uncount(c: Any, number: bool, pair: bool, rng: bool) -> Any:
    """Range counts with this request counted once where a stored value already included it."""
    import dataclasses

    def one_less(*names: str) -> dict[str, int]:
        return {n: max(getattr(c, n) - 1, 1) for n in names}

    return dataclasses.replace(
        c, **(one_less("number_15m", "number_1h", "number_24h") if number else {}),
        **(one_less("pair_1h", "pair_24h") if pair else {}),
        **(one_less("range_1h", "range_24h") if rng else {}))


def decide_pending(rt: StreamRuntime, undecided: list[Undecided],
                   writes: dict[tuple[str, str], Write]) -> None:
    """Decide the counted requests with one model call, then commit each (the outstanding-
    callback mark) and store its decision in ``seen``, in arrival order."""
    if not undecided:
        return
    decisions = decide_many([(u.req, u.enr, u.counts) for u in undecided], rt.context(),
                            decided_at=time.time())
    seen = rt.tables["seen"]
    for u, decision in zip(undecided, decisions, strict=True):
        req = u.req
        decision = spend.settle(decision, req, u.enr, rt.ctx, rt.population)  # spend breakers
        state.range_commit(u.stores, u.update, req, allowed=decision.action == Action.ALLOW,
                           pending_ttl=rt.policy.pending_ttl)
        d = codec.decision_to_wire(decision)
        raw = codec.dumps(d)
        seen_value = {"d": d, "t": req.ts, META: {"o": u.offset, "p": u.partition}}
        seen.data[req.request_id] = seen_value
        # The stored copy is the decision's bytes inside an envelope: serialized once, identical.
        seen_raw = b'{"d":%s,"t":%s,"_":%s}' % (raw, codec.dumps(req.ts), codec.dumps(seen_value[META]))
        writes[("seen", req.request_id)] = Write(seen, req.request_id, seen_value, u.partition, seen_raw)
        u.result.decision, u.result.raw = d, raw
    undecided.clear()


def _outcome(rt: StreamRuntime, env: dict[str, Any], stores: state.RangeStores) -> ListEntry | None:
    outcome = codec.outcome_from_wire(env["o"])
    nkey = number_key_of(outcome.phone_number, rt.policy)
    metrics.OUTCOMES.labels(metrics.bounded(outcome.outcome, OUTCOMES)).inc()
    entry, limited = learn(stores, outcome, nkey, rt.policy,
                           deny_interval_s=rt.settings.learned_deny_interval_s)
    if limited:
        metrics.LEARNED.labels("rate_limited").inc()
    if entry is not None:
        rt.ctx.lists.add(entry)
        metrics.LIST_CHANGES.labels("add", "learned").inc()
        metrics.LEARNED.labels("published" if rt.signer is not None else "local_only").inc()
    return entry


def number_key_of(phone_number: str, policy: Policy) -> str:
    """The ``number`` table key of a dialled number (as :meth:`Detector.apply_outcome` computes it)."""
    info = enrich_phone(phone_number, None, policy.range_digits)
    return info.e164 or "?" + "".join(c for c in phone_number if c.isdigit())


def outcome_routing_key(phone_number: str, policy: Policy) -> str:
    from detector.core.phone import routing_key

    return routing_key(enrich_phone(phone_number, None, policy.range_digits), phone_number)


class RangeBatcher:
    """Stage 2's batching: events are counted one by one as they arrive; their decisions are made
    together (one model call) when the batch is flushed, or earlier when a new event depends on
    one of them (same number or request id, or an outcome). Every RANGE flush interval
    :meth:`flush` decides, makes the batch's table writes durable, then sends its decisions, then
    acks its events (so offsets are committed only after that)."""

    def __init__(self, rt: StreamRuntime) -> None:
        self.rt = rt
        self.writes: dict[tuple[str, str], Write] = {}
        self.results: list[RangeResult] = []
        self.acks: list[tuple[int, Callable[[], Any]]] = []  # (by-range partition, ack)
        self.undecided: list[Undecided] = []
        self.pending_keys: set[str] = set()  # number keys and request ids of ``undecided``
        self.lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self.acks)

    def depends(self, env: dict[str, Any]) -> bool:
        """Whether this event must see the decisions of the undecided requests first."""
        if not self.undecided:
            return False
        if env.get("k") == "out":
            return True  # an outcome edits a number's state
        req = env["r"]
        if req["request_id"] in self.pending_keys:
            return True
        phone = enrich_phone(req["phone_number"], req.get("country_hint"), self.rt.policy.range_digits)
        return state.phone_key(phone, req["phone_number"]) in self.pending_keys

    def decide(self) -> None:
        """Decide the undecided requests; if the batch fails (a bug), one by one, so a single bad
        request does not take its batch with it."""
        try:
            decide_pending(self.rt, self.undecided, self.writes)
        except Exception as exc:  # the type and line only: the message may hold the input
            log.error("range: deciding a batch of %d failed (%s); deciding one by one",
                      len(self.undecided), failures.describe(exc))
            for u in self.undecided:
                try:
                    decide_pending(self.rt, [u], self.writes)
                except Exception as exc:
                    u.result.dead_letter = self._failed(exc, codec.request_to_wire(u.req),
                                                        u.partition, u.offset)
        finally:
            self.undecided.clear()
            self.pending_keys.clear()

    def add(self, value: bytes | None, partition: int, offset: int, ack: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        try:
            env = codec.loads(value or b"")
            if self.depends(env):
                self.decide()
            n = len(self.undecided)
            result = range_one(self.rt, env, partition=partition, offset=offset,
                               writes=self.writes, undecided=self.undecided)
            result.partition = partition
            self.results.append(result)
            if len(self.undecided) > n:
                u = self.undecided[-1]
                self.pending_keys.update((u.update.number_key, u.req.request_id))
        except Exception as exc:  # a bug must not stop the worker nor drop the request
            self.results.append(RangeResult(dead_letter=self._failed(exc, value, partition, offset),
                                            partition=partition))
        self.acks.append((partition, ack))
        metrics.child(metrics.STAGE_SECONDS, "range").observe(time.perf_counter() - t0)

    def _failed(self, exc: Exception, request: Any, partition: int, offset: int) -> dict[str, Any]:
        """The dead-letter record of a request this stage failed on (an internal error)."""
        raw: bytes | None
        if isinstance(request, bytes | None):  # the by-range message: keep the request only
            try:
                request = codec.loads(request or b"")["r"]
                raw = codec.dumps(request)
            except Exception:
                raw, request = request, None
        else:
            raw = codec.dumps(request)
        rid = request.get("request_id") if isinstance(request, dict) else None
        return failures.internal_error_record(
            exc, stage="range", topic=self.rt.topics["by_range"].get_topic_name(),
            partition=partition, offset=offset, original=raw,
            key=str(rid).encode("utf-8") if rid is not None else None)

    async def flush(self) -> int:
        """Decide, make pending writes durable, send pending decisions, ack. Returns decisions sent.
        A failure crashes the worker: the batch's events are neither acked nor retried here, and
        a restart redelivers them (they get their stored decisions)."""
        try:
            return await self._flush()
        except Exception as exc:
            guard.crash(f"range: a batch could not be completed ({failures.describe(exc)})")
            raise

    async def _flush(self) -> int:
        async with self.lock:
            if not self.acks:
                return 0
            t0 = time.perf_counter()
            self.decide()
            metrics.child(metrics.STAGE_SECONDS, "range_decide").observe(time.perf_counter() - t0)
            writes, results, acks = self.writes, self.results, self.acks
            self.writes, self.results, self.acks = {}, [], []
            rt = self.rt
            # Only partitions still owned: the others' events go to their new owner unacked.
            owns = rt.decisions_out.owns
            lost = sorted({p for p, _ in acks if not owns(p)})
            if lost:
                log.info("range: %d events of partitions %s left to their new owner", sum(
                    1 for p, _ in acks if not owns(p)), lost)
            # Serialize now: events processed while we wait below must not leak into this batch.
            frozen = [(w, w.raw if w.raw is not None or w.value is None else codec.dumps(w.value))
                      for w in writes.values() if owns(w.partition)]
            futs = [await rt.publish_raw_changelog(w, raw) for w, raw in frozen]
            if futs:  # state and stored decisions durable before any send (bounded, loud wait)
                await guard.wait_delivered(futs, stage="range", what="changelog writes",
                                           diagnose=rt.diagnose)
            guard.FREEZE.check()  # frozen past the session timeout: another worker may own these
            sent = 0
            now = time.time()
            batch: dict[int, list[tuple[bytes, bytes]]] = {}
            observe: list[tuple[dict[str, Any], float | None]] = []
            for res in results:
                if not owns(res.partition):
                    continue
                if res.dead_letter is not None:
                    key = res.dead_letter["key_b64"]
                    await failures.send_dead_letter(
                        rt, res.dead_letter, None if key is None else base64.b64decode(key))
                    continue
                wire = None if res.entry is None else rt.learned_entry_wire(res.entry)
                if res.entry is not None and wire is not None:
                    await rt.send("lists", res.entry.key.encode("utf-8"), wire)
                d = res.decision
                if d is None:
                    continue
                rid = d["request_id"]
                if rid in rt.sent:
                    if not res.resend:  # decided anew: its state had not counted it before
                        log.warning("range: request %s decided again, its decision is already "
                                    "on the topic; not sent", rid)
                    continue  # already on the decisions topic (a re-send, or sent by a zombie
                    #           before this worker fenced it: see load_sent)
                batch.setdefault(res.partition, []).append(
                    (rid.encode("utf-8"), res.raw if res.raw is not None else codec.dumps(d)))
                rt.sent[rid] = now
                sent += 1
                if not res.resend:
                    observe.append((d, res.kts))
            await rt.decisions_out.send(batch)  # one transaction per partition when fenced
            now = time.time()
            for d, kts in observe:
                metrics.observe_decision(d, None if kts is None else now - float(kts))
            for p, ack in acks:
                if owns(p):
                    ack()
            rt.watch.progress("range")
            return sent


async def outcome_one(rt: StreamRuntime, key: bytes | None, value: bytes | None, *, partition: int,
                      offset: int, timestamp: float | None) -> None:
    """Outcome ingest: validate a dialer outcome; forward it keyed by the number's range."""
    s = rt.settings
    try:
        if value is None:
            raise InputError("message has no value; expected a JSON outcome")
        outcome = parse_outcome(value)
        check_event_time(outcome.ts, time.time(), max_future_s=s.max_future_skew_s,
                         max_past_s=s.max_past_skew_s)
    except InputError as exc:
        await _dead_letter(rt, exc.kind, str(exc), s.topic_outcomes, partition, offset, value, key,
                           timestamp)
        return
    except Exception as exc:  # never let one message stop the worker (see ingest_one)
        await failures.dead_letter_internal(rt, exc, stage="outcome", topic=s.topic_outcomes,
                                            partition=partition, offset=offset, original=value,
                                            key=key, timestamp=timestamp)
        return
    env = {"k": "out", "o": codec.outcome_to_wire(outcome)}
    await rt.send("by_range", outcome_routing_key(outcome.phone_number, rt.policy).encode("utf-8"),
                  codec.dumps(env))


CORE_TABLES = ("ip", "number", "pair", "range")


def sweep_tables(rt: StreamRuntime, now: float,
                 only: dict[str, list[str]] | None = None) -> list[Write]:
    """Delete dead keys of this worker's partitions (core tables via state.sweep; ``seen`` after
    SEEN_TTL_S) and keys of partitions it no longer owns; ``only`` limits it to some keys."""
    writes: list[Write] = []
    by_range = rt.active.get("by_range", set())
    parts = {"ip": rt.active.get("by_ip", set()), "number": by_range, "pair": by_range,
             "range": by_range}
    for name in CORE_TABLES:
        keys = None if only is None else only.get(name, [])
        state.sweep(SweepView(rt.tables[name], parts[name], writes, keys), now)
    seen = rt.tables["seen"]
    keys = list(seen.data.keys()) if only is None else only.get("seen", [])
    for key in keys:
        value = seen.data.get(key)
        if value is None:
            continue
        if value[META]["p"] not in by_range:
            seen.data.pop(key, None)
        elif float(value["t"]) < now - SEEN_TTL_S:
            seen.data.pop(key, None)
            writes.append(Write(seen, key, None, value[META]["p"]))
    return writes


def sweep_now(rt: StreamRuntime) -> float:
    """The time sweeps run at: the newest event time, but never past the wall clock plus the
    allowed future skew (one far-future event must not make every live key look dead)."""
    return sweep_time(newest_event=rt.max_ts, wall=time.time(),
                      max_future_skew=rt.settings.max_future_skew_s)


class Sweeper:
    """Sweeps a slice of keys per tick, so a table of millions of keys never stalls the loop;
    a full pass starts at most every SWEEP_INTERVAL_S."""

    def __init__(self, rt: StreamRuntime, slice_size: int = SWEEP_SLICE) -> None:
        self.rt = rt
        self.slice_size = slice_size
        self.queue: list[tuple[str, str]] = []
        self.pass_started = float("-inf")
        self.pending = 0  # numbers with an outstanding callback seen in the current pass

    def tick(self, now: float) -> list[Write]:
        wall = time.monotonic()
        if not self.queue:
            if wall - self.pass_started < SWEEP_INTERVAL_S:
                return []
            self.pass_started = wall
            metrics.OUTSTANDING.set(self.pending)
            self.pending = 0
            self.queue = [(name, key) for name in (*CORE_TABLES, "seen")
                          for key in list(self.rt.tables[name].data.keys())]
            cutoff = time.time() - SENT_LOOKBACK_S
            for rid, at in list(self.rt.sent.items()):
                if at < cutoff:
                    del self.rt.sent[rid]
        batch, self.queue = self.queue[-self.slice_size:], self.queue[:-self.slice_size]
        only: dict[str, list[str]] = {}
        numbers = self.rt.tables["number"].data
        for name, key in batch:
            only.setdefault(name, []).append(key)
            if name == "number":
                p = (numbers.get(key) or {}).get("p")
                if p and float(p["until"]) > now:
                    self.pending += 1
        return sweep_tables(self.rt, now, only)


# --------------------------------------------------------------------------- the app


def make_app(settings: Settings, *, rt: StreamRuntime | None = None, web: bool = True,
             prometheus: bool = True) -> DetectorApp:
    """Build the worker's Faust app. ``rt`` defaults to one built from ``settings``."""
    from detector.runtime import build_context, build_intel, build_model_watcher

    if rt is None:
        from detector.keys import worker_keys

        ctx = build_context(settings)
        rt = StreamRuntime(settings, ctx, build_intel(settings), build_model_watcher(settings))
        rt.verifier, rt.signer = worker_keys(settings)
    s = settings
    app = DetectorApp(
        s.app_id,
        broker=[f"kafka://{h.strip()}" for h in s.kafka_bootstrap.split(",") if h.strip()],
        broker_credentials=faust_credentials(s),
        store="memory://",
        datadir=str(s.data_dir),
        autodiscover=False,
        topic_partitions=s.partitions,
        topic_replication_factor=s.replication,
        table_standby_replicas=0,
        web_enabled=web,
        web_port=s.web_port,
        web_bind=s.web_bind,  # DETECTOR_WEB_BIND: loopback unless deployed (compose: 0.0.0.0)
        web_host=s.web_host,  # DETECTOR_WEB_HOST: the URL other workers forward pre-checks to
        **CLOSED_WEB_SETTINGS,
        consumer_auto_offset_reset="earliest",
        producer_linger=s.batch_ms / 2000.0,  # fewer, larger produce requests
        broker_commit_interval=1.0,
        broker_session_timeout=guard.SESSION_TIMEOUT_S,  # a killed worker's partitions move on
        broker_heartbeat_interval=guard.HEARTBEAT_INTERVAL_S,
        stream_buffer_maxsize=8192,
        stream_wait_empty=False,
        logging_config=None,
        producer_request_timeout=guard.DELIVERY_TIMEOUT_S,  # Faust's default: 1,200 s of silence
    )
    app.rt = rt
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
           "value_serializer": "raw"}
    rt.topics = {
        "requests": app.topic(s.topic_requests, **raw),
        "outcomes": app.topic(s.topic_outcomes, **raw),
        "decisions": app.topic(s.topic_decisions, **raw),
        "dlq": app.topic(s.topic_dead_letter, **raw),
        "lists": app.topic(s.topic_lists, **raw),
        "by_ip": app.topic(f"{s.app_id}-by-ip", partitions=s.partitions, internal=True,
                           config=retention.internal_config(s), **raw),
        "by_range": app.topic(f"{s.app_id}-by-range", partitions=s.partitions, internal=True,
                              config=retention.internal_config(s), **raw),
        # Population deltas of every worker (stream/population.py): 1 partition, read by all.
        "population": app.topic(f"{s.app_id}-population", partitions=1, internal=True,
                                config=retention.internal_config(s), **raw),
    }
    rt.tables = {
        name: app.Table(name, partitions=s.partitions, help=doc,
                        extra_topic_configs=retention.changelog_config(s))
        for name, doc in (
            ("ip", "per IP: counts, distinct numbers and countries (by-ip stage)"),
            ("number", "per number: counts, distinct IPs, pending callback, machine answers"),
            ("pair", "per IP x number: counts"),
            ("range", "per number range: counts, distinct IPs and numbers"),
            ("seen", "per request id: the decision sent (redelivery dedup)"),
        )
    }

    names: dict[int, str] = {}

    async def publish(channel: Any, key: bytes | None, value: bytes | None,
                      partition: int | None = None) -> Any:
        # Straight to the transport's producer: Topic.send() builds a FutureMessage, a
        # PendingMessage and runs the codecs for each message, which costs more than the rest of
        # a stage. Keys and values are bytes already. Returns the delivery future.
        name = names.get(id(channel))
        if name is None:
            name = names[id(channel)] = channel.get_topic_name()
            await _track_outputs(app, rt, name)
        metrics.child(metrics.MESSAGES_SENT, name).inc()
        return guard.watch_delivery(await app.producer.send(name, key, value, partition, None, None))

    rt.publish = publish
    rt.diagnose = lambda: faust_internals.pending_without_leader(app)
    if rt.decisions_out is None:
        rt.decisions_out = decisions_output(app, rt)

    batcher = rt.batcher = RangeBatcher(rt)
    gates = rt.gates = {key: OffsetGate(rt.topics[key].get_topic_name()) for key in STAGE_INPUTS}
    prepare_lock = asyncio.Lock()

    async def prepare(generation: int) -> None:
        """Before processing in a new generation: lists caught up, the range batch flushed, each
        stage's gate set to the group's committed offsets, recent decision ids loaded."""
        async with prepare_lock:
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
            _update_assignment(app, rt)
            owned = rt.active.get("by_range", set())
            await rt.decisions_out.release(owned)  # revoked: left unsent and unacked ...
            await batcher.flush()  # ... the rest of the last batch completes
            await rt.decisions_out.assign(owned)  # fences the previous owners of new partitions
            n_req = app.consumer.topic_partitions(gates["requests"].topic)
            n_ip = app.consumer.topic_partitions(gates["by_ip"].topic)
            rt.ip_partitions = n_ip if n_ip and n_req == n_ip else 0
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
            # Partitions may come with uncommitted offsets whose decisions are already on the topic
            # (the previous owner crashed after sending them). Read after the fence above: a
            # previous owner can commit no decision any more that this does not see.
            await load_sent_or_exit(rt)
            rt.generation = generation

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Faust awaits this during the rebalance, before the streams resume.
        await prepare(app.consumer_generation_id)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Before the group re-forms: the pending batch completes while its partitions are ours.
        await batcher.flush()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def on_shutdown(sender: Any, *args: Any, **kwargs: Any) -> None:
        await rt.decisions_out.stop()
        if rt.watch.ends is not None:
            await guard.stop_end_offsets_consumer(rt.watch.ends)

    async def admitted(event: Any, key: str, ack: Callable[[Any], None]) -> bool:
        """Whether the stage processes this event now (see :class:`OffsetGate`)."""
        if rt.generation != app.consumer_generation_id:
            await prepare(app.consumer_generation_id)
        if not rt.gate_offsets:
            return True
        m = event.message
        gate = gates[key]
        verdict = gate.admit(m.partition, m.offset)
        if verdict is Admit.PROCESS:
            return True
        if verdict is Admit.SKIP:
            metrics.DUPLICATES.labels(STAGE_INPUTS[key]).inc()
            ack(event)
        elif verdict is Admit.SEEK:
            expected = gate.expected(m.partition)
            assert expected is not None
            log.warning("%s[%d]: got offset %d, expected %d: reading %d-%d again",
                        gate.topic, m.partition, m.offset, expected, expected, m.offset - 1)
            metrics.REREADS.labels(STAGE_INPUTS[key]).inc()
            try:
                await asyncio.wait_for(app.consumer.seek_wait({TP(m.topic, m.partition): expected}),
                                       guard.PREPARE_TIMEOUT_S)
            except Exception as exc:  # e.g. revoked meanwhile: the next assignment resets the gate
                log.warning("%s[%d]: seek to %d failed: %r", gate.topic, m.partition, expected, exc)
                gate.forget_hole(m.partition)  # the next event past the hole seeks again
        return False

    def ack_now(event: Any) -> None:
        event.ack()

    def ack_after_flush(event: Any) -> None:  # the range stage acks a batch once it is durable
        batcher.acks.append((event.message.partition, event.ack))

    async def raw_input_stage(stream: Any, key: str, handle: Callable[..., Awaitable[None]]) -> None:
        """An agent over an external topic (requests, outcomes): validate, hand on, ack."""
        stage = STAGE_INPUTS[key]
        async for event in stream.noack().events():
            if await admitted(event, key, ack_now):
                m = event.message
                try:
                    await handle(rt, m.key, m.value, partition=m.partition, offset=m.offset,
                                 timestamp=m.timestamp)
                except Exception as exc:
                    await _internal_error(rt, exc, stage, m)
                event.ack()
                rt.watch.progress(stage)

    @app.agent(rt.topics["requests"], name="ingest")
    async def ingest(stream: Any) -> None:
        await raw_input_stage(stream, "requests", ingest_one)

    @app.agent(rt.topics["by_ip"], name="ip")
    async def ip_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            if not await admitted(event, "by_ip", ack_now):
                continue
            m = event.message
            try:
                await ip_one(rt, m.value, partition=m.partition)
            except Exception as exc:
                await _internal_error(rt, exc, "ip", m)
            event.ack()
            rt.watch.progress("ip")

    @app.agent(rt.topics["by_range"], name="range")
    async def range_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            if not await admitted(event, "by_range", ack_after_flush):
                continue
            m = event.message
            batcher.add(m.value, m.partition, m.offset, event.ack)
            if len(batcher) >= RANGE_BATCH:
                await batcher.flush()

    @app.task
    async def range_flusher() -> None:
        while not app.should_stop:
            await asyncio.sleep(s.batch_ms / 1000.0)
            await batcher.flush()  # a failure crashes the worker (see RangeBatcher.flush)

    @app.agent(rt.topics["outcomes"], name="outcome")
    async def outcome_agent(stream: Any) -> None:
        await raw_input_stage(stream, "outcomes", outcome_one)

    app.ingest_agent = ingest  # type: ignore[attr-defined]
    app.ip_agent = ip_agent  # type: ignore[attr-defined]
    app.range_agent = range_agent  # type: ignore[attr-defined]
    app.outcome_agent = outcome_agent  # type: ignore[attr-defined]

    @app.task
    async def lists_reader() -> None:
        await read_lists_forever(app, rt)

    sweeper = Sweeper(rt)
    me = pop_stream.worker_id()

    @app.task
    async def population_reader() -> None:
        await pop_stream.read_population_forever(app, rt, rt.topics["population"].get_topic_name(), me)

    @app.timer(pop_stream.PUBLISH_INTERVAL_S)
    async def population_publisher() -> None:
        await pop_stream.publish_delta(rt, rt.topics["population"], me)

    @app.timer(SWEEP_TICK_S)
    async def sweep() -> None:
        if not rt.active:
            _update_assignment(app, rt)
        for w in sweeper.tick(sweep_now(rt)):
            await rt.publish_changelog(w)
        rt.population.prune(pop_stream.prune_clock(rt.max_ts))

    from detector.policy_watch import PolicyWatcher

    policy_watcher = PolicyWatcher(s.policy, rt.ctx, s.rate_deck)  # the rate deck too
    app.policy_watcher = policy_watcher  # type: ignore[attr-defined]

    @app.timer(s.policy_reload_s)
    async def policy_reload() -> None:  # a changed policy file, without a restart
        policy_watcher.check()

    @app.timer(GAUGE_INTERVAL_S)
    async def gauges() -> None:
        _update_assignment(app, rt)
        update_gauges(app, rt)
        pop_stream.update_population_gauges(rt)

    @app.task
    async def freeze_watch() -> None:
        await guard.FREEZE.run()

    @app.timer(guard.PROBE_INTERVAL_S)
    async def liveness() -> None:
        await _check_liveness(app, rt)

    @app.page("/healthz")
    async def healthz(self: Any, request: Any) -> Any:
        _update_assignment(app, rt)
        body = health(app, rt)  # 503 when a stage is stalled or the broker unreachable
        return self.json(body, status=200 if body["status"] == "ok" else 503)

    from detector.stream import capacity, precheck

    capacity.install(app, rt, s)  # the dialers' queue states -> rt.ctx.capacity (agent capacity)
    if web:
        precheck.install(app, rt)  # GET /v1/precheck, only with DETECTOR_PRECHECK_TOKEN

    if prometheus:
        from faust.sensors.prometheus import setup_prometheus_sensors

        setup_prometheus_sensors(app, pattern="/metrics", registry=metrics.REGISTRY)
        app.monitor = faust_internals.lean_monitor(app.monitor)
    for stage in STAGE_INPUTS.values():  # every series exists from the start, at 0
        metrics.REREADS.labels(stage)
    _static_gauges(rt)
    return app


async def _track_outputs(app: faust.App, rt: StreamRuntime, name: str) -> None:
    """Before the first send to a topic: the producer tracks every output topic's metadata
    (see :func:`faust_internals.track_producer_topics`: without it a queued batch could wait
    20 minutes for a leader)."""
    topics = [name, *(t.get_topic_name() for t in rt.topics.values()),
              *(t.changelog_topic.get_topic_name() for t in rt.tables.values())]
    try:
        await faust_internals.track_producer_topics(app, topics)
    except Exception as exc:  # the send itself still asks for the topic's metadata
        log.warning("kafka: could not track the output topics' metadata (%s)", type(exc).__name__)


async def _internal_error(rt: StreamRuntime, exc: Exception, stage: str, m: Any) -> None:
    """A stage failed on one message: a Kafka failure crashes the worker (a restart resumes
    from the committed offsets); anything else is a bug, and the message is dead-lettered."""
    if failures.is_kafka_error(exc):
        guard.crash(f"{stage}: Kafka failed ({type(exc).__name__})")
        raise exc
    original = m.value
    if stage == "ip":  # the by-ip envelope: keep the request only
        try:
            original = codec.dumps(codec.loads(m.value)["r"])
        except Exception:  # noqa: S110 - the envelope itself is what failed: keep it whole
            pass
    await failures.dead_letter_internal(rt, exc, stage=stage, topic=m.topic, partition=m.partition,
                                        offset=m.offset, original=original, key=m.key,
                                        timestamp=m.timestamp)


async def _check_liveness(app: faust.App, rt: StreamRuntime) -> None:
    """Every PROBE_INTERVAL_S: is the broker answering, is every stage with input progressing."""
    producer = faust_internals.aiokafka_producer(app)
    if producer is not None:
        await rt.probe.probe_once(producer.client, rt.topics["decisions"].get_topic_name())
    _update_assignment(app, rt)
    await guard.check_stages(app, rt, STAGE_INPUTS)


def decisions_output(app: faust.App, rt: StreamRuntime) -> Any:
    """Fenced decisions (delivery.FencedDecisions) unless DETECTOR_FENCE_DECISIONS=0."""
    if not rt.settings.fence_decisions:
        return DirectDecisions(lambda key, value: rt.send("decisions", key, value))
    return FencedDecisions(
        rt.settings, rt.topics["decisions"].get_topic_name(),
        wrap=_guard_decision_producer)


def _guard_decision_producer(producer: Any) -> None:
    faust_internals.check_before_sends(producer, guard.FREEZE.check)
    faust_internals.retry_coordinator_lookups(producer)


def _update_assignment(app: faust.App, rt: StreamRuntime) -> None:
    try:
        assigned = app.consumer.assignment()
    except Exception:
        return
    names = {rt.topics[k].get_topic_name(): k for k in STAGE_INPUTS}
    active: dict[str, set[int]] = {k: set() for k in STAGE_INPUTS}
    for tp in assigned:
        if tp.topic in names:
            active[names[tp.topic]].add(tp.partition)
    rt.active = active


def health(app: faust.App, rt: StreamRuntime) -> dict[str, Any]:
    problems = [*rt.watch.stalled.values()]
    broker = rt.probe.problem()
    if broker is not None:
        problems.insert(0, broker)
    return {
        "status": "ok" if not problems else "unhealthy",
        "problems": problems,
        "app": rt.settings.app_id,
        "lists_ready": rt.lists_ready.is_set(),
        "lists": len(rt.ctx.lists),
        "partitions": {k: sorted(v) for k, v in rt.active.items()},
        "model": getattr(rt.ctx.model, "version", None),
        "policy": rt.policy.version,
        "max_event_ts": rt.max_ts,
    }


def _static_gauges(rt: StreamRuntime) -> None:
    metrics.POLICY_INFO.info({"version": rt.policy.version,
                              "path": str(rt.settings.policy or "packaged default")})
    metrics.set_known_reasons(rt.policy.reason_codes())
    metrics.set_spend_countries(rt.policy)
    if rt.ctx.rates is not None:
        metrics.set_rate_deck_info(rt.ctx.rates)
    rt.update_list_gauges()
    _model_gauges(rt)


def _model_gauges(rt: StreamRuntime) -> None:
    model = rt.model_watcher.current() if rt.model_watcher is not None else None
    metrics.MODEL_LOADED.set(1 if model is not None else 0)
    if model is None:
        return
    card = getattr(model, "card", None)
    raw = dict(getattr(card, "raw", {}) or {})
    metrics.MODEL_INFO.info({"version": str(model.version), "name": str(getattr(card, "name", "")),
                             "created": str(getattr(card, "created", ""))})
    created = getattr(card, "created", None)
    if created:
        from datetime import datetime

        try:
            metrics.MODEL_AGE.set(datetime.fromisoformat(str(created)).timestamp())
        except ValueError:
            pass
    mean = (raw.get("training") or {}).get("anomaly_mean") if isinstance(raw.get("training"), dict) else None
    if isinstance(mean, int | float):
        metrics.MODEL_TRAIN_SCORE_MEAN.set(mean)


def update_gauges(app: faust.App, rt: StreamRuntime) -> None:
    for name, table in rt.tables.items():
        metrics.TABLE_KEYS.labels(name).set(len(table.data))
    rt.update_list_gauges()
    _model_gauges(rt)
    try:
        consumer: Any = app.consumer
        lag: dict[str, int] = {}
        for key, gate in rt.gates.items():  # the gate knows the next offset its stage processes
            for p in rt.active.get(key, ()):
                hw, nxt = consumer.highwater(TP(gate.topic, p)), gate.expected(p)
                if hw is not None and nxt is not None:
                    lag[gate.topic] = lag.get(gate.topic, 0) + max(int(hw) - nxt, 0)
        for topic, n in lag.items():
            metrics.CONSUMER_LAG.labels(topic).set(n)
    except Exception as exc:  # the consumer may be rebalancing
        log.debug("consumer lag unavailable: %r", exc)


async def load_sent(rt: StreamRuntime, lookback_s: float = SENT_LOOKBACK_S) -> int:
    """Add the request ids of recent decisions on the decisions topic to ``rt.sent`` (message keys
    only, nothing parsed), so a redelivered request whose decision is already out is not re-sent."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    s = rt.settings
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
                            rt.sent[rec.key.decode("utf-8", "replace")] = now
                            n += 1
        log.info("decisions: %d recent request ids loaded in %.2f s", n, time.monotonic() - t0)
    finally:
        await stop_consumer(consumer)
    return n


async def load_sent_or_exit(rt: StreamRuntime, attempts: int = 3) -> int:
    """:func:`load_sent`, bounded and retried; a worker that cannot read the ids already decided
    exits (a restart tries again) rather than re-send decisions the dialer already has."""
    for attempt in range(1, attempts + 1):
        try:
            return await asyncio.wait_for(load_sent(rt), guard.PREPARE_TIMEOUT_S + 5.0)
        except Exception as exc:
            log.warning("decisions: could not load the recent request ids (attempt %d of %d: %s)",
                        attempt, attempts, type(exc).__name__)
            await asyncio.sleep(1.0)
    guard.crash("decisions: could not read the request ids already decided")
    return 0


async def read_lists_forever(app: faust.App, rt: StreamRuntime) -> None:
    """Read the compacted lists topic from the beginning, then follow it (every worker, no group)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    s = rt.settings
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_wait_ms=100, **client_kwargs(s))
    await consumer.start()
    try:
        parts = await topic_partitions(consumer, s.topic_lists, timeout=20.0)
        if not parts:
            log.warning("lists: topic %s not found; list entries come from policy/file only",
                        s.topic_lists)
            rt.lists_ready.set()
            return
        tps = [TopicPartition(s.topic_lists, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        n = 0
        while not app.should_stop:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for msgs in batch.values():
                for m in msgs:
                    rt.apply_list_message(m.key, m.value, "topic")
                    n += 1
            if batch:
                rt.update_list_gauges()
            if not rt.lists_ready.is_set() and all(
                [await consumer.position(tp) >= end[tp] for tp in tps]
            ):
                log.info("lists: caught up (%d messages, %d entries)", n, len(rt.ctx.lists))
                rt.update_list_gauges()
                rt.lists_ready.set()
    finally:
        await stop_consumer(consumer)
