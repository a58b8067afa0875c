"""Where a table's values live: Faust's memory store or its RocksDB store (``DETECTOR_TABLE_STORE``).

The stages read and write a table through a :class:`TableStore`, never through ``table.data``
directly, because they work outside Faust's current event (a batch's flush, a sweep, a
pre-check) and Faust's RocksDB store routes ``table[key]`` by the current event's partition
(see :mod:`detector.stream.faust_internals`, "RocksDB store"). Both stores keep the same bytes
as the changelog (:mod:`detector.stream.tables` format).

* :class:`MemoryTableStore` (``memory``, the default): ``table.data`` is a dict; a write is
  visible at once; a restart rebuilds every table from its changelog.
* :class:`RocksTableStore` (``rocksdb``): one RocksDB database per table partition, opened and
  closed by Faust at each rebalance (closed when revoked, kept on disk, reopened when assigned
  again). **A database holds only what Kafka has acknowledged**: a write waits in
  :attr:`RocksTableStore.pending` (in memory, read first) until its changelog message is
  acknowledged, then goes to the partition's database together with that message's offset as
  Faust's *persisted offset*, in one atomic RocksDB write batch. The local database is therefore
  always a prefix of its changelog partition, and Faust's recovery, which reads the changelog
  from the persisted offset on, brings it up to date exactly: a restart reads only what was
  written after the last acknowledged write, and nothing counted only locally can outlive a
  crash (a redelivered event finds the state Kafka has, as with the memory store).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, Protocol

from detector.stream import faust_internals

_TOMBSTONE = b""  # a pending deletion (stored values are never empty: they start with a format byte)


class TableStore(Protocol):
    """A table's values by key (bytes -> bytes); ``partition`` is the table partition a key
    belongs to (None: unknown, the store finds it)."""

    persistent: bool

    def get(self, key: bytes, partition: int | None = None) -> bytes | None: ...

    def put(self, key: bytes, value: bytes, partition: int) -> None: ...

    def delete(self, key: bytes, partition: int | None) -> None: ...

    def scan(self) -> Iterator[tuple[bytes, int | None]]:
        """Every key with its partition when known (a sweep pass)."""
        ...

    def count(self) -> int: ...

    def delivered(self, key: bytes, value: bytes | None, partition: int, offset: int) -> None:
        """The changelog message of a write was acknowledged at ``offset``."""
        ...

    def retain(self, owned: set[int]) -> None:
        """Forget unacknowledged writes of partitions this worker no longer owns."""
        ...


class MemoryTableStore:
    """Faust's memory store: ``table.data`` is a dict of the stored bytes."""

    persistent = False

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, key: bytes, partition: int | None = None) -> bytes | None:
        return self.table.data.get(key)  # type: ignore[no-any-return]

    def put(self, key: bytes, value: bytes, partition: int) -> None:
        self.table.data[key] = value

    def delete(self, key: bytes, partition: int | None) -> None:
        self.table.data.pop(key, None)

    def scan(self) -> Iterator[tuple[bytes, int | None]]:
        return zip(list(self.table.data.keys()), itertools.repeat(None), strict=False)

    def count(self) -> int:
        return len(self.table.data)

    def delivered(self, key: bytes, value: bytes | None, partition: int, offset: int) -> None:
        pass

    def retain(self, owned: set[int]) -> None:
        pass  # sweeps drop the keys of partitions not owned (sweep_keys)


