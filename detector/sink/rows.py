"""Decision and outcome messages to decision-log rows, with no raw IP and no raw number.

The number is kept as a keyed hash (``pii_hash`` with ``DETECTOR_PII_HASH_KEY``: the same hash
``detector explain --number`` computes) and a masked form; its E.164 form only when the
``store_numbers`` setting allows it. Decisions carry no raw IP in the first place (``ip_hash``).
"""

from __future__ import annotations

import time
from typing import Any

from detector.core.errors import InvalidField, MissingField
from detector.core.mask import mask_number
from detector.core.phone import enrich_phone
from detector.core.records import OUTCOMES
from detector.core.state import pii_hash

NUMBER_FIELDS = ("e164", "range_key")  # dropped from the stored enrichment unless numbers are kept


def number_hash(e164: str | None, key: bytes) -> str | None:
    return None if not e164 else pii_hash(e164, key)


def normalize_number(raw: str, country_hint: str | None = None) -> str:
    """E.164 of a number as typed (what decisions carry), or its bare digits if it does not parse."""
    info = enrich_phone(raw, country_hint)
    return info.e164 or "?" + "".join(c for c in raw if c.isdigit())


def decision_row(d: dict[str, Any], key: bytes, *, store_numbers: bool = False,
                 now: float | None = None) -> dict[str, Any]:
    """The ``decisions`` row of a decision message (``Decision.to_dict()``)."""
    for name in ("request_id", "action", "reasons", "decided_at", "request_ts", "policy_version", "ip_hash"):
        if d.get(name) is None:
            raise MissingField(name)
    if not isinstance(d["request_id"], str):
        raise InvalidField("request_id", "a string", d["request_id"])
    if d["action"] not in ("allow", "deflect", "block"):
        raise InvalidField("action", "allow, deflect or block", d["action"])
    enr = dict(d.get("enrichment") or {})
    e164 = enr.get("e164")
    if not store_numbers:
        for f in NUMBER_FIELDS:
            enr.pop(f, None)
    return {
        "request_id": d["request_id"],
        "decided_at": float(d["decided_at"]),
        "request_ts": float(d["request_ts"]),
        "action": d["action"],
        "silent": bool(d.get("silent")),
        "risk": float(d.get("risk") or 0.0),
        "reasons": ",".join(d["reasons"]),
        "monitored_reasons": ",".join(d.get("monitored_reasons") or ()),
        "policy_version": str(d["policy_version"]),
        "model_version": d.get("model_version"),
        "number_hash": number_hash(e164, key),
        "number_masked": mask_number(e164),
        "number_e164": e164 if store_numbers else None,
        "number_country": enr.get("number_country"),
        "number_type": enr.get("number_type"),
        "ip_hash": d["ip_hash"],
        "ip_country": enr.get("ip_country"),
        "asn": enr.get("asn"),
        "enrichment": enr,
        "counts": dict(d.get("counts") or {}),
        "model": d.get("model"),
        "stored_at": time.time() if now is None else now,
        "cost_per_min": _money(d, "cost_per_min", nullable=True),
        "expected_cost": _money(d, "expected_cost", nullable=False),
        "currency": d.get("currency") if isinstance(d.get("currency"), str) else None,
        "budget": d.get("budget") if isinstance(d.get("budget"), dict) else None,
    }


def _money(d: dict[str, Any], name: str, *, nullable: bool) -> float | None:
    """A money field of a decision: a finite number >= 0 (absent in decisions made before cost at
    risk existed: None, or 0 for the expected cost)."""
    import math

    v = d.get(name)
    if v is None:
        return None if nullable else 0.0
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise InvalidField(name, "a number >= 0", v)
    return float(v)


def outcome_row(o: dict[str, Any], key: bytes, *, now: float | None = None) -> dict[str, Any]:
    """The ``outcomes`` row of a dialer outcome message (number hashed, never stored)."""
    for name in ("request_id", "outcome"):
        if not isinstance(o.get(name), str):
            raise MissingField(name) if o.get(name) is None else InvalidField(name, "a string", o[name])
    if o["outcome"] not in OUTCOMES:
        raise InvalidField("outcome", f"one of {', '.join(OUTCOMES)}", o["outcome"])
    from detector.core.parse import parse_ts

    phone = o.get("phone_number")
    return {
        "request_id": o["request_id"],
        "outcome": o["outcome"],
        "ts": parse_ts(o["ts"]) if o.get("ts") is not None else time.time(),
        "duration_s": float(o.get("duration_s") or 0.0),
        "number_hash": number_hash(normalize_number(phone), key) if isinstance(phone, str) else None,
        "stored_at": time.time() if now is None else now,
    }
