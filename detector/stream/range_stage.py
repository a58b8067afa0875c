"""The range stage: counts per number, IP x number pair and number range; the decision.

* **input**: ``<app>-by-range``, keyed by the number's range (E.164 minus its last digits, which
  co-partitions the number, its range and every IP x number pair on it). Requests
  ``{"k": "req", "r", "e", "ipc", "kts"}`` from the ip stage (with its enrichment and IP counts)
  and dialer outcomes ``{"k": "out", "o"}``.
* **tables**: ``number`` (:class:`~detector.core.state.NumberState`), ``pair`` (a
  :class:`~detector.core.windows.Window`), ``range`` (:class:`~detector.core.state.RangeState`),
  all watermarked with the by-range offset; ``seen`` (request id -> decision, see
  :class:`~detector.stream.ledger.DecisionStore`).
* **outputs**: ``callback-decisions`` (keyed by request id; one Kafka transaction per by-range
  partition per batch, :class:`~detector.stream.delivery.FencedDecisions`), ``detector-lists``
  (learned deny entries, signed), the dead-letter topic (a request this stage failed on).

Batches (:class:`RangeStage`): each event is counted as it arrives; the batch's requests are
decided together (one model call, :func:`decide_pending`) when it is flushed, or earlier when a
new event depends on one of them (the same number or request id, or an outcome: only a number's
outstanding-callback mark depends on a decision); each decision then passes the spend breakers
(:func:`detector.core.spend.settle`) in commit order. :meth:`RangeStage.flush` then packs each
written key once, sends the changelog messages and the stored decisions, waits until Kafka has
them, sends the decisions (``rt.decisions_out``: fenced per partition), and acks the events
(see :mod:`detector.stream.ledger`). Events of partitions this worker no longer owns (revoked
while the batch waited) are left to their new owner: no changelog write, no decision, no ack.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from detector import metrics
from detector.core import spend, state
from detector.core.decide import decide_many
from detector.core.lists import ListEntry
from detector.core.phone import enrich_phone, routing_key
from detector.core.pipeline import count_population, learn
from detector.core.policy import Policy
from detector.core.records import OUTCOMES, Action, CallbackRequest, Counts, Enrichment
from detector.stream import codec, failures, guard

log = logging.getLogger("detector.stream")

RANGE_BATCH = 500  # events per batch at most (one Kafka round trip per batch)
SOURCE = 0  # the range-stage tables' watermark source: the by-range partition of the value


@dataclass(slots=True)
class RangeResult:
    """What one range-stage event produced: a decision to send and/or a list entry to publish."""

    decision: dict[str, Any] | None = None
    kts: float | None = None
    resend: bool = False
    entry: ListEntry | None = None
    raw: bytes | None = None  # the decision serialized
    dead_letter: dict[str, Any] | None = None  # an internal error: no decision, a dead letter
    partition: int = -1  # the by-range partition of the event (its decisions' fencing unit)


@dataclass(slots=True)
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


def range_one(rt: Any, env: dict[str, Any], *, partition: int, offset: int,
              undecided: list[Undecided]) -> RangeResult:
    """Count one event per number/pair/range; a new request is appended to ``undecided``
    (decided, committed and stored by :func:`decide_pending`), a known one gets its stored
    decision. The caller decides pending requests first when this event depends on one of them
    (:meth:`RangeStage.depends`)."""
    t = rt.state_tables
    views = [t[name].view(partition, SOURCE, offset) for name in ("number", "pair", "range")]
    number, pair, rng = views
    stores = state.RangeStores(number=number, pair=pair, range=rng)
    if env.get("k") == "out":
        return RangeResult(entry=_outcome(rt, env, stores))
    wire = env["r"]
    req = codec.request_from_wire(wire)
    rt.max_ts = max(rt.max_ts, req.ts)
    seen = rt.decisions.stored(req.request_id, partition)
    if seen is None and rt.decisions.was_sent(req.request_id):
        # Decided and on the decisions topic, its stored decision swept since (past its hour of
        # event time: a worker catching up on a backlog runs through an hour in seconds, while
        # copies re-sent by upstream stages after a crash are still on their way). Its counts
        # were durable before its decision was sent: count nothing, decide nothing.
        metrics.DUPLICATES.labels("range").inc()
        return RangeResult(kts=env.get("kts"))
    if seen is not None and seen[0] != offset:
        # The same request arrived again in another message (an upstream stage was redelivered):
        # its state was counted when its first message was processed. Re-send the stored decision.
        metrics.DUPLICATES.labels("range").inc()
        return _stored(seen[1], env, resend=True)
    enr = codec.enrichment_from_wire(env["e"], req.ip)
    upd = state.range_stage(stores, req, enr, routing_key(enr.phone, req.phone_number),
                            key=rt.ctx.pii_key)
    if seen is None and (number.redelivered or pair.redelivered or rng.redelivered):
        # Counted before, decision not stored (a crash or a freeze between the changelog writes
        # of one batch): the stored values include this request already; do not count it twice.
        upd.counts = _uncount(upd.counts, number.redelivered, pair.redelivered, rng.redelivered)
    if seen is not None:  # this very message again (offset not committed before a crash)
        metrics.DUPLICATES.labels("range").inc()
        result = _stored(seen[1], env, resend=True)
        assert result.decision is not None
        state.range_commit(stores, upd, req, allowed=result.decision["action"] == Action.ALLOW,
                           pending_ttl=rt.policy.pending_ttl)
        return result
    result = RangeResult(kts=env.get("kts"))
    ipc = codec.ip_counts_from_wire(env["ipc"])
    pop = count_population(rt.population, req, enr, ipc, upd.counts, rt.policy)
    undecided.append(Undecided(req, enr, upd, Counts(ipc, upd.counts, pop),
                               stores, partition, offset, result))
    return result


def _stored(raw: bytes, env: dict[str, Any], *, resend: bool) -> RangeResult:
    return RangeResult(decision=codec.loads(raw), kts=env.get("kts"), resend=resend, raw=raw)


def _uncount(c: Any, number: bool, pair: bool, rng: bool) -> Any:
    """Range counts with this request counted once where a stored value already included it."""

    def one_less(*names: str) -> dict[str, int]:
        return {n: max(getattr(c, n) - 1, 1) for n in names}

    return dataclasses.replace(
        c, **(one_less("number_15m", "number_1h", "number_24h") if number else {}),
        **(one_less("pair_1h", "pair_24h") if pair else {}),
        **(one_less("range_1h", "range_24h") if rng else {}))


def decide_pending(rt: Any, undecided: list[Undecided]) -> None:
    """Decide the counted requests with one model call, then settle each one's spend breakers,
    commit it (the outstanding-callback mark) and store its decision, in arrival order."""
    if not undecided:
        return
    decisions = decide_many([(u.req, u.enr, u.counts) for u in undecided], rt.context(),
                            decided_at=time.time())
    store = rt.decisions
    ttl = rt.policy.pending_ttl
    for u, decision in zip(undecided, decisions, strict=True):
        decision = spend.settle(decision, u.req, u.enr, rt.ctx, rt.population)  # spend breakers
        state.range_commit(u.stores, u.update, u.req, allowed=decision.action == Action.ALLOW,
                           pending_ttl=ttl)
        d = codec.decision_to_wire(decision)
        raw = codec.dumps(d)
        store.store(u.req.request_id, u.partition, u.offset, u.req.ts, raw)
        u.result.decision, u.result.raw = d, raw
    undecided.clear()


def _outcome(rt: Any, env: dict[str, Any], stores: state.RangeStores) -> ListEntry | None:
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


def envelope_number_key(env: dict[str, Any]) -> str:
    """The ``number`` table key of a by-range request, from its carried enrichment."""
    e164 = env["e"][0]
    if e164:
        return str(e164)
    return "?" + "".join(c for c in env["r"]["phone_number"] if c.isdigit())


class RangeStage:
    """The range stage's batch (see the module doc): events counted one by one, decided together,
    made durable, then sent and acked."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
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
        if env["r"]["request_id"] in self.pending_keys:
            return True
        return envelope_number_key(env) in self.pending_keys

    def decide(self) -> None:
        """Decide the undecided requests; if the batch fails (a bug), one by one, so a single bad
        request does not take its batch with it."""
        try:
            decide_pending(self.rt, self.undecided)
        except Exception as exc:  # the type and line only: the message may hold the input
            log.error("range: deciding a batch of %d failed (%s); deciding one by one",
                      len(self.undecided), failures.describe(exc))
            for u in self.undecided:
                try:
                    decide_pending(self.rt, [u])
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
                               undecided=self.undecided)
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

    def _take(self) -> tuple[list[Any], list[RangeResult], list[tuple[int, Callable[[], Any]]]]:
        """Decide and pack the batch, synchronously: events processed while the flush waits on
        Kafka belong to the next batch."""
        t0 = time.perf_counter()
        self.decide()
        metrics.child(metrics.STAGE_SECONDS, "range_decide").observe(time.perf_counter() - t0)
        rt = self.rt
        writes = [w for name in ("number", "pair", "range")
                  for w in rt.state_tables[name].take_writes()]
        writes += rt.decisions.take_writes()
        results, acks = self.results, self.acks
        self.results, self.acks = [], []
        return writes, results, acks

    async def _flush(self) -> int:
        async with self.lock:
            if not self.acks:
                return 0
            writes, results, acks = self._take()
            rt = self.rt
            # Only partitions still owned: the others' events go to their new owner unacked.
            owns = rt.decisions_out.owns
            lost = sorted({p for p, _ in acks if not owns(p)})
            if lost:
                log.info("range: %d events of partitions %s left to their new owner",
                         sum(1 for p, _ in acks if not owns(p)), lost)
                writes = [w for w in writes if owns(w.partition)]
            futs = await rt.send_writes(writes)
            if futs:  # state and stored decisions durable before any send (bounded, loud wait)
                await guard.wait_delivered(futs, stage="range", what="changelog writes",
                                           diagnose=rt.diagnose)
            guard.FREEZE.check()  # frozen past the session timeout: another worker may own these
            sent = 0
            now = time.time()
            store = rt.decisions
            batch: dict[int, list[tuple[bytes, bytes]]] = {}  # by-range partition -> decisions
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
                if store.was_sent(rid):
                    if not res.resend:  # decided anew: its state had not counted it before
                        log.warning("range: request %s decided again, its decision is already "
                                    "on the topic; not sent", rid)
                    continue  # already on the decisions topic (a re-send, or sent by a zombie
                    #           before this worker fenced it: see DecisionStore.load_sent)
                batch.setdefault(res.partition, []).append(
                    (rid.encode("utf-8"), res.raw if res.raw is not None else codec.dumps(d)))
                store.mark_sent(rid, now)
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
