"""Stream tables: state packed in memory and on the changelog, one changelog write per key per batch.

Each Faust table of the detector is a ``bytes -> bytes`` map (``memory://`` store, ``raw`` key and
value serializers): the key is the core's key in UTF-8, the value is::

    u8 format (1) | u16 partition | u32 expires | u8 n | n x (i32 source, i64 offset) | payload

* **partition**: the table's partition the value belongs to (its stage's input partition when it
  was written). Sweeps and rebalances read it without unpacking the rest.
* **expires**: event time (whole seconds, rounded up) from which nothing in the value can count
  (:func:`detector.core.state.expires_at`): a sweep decides on 4 bytes.
* **watermarks**: per source of the stage's input, the highest offset this value has counted
  (see :mod:`detector.stream.ledger`, "counted once"). The counts and their watermark are one
  changelog message, so they cannot diverge.
* **payload**: :func:`detector.core.state.pack` of the value (``seen``: the decision's JSON).

The same bytes are the table's in-memory value and the changelog message's value, so Faust's
recovery restores them as they are (``raw`` serializers), and a value costs its packed size
(tens of bytes) instead of a Python dict of lists. A batch unpacks a value once
(:class:`StateTable` keeps it until the batch is flushed), its events change it in place, and
the flush packs each written key once: one changelog message per key per batch, whatever number
of requests it counted.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from detector.core import state
from detector.stream.stores import MemoryTableStore, TableStore

log = logging.getLogger("detector.stream")

FORMAT = 1
_HEAD = struct.Struct("<BHIB")  # format, partition, expires, number of watermarks
_MARK = struct.Struct("<iq")  # source, offset
U32_MAX = 2**32 - 1


@dataclass(slots=True)
class Write:
    """A changelog message: ``value`` None is a tombstone."""

    table: Any  # the Faust table (its changelog topic)
    key: bytes
    value: bytes | None
    partition: int
    store: TableStore | None = None  # told when Kafka acknowledged it (RocksTableStore)


def pack_value(partition: int, expires: float, marks: dict[int, int], payload: bytes) -> bytes:
    """The stored form of a value (see the module doc)."""
    exp = 0 if expires == -math.inf else min(max(math.ceil(expires), 0), U32_MAX)
    head = _HEAD.pack(FORMAT, partition, exp, len(marks))
    if not marks:
        return head + payload
    return b"".join((head, *(_MARK.pack(s, o) for s, o in marks.items()), payload))


def read_head(raw: bytes) -> tuple[int, int]:
    """(partition, expires) of a stored value; (-1, 0) when its format is unknown."""
    if not raw or raw[0] != FORMAT:
        return -1, 0
    _, partition, expires, _ = _HEAD.unpack_from(raw, 0)
    return partition, expires


def unpack_value(raw: bytes) -> tuple[int, dict[int, int], int]:
    """(partition, watermarks, payload position) of a stored value."""
    if not raw or raw[0] != FORMAT:
        raise ValueError(f"unknown table value format {raw[:1]!r}")
    _, partition, _, n = _HEAD.unpack_from(raw, 0)
    pos = _HEAD.size
    marks = {}
    for _ in range(n):
        s, o = _MARK.unpack_from(raw, pos)
        marks[s] = o
        pos += _MARK.size
    return partition, marks, pos


class Entry:
    """A value unpacked for the current batch: its partition, watermarks and core object."""

    __slots__ = ("partition", "marks", "value")

    def __init__(self, partition: int, marks: dict[int, int], value: Any) -> None:
        self.partition = partition
        self.marks = marks
        self.value = value


class StateTable:
    """A table of core state values (:mod:`detector.core.state`) as one stage's batches see it:
    :meth:`view` gives an event its idempotent view, :meth:`take_writes` packs what the batch
    wrote (each key once) into the store and returns the changelog messages."""

    def __init__(self, table: Any, *, pack: Callable[[Any], bytes] = state.pack,
                 unpack: Callable[[bytes | memoryview, int], Any] = state.unpack,
                 expires: Callable[[Any], float] = state.expires_at,
                 store: TableStore | None = None) -> None:
        self.table = table
        self.backend: TableStore = store if store is not None else MemoryTableStore(table)
        self.name: str = table.name
        self._pack, self._unpack, self._expires = pack, unpack, expires
        self.cache: dict[str, Entry] = {}  # unpacked in the current batch
        self.dirty: dict[str, None] = {}  # written in the current batch (insertion order)
        self._bad_format_logged = False

    def entry(self, key: str, partition: int | None = None) -> Entry | None:
        """The value of ``key`` (of table partition ``partition``) for this batch (unpacked
        once), or None."""
        e = self.cache.get(key)
        if e is not None:
            return e
        raw = self.backend.get(key.encode("utf-8", "surrogatepass"), partition)
        if raw is None:
            return None
        try:
            partition, marks, pos = unpack_value(raw)
            e = Entry(partition, marks, self._unpack(raw, pos))
        except (ValueError, struct.error, IndexError):
            if not self._bad_format_logged:  # e.g. a changelog written by an older version
                log.warning("table %s: a value in an unknown format is ignored (counts for its "
                            "key start again)", self.name)
                self._bad_format_logged = True
            return None
        self.cache[key] = e
        return e

    def peek(self, key: str, partition: int | None = None) -> Any:
        """The core value of ``key`` to read outside a batch (the pre-check): the current
        batch's if it holds the key, else unpacked from the store without caching it; None when
        absent or in an unknown format. Never to be changed: writes go through :meth:`view`."""
        e = self.cache.get(key)
        if e is not None:
            return e.value
        raw = self.backend.get(key.encode("utf-8", "surrogatepass"), partition)
        if raw is None:
            return None
        try:
            _, _, pos = unpack_value(raw)
            return self._unpack(raw, pos)
        except (ValueError, struct.error, IndexError):
            return None

    def copy_of(self, value: Any) -> Any:
        """A private copy of a core value (what a redelivered event may change and drop)."""
        return self._unpack(self._pack(value), 0)

    def view(self, partition: int, source: int, offset: int) -> EventView:
        return EventView(self, partition, source, offset)

    def take_writes(self) -> list[Write]:
        """Pack every key written in this batch into the store; their changelog messages."""
        out: list[Write] = []
        store = self.backend
        for key in self.dirty:
            e = self.cache[key]
            kb = key.encode("utf-8", "surrogatepass")
            raw = pack_value(e.partition, self._expires(e.value), e.marks, self._pack(e.value))
            store.put(kb, raw, e.partition)
            out.append(Write(self.table, kb, raw, e.partition, store))
        self.dirty = {}
        self.cache = {}
        return out

    def busy(self, key: bytes) -> bool:
        """Whether the current batch holds ``key`` (a sweep leaves it alone)."""
        return key.decode("utf-8", "surrogatepass") in self.cache

    def __len__(self) -> int:
        return self.backend.count()


class EventView(MutableMapping[str, Any]):
    """One event's view of a :class:`StateTable`, which the core's stage functions read and write.

    Idempotent: a stored value whose watermark for this event's source is at or past its offset
    already counts this event (a redelivery). The view then hands out a private copy, drops the
    core's write to it and sets :attr:`redelivered`, so the caller can report the counts the
    event saw the first time. A write stamps the value with the event's watermark and partition.
    """

    __slots__ = ("_st", "_partition", "_source", "_offset", "_written", "_frozen", "redelivered")

    def __init__(self, st: StateTable, partition: int, source: int, offset: int) -> None:
        self._st = st
        self._partition = partition
        self._source = source
        self._offset = offset
        self._written: set[str] = set()
        self._frozen: dict[str, Any] = {}
        self.redelivered = False

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        frozen = self._frozen.get(key)
        if frozen is not None:
            return frozen
        e = self._st.entry(key, self._partition)
        if e is None:
            return default
        if key not in self._written and e.marks.get(self._source, -1) >= self._offset:
            copy = self._frozen[key] = self._st.copy_of(e.value)
            self.redelivered = True
            return copy
        return e.value

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self._frozen:
            return
        st = self._st
        e = st.cache.get(key)
        if e is None:
            e = st.cache[key] = Entry(self._partition, {}, value)
        else:
            e.value = value
            e.partition = self._partition
        if e.marks.get(self._source, -1) < self._offset:
            e.marks[self._source] = self._offset
        st.dirty[key] = None
        self._written.add(key)

    def __delitem__(self, key: str) -> None:  # pragma: no cover - the stages never delete
        raise NotImplementedError("stages do not delete; sweeps do (see Sweeper)")

    def __iter__(self) -> Iterator[str]:  # pragma: no cover - the stages never iterate
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------- sweeps


Keys = list[tuple[bytes, int | None]]  # keys to sweep, with their partition when known


def sweep_keys(table: Any, store: TableStore, keys: Keys | None, now: float, owned: set[int],
               busy: Callable[[bytes], bool] = lambda k: False) -> list[Write]:
    """Delete from ``table`` the values that expired at ``now`` (event time) with a tombstone on
    their changelog partition, and the values of partitions this worker no longer owns (no
    tombstone: they belong to another worker now; a RocksDB store has only the owned
    partitions open). ``keys`` None: every key. ``busy``: keys a batch is working on (left
    alone)."""
    out: list[Write] = []
    for key, where in store.scan() if keys is None else keys:
        raw = store.get(key, where)
        if raw is None:
            continue
        partition, expires = read_head(raw)
        if partition in owned and expires > now:
            continue
        if busy(key):
            continue
        if partition in owned:  # expired; otherwise a partition this worker no longer owns
            store.delete(key, partition)
            out.append(Write(table, key, None, partition, store))
        elif not store.persistent:
            store.delete(key, where)
    return out
