"""Masked forms of phone numbers for people to read (reports, the decision log, dashboards).

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
"""

from __future__ import annotations

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
