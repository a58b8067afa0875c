"""The embedded path: JSONL requests in, one decision per valid request out, rejects explained.

Requests are processed in timestamp order (a stable sort, so equal timestamps keep file order)
through :class:`detector.core.pipeline.Detector`, i.e. the same ``decide`` as the stream path.

Dialer queue states (agent capacity, :mod:`detector.core.capacity`) can be replayed with the
requests (``queue_states``, ``detector replay --queue-states FILE``): each state is applied before
the first request at or after its ``ts``, and staleness is judged at each request's ``ts``. The file
is the operator's and is trusted as is (no signatures), like the static lists file. Without it,
replay has no queue state and decides as if the queue were normal.
"""

from __future__ import annotations

import gc
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

import orjson

from detector.core.capacity import CapacityGate, QueueState, parse_queue_state
from detector.core.errors import InputError
from detector.core.parse import check_event_time, parse_request
from detector.core.pipeline import Detector
from detector.core.records import CallbackRequest, Decision


@dataclass
class Reject:
    line: int
    kind: str
    error: str

    def to_dict(self) -> dict[str, object]:
        return {"line": self.line, "error_kind": self.kind, "error": self.error}


@dataclass
class ReplaySummary:
    requests: int = 0
    decisions: int = 0
    rejects: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    by_action: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    reject_kinds: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.decisions / self.seconds if self.seconds > 0 else 0.0

    def render(self) -> str:
        lines = [
            f"lines read: {self.requests + self.rejects}  decisions: {self.decisions}  "
            f"rejected: {self.rejects}  duplicate ids: {self.duplicates}",
            f"throughput: {self.rate:,.0f} decisions/s ({self.seconds:.2f} s)",
            "by action: " + ", ".join(f"{a}={n}" for a, n in sorted(self.by_action.items())),
        ]
        if self.by_reason:
            lines.append(
                "top reasons: " + ", ".join(f"{r}={n}" for r, n in self.by_reason.most_common(10))
            )
        if self.reject_kinds:
            lines.append(
                "rejects: " + ", ".join(f"{k}={n}" for k, n in self.reject_kinds.most_common())
            )
        return "\n".join(lines)


def parse_lines(
    lines: Iterable[str | bytes],
    event_time: tuple[float, float, float] | None = None,
) -> tuple[list[tuple[int, CallbackRequest]], list[Reject]]:
    """Parse every non-blank line; bad ones become :class:`Reject` with line number and reason.

    Lines are best given as bytes (a file opened in binary mode): invalid UTF-8 is then one
    rejected line. ``event_time`` = (now, max future skew, max past skew): also reject requests
    whose ``ts`` is that far from ``now`` (``event_time_out_of_range``). Never raises on a line."""
    good: list[tuple[int, CallbackRequest]] = []
    bad: list[Reject] = []
    for n, line in enumerate(lines, 1):
        if not line or line.isspace():  # blank (isspace: the whitespace strip() removes, no copy)
            continue
        try:
            req = parse_request(line.rstrip(b"\r\n") if isinstance(line, bytes) else line)
            if event_time is not None:
                now, ahead, behind = event_time
                check_event_time(req.ts, now, max_future_s=ahead, max_past_s=behind)
            good.append((n, req))
        except InputError as exc:
            bad.append(Reject(n, exc.kind, str(exc)))
    return good, bad


COLLECT_FLOOR = 1_000_000  # net new tracked objects before the first full collection
CHECK_MASK = 1023  # the collector check runs every 1,024 decisions


class _Collector:
    """The check :func:`collector_paused` yields (call it every :data:`CHECK_MASK` + 1 requests)
    and its :meth:`freeze_inputs`."""

    __slots__ = ("floor", "limit", "carried", "may_freeze", "froze")

    def __init__(self, floor: int, may_freeze: bool) -> None:
        self.floor = self.limit = floor
        self.carried = 0  # objects counted before a freeze (freezing resets the collector's count)
        self.may_freeze, self.froze = may_freeze, False

    def __call__(self) -> None:
        if gc.get_count()[0] + self.carried > self.limit:
            gc.collect()
            self.carried = 0
            self.limit = max(self.floor, len(gc.get_objects()) + gc.get_freeze_count())

    def freeze_inputs(self) -> None:
        """Everything that exists now (the parsed and sorted requests, which live for the whole
        replay, and the process's own objects) is moved out of the collector's sight until the
        end: the full collections of :meth:`__call__` then traverse only what the replay made
        (the 240,000 objects of 3 simulated days' requests were a third of what the first one
        traversed). They were made before the replay started, so no cycle the replay makes is
        hidden; when the collection comes is unchanged (their count is carried). Not done when
        the process has frozen objects of its own (the exit would unfreeze them)."""
        if self.may_freeze:
            self.carried += gc.get_count()[0]
            gc.freeze()
            self.froze = True


@contextmanager
def collector_paused(floor: int = COLLECT_FLOOR) -> Iterator[_Collector]:
    """The automatic garbage collector off while replaying; the yielded check runs a full
    collection once the objects created since the last one (net of those freed) exceed the
    larger of ``floor`` and the objects that survived it (the heap doubled: amortized, each
    live object is traversed about once per doubling). Restores the collector's state on exit.

    Why: replay keeps millions of small long-lived containers (the window state). The automatic
    collector traverses each of them in its young generations, and then again as they age: 8%
    of a replay's CPU (gc callbacks on a 2-day replay). Replay itself makes no reference
    cycles (tested; the library's exception cycle on an unparsable number is broken where it is
    caught, ``core/phone.py``), so refcounting frees what it drops; the check bounds what an
    unforeseen cycle could hold. A collection every fixed number of requests instead (6c5a663,
    reverted by 3765c9e) traversed the whole state each time and measured no gain."""
    was = gc.isenabled()
    gc.disable()
    check = _Collector(floor, may_freeze=gc.get_freeze_count() == 0)
    try:
        yield check
    finally:
        if check.froze or gc.get_freeze_count() == 0:
            # Everything made while paused is in the youngest generation: the next automatic
            # collection would traverse all of it (~0.7 s after 3 simulated days). Move it to the
            # oldest, as the collector would have promoted it, without traversing it (freeze
            # then unfreeze: what is frozen goes to the oldest generation); a full collection
            # later still finds any cycle in it. (Not when someone froze objects: they stay so.)
            gc.freeze()
            gc.unfreeze()
        if was:
            gc.enable()


