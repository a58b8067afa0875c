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

import re
import traceback
from functools import lru_cache
from typing import Any

import phonenumbers
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, NumberParseException, PhoneNumberType
from phonenumbers import timezone as pn_timezone
from phonenumbers.phonemetadata import PhoneMetadata

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
        region = None if text.startswith("+") else country_hint
        num = _parse_plain(text, region)
        if num is None:
            num = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        # The library keeps the exception it caught in a local of its own frame (a reference
        # cycle through the traceback, whose frames reach this one and its callers: every
        # caller's locals, e.g. the whole replay state, would wait for the cyclic collector).
        traceback.clear_frames(exc.__traceback__)
        return _unparsed(f"not a phone number: {exc._msg}")
    e164 = phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
    # is_valid_number() is "region known and number_type() != UNKNOWN": region and type at once
    nsn = phonenumbers.national_significant_number(num)
    region, ntype = _region_and_type(num.country_code or 0, nsn)
    valid = ntype != PhoneNumberType.UNKNOWN
    number_type = TYPE_NAMES.get(ntype, "UNKNOWN") if valid else "INVALID"
    possible = _POSSIBLE.get(pkey := (num.country_code, len(nsn)))
    if possible is None:  # a function of the calling code and the length alone (see _POSSIBLE)
        possible = _POSSIBLE[pkey] = phonenumbers.is_possible_number(num)
    return PhoneInfo(
        e164=e164,
        parsed=True,
        possible=possible,
        valid=valid,
        region=region if region and region != "ZZ" else None,
        country_code=num.country_code,
        number_type=number_type,
        range_key=(range_key := range_key_of(e164, range_digits)),
        time_zone=_time_zone(num, ntype) if valid else _block_time_zone(range_key),
    )


_cached = lru_cache(maxsize=200_000)(_enrich_phone)

_pnu = phonenumbers.phonenumberutil
_PLAIN = re.compile(rf"\+?[0-9]{{3,{_pnu._MAX_LENGTH_COUNTRY_CODE + _pnu._MAX_LENGTH_FOR_NSN}}}")
_SHORT = (_pnu.ValidationResult.TOO_SHORT, _pnu.ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
          _pnu.ValidationResult.INVALID_LENGTH)


def _parse_plain(text: str, region: str | None) -> phonenumbers.PhoneNumber | None:
    """``phonenumbers.parse(text, region)`` for ASCII digits, with or without a leading ``+``
    (spaces allowed): the forms requests carry. None for anything else, or anything the
    library would reject; the caller then gives the text to ``phonenumbers.parse`` itself.

    For such text the library's first steps (RFC 3966 context, extracting the number from
    surrounding text, viability, extensions, letters, normalising the digits) leave the digits
    as they are, and cost two thirds of its ~11 us. The rest is the library's own code, called
    in its order (``phonenumberutil.parse``): the calling code (after ``+``, or an IDD prefix
    or the hint region's code, ``_maybe_extract_country_code``), the national prefix kept off
    only when the rest is of a possible length, the length limits, Italian leading zeros.
    Tests compare both on example numbers of every calling code and region written both
    ways, their variations and random digit strings."""
    if " " in text:
        text = text.replace(" ", "")
    if _PLAIN.fullmatch(text) is None:
        return None
    num = phonenumbers.PhoneNumber()
    if text[0] == "+":
        cc, national = _pnu._extract_country_code(text[1:])
        if cc == 0:
            return None  # the library raises; let it say why
        num.country_code = cc
        region = None
        metadata = None
    else:
        if not _pnu._is_valid_region_code(region):
            return None
        assert region is not None  # checked just above
        metadata = PhoneMetadata.metadata_for_region(region.upper(), None)
        if metadata is None:  # pragma: no cover - a supported region has metadata
            return None
        try:
            cc, national = _pnu._maybe_extract_country_code(text, metadata, False, num)
        except NumberParseException:
            return None
    if cc != 0:
        number_region = _pnu.region_code_for_country_code(cc)
        if number_region != region:
            metadata = PhoneMetadata.metadata_for_region_or_calling_code(cc, number_region)
    elif metadata is not None and metadata.country_code is not None:
        national = text  # no calling code in the text: the hint region's
        cc = num.country_code = metadata.country_code
    if metadata is None or len(national) < _pnu._MIN_LENGTH_FOR_NSN:
        return None
    _, stripped, _ = _pnu._maybe_strip_national_prefix_carrier_code(national, metadata)
    if _pnu._test_number_length(stripped, metadata) not in _SHORT:
        national = stripped
    if not _pnu._MIN_LENGTH_FOR_NSN <= len(national) <= _pnu._MAX_LENGTH_FOR_NSN:
        return None
    _pnu._set_italian_leading_zeros_for_phone_number(national, num)
    num.national_number = int(national)
    return num


