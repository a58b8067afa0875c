"""OffsetGate: each stage processes a partition's offsets in order, once, whatever is delivered."""

from __future__ import annotations

import pytest

from detector.stream.delivery import (
    Admit,
    DirectDecisions,
    FencedDecisions,
    OffsetGate,
    _DeliverAll,
)

P, S, H, K = Admit.PROCESS, Admit.SKIP, Admit.HOLD, Admit.SEEK


@pytest.mark.parametrize(
    ("start", "offsets", "expected", "next_offset"),
    [
        (0, [0, 1, 2], [P, P, P], 3),
        # a redelivery of what was processed (or committed) is skipped
        (5, [3, 4, 5, 5, 6], [S, S, P, S, P], 7),
        # Faust after a restart: later offsets first; they are held and the hole is read again
        (340, [528, 529, 530, 340, 341], [K, H, H, P, P], 342),
        # after the re-read the held offsets come again, in order
        (2, [4, 5, 2, 3, 4, 5], [K, H, P, P, P, P], 6),
        # a real hole (offsets that do not exist, e.g. transaction markers): the re-read starts
        # at the same offset again, so the gate moves on
        (10, [12, 13, 12, 13], [K, H, P, P], 14),
        # a second hole after the first was filled is a new hole
        (0, [2, 0, 1, 2, 5, 3], [K, P, P, P, K, P], 4),
    ],
)
def test_gate_admits_in_order(start: int, offsets: list[int], expected: list[Admit],
                              next_offset: int) -> None:
    gate = OffsetGate("t")
    gate.reset({0: start})
    assert [gate.admit(0, o) for o in offsets] == expected
    assert gate.expected(0) == next_offset


def test_partitions_are_independent_and_reset_forgets_holes() -> None:
    gate = OffsetGate("t")
    gate.reset({0: 0, 1: 100})
    assert gate.admit(1, 100) is P and gate.admit(0, 3) is K and gate.admit(1, 101) is P
    gate.reset({0: 3})  # a new assignment: partition 0 committed up to 3, partition 1 gone
    assert gate.admit(0, 3) is P
    assert gate.admit(1, 7) is P  # a partition the gate has no start for: taken as delivered
    assert gate.expected(1) == 8


def test_a_failed_seek_is_retried_by_the_next_event_past_the_hole() -> None:
    gate = OffsetGate("t")
    gate.reset({0: 0})
    assert gate.admit(0, 4) is K
    gate.forget_hole(0)
    assert gate.admit(0, 5) is K and gate.admit(0, 6) is H and gate.admit(0, 0) is P


def test_faust_drain_loop_never_sees_a_read_offset() -> None:
    offsets = _DeliverAll()
    offsets["tp"] = 41  # Faust still records what it delivered ...
    assert offsets["tp"] is None  # ... but its drain loop never drops or gap-tracks by it
    assert offsets.get("tp") == 41


@pytest.mark.parametrize(
    ("committed", "acked", "expected"),
    [
        (10, [11, 12], None),  # offset 10 (the committed position) is not acked: no commit
        (10, [10, 11, 12], 13),
        (10, [12, 10, 11, 15], 13),  # up to the first gap
        (None, [3, 4], 5),  # nothing committed yet: the gate started the stage at the log start
    ],
)
def test_commits_only_acked_offsets_that_follow_the_committed_one(
    committed: int | None, acked: list[int], expected: int | None
) -> None:
    from collections import defaultdict

    from intervaltree import IntervalTree

    from detector.stream.delivery import DeliveryConsumer

    consumer = DeliveryConsumer.__new__(DeliveryConsumer)  # only the offset bookkeeping
    consumer._acked = defaultdict(list, {"tp": list(acked)})
    consumer._acked_index = defaultdict(set, {"tp": set(acked)})
    consumer._gap = defaultdict(IntervalTree)
    consumer._committed_offset = defaultdict(lambda: None, {"tp": committed})
    assert consumer._new_offset("tp") == expected


