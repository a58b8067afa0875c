"""Explicit conversion between wire JSON (bytes on Kafka topics) and the core's records.

Every topic value is UTF-8 JSON; every key is UTF-8 text. Nothing here knows about Faust: the app
moves ``bytes`` and calls these functions, so a format is defined in exactly one place.

Internal topics carry an envelope around the validated request:

* ``<app>-by-ip`` (key = IP): ``{"r": request, "src": [partition, offset], "kts": kafka_ts}``
  where ``src`` locates the original message on ``callback-requests`` (used to recognise
  redeliveries) and ``kts`` is its Kafka timestamp in seconds (for decision latency).
* ``<app>-by-range`` (key = range routing key): ``{"k": "req", "r": ..., "e": enrichment,
  "ipc": [8 ints], "kts": ...}`` for requests (the ip stage's enrichment and counts travel with
  the request: the range stage parses the number and looks the IP up no second time) and
  ``{"k": "out", "o": outcome}`` for dialer outcomes.

>>> req = CallbackRequest("r1", 1.8e9, "+442079460018", "203.0.113.9")
>>> request_from_wire(request_to_wire(req)) == req
True
>>> ip_counts_to_wire(ip_counts_from_wire([1, 2, 3, 1, 1, 1, 0, 0]))
[1, 2, 3, 1, 1, 1, 0, 0]
>>> from detector.core.records import IpInfo, PhoneInfo
>>> enr = Enrichment(PhoneInfo("+442079460018", True, True, True, "GB", 44, "FIXED_LINE",
...                            "+442079460"), IpInfo("203.0.113.9", 4, "global", "GB", 64500))
>>> enrichment_from_wire(enrichment_to_wire(enr), "203.0.113.9") == enr
True
"""

from __future__ import annotations

import base64
from dataclasses import fields
from typing import Any

import orjson

from detector.core.lists import ListEntry, entry_from_dict
from detector.core.parse import decode_json
from detector.core.records import (
    CallbackRequest,
    Decision,
    Enrichment,
    IpCounts,
    IpInfo,
    Outcome,
    PhoneInfo,
)

MAX_DLQ_ORIGINAL = 64 * 1024  # bytes of the original message kept in a dead letter


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON (orjson: about ten times the speed of ``json``; non-string dict keys
    become strings, as ``json`` does)."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def loads(raw: bytes | str) -> Any:
    """Parse JSON; a malformed document raises ``ValueError`` (``orjson.JSONDecodeError``)."""
    return orjson.loads(raw)


def key_bytes(key: str | None) -> bytes | None:
    return None if key is None else key.encode("utf-8")


def request_to_wire(req: CallbackRequest) -> dict[str, Any]:
    return req.to_dict()


def request_from_wire(d: dict[str, Any]) -> CallbackRequest:
    """Inverse of :func:`request_to_wire` (internal topics only carry validated requests)."""
    return CallbackRequest(
        request_id=d["request_id"],
        ts=float(d["ts"]),
        phone_number=d["phone_number"],
        ip=d["ip"],
        country_hint=d.get("country_hint"),
        user_id=d.get("user_id"),
        authenticated=bool(d.get("authenticated", False)),
        session_id=d.get("session_id"),
        user_agent=d.get("user_agent"),
    )


_IP_COUNTS = tuple(f.name for f in fields(IpCounts))
_PHONE = tuple(f.name for f in fields(PhoneInfo))
_IP_INFO = tuple(f.name for f in fields(IpInfo) if f.name != "ip")  # the request has the IP


def ip_counts_to_wire(c: IpCounts) -> list[int]:
    return [getattr(c, name) for name in _IP_COUNTS]


def enrichment_to_wire(enr: Enrichment) -> list[Any]:
    """The phone and IP enrichment as one flat list (field order of PhoneInfo, then IpInfo
    without its ``ip``)."""
    p, i = enr.phone, enr.ip
    return [*(getattr(p, n) for n in _PHONE), *(getattr(i, n) for n in _IP_INFO)]


def enrichment_from_wire(v: list[Any], ip: str) -> Enrichment:
    """Inverse of :func:`enrichment_to_wire` for the request's ``ip``."""
    k = len(_PHONE)
    return Enrichment(PhoneInfo(*v[:k]), IpInfo(ip, *v[k:]))


def ip_counts_from_wire(v: list[int]) -> IpCounts:
    return IpCounts(*(int(x) for x in v))


def decision_to_wire(d: Decision) -> dict[str, Any]:
    """Same dict as :meth:`Decision.to_dict` (a test checks it) at a fraction of the cost:
    ``dataclasses.asdict`` deep-copies recursively, and the nested dicts here are fresh already."""
    return {
        "request_id": d.request_id,
        "action": str(d.action),
        "silent": d.silent,
        "risk": d.risk,
        "reasons": list(d.reasons),
        "enrichment": dict(d.enrichment),
        "counts": dict(d.counts),
        "policy_version": d.policy_version,
        "model_version": d.model_version,
        "decided_at": d.decided_at,
        "request_ts": d.request_ts,
        "ip_hash": d.ip_hash,
        "model": None if d.model is None else {
            k: list(v) if isinstance(v, list | tuple) else v for k, v in d.model.items()
        },
        "monitored_reasons": list(d.monitored_reasons),
        "cost_per_min": d.cost_per_min,
        "expected_cost": d.expected_cost,
        "currency": d.currency,
        "budget": None if d.budget is None else dict(d.budget),
    }


def outcome_to_wire(o: Outcome) -> dict[str, Any]:
    return o.to_dict()


def outcome_from_wire(d: dict[str, Any]) -> Outcome:
    return Outcome(d["request_id"], d["phone_number"], d["outcome"], float(d["ts"]),
                   float(d.get("duration_s") or 0.0))


def list_entry_to_wire(e: ListEntry) -> bytes:
    return dumps(e.to_dict())


def list_entry_from_wire(raw: bytes) -> ListEntry:
    """Parse a ``detector-lists`` value (signature not checked: see :mod:`detector.core.signing`);
    raises only InputError on a bad one."""
    return entry_from_dict(decode_json(raw))


def dead_letter(
    *, kind: str, error: str, topic: str, partition: int, offset: int,
    original: bytes | None, key: bytes | None = None, timestamp: float | None = None,
) -> dict[str, Any]:
    """The dead-letter record of a message that could not be processed (original kept as base64)."""
    raw = original or b""
    return {
        "error_kind": kind,
        "error": error,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp": timestamp,
        "key_b64": None if key is None else base64.b64encode(key[:1024]).decode("ascii"),
        "original_b64": base64.b64encode(raw[:MAX_DLQ_ORIGINAL]).decode("ascii"),
        "original_size": len(raw),
        "truncated": len(raw) > MAX_DLQ_ORIGINAL,
    }
