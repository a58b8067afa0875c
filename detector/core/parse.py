"""Turn untrusted bytes / dicts into :class:`CallbackRequest`, or raise a precise :class:`InputError`.

>>> r = parse_request(b'{"request_id": "r1", "ts": "2026-11-22T10:00:00Z",'
...                   b' "phone_number": "+44 20 7946 0000", "ip": "203.0.113.9"}')
>>> (r.request_id, r.ts, r.authenticated)
('r1', 1795341600.0, False)
>>> parse_request({"request_id": "r1", "ts": 1.8e9, "phone_number": "1", "ip": "300.1.1.1"})
Traceback (most recent call last):
...
detector.core.errors.InvalidField: field 'ip': expected an IPv4 or IPv6 address, got '300.1.1.1'
"""

from __future__ import annotations

import ipaddress
import json
import math
from datetime import datetime
from typing import Any

from detector.core.errors import InvalidField, MalformedMessage, MissingField
from detector.core.records import CallbackRequest

MAX_ID_LEN = 128
MAX_PHONE_LEN = 64
MAX_TEXT_LEN = 512
# Earliest and latest plausible event times: 2000-01-01 .. 2100-01-01 (catches ms-vs-s mistakes).
MIN_TS, MAX_TS = 946_684_800.0, 4_102_444_800.0


def decode_json(raw: bytes | str) -> dict[str, Any]:
    """Decode one UTF-8 JSON object; raise :class:`MalformedMessage` explaining what is wrong."""
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessage(
                f"message is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from exc
    else:
        text = raw
    if not text.strip():
        raise MalformedMessage("message is empty; expected a JSON object")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedMessage(
            f"message is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    if not isinstance(obj, dict):
        raise MalformedMessage(f"expected a JSON object, got a JSON {type(obj).__name__}")
    return obj


def _text(obj: dict[str, Any], name: str, *, required: bool, max_len: int) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise MissingField(name)
        return None
    if not isinstance(value, str):
        raise InvalidField(name, "a string", value)
    value = value.strip()
    if required and not value:
        raise InvalidField(name, "a non-empty string", obj[name])
    if len(value) > max_len:
        raise InvalidField(name, f"at most {max_len} characters", value)
    return value or None


def parse_ts(value: Any) -> float:
    """Epoch seconds (int/float) or an RFC 3339 string with a time zone, to epoch seconds."""
    if isinstance(value, bool):
        raise InvalidField("ts", "epoch seconds or an RFC 3339 timestamp", value)
    if isinstance(value, int | float):
        ts = float(value)
        if not math.isfinite(ts) or not MIN_TS <= ts <= MAX_TS:
            raise InvalidField(
                "ts", "epoch seconds between 2000 and 2100 (not milliseconds)", value
            )
        return ts
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidField(
                "ts", "an RFC 3339 timestamp like 2026-11-22T10:00:00Z", value
            ) from None
        if dt.tzinfo is None:
            raise InvalidField("ts", "an RFC 3339 timestamp with a time zone (Z or +hh:mm)", value)
        return parse_ts(dt.timestamp())
    raise InvalidField("ts", "epoch seconds or an RFC 3339 timestamp", value)


def parse_ip(value: Any) -> str:
    """Normalized textual IPv4/IPv6 address (IPv4-mapped IPv6 is unwrapped)."""
    if not isinstance(value, str):
        raise InvalidField("ip", "an IPv4 or IPv6 address string", value)
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise InvalidField("ip", "an IPv4 or IPv6 address", value) from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def parse_request(raw: bytes | str | dict[str, Any]) -> CallbackRequest:
    """Validate one callback request. Unknown fields are ignored."""
    obj = raw if isinstance(raw, dict) else decode_json(raw)
    request_id = _text(obj, "request_id", required=True, max_len=MAX_ID_LEN)
    if obj.get("ts") is None:
        raise MissingField("ts")
    ts = parse_ts(obj["ts"])
    phone = _text(obj, "phone_number", required=True, max_len=MAX_PHONE_LEN)
    if obj.get("ip") is None:
        raise MissingField("ip")
    ip = parse_ip(obj["ip"])
    hint = _text(obj, "country_hint", required=False, max_len=2)
    if hint is not None:
        if len(hint) != 2 or not hint.isalpha() or not hint.isascii():
            raise InvalidField(
                "country_hint", "an ISO 3166 alpha-2 code like 'GB'", obj["country_hint"]
            )
        hint = hint.upper()
    authenticated = obj.get("authenticated", False)
    if authenticated is None:
        authenticated = False
    if not isinstance(authenticated, bool):
        raise InvalidField("authenticated", "true or false", authenticated)
    assert request_id is not None and phone is not None
    return CallbackRequest(
        request_id=request_id,
        ts=ts,
        phone_number=phone,
        ip=ip,
        country_hint=hint,
        user_id=_text(obj, "user_id", required=False, max_len=MAX_ID_LEN),
        authenticated=authenticated,
        session_id=_text(obj, "session_id", required=False, max_len=MAX_ID_LEN),
        user_agent=_text(obj, "user_agent", required=False, max_len=MAX_TEXT_LEN),
    )
