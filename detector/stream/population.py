"""Cross-worker population counters: every worker sees every worker's traffic, within ~2 s.

A count per country, per number block or overall is no partition's business: the requests of one
country are spread over every range-stage partition, hence over every worker. So no table is
keyed by scope (that would make one hot partition per busy country). Instead:

* each worker counts its own requests at once in its :class:`~detector.core.population.PopulationView`
  (so a single worker decides exactly as the replay path does);
* every :data:`PUBLISH_INTERVAL_S` it publishes what it counted since the last time (its *delta*:
  ``[[scope, minute, requests, fresh], ...]``) to the internal topic ``<app>-population``
  (1 partition, key = the worker's id, the internal topics' retention);
* every worker reads that topic without a consumer group (like the lists topic) and merges the
  other workers' deltas into its view; at start it reads back the last day, so a restarted or
  added worker has the population's history.

Delay: a request counted by another worker is in this worker's view after at most the publish
interval plus one fetch wait (1 s + 0.1 s; the two-worker integration test checks <= 2 s).
A request redelivered after a crash may be counted twice in the population (once by the dead
worker's published delta, once again): population counts are baselines, not exact per-key limits.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

from detector import metrics
from detector.core import population, spend
from detector.core.population import PopulationView
from detector.stream import codec

log = logging.getLogger("detector.stream.population")

PUBLISH_INTERVAL_S = 1.0
READ_BACK_S = 26 * 3600.0  # history read at start: a day of hours plus the current one


def worker_id() -> str:
    """A fresh id per process: a restarted worker's old deltas are merged like anyone's."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def encode_delta(worker: str, delta: list[list[Any]]) -> bytes:
    return codec.dumps({"w": worker, "t": time.time(), "d": delta})


def apply_message(view: PopulationView, me: str, value: bytes | None) -> bool:
    """Merge one message of the population topic unless it is ours; False when it is malformed
    (counted and skipped: a bad message must not stop the reader)."""
    if not value:
        return True
    try:
        msg = codec.loads(value)
        if msg.get("w") == me:
            return True
        rows = msg["d"]
        if not isinstance(rows, list):
            raise TypeError("d is not a list")
        view.merge(rows)
    except Exception:  # noqa: BLE001 - malformed internal message: count it, never stop
        metrics.POPULATION_BAD_MESSAGES.inc()
        return False
    return True


def prune_clock(max_event_ts: float, skew_s: float = 300.0) -> float:
    """The clock population state is aged against: the newest event time seen, but never more
    than ``skew_s`` past the wall clock (one request dated 2099 must not age everything out)."""
    return min(max_event_ts, time.time() + skew_s)


async def read_population_forever(app: Any, rt: Any, topic: str, me: str) -> None:
    """Follow ``topic`` from READ_BACK_S ago and merge the other workers' deltas into
    ``rt.population`` (every worker, no consumer group)."""
    from detector.stream.io import open_broadcast_reader, stop_consumer

    consumer = await open_broadcast_reader(app, rt, topic, READ_BACK_S, "population")
    try:
        n = 0
        while not app.should_stop:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            for msgs in batch.values():
                for m in msgs:
                    apply_message(rt.population, me, m.value)
                    n += 1
            if batch:
                metrics.POPULATION_MESSAGES.inc(sum(len(v) for v in batch.values()))
    finally:
        await stop_consumer(consumer)


async def publish_delta(rt: Any, topic: Any, me: str) -> int:
    """Publish what this worker counted since the last call; returns the rows sent."""
    delta = rt.population.take_delta()
    if not delta:
        return 0
    await rt.publish(topic, me.encode("utf-8"), encode_delta(me, delta), None)
    return len(delta)


def update_population_gauges(rt: Any) -> None:
    """Under-attack state per scope at the current clock: overall and per destination country
    (ISO codes only, so the label set is bounded)."""
    view: PopulationView = rt.population
    now = prune_clock(rt.max_ts)
    pol = rt.policy.population
    metrics.POPULATION_SCOPES.set(len(view))
    surging = population.surging_scopes(view, now, pol)
    for (scope, country), (factor, on) in surging.items():
        metrics.UNDER_ATTACK.labels(scope, country).set(1 if on else 0)
        metrics.SURGE_FACTOR.labels(scope, country).set(factor)
    update_spend_gauges(rt, now)


_OPEN_BREAKERS: dict[str, str] = {}  # spend scope key -> last log line (this worker's view)
_SPEND_LABELS: set[tuple[str, str]] = set()


def update_spend_gauges(rt: Any, now: float) -> None:
    """Spend breakers per (scope kind, country label): how many are open, the tightest ratio;
    and one log line when a breaker opens or closes (scope names come from the policy and the
    rate deck, never from a request: a country code or a tariff prefix)."""
    pol = rt.policy
    states = spend.breakers(rt.population, now, pol.spend, pol.population.campaigns, rt.ctx.lists)
    opened: dict[tuple[str, str], int] = {}
    ratio: dict[tuple[str, str], float] = {}
    currency = pol.spend.currency
    seen_open = set()
    for st in states:
        label = (st.kind, metrics.spend_country(spend.scope_region(st.key)))
        opened[label] = opened.get(label, 0) + (1 if st.open else 0)
        ratio[label] = max(ratio.get(label, 0.0), st.ratio)
        if st.open:
            seen_open.add(st.key)
            if st.key not in _OPEN_BREAKERS:
                _OPEN_BREAKERS[st.key] = st.scope
                log.warning("spend breaker OPEN: %s %s: %.2f %s in the last hour (budget %.2f), %.2f in "
                            "24 h (budget %.2f), budget source %s", st.kind, st.scope, st.spend_1h,
                            currency, st.limit_1h, st.spend_24h, st.limit_24h, st.source)
    for key in [k for k in _OPEN_BREAKERS if k not in seen_open]:
        log.warning("spend breaker closed: %s", _OPEN_BREAKERS.pop(key))
    for label in _SPEND_LABELS | set(opened):
        metrics.SPEND_BREAKERS_OPEN.labels(*label).set(opened.get(label, 0))
        metrics.SPEND_BUDGET_RATIO.labels(*label).set(round(ratio.get(label, 0.0), 4))
    _SPEND_LABELS.update(opened)
