"""The Faust app: topics, tables, agents and timers wired to the stages.

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

One module per stage, each naming its input, tables and outputs:

* :mod:`detector.stream.ingest` -- requests and dialer outcomes validated (or dead-lettered);
* :mod:`detector.stream.ip_stage` -- counts per IP (table ``ip``);
* :mod:`detector.stream.range_stage` -- counts per number, pair and range, the decision, learned
  deny entries (tables ``number``, ``pair``, ``range``, ``seen``);
* :mod:`detector.stream.population` -- population counts shared between workers.

Around them: :mod:`detector.stream.ledger` (delivery bookkeeping: offset gates, acks, stored and
sent decisions: the one de-duplication story), :mod:`detector.stream.tables` (state packed in
memory and on the changelogs, one write per key per batch), :mod:`detector.stream.sweep` (dead
keys deleted in event time), :mod:`detector.stream.runtime` (what the stages share) and
:mod:`detector.stream.guard` (timeouts, stalls, liveness). This module only builds the app and
connects each agent and timer to its stage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.types import TP

from detector import metrics
from detector.config import Settings
from detector.stream import codec, failures, faust_internals, guard, retention, stores
from detector.stream import population as pop_stream
from detector.stream.delivery import DirectDecisions, FencedDecisions
from detector.stream.ingest import ingest_one, outcome_one
from detector.stream.io import stop_consumer, topic_partitions
from detector.stream.ip_stage import IpStage
from detector.stream.kafka_security import client_kwargs, faust_credentials
from detector.stream.ledger import (
    SEEN_TTL_S,
    SENT_LOOKBACK_S,
    STAGE_INPUTS,
    DecisionStore,
    StageDelivery,
)
from detector.stream.range_stage import RANGE_BATCH, RangeStage
from detector.stream.runtime import Publish, StreamRuntime
from detector.stream.sweep import SWEEP_TICK_S, Sweeper, sweep_now, sweep_tables
from detector.stream.tables import StateTable
from detector.stream.web_surface import CLOSED_WEB_SETTINGS

log = logging.getLogger("detector.stream")

GAUGE_INTERVAL_S = 5.0
TABLES = (  # name, what a value holds (all: detector.stream.tables format)
    ("ip", "per IP: counts, distinct numbers, countries and ranges (ip stage)"),
    ("number", "per number: counts, distinct IPs, outstanding callback, machine answers"),
    ("pair", "per IP x number: counts"),
    ("range", "per number range: counts, distinct IPs and numbers"),
    ("seen", "per request id: the decision (redeliveries get it again)"),
)

__all__ = ["RANGE_BATCH", "SEEN_TTL_S", "SENT_LOOKBACK_S", "STAGE_INPUTS", "DetectorApp",
           "StreamRuntime", "Sweeper", "health", "make_app", "sweep_now", "sweep_tables",
           "update_gauges"]


class DetectorApp(faust_internals.DeliveryTransportMixin, faust_internals.ClosedWebMixin, faust.App):
    """A faust.App whose consumer is :class:`DeliveryConsumer` (short fetch waits, every record
    delivered, commits never past an unacked offset) and whose web server serves only the pages
    the app adds (/metrics, /healthz)."""

    rt: StreamRuntime


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
    app = _faust_app(s, web)
    app.rt = rt
    _topics_and_tables(app, rt, s)
    rt.publish = _publisher(app, rt)
    rt.diagnose = lambda: faust_internals.pending_without_leader(app)
    if rt.decisions_out is None:
        rt.decisions_out = decisions_output(app, rt)
    rt.ip = IpStage(rt, rt.state_tables["ip"])
    rt.batcher = RangeStage(rt)
    delivery = rt.delivery = StageDelivery(app, rt)
    rt.gates = delivery.gates
    _agents(app, rt, delivery)
    _timers(app, rt)

    @app.page("/healthz")
    async def healthz(self: Any, request: Any) -> Any:
        rt.update_assignment(app)
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


def _faust_app(s: Settings, web: bool) -> DetectorApp:
    return DetectorApp(
        s.app_id,
        broker=[f"kafka://{h.strip()}" for h in s.kafka_bootstrap.split(",") if h.strip()],
        broker_credentials=faust_credentials(s),
        store=stores.store_url(s.table_store),  # DETECTOR_TABLE_STORE (detector.stream.stores)
        datadir=str(s.data_dir),
        **_table_dir(s),
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


def _table_dir(s: Settings) -> dict[str, Any]:
    """DETECTOR_TABLE_DIR: where the RocksDB databases live (default: Faust's, under the data dir)."""
    return {"tabledir": str(s.table_dir)} if s.table_dir is not None else {}


RAW: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
                       "value_serializer": "raw"}


