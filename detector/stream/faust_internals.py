"""Every place the detector overrides or relies on a private faust-streaming / aiokafka API.

Nothing outside this module touches a Faust or aiokafka name that starts with ``_``. Each item
says what it does, why a public API does not do it, and what breaks if upstream changes it;
``tests/stream/test_faust_contract.py`` checks each assumption against the installed versions
(``faust-streaming==0.15.3``, ``aiokafka==0.14.0``) and fails loudly on an upgrade that breaks
one, and :func:`check_app` refuses to start a worker whose consumer is not ours.

=========================  ================================================================
override / reliance        why (upstream issue)
=========================  ================================================================
Consumer._read_offset      Faust's drain loop drops every record below the last offset it
  -> :class:`DeliverAll`   handed out and commits over forward jumps as "gaps". After a seek
                           during recovery it dropped re-read records and committed past
                           requests that never reached an agent (measured: 50-1,200 requests
                           lost in 1 SIGKILL restart of 4). faust-streaming #606 (wrong commit
                           with gaps, open), #221 (prefetched events out of order after a
                           rebalance), #502 (duplicates after a rebalance, open).
Consumer._add_gap          Never reached once read offsets are unknown; a no-op so a gap can
                           never be committed over (#606, history in #312/#313/#378).
Consumer._new_offset       Reads ``_acked`` and ``_committed_offset``: never commit when the
                           record at the committed offset is not acked (#606).
Consumer.wait_first        The drain loop awaits ``wait_first(callback(message),
  (drain loop's call)      suspend_flow.wait())`` for every record: four tasks and an
                           ``asyncio.wait`` per record, a fifth of a bare pass-through agent's
                           CPU. :meth:`DeliveryConsumer.wait_first` runs the callback up to its
                           first suspension and returns at once when it finished (the usual
                           case: its stream's queue had room); otherwise the started callback
                           races ``suspend_flow`` in Faust's own ``wait_first``. No upstream
                           issue found; the contract test checks the loop's call.
Consumer._new_consumer_    Swap in :class:`LowLatencyConsumerThread` (below).
  thread
AIOKafkaConsumerThread.    Faust hard-codes ``fetch_max_wait_ms=1500`` and gives no setting;
  _create_worker_consumer  we set aiokafka's ``_fetch_max_wait_ms`` / ``_fetch_min_bytes``
                           on the consumer before ``start()`` builds its fetcher from them.
App._new_transport         The only hook that picks the consumer class. If Faust renamed it,
                           the stock consumer would run silently: :func:`check_app` refuses.
App._new_web               The only hook that picks the web server: the stock one serves table
                           contents (/table/, /router/); :class:`ClosedWebMixin` serves none.
aiokafka producer client   See :func:`track_producer_topics`: aiokafka forgets the metadata of
  metadata (add_topic)     a topic it was never asked to track as soon as it tracks any other
                           topic; a batch already queued for it then waits for a leader until
                           ``request_timeout_ms`` (Faust: 1,200 s). This was the range-stage
                           stall of issue 13. No upstream issue found; reproduced in
                           ``tests/integration/test_faults.py``.
aiokafka producer         :func:`check_before_sends` wraps ``_message_accumulator.drain_by_nodes``
  _message_accumulator     (what ``Sender._sender_routine`` calls before each produce request)
                           so a worker frozen past the session timeout exits before it sends
                           what it queued before the freeze. No public hook runs between a
                           queued message and its produce request.
aiokafka Sender.          :func:`retry_coordinator_lookups`: the transactional producers of
  _find_coordinator        :class:`~detector.stream.delivery.FencedDecisions` would die at the
                           first broker restart (a connection error during a coordinator lookup
                           is fatal there); aio-libs/aiokafka#1151 is the same class of bug.
Faust producer            ``Producer._producer`` (the aiokafka producer) for the items above
                           and the broker probe.
table.data + changelog     Stages write ``table.data`` and send changelog messages themselves
  format                   (key and value bytes, partition = the event's), so batches and sweeps
                           work outside the current event. Recovery relies on Faust putting
                           those bytes back as they are (a Table with ``key_type=bytes`` and
                           ``value_type=bytes`` has ``raw`` serializers; see
                           :mod:`detector.stream.tables` for the value format).
RocksDB store               ``DETECTOR_TABLE_STORE=rocksdb`` (:mod:`detector.stream.stores`).
  Store._dbs, offset_key,  ``Store._set`` takes the partition from ``current_event()`` (it
  persisted offset,         asserts there is one) and ``_get`` outside an event searches every
  apply_changelog_batch    partition's database; the stages write and read outside the event
                           (a batch's flush, a sweep), for keys of many partitions. So
                           :func:`rocksdb_open_dbs` reads the store's ``_dbs`` (the databases
                           Faust opened for this worker's partitions, closed by Faust when
                           revoked) and the detector reads and writes the partition's database
                           itself. :func:`rocksdb_write_acknowledged` writes a value whose
                           changelog message Kafka acknowledged together with that offset
                           under ``Store.offset_key`` (what ``persisted_offset`` reads and
                           Faust's recovery seeks past, as Faust's own ``set_persisted_offset``
                           stores it) in one write batch: the database stays a prefix of its
                           changelog partition. Recovery's ``apply_changelog_batch`` writes
                           message key and value bytes as they are. Upstream: writes outside
                           stream iteration fail with RocksDB (faust-streaming #261, SetTable
                           crashes with RocksDB; #522, flush without a ``current_event``;
                           #497, writes from ``Stream.take()`` refused), data loss under
                           intense writes (#333).
Consumer._active_/_paused_ :func:`partition_flow_state`: a stalled partition's state in Faust's
  /_buffered_partitions    consumer, for the stall report only (nothing depends on it).
PrometheusMonitor._metrics  :func:`lean_monitor` rebuilds Faust's monitor without its per-event
  / Monitor.stream_        stream sensors (5% of a worker's time), but still stamping
  inbound_time             ``stream_inbound_time[tp]``, which Faust's consumer reads to tell a
                           stalled stream: without it, every partition with lag logged "Stream
                           has not started processing" (an ERROR with its 20-line explanation)
                           once the worker had run 5 minutes (3,167 lines in one flood test).
AIOKafkaConsumer._client   :func:`fetch_all_metadata`: the partitions of a topic for a
                           group-less consumer (no public call before assignment).
mode Worker._on_sigterm /  :class:`StopDeadlineMixin` starts the stop deadline (``guard``)
  _on_sigint               before mode's graceful stop, which can wait on Kafka for minutes.
mode Worker._cry           SIGUSR1 task dump, without the local variables mode prints (they
                           hold requests: phone numbers and IPs must not reach the logs).
=========================  ================================================================
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger("detector.stream")

FETCH_MAX_WAIT_MS = 30  # default; Faust hard-codes 1500 ms: an idle partition would add that per hop
FETCH_MIN_BYTES = 1 << 20  # a fetch returns at once when this much is ready (a backlog), else
#                            after the max wait: work arrives in batches at moderate load


class FaustContractError(RuntimeError):
    """The installed faust-streaming/aiokafka no longer behave as this module relies on."""


# --------------------------------------------------------------------------- consumer


class DeliverAll(dict):  # type: ignore[type-arg]
    """Faust's per-partition read offsets, as its drain loop sees them: never known, so the
    loop hands every fetched record to the streams (the stages' gates order them).

    Works only because ``Consumer._drain_messages`` reads it through ``__getitem__`` (bound once
    as ``get_read_offset``) and treats None as "take it"; the contract test checks both."""

    def __getitem__(self, key: Any) -> None:
        return None


class LowLatencyConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        rt = getattr(transport.app, "rt", None)  # DetectorApp's runtime: the worker's settings
        # Read by the fetcher created in start(). Batching matters on small VMs: the same request
        # costs ~3x the CPU when the worker sleeps between single events (cold caches, CPU
        # frequency); measured 3.0 ms/request at 300 req/s unbatched, 2.1 ms with 50 ms fetches.
        consumer._fetch_max_wait_ms = rt.settings.batch_ms if rt is not None else FETCH_MAX_WAIT_MS
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        return consumer


def _is_event_wait(coro: Any) -> bool:
    from mode.utils.locks import Event

    return getattr(coro, "cr_code", None) is Event.wait.__code__


async def resume_started(coro: Any, yielded: Any) -> Any:
    """Drive to its end a coroutine that was started by hand and suspended on ``yielded`` (an
    asyncio future, or None for a bare yield), as an asyncio Task would; a cancellation or the
    future's exception is thrown into it."""
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                yielded._asyncio_future_blocking = False  # taken over, as Task.__step does
                await yielded
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the coroutine decides
            try:
                yielded = coro.throw(exc)
            except StopIteration as done:
                return done.value
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            return done.value


class DeliveryConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer: short fetch waits, every record delivered, commits only over
    acked offsets that follow the committed one, and no task per record in the drain loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_offset = DeliverAll()

    async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:
        """The drain loop's ``wait_first(callback(message), self.suspend_flow.wait())`` without
        a task per record when the callback finishes without suspending; any other call, and a
        callback that suspends, is Faust's ``wait_first`` (see the module doc)."""
        if (len(coros) == 2 and timeout is None and inspect.iscoroutine(coros[0])
                and inspect.getcoroutinestate(coros[0]) == inspect.CORO_CREATED
                and _is_event_wait(coros[1]) and not self.should_stop):
            callback, flow = coros
            try:
                yielded = callback.send(None)
            except StopIteration as done:
                flow.close()  # never started: nothing to cancel
                from mode.services import WaitResults

                return WaitResults([callback], [done.value], False)
            except BaseException:
                flow.close()
                raise
            return await super().wait_first(resume_started(callback, yielded), flow)
        return await super().wait_first(*coros, timeout=timeout)

    def _new_consumer_thread(self) -> Any:
        return LowLatencyConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        """Never called (read offsets are unknown to the drain loop); a gap is never acked."""

    def _new_offset(self, tp: Any) -> int | None:
        acked = self._acked[tp]
        committed = self._committed_offset[tp]
        if acked and committed is not None and min(acked) > committed:
            return None  # the record at the committed offset is not acked yet
        result: int | None = super()._new_offset(tp)
        return result


class DeliveryTransport(faust_aiokafka.Transport):
    Consumer = DeliveryConsumer


class DeliveryTransportMixin:
    """Mixed into the app class: its consumer transport is :class:`DeliveryTransport`."""

    conf: Any

    def _new_transport(self) -> Any:
        return DeliveryTransport(self.conf.broker_consumer, self)


class ClosedWebMixin:
    """``App._new_web`` (faust/app/base.py) is the only hook that picks the web server class; the
    stock one registers Faust's own views (/table/..., /router/..., /graph/, /stats/, ...), which
    expose table contents to anyone who can reach the port (no upstream option turns all of them
    off in faust-streaming 0.15.3). :class:`~detector.stream.web_surface.ClosedWeb` registers
    none. The contract test checks the hook still exists and is called."""

    def _new_web(self) -> Any:
        from detector.stream.web_surface import ClosedWeb

        return ClosedWeb(self)  # type: ignore[arg-type]  # mixed into a faust.App


def check_app(app: Any) -> None:
    """Refuse to run when the app's consumer is not :class:`DeliveryConsumer` (a Faust upgrade
    that stopped calling ``_new_transport`` would otherwise run the stock consumer silently,
    with none of the delivery guarantees)."""
    consumer = app.consumer
    if not isinstance(consumer, DeliveryConsumer):
        raise FaustContractError(
            f"the app's consumer is {type(consumer).__module__}.{type(consumer).__qualname__}, "
            f"expected {DeliveryConsumer.__qualname__}: faust-streaming no longer builds its "
            "consumer through App._new_transport; see detector/stream/faust_internals.py")
    if not isinstance(consumer._read_offset, DeliverAll):
        raise FaustContractError("Consumer._read_offset was replaced after __init__: Faust's drain "
                                 "loop would drop re-read records again (faust-streaming #606)")


# --------------------------------------------------------------------------- producer


def aiokafka_producer(app: Any) -> Any:
    """The aiokafka producer behind ``app.producer`` (None before it started)."""
    return getattr(app.producer, "_producer", None)


async def track_producer_topics(app: Any, topics: list[str], timeout: float = 10.0) -> None:
    """Make the producer's client track the metadata of every topic the worker writes to.

    Why: an aiokafka client with no tracked topics asks for the metadata of *all* topics; once
    a send meets a topic missing from that answer (one created a moment ago, e.g. a changelog
    whose leader was not elected yet), the client tracks only that topic and the next refresh
    drops every other one. A batch already queued for a dropped topic then has no leader and
    waits, without a log line, until the producer's request timeout, and with it the range
    stage's flush and every commit (Faust flushes the producer before committing). Tracking
    every output topic before the first send removes the case. ``add_topic`` is public; what
    it protects against is aiokafka's metadata behaviour (``AIOKafkaClient._topics``).
    """
    producer = aiokafka_producer(app)
    if producer is not None:
        await track_client_topics(producer.client, topics, timeout)


async def track_client_topics(client: Any, topics: list[str], timeout: float = 10.0) -> None:
    """:func:`track_producer_topics` for an aiokafka client (``AIOKafkaProducer.client``)."""
    futures = [client.add_topic(t) for t in dict.fromkeys(topics) if t not in client._topics]
    if futures:
        await asyncio.wait_for(asyncio.gather(*futures), timeout)


def check_before_sends(producer: Any, check: Callable[[], None]) -> None:
    """Call ``check`` each time the aiokafka producer's sender is about to take queued batches
    for produce requests (``MessageAccumulator.drain_by_nodes``, called once per turn of
    ``Sender._sender_routine``). With :meth:`guard.FreezeWatch.check` it makes a worker that
    was frozen past the session timeout exit before anything it queued before the freeze
    reaches Kafka: after SIGCONT the sender may run before any other task of the worker (it
    was the source of the duplicates after a freeze). Idempotent."""
    if producer is None:
        return
    acc = producer._message_accumulator
    if getattr(acc, "_detector_checked", False):
        return
    drain = acc.drain_by_nodes

    def checked(*args: Any, **kwargs: Any) -> Any:
        check()
        return drain(*args, **kwargs)

    acc.drain_by_nodes = checked
    acc._detector_checked = True


COORDINATOR_RETRY_S = 0.5  # pause before the next coordinator lookup while the broker is away


def retry_coordinator_lookups(producer: Any) -> None:
    """Make a transactional aiokafka producer survive a broker restart.

    aiokafka 0.14's ``Sender._find_coordinator`` retries a coordinator lookup only on
    ``CoordinatorNotAvailable``/``NodeNotReady``/``RequestTimedOut``; any other error, such as
    the ``KafkaConnectionError`` of a broker closing its connections on a clean stop, escapes
    the sender routine, which then fails every queued message and leaves the producer dead
    (measured: the worker exited at the first broker restart). Connection errors are retriable
    (``KafkaConnectionError.retriable``), so the lookup (``AIOKafkaClient.coordinator_lookup``)
    reports them as ``NodeNotReadyError`` after a short pause, and the sender retries until the
    broker is back (the caller's own deadline still applies). Upstream: aio-libs/aiokafka#1151
    (the same class of hard failure, on the group coordinator) was fixed for that path only."""
    from aiokafka import errors

    client = producer.client
    if getattr(client, "_detector_retrying", False):
        return
    lookup = client.coordinator_lookup

    async def retrying(coordinator_type: Any, coordinator_key: Any) -> Any:
        try:
            return await lookup(coordinator_type, coordinator_key)
        except errors.KafkaError as exc:
            if not getattr(exc, "retriable", False) or isinstance(exc, errors.NodeNotReadyError):
                raise
            await asyncio.sleep(COORDINATOR_RETRY_S)
            raise errors.NodeNotReadyError(f"coordinator lookup: {type(exc).__name__}") from exc

    client.coordinator_lookup = retrying
    client._detector_retrying = True


def pending_without_leader(app: Any) -> list[str]:
    """Topic-partitions with queued batches whose leader the producer does not know (for the
    stall report; empty when unknown)."""
    producer = aiokafka_producer(app)
    try:
        acc = producer._message_accumulator
        cluster = producer.client.cluster
        return sorted(f"{tp.topic}[{tp.partition}]" for tp, batches in acc._batches.items()
                      if batches and cluster.leader_for_partition(tp) in (None, -1))
    except Exception:  # diagnostics only
        return []


def partition_flow_state(app: Any, tp: Any) -> str:
    """What Faust's consumer does with one assigned partition, for a stall report (diagnostics
    only: ``Consumer._active_partitions`` are fetched, ``_paused_partitions`` were paused by a
    rebalance or recovery, ``_buffered_partitions`` left the fetch set when their stream's buffer
    filled and come back when it drains)."""
    try:
        consumer = app.consumer
        if tp not in consumer.assignment():
            return "not assigned"
        states = []
        if tp in consumer._paused_partitions:
            states.append("paused")
        if tp in consumer._buffered_partitions:
            states.append("buffer full")
        active = consumer._active_partitions
        states.append("fetched" if active is None or tp in active else "not fetched")
        hw = consumer.highwater(tp)
        return ", ".join(states) + f", high watermark seen {hw}"
    except Exception as exc:  # diagnostics only
        return f"unknown ({type(exc).__name__})"


# --------------------------------------------------------------------------- the rest


async def fetch_all_metadata(consumer: Any) -> Any:
    """Cluster metadata through an aiokafka consumer's client (``AIOKafkaConsumer._client``)."""
    return await consumer._client.fetch_all_metadata()


def lean_monitor(monitor: Any) -> Any:
    """Faust's Prometheus monitor without its per-event stream sensors (two calls, three metric
    updates and a label computed from the stream's repr for every event of every hop: ~5% of a
    worker's time). Per-stage processing time is ``detector_stage_seconds``; Faust's message,
    commit and rebalance metrics stay."""
    from time import monotonic

    from faust.sensors.prometheus import PrometheusMonitor

    class LeanPrometheusMonitor(PrometheusMonitor):
        def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
            self.stream_inbound_time[tp] = monotonic()  # the consumer's stall check reads it
            return None

        def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any,
                                state: Any = None) -> None:
            return None

    return LeanPrometheusMonitor(metrics=monitor._metrics)


