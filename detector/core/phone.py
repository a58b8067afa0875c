"""Phone-number enrichment with ``phonenumbers``: E.164, validity, region, type, range key and
time zone, from one parse of the number as typed (cached by the raw string).

>>> info = enrich_phone("+44 20 7946 0018", None)
>>> (info.e164, info.valid, info.region, info.number_type, info.range_key, info.time_zone)
('+442079460018', True, 'GB', 'FIXED_LINE', '+442079460', 'Europe/London')
>>> enrich_phone("020 7946 0018", "GB").e164
'+442079460018'
>>> enrich_phone("12345", None).error
'national-format number without country_hint'
"""

from __future__ import annotations

from functools import lru_cache

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType
from phonenumbers import timezone as pn_timezone

from detector.core.records import PhoneInfo

#: phonenumbers' integer type codes to stable names (MOBILE, FIXED_LINE, PREMIUM_RATE, ...).
TYPE_NAMES: dict[int, str] = {
    value: name
    for name, value in vars(PhoneNumberType).items()
    if name.isupper() and isinstance(value, int)
}

DEFAULT_RANGE_DIGITS = 3


def range_key_of(e164: str, digits: int) -> str:
    """The number without its last ``digits`` digits: the block a range seller leases.

    >>> range_key_of("+252905551234", 3)
    '+252905551'
    """
    keep = max(len(e164) - digits, 2)
    return e164[:keep]


def _clean(raw: str) -> str:
    text = raw.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    return text


def enrich_phone(
    raw: str, country_hint: str | None, range_digits: int = DEFAULT_RANGE_DIGITS
) -> PhoneInfo:
    """Parse and classify a number as typed. Never raises: failures are in ``error``.

    Numbers in national format need ``country_hint``; E.164 (``+...`` or ``00...``) does not.
    Results are cached by (raw, hint) (see :func:`set_cache_size`): parsing, typing and the
    time zone cost ~30 us.
    """
    return _cached(raw, country_hint, range_digits)


def set_cache_size(entries: int) -> None:
    """Keep the ``entries`` most recent numbers parsed (200,000 by default: ~80 MB when full,
    which a replay can afford; a worker keeps fewer, see ``detector.stream.worker``)."""
    global _cached
    _cached = lru_cache(maxsize=entries)(_enrich_phone)


def _enrich_phone(raw: str, country_hint: str | None, range_digits: int) -> PhoneInfo:
    text = _clean(raw)
    if not text.startswith("+") and not country_hint:
        return _unparsed("national-format number without country_hint")
    try:
        num = phonenumbers.parse(text, None if text.startswith("+") else country_hint)
    except NumberParseException as exc:
        return _unparsed(f"not a phone number: {exc._msg}")
    e164 = phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
    region = phonenumbers.region_code_for_number(num)
    # is_valid_number() is "region known and number_type() != UNKNOWN"; computing the type once
    # halves the cost (~30 us) on the many numbers seen only once.
    ntype = phonenumbers.number_type(num) if region is not None else PhoneNumberType.UNKNOWN
    valid = ntype != PhoneNumberType.UNKNOWN
    number_type = TYPE_NAMES.get(ntype, "UNKNOWN") if valid else "INVALID"
    return PhoneInfo(
        e164=e164,
        parsed=True,
        possible=phonenumbers.is_possible_number(num),
        valid=valid,
        region=region if region and region != "ZZ" else None,
        country_code=num.country_code,
        number_type=number_type,
        range_key=(range_key := range_key_of(e164, range_digits)),
        time_zone=_time_zone(num, ntype) if valid else _block_time_zone(range_key),
    )


_cached = lru_cache(maxsize=200_000)(_enrich_phone)


def _time_zone(num: phonenumbers.PhoneNumber, ntype: int) -> str | None:
    """The first time zone ``phonenumbers.timezone.time_zones_for_number`` gives a valid number,
    reusing its type (which that function would compute a second time): the prefix's zones for
    a geographic type, the country's otherwise."""
    cc: int = num.country_code or 0  # never 0: a valid number has a calling code
    if phonenumbers.is_number_type_geographical(ntype, cc):
        zones = pn_timezone.time_zones_for_geographical_number(num)
        return next((z for z in zones if z != pn_timezone.UNKNOWN_TIMEZONE), None)
    # Mobile (in most countries), VoIP, premium, ...: the country's zones, which depend on the
    # calling code alone; asked of the library once per calling code.
    if cc not in _COUNTRY_ZONE:
        zones = pn_timezone.time_zones_for_number(num)
        _COUNTRY_ZONE[cc] = next((z for z in zones if z != pn_timezone.UNKNOWN_TIMEZONE), None)
    return _COUNTRY_ZONE[cc]


_COUNTRY_ZONE: dict[int, str | None] = {}


@lru_cache(maxsize=4096)
def _block_time_zone(range_key: str) -> str | None:
    """An invalid number has no zone of its own: its block's, i.e. that of ``range_key`` + 000
    (the block's first number with the default range size), when that one is valid.

    >>> _block_time_zone("+4930123"), _block_time_zone("+99")
    ('Europe/Berlin', None)
    """
    try:
        num = phonenumbers.parse(range_key + "000", None)
    except NumberParseException:
        return None
    zones = pn_timezone.time_zones_for_number(num)
    return next((z for z in zones if z != pn_timezone.UNKNOWN_TIMEZONE), None)


def time_zone_of(e164: str | None) -> str | None:
    """:attr:`PhoneInfo.time_zone` of an E.164 number (for records that carry only that).

    >>> time_zone_of("+33612345678"), time_zone_of(None)
    ('Europe/Paris', None)
    """
    return enrich_phone(e164, None).time_zone if e164 else None


def _unparsed(error: str) -> PhoneInfo:
    return PhoneInfo(
        e164=None,
        parsed=False,
        possible=False,
        valid=False,
        region=None,
        country_code=None,
        number_type="INVALID",
        range_key=None,
        error=error,
    )


def routing_key(info: PhoneInfo, raw: str) -> str:
    """Key that co-partitions a number, its range and every IP x number pair on it.

    Unparseable input gets a stable pseudo-range from its digits so it is still counted.
    """
    if info.range_key is not None:
        return info.range_key
    digits = "".join(ch for ch in raw if ch.isdigit())
    return "?" + digits[: max(len(digits) - DEFAULT_RANGE_DIGITS, 0)]