def _topics_and_tables(app: DetectorApp, rt: StreamRuntime, s: Settings) -> None:
    rt.topics = {
        "requests": app.topic(s.topic_requests, **RAW),
        "outcomes": app.topic(s.topic_outcomes, **RAW),
        "decisions": app.topic(s.topic_decisions, **RAW),
        "dlq": app.topic(s.topic_dead_letter, **RAW),
        "lists": app.topic(s.topic_lists, **RAW),
        "by_ip": app.topic(f"{s.app_id}-by-ip", partitions=s.partitions, internal=True,
                           config=retention.internal_config(s), **RAW),
        "by_range": app.topic(f"{s.app_id}-by-range", partitions=s.partitions, internal=True,
                              config=retention.internal_config(s), **RAW),
        # Population deltas of every worker (stream/population.py): 1 partition, read by all.
        "population": app.topic(f"{s.app_id}-population", partitions=1, internal=True,
                                config=retention.internal_config(s), **RAW),
    }
    # Keys and values are bytes in the detector.stream.tables format, on the changelog as in
    # the store (bytes key and value types: raw serializers, so Faust's recovery restores them as
    # they are). The stages use them through detector.stream.stores (DETECTOR_TABLE_STORE).
    options = stores.rocksdb_options(s) if s.table_store == "rocksdb" else None
    rt.tables = {name: app.Table(name, partitions=s.partitions, help=doc,
                                 extra_topic_configs=retention.changelog_config(s),
                                 key_type=bytes, value_type=bytes,
                                 options=None if options is None else dict(options))
                 for name, doc in TABLES}
    rt.state_tables = {name: StateTable(rt.tables[name],
                                        store=stores.make_store(rt.tables[name], s.table_store))
                       for name in ("ip", "number", "pair", "range")}
    rt.decisions = DecisionStore(rt.tables["seen"], stores.make_store(rt.tables["seen"], s.table_store))


def _publisher(app: DetectorApp, rt: StreamRuntime) -> Publish:
    """``publish``: one message, straight to the transport's producer.

    Measured and left: aiokafka's batch API (one closed record batch per partition per flush) cut
    produce requests per decision from 0.42 to 0.32 with no CPU gain to see, but its send waits
    until the partition's previous batch is taken by the sender (one produce request in flight
    per broker), which raised the p95 latency at 330 req/s from 216 ms to 701 ms."""
    names: dict[int, str] = {}

    async def publish(channel: Any, key: bytes | None, value: bytes | None,
                      partition: int | None = None) -> Any:
        # Topic.send() builds a FutureMessage, a PendingMessage and runs the codecs for each
        # message, which costs more than the rest of a stage. Keys and values are bytes already.
        # Returns the delivery future.
        name = names.get(id(channel))
        if name is None:
            name = names[id(channel)] = channel.get_topic_name()
            await _track_outputs(app, rt, name)
        metrics.child(metrics.MESSAGES_SENT, name).inc()
        return guard.watch_delivery(await app.producer.send(name, key, value, partition, None, None))

    return publish


