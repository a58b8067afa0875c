"""Masked forms of phone numbers and IP addresses for people to read (reports, the decision log, dashboards).

A masked number keeps the country code, the first half of the national number and its last two
digits, in the international format: enough for a support agent to match a customer's number
read out on the phone, not enough to dial it.

>>> mask_number("+447700900123")
'+44 7700 9•• •23'
>>> mask_number("+33612345678")
'+33 6 12 34 •• 78'
>>> mask_number("+35356821")
'+353 56• 21'
>>> mask_number(None)
'(no number)'

An IP address keeps its network part only (IPv4: the first two octets, IPv6: the first two
groups), enough to tell a datacentre from a mobile carrier, not to find the visitor:

>>> mask_ip("203.0.113.9"), mask_ip("2001:db8:85a3::8a2e:370:7334"), mask_ip("bogus")
('203.0.•.•', '2001:db8:•', '(invalid IP)')
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

import phonenumbers

MASK = "•"


@lru_cache(maxsize=65_536)
def mask_number(e164: str | None) -> str:
    """``e164`` in the international format with the middle of its national number masked."""
    if not e164:
        return "(no number)"
    try:
        num = phonenumbers.parse(e164, None)
        text = phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
        cc = f"+{num.country_code}"
    except phonenumbers.NumberParseException:
        text, cc = e164, e164[:3]
    head, rest = text[: len(cc)], text[len(cc):]
    # Long digit groups read better in threes: 7700 900123 -> 7700 900 123.
    rest = " ".join(
        " ".join(g[i : i + 3] for i in range(0, len(g), 3)) if len(g) > 4 and g.isdigit() else g
        for g in rest.split(" ")
    )
    digits = [i for i, ch in enumerate(rest) if ch.isdigit()]
    keep_first = max(1, min((len(digits) + 1) // 2, len(digits) - 3))  # at least one digit masked
    masked = set(digits[keep_first:-2]) if len(digits) > 4 else set(digits[1:])
    return head + "".join(MASK if i in masked else ch for i, ch in enumerate(rest))


def mask_ip(ip: str | None) -> str:
    """``ip`` with its host part masked (see the module doc); never the full address."""
    try:
        addr = ipaddress.ip_address((ip or "").strip())
    except ValueError:
        return "(invalid IP)"
    if addr.version == 4:
        a, b = str(addr).split(".")[:2]
        return f"{a}.{b}.{MASK}.{MASK}"
    groups = addr.exploded.split(":")[:2]
    return ":".join(g.lstrip("0") or "0" for g in groups) + f":{MASK}"
