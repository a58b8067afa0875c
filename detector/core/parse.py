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
import math
import re
from datetime import datetime
from typing import Any

import orjson

from detector.core.errors import (
    EventTimeOutOfRange,
    InvalidField,
    MalformedMessage,
    MessageTooLarge,
    MissingField,
)
from detector.core.records import CallbackRequest

MAX_ID_LEN = 128
MAX_PHONE_LEN = 64
MAX_TEXT_LEN = 512
MAX_TS_TEXT_LEN = 40  # longest RFC 3339 timestamp we read (with fractions and offset)
MAX_IP_TEXT_LEN = 64  # longest textual IPv6 address with an IPv4 tail and a zone
# No valid request comes near this: every field is capped, the whole is a few hundred bytes.
MAX_MESSAGE_BYTES = 16 * 1024
# Earliest and latest plausible event times: 2000-01-01 .. 2100-01-01 (catches ms-vs-s mistakes).
MIN_TS, MAX_TS = 946_684_800.0, 4_102_444_800.0


def decode_json(raw: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode one UTF-8 JSON object; raise :class:`MalformedMessage` explaining what is wrong.

    Never raises anything but :class:`InputError`: invalid UTF-8, nesting deeper than 1,024,
    integers beyond 64 bits and non-finite numbers are malformed JSON here (orjson's limits),
    and a message over ``max_bytes`` is rejected before it is parsed.
    """
    if raw.__class__ is bytes:  # the usual case, first
        data = raw
    elif isinstance(raw, str):
        try:
            data = raw.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates
            raise MalformedMessage(f"message is not valid UTF-8 ({exc.reason})") from None
    elif isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
    else:
        raise MalformedMessage(f"expected bytes holding a JSON object, got {type(raw).__name__}")
    if len(data) > max_bytes:
        raise MessageTooLarge(f"message is {len(data):,} bytes; at most {max_bytes:,} expected")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if not data.strip():  # checked here, not before: a copy of every message otherwise
            raise MalformedMessage("message is empty; expected a JSON object") from None
        raise MalformedMessage(f"message is not JSON: {_json_error(exc)}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"expected a JSON object, got a JSON {type(obj).__name__}")
    return obj


def _json_error(exc: orjson.JSONDecodeError) -> str:
    # orjson's message ends with the position; "is not valid UTF-8" style messages say enough.
    msg = str(exc.msg) if getattr(exc, "msg", None) else str(exc)
    return f"{msg} at line {exc.lineno} column {exc.colno}"


def _text(obj: dict[str, Any], name: str, *, required: bool, max_len: int) -> str | None:
    value = obj.get(name)
    if value.__class__ is str and len(value) <= max_len:  # the usual case, checked in one go
        text = value.strip()
        if text or not required:
            return text or None
    if value is None:
        if required:
            raise MissingField(name)
        return None
    if not isinstance(value, str):
        raise InvalidField(name, "a string", value)
    if len(value) > 4 * max_len:  # do not strip a megabyte to find out
        raise InvalidField(name, f"at most {max_len} characters", value)
    value = value.strip()
    if required and not value:
        raise InvalidField(name, "a non-empty string", obj[name])
    if len(value) > max_len:
        raise InvalidField(name, f"at most {max_len} characters", value)
    return value or None


def parse_ts(value: Any, name: str = "ts") -> float:
    """Epoch seconds (int/float) or an RFC 3339 string with a time zone, to epoch seconds.

    Any value outside 2000..2100 (negative, NaN, infinite, 10**400, milliseconds) is an
    :class:`InvalidField` naming ``name``, never an OverflowError or ValueError."""
    expected_epoch = "epoch seconds between 2000 and 2100 (not milliseconds)"
    if isinstance(value, bool):
        raise InvalidField(name, "epoch seconds or an RFC 3339 timestamp", value)
    if isinstance(value, int):
        if not MIN_TS <= value <= MAX_TS:  # compare as int: float(10**400) would overflow
            raise InvalidField(name, expected_epoch, _short_number(value))
        return float(value)
    if isinstance(value, float):
        if not math.isfinite(value) or not MIN_TS <= value <= MAX_TS:
            raise InvalidField(name, expected_epoch, value)
        return value
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_TS_TEXT_LEN:
            raise InvalidField(name, "an RFC 3339 timestamp like 2026-11-22T10:00:00Z", value)
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidField(
                name, "an RFC 3339 timestamp like 2026-11-22T10:00:00Z", value
            ) from None
        if dt.tzinfo is None:
            raise InvalidField(name, "an RFC 3339 timestamp with a time zone (Z or +hh:mm)", value)
        try:
            ts = dt.timestamp()
        except (OverflowError, ValueError, OSError):
            raise InvalidField(name, expected_epoch, value) from None
        return parse_ts(ts, name)
    raise InvalidField(name, "epoch seconds or an RFC 3339 timestamp", value)


def _short_number(value: int) -> str:
    """A huge integer shown without converting all its digits (str() refuses > 4,300 digits)."""
    if -(10**30) < value < 10**30:
        return str(value)
    return f"an integer of about {int(value.bit_length() * 0.30103)} digits"


def check_event_time(ts: float, now: float, *, max_future_s: float, max_past_s: float,
                     name: str = "ts") -> float:
    """``ts`` if it is at most ``max_future_s`` ahead of ``now`` and ``max_past_s`` behind it
    (0 = that side unchecked); else :class:`EventTimeOutOfRange`.

    >>> check_event_time(1000.0, 1000.0, max_future_s=300, max_past_s=86400)
    1000.0
    >>> check_event_time(4e9, 1.8e9, max_future_s=300, max_past_s=86400)
    Traceback (most recent call last):
    ...
    detector.core.errors.EventTimeOutOfRange: field 'ts': 2200000000 s ahead of the clock; ...
    """
    if max_future_s > 0 and ts > now + max_future_s:
        raise EventTimeOutOfRange(
            f"field {name!r}: {ts - now:.0f} s ahead of the clock; at most {max_future_s:.0f} s allowed",
            field=name,
        )
    if max_past_s > 0 and ts < now - max_past_s:
        raise EventTimeOutOfRange(
            f"field {name!r}: {now - ts:.0f} s behind the clock; at most {max_past_s:.0f} s allowed",
            field=name,
        )
    return ts


# A dotted quad without leading zeros (which ``ipaddress`` refuses) and with every part <= 255:
# exactly the IPv4 texts that ``str(ipaddress.ip_address(text))`` returns unchanged. Checking it
# costs a tenth of building the address object (4 us per request on the replay benchmark).
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


_IPV6_CHARS = re.compile("[0-9a-f:]{2,39}")


def _canonical_ipv6(text: str) -> bool:
    """True when ``text`` is an IPv6 address in exactly the form ``str(ipaddress.ip_address())``
    gives it (RFC 5952: lower-case hex without leading zeros, the longest run of two or more
    zero groups, the first of equal runs, written ``::``) and not IPv4-mapped (which parse_ip
    unwraps). A third of the cost of building the address object and printing it back
    (13 us); anything else (IPv4 tails, zones, other spellings) takes that road."""
    if not _IPV6_CHARS.fullmatch(text):
        return False
    head, sep, tail = text.partition("::")
    groups = (head.split(":") if head else []) + (tail.split(":") if tail else [])
    zeros = 8 - len(groups)
    if (zeros < 2) if sep else (zeros != 0):
        return False
    for g in groups:  # no empty group, at most 4 digits, no leading zero
        if not g or len(g) > 4 or (g[0] == "0" and g != "0"):
            return False
    full = (head.split(":") if head else []) + ["0"] * zeros + (tail.split(":") if tail else [])
    if full[:6] == ["0", "0", "0", "0", "0", "ffff"]:
        return False
    # the longest run of "0" groups (the first of equal ones): it alone is written "::"
    best_start, best_len, start, run = -1, 0, -1, 0
    for i, g in enumerate(full):
        if g == "0":
            if run == 0:
                start = i
            run += 1
            if run > best_len:
                best_start, best_len = start, run
        else:
            run = 0
    if best_len < 2:
        return not sep
    return bool(sep) and best_start == len(head.split(":") if head else []) and best_len == zeros


def parse_ip(value: Any) -> str:
    """Normalized textual IPv4/IPv6 address (IPv4-mapped IPv6 is unwrapped)."""
    if not isinstance(value, str):
        raise InvalidField("ip", "an IPv4 or IPv6 address string", value)
    if len(value) > MAX_IP_TEXT_LEN:
        raise InvalidField("ip", "an IPv4 or IPv6 address", value)
    text = value.strip()
    if _CANONICAL_IPV4.fullmatch(text) or _canonical_ipv6(text):  # already the normalized form
        return text
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidField("ip", "an IPv4 or IPv6 address", value) from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def parse_request(raw: bytes | str | dict[str, Any]) -> CallbackRequest:
    """Validate one callback request. Unknown fields are ignored.

    Raises only :class:`~detector.core.errors.InputError` (and its children) on bad input."""
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
    return CallbackRequest(  # positional, in field order (keywords cost more than the rest)
        request_id,
        ts,
        phone,  # phone_number
        ip,
        hint,  # country_hint
        _text(obj, "user_id", required=False, max_len=MAX_ID_LEN),
        authenticated,
        _text(obj, "session_id", required=False, max_len=MAX_ID_LEN),
        _text(obj, "user_agent", required=False, max_len=MAX_TEXT_LEN),
    )
