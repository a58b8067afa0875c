"""OffsetGate: each stage processes a partition's offsets in order, once, whatever is delivered."""

from __future__ import annotations

import pytest

from detector.stream.delivery import Admit, OffsetGate, _DeliverAll

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
