"""The one feature function shared by training and scoring (no training/serving skew).

``features(request, enrichment, counts, policy)`` returns a float vector in the order of
``FEATURE_NAMES``. Counts enter as ``log1p`` so that a flood and a trickle differ without a flood
dominating the forest's splits. Every feature is "higher = more unusual" or a plain indicator.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from functools import lru_cache
from operator import attrgetter
from typing import Any
from zoneinfo import ZoneInfo

from detector.core.policy import Policy
from detector.core.records import CallbackRequest, Counts, Enrichment

COUNT_FEATURES = (
    # Per number, pair and range: a customer asks for one number, from one or two networks.
    # Raw per-IP volumes are NOT features: a carrier-grade NAT or an office address carries
    # hundreds of innocent customers, so the model sees the IP through ratios and flags instead.
    "number_15m",
    "number_1h",
    "number_24h",
    "pair_1h",
    "pair_24h",
    "range_1h",
    "range_24h",
    "number_distinct_ips_1h",
    "number_distinct_ips_24h",
    "range_distinct_ips_24h",
    "range_distinct_numbers_24h",
)
FEATURE_NAMES: tuple[str, ...] = (
    *(f"log_{c}" for c in COUNT_FEATURES),
    "range_ips_per_request",  # distinct IPs / requests on the range (pumping from many IPs -> 1)
    "range_numbers_per_request",  # distinct numbers / requests on the range (rotation -> high)
    "pair_share_of_number",  # pair count / number count over 24 h
    "ip_numbers_per_request",  # distinct numbers / requests of the IP in 24 h (a retry lowers it)
    "ip_countries_per_number",  # distinct destination countries / distinct numbers of the IP
    "ip_burst",  # requests of the IP in 15 min / in 1 h (a script bursts; a population spreads)
    "ip_shared",  # 1: a shared address (carrier or office NAT), see state.shared_ip
    "ip_fresh",  # 1: the IP's first request in 24 h
    "log_country_surge_factor",  # population: the destination country's last 10 min / baseline
    "log_prefix_concentration",  # population: the number's block against a spread-out share
    "prefix_fresh_share",  # population: share of the block's requests from fresh IPs
    "number_valid",
    "number_mobile_or_fixed",
    "number_risky_type",  # premium, shared cost, UAN, personal, pager, VoIP, unknown
    "destination_allowed",
    "destination_denied_prefix",
    "ip_anonymous",
    "ip_hosting",
    "ip_not_global",
    "ip_country_unknown",
    "geo_mismatch",
    "authenticated",
    "local_hour_sin",  # local time at the destination, on the unit circle
    "local_hour_cos",
    "night_at_destination",  # 00:00-06:00 local
    "pending",
)
RISKY_TYPES = frozenset(
    {"PREMIUM_RATE", "SHARED_COST", "UAN", "PERSONAL_NUMBER", "PAGER", "VOIP", "UNKNOWN"}
)


@lru_cache(maxsize=1024)
def _zone(name: str | None) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError):
        return None


def local_hour(ts: float, enr: Enrichment) -> float | None:
    """Fractional local hour at the destination (the number's time zone, see
    :func:`detector.core.phone.enrich_phone`), or None when its time zone is unknown."""
    name = enr.phone.time_zone
    if not name:
        return None
    minute = ts // 60.0
    # Requests come in time order, many per minute: the local hour is read once per zone and
    # UTC minute. Not within 10 ms of the next minute: datetime rounds ts to microseconds.
    if ts - minute * 60.0 < 59.99:
        key = (name, minute)
        hour = _HOURS.get(key)
        if hour is None:
            if len(_HOURS) >= 1024:
                _HOURS.clear()
            zone = _zone(name)
            hour = _HOURS[key] = _NO_ZONE if zone is None else _hour_of_minute(zone, minute)
        if hour >= 0.0:
            return hour
        if hour == _NO_ZONE:
            return None
    zone = _zone(name)
    if zone is None:
        return None
    dt = datetime.fromtimestamp(ts, tz=UTC).astimezone(zone)
    return dt.hour + dt.minute / 60.0


_HOURS: dict[tuple[str, float], float] = {}  # (zone name, UTC minute) -> local hour, or < 0
_NO_ZONE = -2.0  # the name is no zone ZoneInfo knows


def _hour_of_minute(zone: ZoneInfo, minute: float) -> float:
    """The local hour (as :func:`local_hour` computes it) of every instant of UTC minute
    ``minute``, or -1.0 when that is not one value: the zone's offset has seconds (only before
    1972) or changes inside the minute."""
    start = datetime.fromtimestamp(minute * 60.0, tz=UTC).astimezone(zone)
    end = datetime.fromtimestamp(minute * 60.0 + 59.0, tz=UTC).astimezone(zone)
    if start.second or start.microsecond or start.utcoffset() != end.utcoffset():
        return -1.0
    return start.hour + start.minute / 60.0


class _PrefixIndex:
    """A policy's denied prefixes as a set, their lengths (longest first), and the answers given
    so far per number (each request asks twice: its features and its rules; numbers repeat)."""

    __slots__ = ("prefixes", "table", "lengths", "found")

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes
        self.table = frozenset(prefixes)
        self.lengths = tuple(sorted({len(p) for p in prefixes}, reverse=True))
        self.found: dict[str, str | None] = {}


_PREFIX_INDEX: dict[int, _PrefixIndex] = {}


def _prefix_index(prefixes: tuple[str, ...]) -> _PrefixIndex:
    """Built once per policy's tuple (found by identity: hashing a tuple of ~50 prefixes cost
    more than the look-up)."""
    index = _PREFIX_INDEX.get(id(prefixes))
    if index is None or index.prefixes is not prefixes:
        if len(_PREFIX_INDEX) >= 16:
            _PREFIX_INDEX.clear()
        index = _PREFIX_INDEX[id(prefixes)] = _PrefixIndex(prefixes)
    return index


_NOT_YET = "?"  # no answer memoized (an answer is None or a prefix starting with "+")


def denied_prefix(e164: str | None, policy: Policy) -> str | None:
    """The longest denied prefix of ``e164``, if any.

    >>> from detector.core.policy import load_policy
    >>> denied_prefix("+252901234567", load_policy()), denied_prefix("+447400123456", load_policy())
    ('+252', None)
    """
    if not e164:
        return None
    index = _prefix_index(policy.denied_prefixes)
    found = index.found
    prefix = found.get(e164, _NOT_YET)
    if prefix is _NOT_YET:
        prefix = None
        for n in index.lengths:
            if e164[:n] in index.table:
                prefix = e164[:n]
                break
        if len(found) >= 65536:
            found.clear()
        found[e164] = prefix
    return prefix


def geo_mismatch(enr: Enrichment) -> bool:
    return bool(enr.ip.country and enr.phone.region and enr.ip.country != enr.phone.region)


_LOG1P_SIZE = 4096
# log1p of the counts 0.._LOG1P_SIZE-1, computed by math.log1p itself (so bit-identical): a
# tuple index costs less than the call, and a row has 11 log-counts
_LOG1P = tuple(math.log1p(n) for n in range(_LOG1P_SIZE))
_range_counts = attrgetter(*COUNT_FEATURES)  # the range stage's counts behind the log_ features


def features(req: CallbackRequest, enr: Enrichment, counts: Counts, policy: Policy,
             count_map: dict[str, Any] | None = None) -> list[float]:
    """Feature vector in ``FEATURE_NAMES`` order (``count_map``: unused, accepted for callers
    that pass ``counts.to_dict()``; the counts are read from ``counts`` itself)."""
    ipc, rng, pop = counts.ip, counts.rng, counts.pop
    log1p = math.log1p
    r24 = max(rng.range_24h, 1)
    ph, ip = enr.phone, enr.ip
    ntype = ph.number_type
    try:  # the usual case: every count is in the table (math.log1p's own values)
        t = _LOG1P
        out = [
            t[rng.number_15m], t[rng.number_1h], t[rng.number_24h],
            t[rng.pair_1h], t[rng.pair_24h], t[rng.range_1h], t[rng.range_24h],
            t[rng.number_distinct_ips_1h], t[rng.number_distinct_ips_24h],
            t[rng.range_distinct_ips_24h], t[rng.range_distinct_numbers_24h],
        ]
    except IndexError:  # a count of _LOG1P_SIZE or more (counts are never negative)
        out = [log1p(n) for n in _range_counts(rng)]
    out += (
        rng.range_distinct_ips_24h / r24,
        rng.range_distinct_numbers_24h / r24,
        rng.pair_24h / max(rng.number_24h, 1),
        ipc.ip_distinct_numbers_24h / max(ipc.ip_24h, 1),
        ipc.ip_distinct_countries_24h / max(ipc.ip_distinct_numbers_24h, 1),
        ipc.ip_15m / max(ipc.ip_1h, 1),
        float(ipc.ip_shared),
        float(ipc.ip_fresh),
        log1p(pop.country_surge_factor),
        log1p(pop.prefix_concentration),
        pop.prefix_fresh_share,
        1.0 if ph.valid else 0.0,
        1.0 if ntype in ("MOBILE", "FIXED_LINE", "FIXED_LINE_OR_MOBILE") else 0.0,
        1.0 if ntype in RISKY_TYPES else 0.0,
        1.0 if ph.region in policy.allowed_countries else 0.0,
        1.0 if denied_prefix(ph.e164, policy) else 0.0,
        1.0 if (ip.anonymous_vpn or ip.tor_exit or ip.public_proxy or ip.residential_proxy) else 0.0,
        1.0 if ip.hosting else 0.0,
        0.0 if ip.scope == "global" else 1.0,
        0.0 if ip.country else 1.0,
        1.0 if (ip.country and ph.region and ip.country != ph.region) else 0.0,  # geo_mismatch
        1.0 if req.authenticated else 0.0,
    )
    hour = local_hour(req.ts, enr)
    if hour is None:
        out += (0.0, 0.0, 0.0)
    else:
        angle = 2 * math.pi * hour / 24.0
        out += (math.sin(angle), math.cos(angle), 1.0 if hour < 6.0 else 0.0)
    out.append(1.0 if rng.pending else 0.0)
    return out