class RocksTableStore:
    """Faust's RocksDB store (rocksdict), one database per partition; see the module doc."""

    persistent = True

    def __init__(self, table: Any) -> None:
        self.table = table
        # key -> (partition, value or _TOMBSTONE): written, changelog not acknowledged yet
        self.pending: dict[bytes, tuple[int, bytes]] = {}
        self.counted: int | None = None  # keys on disk at the last complete scan

    def _dbs(self) -> dict[int, Any]:
        return faust_internals.rocksdb_open_dbs(self.table.data)

    def get(self, key: bytes, partition: int | None = None) -> bytes | None:
        p = self.pending.get(key)
        if p is not None:
            return p[1] or None
        dbs = self._dbs()
        if partition is not None:
            db = dbs.get(partition)
            return None if db is None else db.get(key)  # type: ignore[no-any-return]
        for db in dbs.values():  # a caller that does not know the partition (pre-check, tests)
            if db.key_may_exist(key):
                value = db.get(key)
                if value is not None:
                    return value  # type: ignore[no-any-return]
        return None

    def put(self, key: bytes, value: bytes, partition: int) -> None:
        self.pending[key] = (partition, value)

    def delete(self, key: bytes, partition: int | None) -> None:
        if partition is None:
            p = self.pending.get(key)
            partition = p[0] if p is not None else self._partition_of(key)
            if partition is None:
                return
        self.pending[key] = (partition, _TOMBSTONE)

    def _partition_of(self, key: bytes) -> int | None:
        for partition, db in self._dbs().items():
            if db.key_may_exist(key) and db.get(key) is not None:
                return partition
        return None

    def delivered(self, key: bytes, value: bytes | None, partition: int, offset: int) -> None:
        stored = _TOMBSTONE if value is None else value
        p = self.pending.get(key)
        if p is not None and p[1] is stored:  # a later write of the key is still pending
            del self.pending[key]
        db = self._dbs().get(partition)
        if db is None:  # revoked (or the worker is stopping): recovery reads it from the changelog
            return
        faust_internals.rocksdb_write_acknowledged(self.table.data, db, key, value, offset)

    def retain(self, owned: set[int]) -> None:
        for key in [k for k, (p, _) in self.pending.items() if p not in owned]:
            del self.pending[key]

    def scan(self, chunk: int = 1000) -> Iterator[tuple[bytes, int | None]]:
        """Keys of the open (owned) partitions, ``chunk`` at a time (each chunk from a fresh
        RocksDB iterator: nothing holds a database open across a sweep tick, so Faust can
        close and reopen it at a rebalance), then the pending ones."""
        n = 0
        for partition in sorted(self._dbs()):
            after: bytes | None = None
            while True:
                keys, more = self._keys_after(partition, after, chunk)
                n += len(keys)
                yield from zip(keys, itertools.repeat(partition), strict=False)
                if not more or not keys:
                    break
                after = keys[-1]
        self.counted = n
        yield from ((k, p) for k, (p, v) in list(self.pending.items()) if v)

    def _keys_after(self, partition: int, after: bytes | None, n: int) -> tuple[list[bytes], bool]:
        db = self._dbs().get(partition)
        if db is None:  # revoked meanwhile
            return [], False
        return faust_internals.rocksdb_keys(self.table.data, db, after, n)

    def count(self) -> int:
        """The keys the last complete :meth:`scan` (sweep pass) read, plus the pending writes;
        before the first pass, RocksDB's estimate (which counts every overwrite still in a
        memtable: too high)."""
        if self.counted is None:
            return sum(int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
                       for db in self._dbs().values()) + len(self.pending)
        return self.counted + len(self.pending)


def make_store(table: Any, kind: str) -> TableStore:
    """The store adapter of a Faust table built with ``store=`` :func:`store_url` ``(kind)``."""
    return RocksTableStore(table) if kind == "rocksdb" else MemoryTableStore(table)


def store_url(kind: str) -> str:
    return "rocksdb://" if kind == "rocksdb" else "memory://"


def rocksdb_options(settings: Any) -> dict[str, Any]:
    """Faust's RocksDB options (per table partition): small memtables and read cache, so a
    worker's memory is bounded by partitions x tables x (2 x write buffer + block cache)."""
    mib = 1 << 20
    return {"write_buffer_size": settings.rocksdb_write_buffer_mb * mib,
            "max_write_buffer_number": 2,
            "block_cache_size": settings.rocksdb_block_cache_mb * mib,
            "driver": "rocksdict"}


def iter_slice(it: Iterator[tuple[bytes, int | None]], n: int) -> list[tuple[bytes, int | None]]:
    return list(itertools.islice(it, n))


__all__ = ["MemoryTableStore", "RocksTableStore", "TableStore", "iter_slice", "make_store",
           "rocksdb_options", "store_url"]