# --------------------------------------------------------------------------- worker


class StopDeadlineMixin:
    """Mixed into the Faust Worker class: SIGTERM/SIGINT start :func:`guard.start_shutdown_deadline`
    before mode's graceful stop; SIGUSR1 dumps task stacks without local variables."""

    stderr: Any

    def _on_sigterm(self) -> None:
        from detector.stream.guard import start_shutdown_deadline

        start_shutdown_deadline()
        super()._on_sigterm()  # type: ignore[misc]

    def _on_sigint(self) -> None:
        from detector.stream.guard import start_shutdown_deadline

        start_shutdown_deadline()
        super()._on_sigint()  # type: ignore[misc]

    async def _cry(self) -> None:
        dump_tasks(self.stderr)


def dump_tasks(file: Any) -> None:
    """Every asyncio task's stack, file and line only (no local variables: they hold requests)."""
    import traceback

    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()} {task.get_coro()!r}", file=file)
        frames = task.get_stack()
        for line in traceback.format_list(
                [(f.f_code.co_filename, f.f_lineno, f.f_code.co_name, None) for f in frames]):
            print(line.rstrip(), file=file)
        for line in traceback.format_list(_awaited_frames(task.get_coro())):
            print("  awaiting" + line.rstrip()[1:], file=file)
    file.flush()


