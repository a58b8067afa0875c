"""The ingest stages: external input validated, then dead-lettered or handed on.

* **ingest** -- input ``callback-requests`` (key: the client IP, or anything); outputs the
  dead-letter topic (bad input, with its reason), the ip stage in this process (a request keyed
  by its IP on the partition the ``by-ip`` hop would pick: the ip table's partition is this
  worker's, no hop), or ``<app>-by-ip`` keyed by IP (any other key). No table.
* **outcome ingest** -- input ``callback-outcomes``; outputs the dead-letter topic or
  ``<app>-by-range`` keyed by the dialled number's range (the range stage owns the number's
  state). No table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from detector import metrics
from detector.core.errors import InputError
from detector.core.parse import check_event_time, parse_request
from detector.core.phone import enrich_phone, routing_key
from detector.core.pipeline import parse_outcome
from detector.core.policy import Policy
from detector.stream import codec, failures
from detector.stream.ledger import ip_source

log = logging.getLogger("detector.stream")

T = TypeVar("T")


async def ingest_one(rt: Any, key: bytes | None, value: bytes | None, *, partition: int,
                     offset: int, timestamp: float | None, ack: Any = None) -> None:
    """Validate one raw request; dead-letter it, count it here or forward it keyed by IP.

    ``ack``: the event's ack when the caller defers it (the ip stage acks a request it counted
    once its table write is flushed); called here when nothing is deferred."""
    t0 = time.perf_counter()
    metrics.REQUESTS.inc()
    req = await _validated(rt, parse_request, value,
                           "message has no value (tombstone); expected a JSON request",
                           rt.settings.topic_requests, "ingest", partition, offset, key, timestamp, ack)
    if req is None:
        return
    ip_key = req.ip.encode("utf-8")
    if key == ip_key and partition == rt.ip_partition(ip_key):
        # Keyed by IP by the web tier and on the partition the by-ip hop would pick: this worker
        # owns that partition of the ip table too (co-partitioned), so count here, no hop.
        await rt.ip.count(req, None, source=ip_source(partition, direct=True), offset=offset,
                          kts=timestamp, partition=partition, ack=ack)
        metrics.child(metrics.STAGE_SECONDS, "ingest_ip").observe(time.perf_counter() - t0)
        return
    env = {"r": codec.request_to_wire(req), "src": [partition, offset], "kts": timestamp}
    await rt.send("by_ip", ip_key, codec.dumps(env))
    _ack(ack)
    metrics.child(metrics.STAGE_SECONDS, "ingest").observe(time.perf_counter() - t0)


async def _validated(rt: Any, parse: Callable[[bytes], T], value: bytes | None, empty: str, topic: str,
                     stage: str, partition: int, offset: int, key: bytes | None,
                     timestamp: float | None, ack: Any) -> T | None:
    """``parse(value)`` with its event time checked against the wall clock; None once a bad
    message is dead-lettered with its reason (``empty``: the reason of a message without a
    value) and acked. An unexpected exception is dead-lettered as ``internal_error``: never let
    one message stop the worker."""
    s = rt.settings
    try:
        if value is None:
            raise InputError(empty)
        obj = parse(value)
        check_event_time(obj.ts, time.time(), max_future_s=s.max_future_skew_s,  # type: ignore[attr-defined]
                         max_past_s=s.max_past_skew_s)
        return obj
    except InputError as exc:
        await dead_letter(rt, exc.kind, str(exc), topic, partition, offset, value, key, timestamp)
    except Exception as exc:
        await failures.dead_letter_internal(rt, exc, stage=stage, topic=topic, partition=partition,
                                            offset=offset, original=value, key=key,
                                            timestamp=timestamp)
    _ack(ack)
    return None


def _ack(ack: Any) -> None:
    if ack is not None:
        ack()


async def dead_letter(rt: Any, kind: str, error: str, topic: str, partition: int, offset: int,
                      value: bytes | None, key: bytes | None, timestamp: float | None) -> None:
    record = codec.dead_letter(kind=kind, error=error, topic=topic, partition=partition,
                               offset=offset, original=value, key=key, timestamp=timestamp)
    await rt.send("dlq", key, codec.dumps(record))
    metrics.DEAD_LETTERS.labels(topic, kind).inc()


async def outcome_one(rt: Any, key: bytes | None, value: bytes | None, *, partition: int,
                      offset: int, timestamp: float | None, ack: Any = None) -> None:
    """Validate a dialer outcome; forward it keyed by the number's range."""
    outcome = await _validated(rt, parse_outcome, value, "message has no value; expected a JSON outcome",
                               rt.settings.topic_outcomes, "outcome", partition, offset, key, timestamp,
                               ack)
    if outcome is None:
        return
    env = {"k": "out", "o": codec.outcome_to_wire(outcome)}
    await rt.send("by_range", outcome_routing_key(outcome.phone_number, rt.policy).encode("utf-8"),
                  codec.dumps(env))
    _ack(ack)


def outcome_routing_key(phone_number: str, policy: Policy) -> str:
    return routing_key(enrich_phone(phone_number, None, policy.range_digits), phone_number)