# --- fenced decisions: one transactional producer per owned by-range partition ---------------


class FakeProducer:
    """Records what a transactional producer is asked to do; ``fail`` makes commits raise."""

    def __init__(self, tid: str, log: list[tuple[str, ...]], fail: Exception | None = None) -> None:
        self.tid, self.log, self.fail = tid, log, fail

    async def start(self) -> None:
        self.log.append(("start", self.tid))  # InitProducerId: fences the id's previous owner

    async def stop(self) -> None:
        self.log.append(("stop", self.tid))

    async def begin_transaction(self) -> None:
        self.log.append(("begin", self.tid))

    async def send(self, topic: str, value: bytes, key: bytes) -> None:
        self.log.append(("send", self.tid, topic, key.decode()))

    async def commit_transaction(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.log.append(("commit", self.tid))


def fenced(log: list[tuple[str, ...]], fail: Exception | None = None) -> FencedDecisions:
    from types import SimpleNamespace

    settings = SimpleNamespace(app_id="app")
    wrapped: list[str] = []
    out = FencedDecisions(settings, "decisions", factory=lambda tid: FakeProducer(tid, log, fail),
                          wrap=lambda p: wrapped.append(p.tid))
    out.wrapped = wrapped  # type: ignore[attr-defined]
    return out


@pytest.mark.asyncio
async def test_fenced_decisions_start_one_producer_per_partition_and_stop_revoked_ones() -> None:
    log: list[tuple[str, ...]] = []
    out = fenced(log)
    await out.assign({0, 2})
    assert sorted(log) == [("start", "app-decisions-0"), ("start", "app-decisions-2")]
    assert out.owns(0) and out.owns(2) and not out.owns(1)
    assert sorted(out.wrapped) == ["app-decisions-0", "app-decisions-2"]  # type: ignore[attr-defined]
    log.clear()
    await out.release({2})  # partition 0 moved away: its events are left to the new owner
    assert log == [("stop", "app-decisions-0")] and not out.owns(0)
    log.clear()
    await out.assign({1, 2})  # only the new partition's producer starts (and fences)
    assert log == [("start", "app-decisions-1")]
    await out.stop()
    assert not out.producers


@pytest.mark.asyncio
async def test_fenced_decisions_commit_one_transaction_per_partition() -> None:
    log: list[tuple[str, ...]] = []
    out = fenced(log)
    await out.assign({0, 1})
    log.clear()
    await out.send({0: [(b"a", b"{}"), (b"b", b"{}")], 1: [(b"c", b"{}")], 3: []})
    by_tid: dict[str, list[tuple[str, ...]]] = {}
    for entry in log:
        by_tid.setdefault(entry[1], []).append(entry)
    assert by_tid["app-decisions-0"] == [
        ("begin", "app-decisions-0"), ("send", "app-decisions-0", "decisions", "a"),
        ("send", "app-decisions-0", "decisions", "b"), ("commit", "app-decisions-0")]
    assert [e[0] for e in by_tid["app-decisions-1"]] == ["begin", "send", "commit"]


@pytest.mark.asyncio
async def test_a_fenced_worker_exits_before_acking(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiokafka.errors import ProducerFenced

    from detector.stream import guard

    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(guard, "_exit", fake_exit)
    out = fenced([], fail=ProducerFenced())
    await out.assign({0})
    with pytest.raises(SystemExit):
        await out.send({0: [(b"a", b"{}")]})
    assert codes == [guard.EXIT_DELIVERY_FAILED]


@pytest.mark.asyncio
async def test_direct_decisions_send_through_the_app_producer() -> None:
    sent: list[tuple[bytes, bytes]] = []

    async def send(key: bytes, value: bytes) -> None:
        sent.append((key, value))

    out = DirectDecisions(send)
    await out.assign({0})
    assert out.owns(5)
    await out.send({0: [(b"a", b"1")], 5: [(b"b", b"2")]})
    assert sent == [(b"a", b"1"), (b"b", b"2")]
