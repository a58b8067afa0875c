"""The private faust-streaming / aiokafka / mode behaviour detector/stream/faust_internals.py relies on.

Each test names the override it protects. A failure here after an upgrade means: read the new
upstream code, adapt faust_internals.py (or drop the override if upstream fixed the bug), then
update the pins in pyproject.toml. Never silence a failure here: the override it guards would
fail silently in production (lost or duplicated requests, or a 20-minute stall).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import aiokafka
import faust
import mode
import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.producer.message_accumulator import MessageAccumulator
from faust.sensors.prometheus import PrometheusMonitor
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka

from detector.core import state
from detector.stream import faust_internals
from detector.stream.tables import pack_value

PINNED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1"}


def source(obj: Any) -> str:
    return inspect.getsource(obj)


def params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_pinned_versions_are_the_ones_checked_here() -> None:
    from importlib.metadata import version

    assert {name: version(name) for name in PINNED} == PINNED, (
        "faust-streaming/aiokafka/mode changed: re-check every test in this file against the new "
        "sources and update faust_internals.py before changing PINNED")


# --- Consumer._read_offset (DeliverAll) ------------------------------------------------------


def test_drain_loop_reads_the_read_offset_mapping_by_subscript_and_takes_none() -> None:
    src = source(faust_consumer.Consumer._drain_messages)
    assert "get_read_offset = self._read_offset.__getitem__" in src
    assert "r_offset = get_read_offset(tp)" in src
    assert "if r_offset is None or offset >= r_offset:" in src  # None: every record delivered
    assert "await self._add_gap(tp, r_offset + 1, offset)" in src
    # DeliverAll makes that subscript None, whatever was stored
    offsets = faust_internals.DeliverAll()
    offsets["tp"] = 5
    assert offsets["tp"] is None


def test_consumer_init_creates_read_offset_that_we_replace_after_super() -> None:
    assert "self._read_offset = defaultdict(lambda: None)" in source(faust_consumer.Consumer.__init__)
    assert inspect.iscoroutinefunction(faust_consumer.Consumer._add_gap)
    assert params(faust_consumer.Consumer._add_gap) == ["self", "tp", "offset_from", "offset_to"]


def test_new_offset_reads_acked_and_committed_offsets() -> None:
    init = source(faust_consumer.Consumer.__init__)
    assert "self._acked = defaultdict(list)" in init
    assert "self._committed_offset = defaultdict(lambda: None)" in init
    assert params(faust_consumer.Consumer._new_offset) == ["self", "tp"]
    assert "offset = self._new_offset(tp)" in source(faust_consumer.Consumer._filter_committable_offsets)


def test_consumer_thread_and_fetch_settings_hooks() -> None:
    assert "_new_consumer_thread" in vars(faust_aiokafka.Consumer)
    assert params(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer) == ["self", "transport"]
    start = source(aiokafka.AIOKafkaConsumer.start)
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in start  # read when start() builds the
    assert "fetch_min_bytes=self._fetch_min_bytes" in start  # fetcher: we set both before


# --- Consumer.wait_first (the drain loop's call) ---------------------------------------------


def test_drain_loop_awaits_wait_first_of_the_callback_and_the_flow_event() -> None:
    src = " ".join(source(faust_consumer.Consumer._drain_messages).split())
    assert "await self.wait_first( callback(message), self.suspend_flow.wait() )" in src
    from mode.utils.locks import Event

    assert inspect.iscoroutinefunction(Event.wait)
    assert "async def wait_first(" in source(mode.Service.wait_first)
    assert params(mode.Service.wait_first) == ["self", "coros", "timeout"]


def _consumer() -> Any:
    from mode.utils.locks import Event

    c = object.__new__(faust_internals.DeliveryConsumer)  # only wait_first's state
    mode.Service.__init__(c)
    c.suspend_flow = Event()
    return c


def test_wait_first_returns_a_callback_that_did_not_suspend_without_a_task() -> None:
    import asyncio

    ran: list[int] = []

    async def callback() -> str:
        ran.append(1)
        return "done"

    async def main() -> Any:
        c = _consumer()
        tasks_before = len(asyncio.all_tasks())
        result = await c.wait_first(callback(), c.suspend_flow.wait())
        return result, len(asyncio.all_tasks()) - tasks_before

    result, new_tasks = asyncio.run(main())
    assert ran == [1] and result.results == ["done"] and not result.stopped and new_tasks == 0


def test_wait_first_finishes_a_callback_that_suspends_and_propagates_its_error() -> None:
    import asyncio

    async def slow(fut: asyncio.Future[int]) -> int:
        await asyncio.sleep(0)
        return await fut + 1

    async def failing() -> None:
        await asyncio.sleep(0)
        raise KeyError("x")

    async def main() -> Any:
        c = _consumer()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, fut.set_result, 41)
        ok = await c.wait_first(slow(fut), c.suspend_flow.wait())
        with pytest.raises(KeyError):
            await c.wait_first(failing(), c.suspend_flow.wait())
        # a callback still waiting when the flow is suspended is abandoned, as in Faust
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, c.suspend_flow.set)
        suspended = await c.wait_first(slow(never), c.suspend_flow.wait())
        return ok, suspended, never

    ok, suspended, never = asyncio.run(main())
    assert ok.results == [42]
    assert len(suspended.done) == 1 and never.cancelled()


# --- App._new_transport and the start-up check ----------------------------------------------


def test_app_builds_its_consumer_through_new_transport() -> None:
    assert "_new_transport" in vars(faust.App)
    assert "self._new_transport()" in source(faust.App.transport.fget)  # type: ignore[attr-defined]
    assert issubclass(faust_internals.DeliveryTransport, faust_aiokafka.Transport)
    assert faust_internals.DeliveryTransport.Consumer is faust_internals.DeliveryConsumer


def test_app_builds_its_web_server_through_new_web() -> None:
    """ClosedWebMixin replaces the web server through App._new_web: if Faust stopped calling
    it, the stock server with its /table/ and /router/ views would come back silently."""
    from detector.stream.app import DetectorApp
    from detector.stream.web_surface import ClosedWeb

    assert "_new_web" in vars(faust.App)
    assert "self._new_web()" in source(faust.App)
    app = DetectorApp("t-contract-web", broker="kafka://127.0.0.1:1", autodiscover=False)
    assert isinstance(app.web, ClosedWeb)


def test_every_page_goes_through_web_route_so_the_allow_list_sees_it() -> None:
    """web_surface.ClosedWeb.route refuses paths outside SERVED_PATHS: that holds only while
    ``App.page`` -> ``Web.add_view`` -> ``Web.route`` (public methods, relied on for a guarantee)."""
    from faust.web import base as web_base

    assert "self.web.add_view(" in source(faust.App.page)
    assert "self.route(path, view" in source(web_base.Web.add_view)


def test_router_table_metadata_maps_worker_urls_to_table_partitions() -> None:
    """stream/precheck.py forwards a pre-check to the owner of the IP's ``ip`` table partition
    from ``app.router.table_metadata("ip")``: {worker URL: {changelog topic: [partitions]}} of
    the active assignment (faust/assignor/partition_assignor.py)."""
    from faust.app.router import Router
    from faust.assignor.partition_assignor import PartitionAssignor

    assert "self._assignor.table_metadata(topic)" in source(Router.table_metadata)
    assert "self._topics_filtered(assignment, {topic})" in source(PartitionAssignor.table_metadata)
    assert "assignment.actives" in source(PartitionAssignor._get_changelog_distribution)


def test_check_app_accepts_the_detector_app_and_refuses_the_stock_consumer() -> None:
    from detector.config import load_settings
    from detector.core.ipintel import IpIntel
    from detector.runtime import build_context
    from detector.stream.app import StreamRuntime, make_app

    s = load_settings(env={}, app_id="t-contract", partitions=2)
    app = make_app(s, rt=StreamRuntime(s, build_context(s), IpIntel(), None), web=False,
                   prometheus=False)
    faust_internals.check_app(app)
    assert isinstance(app.consumer._read_offset, faust_internals.DeliverAll)
    plain = faust.App("t-contract-plain", broker="kafka://127.0.0.1:1", autodiscover=False)
    with pytest.raises(faust_internals.FaustContractError, match="expected DeliveryConsumer"):
        faust_internals.check_app(plain)


# --- the producer's metadata (track_producer_topics) ----------------------------------------


def test_faust_producer_keeps_the_aiokafka_producer_in_producer_attribute() -> None:
    assert "producer = self._producer = self._new_producer()" in source(faust_aiokafka.Producer.on_start)
    assert "self.client = AIOKafkaClient(" in source(aiokafka.AIOKafkaProducer.__init__)
    assert "self._message_accumulator = MessageAccumulator(" in source(aiokafka.AIOKafkaProducer.__init__)
    assert "self._batches = collections.defaultdict(collections.deque)" in source(MessageAccumulator.__init__)


def test_aiokafka_client_still_narrows_metadata_to_the_tracked_topics() -> None:
    """The behaviour track_producer_topics protects against: with any tracked topic, a refresh
    asks for the tracked topics only and replaces the cluster metadata with the answer."""
    assert "self._topics = set()  # empty set will fetch all topic metadata" in source(AIOKafkaClient.__init__)
    assert "MetadataRequest(list(topics) if topics else None)" in source(AIOKafkaClient._metadata_update)
    assert "self._topics.add(topic)" in source(AIOKafkaClient.add_topic)
    assert params(AIOKafkaClient.add_topic) == ["self", "topic"]
    assert "self.add_topic(topic)" in source(AIOKafkaClient._wait_on_metadata)
    # a queued batch without a known leader waits (no error) until it expires
    drain = source(MessageAccumulator.drain_by_nodes)
    assert "if leader is None or leader == -1:" in drain and ".expired()" in drain


# --- the producers' sends after a freeze (check_before_sends) --------------------------------


def test_sender_drains_the_accumulator_through_the_attribute_we_wrap() -> None:
    """check_before_sends replaces ``_message_accumulator.drain_by_nodes`` on the instance: the
    sender must still take every queued batch through that call, once per turn."""
    from aiokafka.producer.sender import Sender

    routine = source(Sender._sender_routine)
    assert "self._message_accumulator.drain_by_nodes(" in routine
    assert "create_task(self._send_produce_req(node_id, node_batches))" in routine
    assert params(MessageAccumulator.drain_by_nodes) == ["self", "ignore_nodes", "muted_partitions"]


@pytest.mark.asyncio
async def test_check_before_sends_runs_the_check_before_each_drain() -> None:
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    calls: list[str] = []
    faust_internals.check_before_sends(producer, lambda: calls.append("check"))
    faust_internals.check_before_sends(producer, lambda: calls.append("again"))  # idempotent
    batches, unknown = producer._message_accumulator.drain_by_nodes(ignore_nodes=set())
    assert calls == ["check"] and batches == {} and not unknown


# --- transactional producers across a broker restart (retry_coordinator_lookups) ------------


def test_find_coordinator_retries_only_some_errors_and_looks_up_through_the_client() -> None:
    """If aiokafka starts retrying connection errors here, retry_coordinator_lookups may go."""
    from aiokafka.producer.sender import Sender

    src = source(Sender._find_coordinator)
    assert "coordinator_id = await self.client.coordinator_lookup(" in src
    retried = src.split("except (", 1)[1].split(")", 1)[0]
    assert "Errors.NodeNotReadyError" in retried and "KafkaConnectionError" not in retried
    assert 'log.error("FindCoordinator Request failed: %s", err)' in src  # anything else: fatal
    assert params(AIOKafkaClient.coordinator_lookup) == ["self", "coordinator_type", "coordinator_key"]
    assert "self._maybe_wait_for_pid()" in source(Sender.start)
    assert "_find_coordinator" in source(Sender._maybe_wait_for_pid)


@pytest.mark.asyncio
async def test_coordinator_lookup_turns_connection_errors_into_not_ready(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka import errors

    monkeypatch.setattr(faust_internals, "COORDINATOR_RETRY_S", 0.0)
    producer = aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", transactional_id="t")
    raised: list[Exception] = [errors.KafkaConnectionError("closed"),
                               errors.TransactionalIdAuthorizationFailed("t")]

    async def lookup(coordinator_type: Any, coordinator_key: Any) -> int:
        if raised:
            raise raised.pop(0)
        return 7

    producer.client.coordinator_lookup = lookup
    faust_internals.retry_coordinator_lookups(producer)
    faust_internals.retry_coordinator_lookups(producer)  # idempotent
    with pytest.raises(errors.NodeNotReadyError):  # retried by Sender._find_coordinator
        await producer.client.coordinator_lookup(1, "t")
    with pytest.raises(errors.TransactionalIdAuthorizationFailed):  # not retriable: as before
        await producer.client.coordinator_lookup(1, "t")
    assert await producer.client.coordinator_lookup(1, "t") == 7


# --- a stalled partition's state (partition_flow_state, diagnostics only) -------------------


def test_consumer_keeps_the_partition_sets_the_stall_report_reads() -> None:
    init = source(faust_consumer.Consumer._reset_state)
    for name in ("_active_partitions", "_paused_partitions", "_buffered_partitions"):
        assert f"self.{name} = set()" in init
    assert "active_partitions.discard(tp)" in source(faust_consumer.Consumer.on_buffer_full)
    assert params(faust_consumer.Consumer.resume_partitions) == ["self", "tps"]
    assert params(faust_aiokafka.Consumer.seek_wait) == ["self", "partitions"]


# --- changelog format (table.data written directly, changelog messages sent by hand) --------


def test_changelog_messages_we_send_are_what_faust_recovery_reads() -> None:
    from detector.config import load_settings
    from detector.core.ipintel import IpIntel
    from detector.runtime import build_context
    from detector.stream.app import StreamRuntime, make_app

    s = load_settings(env={}, app_id="t-contract-cl", partitions=2)
    rt = StreamRuntime(s, build_context(s), IpIntel(), None)
    make_app(s, rt=rt, web=False, prometheus=False)
    table = rt.tables["number"]
    ct = table.changelog_topic
    assert (ct.key_serializer, ct.value_serializer) == ("raw", "raw")  # bytes key and value types
    key_b = b"+441234567890"
    value_b = pack_value(1, 1.8e9, {0: 7}, state.pack(state.NumberState()))
    from faust.serializers import codecs

    events = [
        SimpleNamespace(key=codecs.loads("raw", key_b), value=codecs.loads("raw", value_b),
                        message=SimpleNamespace(value=value_b, partition=1)),
        SimpleNamespace(key=codecs.loads("raw", b"gone"), value=None,
                        message=SimpleNamespace(value=None, partition=1)),  # a tombstone
    ]
    table.data[b"gone"] = b"x"
    table.apply_changelog_batch(events)  # what Faust's recovery calls for a changelog batch
    assert table.data[key_b] == value_b  # the bytes we wrote, as they are
    assert b"gone" not in table.data


# --- PrometheusMonitor._metrics --------------------------------------------------------------


def test_the_consumer_stall_check_reads_the_monitor_inbound_time_we_still_stamp() -> None:
    src = source(faust_aiokafka.AIOKafkaConsumerThread.verify_event_path)
    assert "inbound = monitor.stream_inbound_time.get(tp)" in src
    assert "self.stream_inbound_time[tp] = monotonic()" in source(
        faust.sensors.Monitor.on_stream_event_in)
    monitor = faust_internals.lean_monitor(PrometheusMonitor(metrics=None))  # type: ignore[arg-type]
    monitor.on_stream_event_in("tp", 1, None, None)  # type: ignore[arg-type]
    assert "tp" in monitor.stream_inbound_time


def test_prometheus_monitor_keeps_its_metrics_and_event_hooks() -> None:
    assert "self._metrics = metrics" in source(PrometheusMonitor.__init__)
    assert params(PrometheusMonitor.on_stream_event_in) == ["self", "tp", "offset", "stream", "event"]
    assert params(PrometheusMonitor.on_stream_event_out)[:5] == ["self", "tp", "offset", "stream", "event"]


def test_group_less_consumer_client_fetches_metadata() -> None:
    assert "self._client = AIOKafkaClient(" in source(aiokafka.AIOKafkaConsumer.__init__)
    assert inspect.iscoroutinefunction(AIOKafkaClient.fetch_all_metadata)


# --- mode Worker signal hooks (StopDeadlineMixin) ---------------------------------------------


def test_mode_worker_signal_handlers_call_the_methods_we_override() -> None:
    install = source(mode.Worker._install_signal_handlers_unix)
    assert "signal.SIGTERM, self._on_sigterm" in install
    assert "signal.SIGINT, self._on_sigint" in install
    assert "self._cry()" in source(mode.Worker._on_sigusr1)
    assert "self._schedule_shutdown(signal.SIGTERM)" in source(mode.Worker._on_sigterm)


def test_dump_tasks_prints_stacks_without_local_values() -> None:
    import asyncio
    import io

    secret = "+447700900123"

    async def inner_wait() -> None:
        phone = secret  # noqa: F841 - a local mode's own dump would print
        await asyncio.sleep(10)

    async def holder() -> None:
        await inner_wait()

    async def main() -> str:
        task = asyncio.create_task(holder(), name="holder")
        await asyncio.sleep(0)
        out = io.StringIO()
        faust_internals.dump_tasks(out)
        task.cancel()
        return out.getvalue()

    text = asyncio.run(main())
    assert "holder" in text and "test_faust_contract.py" in text
    assert "awaiting" in text and "inner_wait" in text  # where the task waits, not only its top
    assert secret not in text


# --- RocksDB store (DETECTOR_TABLE_STORE=rocksdb: detector.stream.stores) ---------------------


def test_rocksdb_store_routes_writes_by_the_current_event_so_we_write_the_partition_db() -> None:
    from faust.stores import rocksdb as faust_rocksdb

    store = faust_rocksdb.Store
    set_src = source(store._set)
    assert "event = current_event()" in set_src and "event.message.partition" in set_src, (
        "Store._set no longer needs the current event: the detector's own partition routing "
        "(rocksdb_open_dbs) may be replaceable by the public API")
    assert "self._dbs = {}" in source(store.__init__)
    assert "db = self._dbs[partition] = self._open_for_partition(partition)" in source(
        store._db_for_partition)
    assert "db = self._dbs.pop(tp.partition, None)" in source(store.revoke_partitions)
    assert "self._dbs.clear()" in source(store.stop)
    assert "await self._try_open_db_for_partition(" in source(store.assign_partitions)


def test_rocksdb_persisted_offset_is_the_offset_key_we_write_and_recovery_seeks_to() -> None:
    from faust.stores import rocksdb as faust_rocksdb
    from faust.tables import recovery

    store = faust_rocksdb.Store
    assert store.offset_key == b"__faust\0offset__"
    assert "self._db_for_partition(tp.partition).get(self.offset_key)" in source(store.persisted_offset)
    assert "return int(offset)" in source(store.persisted_offset)
    assert "put(self.offset_key, str(offset).encode())" in source(store.set_persisted_offset)
    assert "persisted_offset = table.persisted_offset(tp)" in source(recovery.Recovery._add)
    # Recovery writes changelog key and value bytes as they are, then the batch's last offset.
    batch_src = source(store.apply_changelog_batch)
    assert "batches[msg.partition].put(msg.key, msg.value)" in batch_src
    assert "batches[msg.partition].delete(msg.key)" in batch_src
    assert "self.set_persisted_offset(tp, offset)" in batch_src
    assert "Options(raw_mode=True)" in source(faust_rocksdb.RocksDBOptions.as_options)


def test_rocksdb_write_acknowledged_is_what_faust_reads_back(tmp_path: Any) -> None:
    pytest.importorskip("rocksdict")
    from faust.types import TP

    app = faust.App("t-contract-rocks", store="rocksdb://", datadir=str(tmp_path), autodiscover=False)
    table = app.Table("number", partitions=2, key_type=bytes, value_type=bytes)
    db = table.data._db_for_partition(1)
    faust_internals.rocksdb_write_acknowledged(table.data, db, b"k", b"v", 12)
    tp = TP(table.changelog_topic.get_topic_name(), 1)
    assert table.data.persisted_offset(tp) == 12
    assert faust_internals.rocksdb_open_dbs(table.data) == {1: db}
    assert faust_internals.rocksdb_keys(table.data, db, None, 10) == ([b"k"], False)
    faust_internals.rocksdb_write_acknowledged(table.data, db, b"k", None, 13)
    assert db.get(b"k") is None and table.data.persisted_offset(tp) == 13