#: ``phonenumbers.is_possible_number`` by (calling code, length of the national significant
#: number): the library decides it from the calling code's main region's possible lengths and
#: the number's length only (``_test_number_length``); bounded by codes x lengths.
_POSSIBLE: dict[tuple[int | None, int], bool] = {}

_UNKNOWN = PhoneNumberType.UNKNOWN
#: the order in which ``phonenumbers`` (``_number_type_helper``) tries the types before the
#: fixed-line / mobile pair: the first whose pattern matches is the number's type.
_SPECIAL_TYPES = (
    ("premium_rate", PhoneNumberType.PREMIUM_RATE), ("toll_free", PhoneNumberType.TOLL_FREE),
    ("shared_cost", PhoneNumberType.SHARED_COST), ("voip", PhoneNumberType.VOIP),
    ("personal_number", PhoneNumberType.PERSONAL_NUMBER), ("pager", PhoneNumberType.PAGER),
    ("uan", PhoneNumberType.UAN), ("voicemail", PhoneNumberType.VOICEMAIL),
)  # fmt: skip

_Matcher = tuple[
    re.Pattern[str] | None,  # general_desc (None: no number of this length is valid)
    re.Pattern[str] | None,  # the candidate types' patterns in one alternation (see _matcher)
    dict[str, int],  # its group names -> types
    tuple[tuple[re.Pattern[str], int], ...],  # the candidates one by one, when not combined
    re.Pattern[str] | None,  # mobile (a fixed-line match is FIXED_LINE_OR_MOBILE if it matches)
    bool,  # same_mobile_and_fixed_line_pattern
]
_UNSAFE_TO_COMBINE = re.compile(r"\\[1-9]|\(\?P|\(\?[aiLmsux]")  # backreferences, names, flags


def _desc_text(desc: Any, length: int) -> str | None:
    """The pattern of a ``PhoneNumberDesc`` for numbers of ``length`` digits, or None when the
    library's ``_is_number_matching_desc`` is False for every such number (no desc, a
    possible-length list without ``length``, no pattern)."""
    if desc is None or (desc.possible_length and length not in desc.possible_length):
        return None
    return desc.national_number_pattern or None


