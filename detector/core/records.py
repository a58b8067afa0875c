"""Typed, immutable records of the core.

Directions are stated where they matter: ``risk`` and ``anomaly`` are in [0, 1], higher = riskier.
Wire formats (JSON) are produced by ``to_dict`` / ``*_from_dict`` so that the Faust adapters and the
replay path serialize identically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from detector.core.frozen import fast_new
from detector.core.population import PopulationCounts


class Action(StrEnum):
    """What the web tier and the dialer do with a request."""

    ALLOW = "allow"  # dial the number
    DEFLECT = "deflect"  # do not dial; offer chat / call-in instead
    BLOCK = "block"  # do not dial


@fast_new
@dataclass(frozen=True, slots=True)
class CallbackRequest:
    """One click-to-call form submission, as validated by :func:`detector.core.parse.parse_request`."""

    request_id: str
    ts: float  # epoch seconds (event time)
    phone_number: str  # as typed by the visitor
    ip: str  # normalized textual form
    country_hint: str | None = None
    user_id: str | None = None
    authenticated: bool = False
    session_id: str | None = None
    user_agent: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field (all scalars, so this equals ``dataclasses.asdict`` at a fifth of the cost).

        >>> CallbackRequest("r1", 1.0, "+1", "1.2.3.4").to_dict()["country_hint"] is None
        True
        """
        return {name: getattr(self, name) for name in _REQUEST_FIELDS}


_REQUEST_FIELDS = tuple(f.name for f in fields(CallbackRequest))


@fast_new
@dataclass(frozen=True, slots=True)
class PhoneInfo:
    """What ``phonenumbers`` says of the typed number."""

    e164: str | None  # None when the input cannot be parsed at all
    parsed: bool
    possible: bool
    valid: bool
    region: str | None  # ISO 3166 alpha-2, "001" for non-geographic entities
    country_code: int | None  # calling code, e.g. 44
    number_type: str  # MOBILE, FIXED_LINE, VOIP, PREMIUM_RATE, ..., UNKNOWN
    range_key: str | None  # E.164 minus its last N digits: the leased block IRSF sellers rotate in
    error: str | None = None  # why parsing failed, when it did
    time_zone: str | None = None  # IANA name of the number's (first) time zone, when phonenumbers knows it


@fast_new
@dataclass(frozen=True, slots=True)
class IpInfo:
    """What the IP databases and lists say of the requester's address."""

    ip: str
    version: int  # 4 or 6, 0 when malformed
    scope: str  # "global", "private", "loopback", "reserved", "malformed"
    country: str | None = None
    asn: int | None = None
    as_org: str | None = None
    anonymous_vpn: bool = False
    tor_exit: bool = False
    public_proxy: bool = False
    residential_proxy: bool = False
    hosting: bool = False
    cellular: bool = False  # a mobile carrier's address (connection-type data or mobile-ASN list)

    @property
    def anonymous(self) -> bool:
        """True when any anonymity signal is set (VPN, Tor, proxy, hosting)."""
        return (
            self.anonymous_vpn
            or self.tor_exit
            or self.public_proxy
            or self.residential_proxy
            or self.hosting
        )

    def flags(self) -> list[str]:
        """Names of the anonymity flags that are set, in a fixed order."""
        names = ("anonymous_vpn", "tor_exit", "public_proxy", "residential_proxy", "hosting")
        return [n for n in names if getattr(self, n)]


@fast_new
@dataclass(frozen=True, slots=True)
class Enrichment:
    phone: PhoneInfo
    ip: IpInfo

    def to_dict(self) -> dict[str, Any]:
        """The enrichment block of a decision (no raw IP: the decision carries its hash only)."""
        phone, ip = self.phone, self.ip
        return {
            "e164": phone.e164,
            "number_valid": phone.valid,
            "number_country": phone.region,
            "number_type": phone.number_type,
            "range_key": phone.range_key,
            "ip_country": ip.country,
            "ip_scope": ip.scope,
            "asn": ip.asn,
            "anonymity": ip.flags() if ip.anonymous else [],
        }


@fast_new
@dataclass(frozen=True, slots=True)
class IpCounts:
    """Counts owned by the IP stage (partitioned by IP). Include the current request."""

    ip_15m: int = 0
    ip_1h: int = 0
    ip_24h: int = 0
    ip_distinct_numbers_1h: int = 0
    ip_distinct_numbers_24h: int = 0
    ip_distinct_countries_24h: int = 0
    ip_fresh: int = 0  # 1: the IP's first request in 24 h
    ip_shared: int = 0  # 1: a shared IP (carrier or office NAT), so per-IP limits are relaxed


@fast_new
@dataclass(frozen=True, slots=True)
class RangeCounts:
    """Counts owned by the range stage (partitioned by number range). Include the current request."""

    number_15m: int = 0
    number_1h: int = 0
    number_24h: int = 0
    pair_1h: int = 0
    pair_24h: int = 0
    range_1h: int = 0
    range_24h: int = 0
    number_distinct_ips_1h: int = 0
    number_distinct_ips_24h: int = 0
    range_distinct_ips_24h: int = 0
    range_distinct_numbers_24h: int = 0
    pending: bool = False  # a callback to this number is still outstanding