def _awaited_frames(coro: Any, limit: int = 40) -> list[tuple[str, int, str, None]]:
    """The chain of coroutines a task's coroutine is awaiting (``cr_await``), innermost last:
    ``Task.get_stack`` shows only the outermost frame, which says nothing about where a task
    waits (e.g. an agent awaiting its handler awaiting a Kafka delivery)."""
    out: list[tuple[str, int, str, None]] = []
    current = getattr(coro, "cr_await", None)
    while current is not None and len(out) < limit:
        frame = getattr(current, "cr_frame", None) or getattr(current, "gi_frame", None)
        if frame is not None:
            out.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None))
        current = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None)
    return out


# --------------------------------------------------------------------------- RocksDB store


def rocksdb_open_dbs(store: Any) -> dict[int, Any]:
    """partition -> the open rocksdict database of Faust's RocksDB ``store`` (``table.data``):
    those of the partitions Faust assigned to this worker (it opens them at assignment and drops
    them when revoked)."""
    dbs = store._dbs
    if not isinstance(dbs, dict):
        raise FaustContractError("faust.stores.rocksdb.Store._dbs is no longer a dict of the "
                                 "partitions' databases (DETECTOR_TABLE_STORE=rocksdb)")
    return dbs


def rocksdb_write_acknowledged(store: Any, db: Any, key: bytes, value: bytes | None,
                               offset: int) -> None:
    """Write ``key`` (``value`` None: delete it) and Faust's persisted offset ``offset`` (the
    write's changelog offset, Kafka acknowledged) to ``db`` atomically."""
    from rocksdict import WriteBatch

    batch = WriteBatch(raw_mode=True)
    if value is None:
        batch.delete(key)
    else:
        batch.put(key, value)
    batch.put(store.offset_key, str(offset).encode())
    db.write(batch)


def rocksdb_keys(store: Any, db: Any, after: bytes | None, n: int) -> tuple[list[bytes], bool]:
    """Up to ``n`` keys of ``db`` after ``after`` (None: from the first), without Faust's
    persisted-offset key, and whether there may be more."""
    import itertools

    it = db.keys() if after is None else db.keys(from_key=after)
    raw = list(itertools.islice(it, n + 1))
    keys = [k for k in raw if k != after and k != store.offset_key]
    return keys[:n], len(raw) == n + 1