def _agents(app: DetectorApp, rt: StreamRuntime, delivery: StageDelivery) -> None:
    """One agent per stage input; each passes its events through the delivery gate."""

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Faust awaits this during the rebalance, before the streams resume.
        await delivery.prepare(app.consumer_generation_id)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Before the partitions move on: what was counted goes to the changelogs now, not after
        # the next owner has started from them; the pending range batch completes while its
        # partitions are ours.
        await rt.flush_batches()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def on_shutdown(sender: Any, *args: Any, **kwargs: Any) -> None:
        # A range flush in flight finishes its transactions first (bounded): stopping the
        # decision producers under it failed the batch (ProducerClosed) and the worker exited 75
        # instead of 0 (fault series run 15). Once they are stopped, owns() is False for every
        # partition and a later flush leaves its events, unacked, to the next owner.
        lock = rt.batcher.lock if rt.batcher is not None else None
        held = False
        if lock is not None:
            try:
                await asyncio.wait_for(lock.acquire(), guard.SHUTDOWN_FLUSH_WAIT_S)
                held = True
            except TimeoutError:
                log.warning("stopping: a range batch still in flight after %.0f s; its "
                            "decisions are left to the next owner", guard.SHUTDOWN_FLUSH_WAIT_S)
        try:
            await rt.decisions_out.stop()
        finally:
            if held and lock is not None:
                lock.release()
        if rt.watch.ends is not None:
            await guard.stop_end_offsets_consumer(rt.watch.ends)

    async def raw_input(stream: Any, key: str,
                        handle: Callable[..., Awaitable[None]]) -> None:
        """An agent over an external topic (requests, outcomes): validate, hand on, ack (the ip
        stage acks what it counted after its flush)."""
        stage = STAGE_INPUTS[key]
        async for event in stream.noack().events():
            if await delivery.admitted(event, key):
                m = event.message
                try:
                    await handle(rt, m.key, m.value, partition=m.partition, offset=m.offset,
                                 timestamp=m.timestamp, ack=event.ack)
                except Exception as exc:
                    await _internal_error(rt, exc, stage, m)
                    event.ack()
                rt.watch.progress(stage)

    @app.agent(rt.topics["requests"], name="ingest")
    async def ingest(stream: Any) -> None:
        await raw_input(stream, "requests", ingest_one)

    @app.agent(rt.topics["by_ip"], name="ip")
    async def ip_agent(stream: Any) -> None:
        async for event in stream.noack().events():
            if not await delivery.admitted(event, "by_ip"):
                continue
            m = event.message
            try:
                await rt.ip.handle_hop(m.value, partition=m.partition, ack=event.ack)
            except Exception as exc:
                await _internal_error(rt, exc, "ip", m)
                event.ack()
            rt.watch.progress("ip")

    @app.agent(rt.topics["by_range"], name="range")
    async def range_agent(stream: Any) -> None:
        batcher = rt.batcher
        async for event in stream.noack().events():
            if not await delivery.admitted(event, "by_range"):
                continue
            m = event.message
            batcher.add(m.value, m.partition, m.offset, event.ack)
            if len(batcher) >= RANGE_BATCH:
                await batcher.flush()

    @app.agent(rt.topics["outcomes"], name="outcome")
    async def outcome_agent(stream: Any) -> None:
        await raw_input(stream, "outcomes", outcome_one)

    app.ingest_agent = ingest  # type: ignore[attr-defined]
    app.ip_agent = ip_agent  # type: ignore[attr-defined]
    app.range_agent = range_agent  # type: ignore[attr-defined]
    app.outcome_agent = outcome_agent  # type: ignore[attr-defined]

    @app.task
    async def flusher() -> None:
        while not app.should_stop:
            await asyncio.sleep(rt.settings.batch_ms / 1000.0)
            await rt.flush_batches()  # a range-stage failure crashes the worker (RangeStage.flush)


def _timers(app: DetectorApp, rt: StreamRuntime) -> None:
    s = rt.settings

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
            rt.update_assignment(app)
        started = sweeper.pass_started
        tombstones = sweeper.tick(sweep_now(rt))
        if tombstones:
            await rt.send_writes(tombstones)
        if sweeper.pass_started != started:  # a new pass (every SWEEP_INTERVAL_S at most)
            rt.population.prune(pop_stream.prune_clock(rt.max_ts))

    from detector.policy_watch import PolicyWatcher

    policy_watcher = PolicyWatcher(s.policy, rt.ctx, s.rate_deck)  # the rate deck too
    app.policy_watcher = policy_watcher  # type: ignore[attr-defined]

    @app.timer(s.policy_reload_s)
    async def policy_reload() -> None:  # a changed policy file, without a restart
        policy_watcher.check()

    @app.timer(GAUGE_INTERVAL_S)
    async def gauges() -> None:
        rt.update_assignment(app)
        update_gauges(app, rt)
        pop_stream.update_population_gauges(rt)

    @app.task
    async def freeze_watch() -> None:
        await guard.FREEZE.run()

    @app.timer(guard.PROBE_INTERVAL_S)
    async def liveness() -> None:
        await _check_liveness(app, rt)


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
    rt.update_assignment(app)
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
    backends = {name: st.backend for name, st in rt.state_tables.items()}
    if rt.decisions is not None:
        backends["seen"] = rt.decisions.backend
    for name, backend in backends.items():
        metrics.TABLE_KEYS.labels(name).set(backend.count())
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