@fast_new
@dataclass(frozen=True, slots=True)
class Counts:
    ip: IpCounts = field(default_factory=IpCounts)
    rng: RangeCounts = field(default_factory=RangeCounts)
    pop: PopulationCounts = field(default_factory=PopulationCounts)

    def to_dict(self) -> dict[str, Any]:
        """Every count by name: the IP's, then the range stage's, then the population's
        (replaced below by the same as one generated dict display: :func:`_make_counts_dict`)."""
        return dict(zip(_COUNT_NAMES, [getattr(part, name) for part in (self.ip, self.rng, self.pop)
                                       for name in part.__slots__], strict=True))


_COUNT_NAMES: tuple[str, ...] = (
    IpCounts.__slots__ + RangeCounts.__slots__ + PopulationCounts.__slots__  # type: ignore[attr-defined]
)


def _make_counts_dict() -> Callable[[Counts], dict[str, Any]]:
    """:meth:`Counts.to_dict` as one dict display of the 31 counts (``{"ip_15m": i.ip_15m, ...}``):
    built per request (every decision carries it), this is 1.3 us where zipping the names with
    the three records' values was 2.3. Generated, as dataclasses builds ``__init__``: every name
    in it is a field of the three count records."""
    items = [f"{name!r}: {var}.{name}" for var, cls in (("i", IpCounts), ("r", RangeCounts),
                                                        ("p", PopulationCounts))
             for name in cls.__slots__]  # type: ignore[attr-defined]
    env: dict[str, Any] = {}
    exec("def to_dict(counts):\n"  # noqa: S102
         "    i, r, p = counts.ip, counts.rng, counts.pop\n"
         f"    return {{{', '.join(items)}}}\n", env)
    fn: Callable[[Counts], dict[str, Any]] = env["to_dict"]
    fn.__doc__ = Counts.to_dict.__doc__
    fn.__qualname__ = "Counts.to_dict"
    return fn


_reference_to_dict = Counts.to_dict  # (the tests compare the two)
type.__setattr__(Counts, "to_dict", _make_counts_dict())


@fast_new
@dataclass(frozen=True, slots=True)
class Hit:
    """One rule or model finding. ``weight`` in [0, 1]: higher = riskier."""

    code: str
    weight: float
    action: Action
    silent: bool = False
    monitored: bool = False  # from a rule in monitor mode: reported, never acted on


@fast_new
@dataclass(frozen=True, slots=True)
class ModelResult:
    """Isolation-forest output. ``anomaly`` in [0, 1], higher = more unlike normal traffic."""

    version: str
    anomaly: float
    is_anomalous: bool
    top_features: tuple[str, ...] = ()
    shadow_version: str | None = None
    shadow_anomaly: float | None = None


@fast_new
@dataclass(frozen=True, slots=True)
class Decision:
    """The detector's verdict for one request (the ``callback-decisions`` message)."""

    request_id: str
    action: Action
    silent: bool  # True: tell the requester it worked although nothing will be dialled
    risk: float  # [0, 1], higher = riskier
    reasons: tuple[str, ...]  # stable reason codes, most important first
    enrichment: dict[str, Any]
    counts: dict[str, Any]
    policy_version: str
    model_version: str | None
    decided_at: float
    request_ts: float
    ip_hash: str
    model: dict[str, Any] | None = None
    monitored_reasons: tuple[str, ...] = ()  # codes of monitor-mode rules that fired (not acted on)
    # Cost at risk (core/spend.py): the rate deck's price of the destination (None: unknown, or
    # not a valid number), the risk-weighted expected cost of the callback, and the tightest
    # spend breaker of an allowed request's scopes (None when none was checked).
    cost_per_min: float | None = None
    expected_cost: float = 0.0
    currency: str | None = None
    budget: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The wire dict: the same as ``asdict`` (fresh containers, tuples as lists) at a fraction
        of its cost (``asdict`` deep-copies every nested value; the nested values are flat here)."""
        d: dict[str, Any] = {}
        for name in _DECISION_FIELDS:
            v = getattr(self, name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, dict):
                v = {k: list(x) if isinstance(x, list | tuple) else x for k, x in v.items()}
            d[name] = v
        d["action"] = str(self.action)
        return d


_DECISION_FIELDS = tuple(f.name for f in fields(Decision))


def decision_from_dict(d: dict[str, Any]) -> Decision:
    """Inverse of :meth:`Decision.to_dict`."""
    return Decision(
        request_id=d["request_id"],
        action=Action(d["action"]),
        silent=bool(d["silent"]),
        risk=float(d["risk"]),
        reasons=tuple(d["reasons"]),
        enrichment=dict(d["enrichment"]),
        counts=dict(d["counts"]),
        policy_version=d["policy_version"],
        model_version=d.get("model_version"),
        decided_at=float(d["decided_at"]),
        request_ts=float(d["request_ts"]),
        ip_hash=d["ip_hash"],
        model=d.get("model"),
        monitored_reasons=tuple(d.get("monitored_reasons") or ()),
        cost_per_min=None if d.get("cost_per_min") is None else float(d["cost_per_min"]),
        expected_cost=float(d.get("expected_cost") or 0.0),
        currency=d.get("currency"),
        budget=d.get("budget"),
    )


OUTCOMES = ("completed", "no_answer", "busy", "failed", "machine", "agent_marked_spam", "cancelled")


@fast_new
@dataclass(frozen=True, slots=True)
class Outcome:
    """What the dialer reports after acting on an allowed request (``callback-outcomes``)."""

    request_id: str
    phone_number: str  # E.164 as dialled
    outcome: str  # one of OUTCOMES
    ts: float
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