def _matcher(metadata: Any, length: int) -> _Matcher:
    """What ``_number_type_helper`` checks for a ``metadata``'s numbers of ``length`` digits,
    compiled once. The library looks each pattern up in ``re``'s cache and runs it twice per
    check (``match`` then ``fullmatch``: only ``fullmatch`` decides when no prefix match is
    allowed), trying premium rate, toll free, ..., fixed line, mobile one after the other.
    Here they are one alternation, each pattern in a named group, in the library's order: a
    full match takes the first alternative that matches the whole number, i.e. the type the
    library would return first (``lastgroup`` names it). Kept per (metadata object, length):
    bounded by regions x lengths; the library keeps its metadata objects for good."""
    key = (id(metadata), length)
    hit = _MATCHERS.get(key)
    if hit is not None and hit[0] is metadata:
        return hit[1]
    same = bool(metadata.same_mobile_and_fixed_line_pattern)
    candidates = [(text, t) for name, t in _SPECIAL_TYPES
                  if (text := _desc_text(getattr(metadata, name), length)) is not None]
    if (text := _desc_text(metadata.fixed_line, length)) is not None:
        candidates.append((text, PhoneNumberType.FIXED_LINE))
    mobile = _desc_text(metadata.mobile, length)
    if mobile is not None and not same:
        candidates.append((mobile, PhoneNumberType.MOBILE))
    combined: re.Pattern[str] | None = None
    names: dict[str, int] = {}
    ordered: tuple[tuple[re.Pattern[str], int], ...] = ()
    if all(_UNSAFE_TO_COMBINE.search(text) is None for text, _ in candidates):
        if candidates:
            combined = re.compile("|".join(f"(?P<t{i}>{text})" for i, (text, _) in
                                           enumerate(candidates)))
            names = {f"t{i}": t for i, (_, t) in enumerate(candidates)}
    else:  # pragma: no cover - no such pattern in phonenumbers' metadata today
        ordered = tuple((re.compile(text), t) for text, t in candidates)
    general = _desc_text(metadata.general_desc, length)
    matcher: _Matcher = (
        re.compile(general) if general else None, combined, names, ordered,
        re.compile(mobile) if mobile else None, same,
    )  # fmt: skip
    _MATCHERS[key] = (metadata, matcher)
    return matcher


_MATCHERS: dict[tuple[int, int], tuple[Any, _Matcher]] = {}


def _type_of(nsn: str, metadata: Any) -> int:
    """``phonenumbers._number_type_helper(nsn, metadata)``: the same checks in the same order
    with precompiled patterns, two regular expressions for most numbers instead of up to ten
    (equal on every number tested, see tests)."""
    general, combined, names, ordered, mobile, same = _matcher(metadata, len(nsn))
    if general is None or general.fullmatch(nsn) is None:
        return _UNKNOWN
    ntype = _UNKNOWN
    if combined is not None:
        m = combined.fullmatch(nsn)
        if m is not None and m.lastgroup is not None:
            ntype = names[m.lastgroup]
    else:
        ntype = next((t for pattern, t in ordered if pattern.fullmatch(nsn) is not None), _UNKNOWN)
    if ntype == PhoneNumberType.FIXED_LINE and (
            same or (mobile is not None and mobile.fullmatch(nsn) is not None)):
        return PhoneNumberType.FIXED_LINE_OR_MOBILE
    return ntype


@lru_cache(maxsize=1024)
def _leading_digits(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _region_and_type(cc: int, nsn: str) -> tuple[str | None, int]:
    """``(region_code_for_number(num), number_type(num) if that region is not None else
    UNKNOWN)`` for a number of calling code ``cc`` and national significant number ``nsn``.

    The library's ``number_type`` finds the region again, and for a calling code shared by
    several regions (+44: GB, GG, IM, JE; +1, +7, ...) finding it types the number against
    each candidate region without leading digits: up to three typings of a UK number. Here
    the region search keeps the type it found, and typing uses :func:`_type_of`."""
    regions = COUNTRY_CODE_TO_REGION_CODE.get(cc)
    if regions is None:
        return None, _UNKNOWN
    if len(regions) == 1:
        region = regions[0]
    else:  # phonenumbers._region_code_for_number_from_list
        for code in regions:
            metadata = PhoneMetadata.metadata_for_region(code.upper(), None)
            if metadata is None:
                continue
            if metadata.leading_digits is not None:
                if _leading_digits(metadata.leading_digits).match(nsn):
                    region = code
                    break
            elif (ntype := _type_of(nsn, metadata)) != _UNKNOWN:
                return code, ntype  # number_type() would type it against this same metadata
        else:
            return None, _UNKNOWN
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(cc, region)
    return region, _UNKNOWN if metadata is None else _type_of(nsn, metadata)


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