def decide_all(detector: Detector, reqs: Iterable[CallbackRequest]) -> list[Decision]:
    """``list(detector.process_many(reqs))`` with the collector paused (:func:`collector_paused`):
    what a backtest runs, twice."""
    out: list[Decision] = []
    with collector_paused() as check:
        check.freeze_inputs()  # the caller's requests (and everything else made before)
        for decision in detector.process_many(reqs):
            out.append(decision)
            if not len(out) & CHECK_MASK:
                check()
    return out


def replay(
    lines: Iterable[str | bytes],
    detector: Detector,
    *,
    out: IO[str] | None = None,
    rejects: IO[str] | None = None,
    on_decision: Callable[[CallbackRequest, Decision], None] | None = None,
    progress: bool = False,
    event_time: tuple[float, float, float] | None = None,
    queue_states: Iterable[QueueState] = (),
) -> ReplaySummary:
    """Decide every valid request in ``lines`` (JSONL); write decisions and rejects as JSONL.
    ``queue_states``: dialer queue states applied in time order between the requests."""
    with collector_paused() as check:
        return _replay(lines, detector, out, rejects, on_decision, progress, event_time,
                       queue_states, check)


def _replay(lines: Iterable[str | bytes], detector: Detector, out: IO[str] | None,
            rejects: IO[str] | None,
            on_decision: Callable[[CallbackRequest, Decision], None] | None, progress: bool,
            event_time: tuple[float, float, float] | None, queue_states: Iterable[QueueState],
            check_collector: _Collector) -> ReplaySummary:
    summary = ReplaySummary()
    t0 = time.perf_counter()
    good, bad = parse_lines(lines, event_time)
    for r in bad:
        summary.rejects += 1
        summary.reject_kinds[r.kind] += 1
        if rejects is not None:
            rejects.write(json.dumps(r.to_dict()) + "\n")
    good.sort(key=lambda item: item[1].ts)
    check_collector.freeze_inputs()  # the requests live until the end: not traversed again
    seen: set[str] = set()
    items: Iterable[tuple[int, CallbackRequest]] = good
    if progress:
        from tqdm import tqdm

        items = tqdm(good, unit="req", desc="replay")
    def fresh() -> Iterator[CallbackRequest]:
        for n, req in items:
            summary.requests += 1
            if req.request_id in seen:
                # A repeated request id is a redelivery: it already has its one decision.
                summary.duplicates += 1
                if rejects is not None:
                    rejects.write(
                        json.dumps(
                            Reject(
                                n,
                                "duplicate_request_id",
                                f"request_id {req.request_id!r} already decided",
                            ).to_dict()
                        )
                        + "\n"
                    )
                continue
            seen.add(req.request_id)
            yield req

    by_id: dict[str, CallbackRequest] | None = {} if on_decision is not None else None
    reqs: Iterable[CallbackRequest] = fresh()
    if by_id is not None:
        reqs = _remember(reqs, by_id)
    dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    for decision in _with_queue_states(detector, reqs, queue_states):
        summary.decisions += 1
        summary.by_action[decision.action] += 1
        summary.by_reason.update(decision.reasons)
        if out is not None:  # orjson writes the dataclass as to_dict() would, without the dict
            out.write(dumps(decision, option=newline).decode())
        if on_decision is not None and by_id is not None:
            on_decision(by_id.pop(decision.request_id), decision)
        if not summary.decisions & CHECK_MASK:
            check_collector()
    summary.seconds = time.perf_counter() - t0
    return summary


def _with_queue_states(detector: Detector, reqs: Iterable[CallbackRequest],
                       queue_states: Iterable[QueueState]) -> Iterator[Decision]:
    """``detector.process_many(reqs)``, with each queue state applied before the first request
    at or after its ``ts`` (the batch before it is decided first: a barrier)."""
    states = sorted(queue_states, key=lambda q: q.ts)
    if not states:
        yield from detector.process_many(reqs)
        return
    gate = detector.ctx.capacity
    if gate is None:
        gate = detector.ctx.capacity = CapacityGate()
    i = 0
    segment: list[CallbackRequest] = []
    for req in reqs:
        if i < len(states) and states[i].ts <= req.ts:
            yield from detector.process_many(segment)
            segment = []
            while i < len(states) and states[i].ts <= req.ts:
                gate.apply(states[i], detector.ctx.policy.capacity)
                i += 1
        segment.append(req)
    yield from detector.process_many(segment)


def load_queue_states(lines: Iterable[str | bytes], source: str = "queue states") -> list[QueueState]:
    """Queue states from JSONL (the ``<app>-queue-state`` message format; ``sig`` ignored); a bad
    line is an :class:`InputError` naming the line."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(parse_queue_state(line.rstrip(b"\r\n") if isinstance(line, bytes) else line))
        except InputError as exc:
            raise InputError(f"{source}:{n}: {exc}") from None
    return out


def _remember(
    reqs: Iterable[CallbackRequest], by_id: dict[str, CallbackRequest]
) -> Iterator[CallbackRequest]:
    for req in reqs:
        by_id[req.request_id] = req
        yield req
