"""The table store adapters (detector.stream.stores) over Faust's real RocksDB and memory stores."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import faust
import pytest
import pytest_asyncio
from faust.types import TP

from detector.core import state
from detector.stream.stores import MemoryTableStore, RocksTableStore, make_store, rocksdb_options
from detector.stream.tables import StateTable, pack_value, sweep_keys, unpack_value

pytest.importorskip("rocksdict")
pytestmark = pytest.mark.asyncio

PARTITIONS = 3


class Opts:
    rocksdb_write_buffer_mb = 1
    rocksdb_block_cache_mb = 1


def rocks_table(tmp: Path, name: str = "number") -> Any:
    app = faust.App(f"t-stores-{tmp.name}", store="rocksdb://", datadir=str(tmp), autodiscover=False)
    return app.Table(name, partitions=PARTITIONS, key_type=bytes, value_type=bytes,
                     options=dict(rocksdb_options(Opts())))


def tps(table: Any, *partitions: int) -> set[TP]:
    return {TP(table.changelog_topic.get_topic_name(), p) for p in partitions}


async def assign(table: Any, *partitions: int) -> None:
    """What Faust does for newly assigned active partitions at a rebalance."""
    await table.data.assign_partitions(table, tps(table, *partitions))


def value(partition: int, n: int, expires: float = 2e9) -> bytes:
    return pack_value(partition, expires, {0: n}, b"payload-%d" % n)


@pytest_asyncio.fixture
async def table(tmp_path: Path) -> Any:
    t = rocks_table(tmp_path)
    await assign(t, 0, 1, 2)
    return t


async def test_a_write_reaches_the_database_only_when_kafka_acknowledged_it(table: Any) -> None:
    st = RocksTableStore(table)
    v = value(1, 5)
    st.put(b"k", v, 1)
    assert st.get(b"k", 1) == v and st.get(b"k") == v  # read from the pending writes
    assert table.data._dbs[1].get(b"k") is None  # not on disk: the changelog may never have it
    st.delivered(b"k", v, 1, 41)
    assert st.pending == {}
    assert table.data._dbs[1].get(b"k") == v
    assert table.data.persisted_offset(next(iter(tps(table, 1)))) == 41  # what recovery seeks to
    assert st.get(b"k", 1) == v and st.get(b"k", 0) is None and st.get(b"k") == v


async def test_a_later_pending_write_is_kept_when_an_earlier_one_is_acknowledged(table: Any) -> None:
    st = RocksTableStore(table)
    v1, v2 = value(2, 1), value(2, 2)
    st.put(b"k", v1, 2)
    st.put(b"k", v2, 2)
    st.delivered(b"k", v1, 2, 10)
    assert st.get(b"k", 2) == v2  # the newer one, still pending
    assert table.data._dbs[2].get(b"k") == v1  # the database: the acknowledged prefix
    st.delivered(b"k", v2, 2, 11)
    assert st.pending == {} and table.data._dbs[2].get(b"k") == v2


async def test_a_deletion_hides_the_key_at_once_and_reaches_the_database_when_acknowledged(
        table: Any) -> None:
    st = RocksTableStore(table)
    v = value(0, 1)
    st.put(b"k", v, 0)
    st.delivered(b"k", v, 0, 3)
    st.delete(b"k", None)  # the partition found by the store
    assert st.get(b"k", 0) is None and st.get(b"k") is None
    assert table.data._dbs[0].get(b"k") == v
    st.delivered(b"k", None, 0, 4)
    assert table.data._dbs[0].get(b"k") is None and st.pending == {}


async def test_scan_reads_every_partition_in_chunks_without_the_offset_key(table: Any) -> None:
    st = RocksTableStore(table)
    expected = set()
    for p in range(PARTITIONS):
        for i in range(5):
            key = b"p%d-%d" % (p, i)
            st.put(key, value(p, i), p)
            st.delivered(key, st.get(key, p), p, i)
            expected.add((key, p))
    st.put(b"pending", value(1, 9), 1)
    got = list(st.scan(chunk=2))
    assert len(got) == len(set(got)) == 16
    assert set(got) == expected | {(b"pending", 1)}
    assert st.count() == 16  # the keys the scan read, plus the pending write


async def test_a_revoked_partition_is_closed_its_late_acks_skipped_and_reassigned_from_disk(
        table: Any) -> None:
    st = RocksTableStore(table)
    v1, v2 = value(1, 1), value(1, 2)
    st.put(b"a", v1, 1)
    st.delivered(b"a", v1, 1, 7)
    st.put(b"b", v2, 1)
    table.data.revoke_partitions(table, tps(table, 1))  # Faust, at a rebalance
    st.retain({0, 2})  # the detector, at the next generation: pending writes of 1 forgotten
    assert st.get(b"b", 1) is None and st.get(b"a", 1) is None
    st.delivered(b"b", v2, 1, 8)  # a late acknowledgement: not written, the DB is not reopened
    assert 1 not in table.data._dbs
    assert [k for k, _ in st.scan()] == []  # partitions 0 and 2 hold nothing
    await assign(table, 1)  # assigned again: the database from disk, recovery from offset 7 on
    assert st.get(b"a", 1) == v1 and st.get(b"b", 1) is None
    assert table.data.persisted_offset(next(iter(tps(table, 1)))) == 7


async def test_the_databases_survive_a_new_app_on_the_same_directory(tmp_path: Path) -> None:
    t = rocks_table(tmp_path)
    await assign(t, 0, 1, 2)
    st = RocksTableStore(t)
    v = value(2, 3)
    st.put(b"k", v, 2)
    st.delivered(b"k", v, 2, 99)
    await t.data.stop()  # Faust drops the databases at stop
    t2 = rocks_table(tmp_path)  # a restarted worker
    await assign(t2, 2)
    assert RocksTableStore(t2).get(b"k", 2) == v
    assert t2.data.persisted_offset(next(iter(tps(t2, 2)))) == 99


async def test_state_table_batches_and_sweeps_work_the_same_on_both_stores(tmp_path: Path) -> None:
    rocks = rocks_table(tmp_path)
    await assign(rocks, 0, 1, 2)
    app = faust.App("t-stores-mem", store="memory://", autodiscover=False)
    memory = app.Table("number", partitions=PARTITIONS, key_type=bytes, value_type=bytes)
    for kind, table in (("rocksdb", rocks), ("memory", memory)):
        store = make_store(table, kind)
        assert isinstance(store, RocksTableStore if kind == "rocksdb" else MemoryTableStore)
        st = StateTable(table, store=store)
        view = st.view(1, 0, 10)
        view["+441"] = state.NumberState()
        view2 = st.view(2, 0, 11)
        view2["+442"] = state.NumberState()
        writes = st.take_writes()
        assert [(w.key, w.partition, w.store) for w in writes] == [(b"+441", 1, store), (b"+442", 2, store)]
        for i, w in enumerate(writes):
            store.delivered(w.key, w.value, w.partition, i)
        again = st.view(1, 0, 10)  # a redelivery of offset 10: counted already
        assert again.get("+441") is not None and again.redelivered
        assert unpack_value(store.get(b"+441", 1) or b"")[1] == {0: 10}
        # NumberState without events expires at once: a sweep deletes it with a tombstone
        tomb = sweep_keys(table, store, None, 1e9, owned={1, 2})
        assert sorted((w.key, w.value, w.partition) for w in tomb) == [
            (b"+441", None, 1), (b"+442", None, 2)], kind
        assert store.get(b"+441") is None and store.get(b"+442") is None
        for w in tomb:
            store.delivered(w.key, w.value, w.partition, 5)
        assert list(store.scan()) == []


async def test_sweeps_leave_live_values_and_keys_of_partitions_not_owned(table: Any) -> None:
    st = RocksTableStore(table)
    live, dead = value(0, 1, expires=2e9), value(0, 2, expires=100)
    other = value(1, 3, expires=100)
    for key, v, p in ((b"live", live, 0), (b"dead", dead, 0), (b"other", other, 1)):
        st.put(key, v, p)
        st.delivered(key, v, p, 1)
    tomb = sweep_keys(table, st, None, 1000.0, owned={0})
    assert [(w.key, w.value) for w in tomb] == [(b"dead", None)]
    assert st.get(b"live") == live
    assert st.get(b"other", 1) == other  # not owned: left to Faust (closed at revocation)


@pytest.mark.filterwarnings("ignore")
def test_pack_value_expiry_is_what_sweeps_read() -> None:
    assert unpack_value(value(1, 1, expires=-math.inf))[0] == 1
