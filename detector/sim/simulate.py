"""Labelled traffic for the callback detector: legitimate customers plus attack scenarios.

:func:`simulate` returns :class:`LabeledRequest` items sorted by event time; :func:`write_jsonl`
writes the requests (the wire format the detector consumes) and, in a separate side file, the
labels. Nothing in a request reveals its label: request ids are random UUIDs drawn after sorting.

Every random choice comes from :class:`random.Random` instances seeded from ``SimConfig.seed`` and
the scenario name, so a seed always gives the same traffic, and turning one scenario off leaves
the others unchanged. Phone numbers come from ``phonenumbers`` metadata and are checked with it;
IP addresses come from :data:`detector.sim.ipdb.IP_PLAN`, which :func:`build_ip_databases` turns
into matching MaxMind databases.

>>> items = simulate(SimConfig(duration_s=3600.0, legit_per_day=2400, scenarios=("dos_flood",)))
>>> sorted({i.scenario for i in items} - {"legit", "legit_repeat", "legit_traveller"})
['dos_flood']
>>> all(a.request["ts"] <= b.request["ts"] for a, b in zip(items, items[1:]))
True
"""

from __future__ import annotations

import json
import math
import random
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import phonenumbers
from phonenumbers import PhoneNumber, PhoneNumberFormat, PhoneNumberType

from detector.sim.ipdb import blocks_for, random_ip, random_ip_in

#: Attack scenarios (label ``attack: true``), name -> what the attacker does.
SCENARIOS: dict[str, str] = {
    "premium_rate": "premium-rate numbers of business countries called from a handful of IPs",
    "irsf_range": "IRSF: adjacent numbers of one leased international range, ~10 calls per number",
    "range_pumping": "slow pumping of 1-2 mobile ranges in a business country from rotating"
    " residential IPs",
    "dos_flood": "10-minute bursts at a few victim numbers, and a flood of random numbers from"
    " one hosting block",
    "combo_recombine": "8 IPs x 8 numbers recombined over hours, each pair reused several times",
    "invalid_flood": "a burst of invalid or garbage phone numbers from a few IPs",
    "anonymous_ip": "requests from VPN, Tor, open-proxy and hosting addresses to assorted numbers",
    "geo_mismatch": "business-country numbers requested from residential IPs in NG, PK, VN, BR",
    "night_burst": "bursts after local midnight at the destination to numbers of one range",
    "botnet_flood": "thousands of requests in 3-10 minutes, one per IP and per number, numbers from"
    " the whole plan of the business countries, IPs of home and mobile networks worldwide",
    "pump_spread": "pumping spread evenly over one leased 100,000-number block of a business"
    " country, a fresh residential IP per request, diurnal, ~12% from authenticated accounts",
    "slow_combo": "6 IPs x 6 numbers recombined slowly over the whole day",
    "enumeration": "sequential enumeration of a range (+1 each), a handful of IPs, a few a minute",
    "harassment": "one victim number requested from rotating IPs (each once or twice) for hours",
}
ALL_SCENARIOS: tuple[str, ...] = tuple(SCENARIOS)

#: Benign labels (``attack: false``), name -> what the customer does.
LEGIT_LABELS: dict[str, str] = {
    "legit": "a customer asks once for a callback (a few return later, share an IP or use a VPN)",
    "legit_repeat": "an impatient customer submits the same number from the same IP 2-3 times",
    "legit_traveller": "a customer abroad asks for a callback to their home number",
    "legit_cgnat": "mobile customers behind carrier-grade NAT: tens to hundreds of subscribers per"
    " mobile-operator IPv4 address per day, on mobile numbers from many ranges",
    "legit_office": "employees behind one office NAT address (10-60 staff per office), working"
    " hours, callbacks to their own mobile or direct-dial numbers",
    "legit_household": "a family at one home IP asking on 2-3 different numbers over a day",
    "legit_retry": "a customer retries 20-60 min after a missed callback (same number; mostly the"
    " same IP, sometimes another network)",
    "legit_returning": "a customer comes back hours later from another network (same number)",
    "legit_shared_line": "a small business's shared fixed line asked for by several staff from"
    " several devices and IPs within a day",
    "legit_surge": "an unannounced marketing surge: 10x-50x the normal rate of one business"
    " country for ~30 min, ordinary customers",
    "legit_surge_announced": "the same, announced: its window is declared as a campaign"
    " (campaign_windows)",
}

#: Legitimate populations generated on their own (each its own label), beside the base day of
#: ``legit`` / ``legit_repeat`` / ``legit_traveller`` that ``legit_per_day`` sizes.
POPULATIONS: tuple[str, ...] = tuple(name for name in LEGIT_LABELS if name not in (
    "legit", "legit_repeat", "legit_traveller"))  # fmt: skip

#: Requests per day of each legitimate population at ``legit_per_day`` = 20,000 (they scale with
#: it; surges: ``None`` = derived from the normal rate of the surging country and a 10x-50x factor).
POPULATION_PER_DAY: dict[str, int | None] = {
    "legit_cgnat": 3000,
    "legit_office": 400,
    "legit_household": 600,
    "legit_retry": 600,
    "legit_returning": 400,
    "legit_shared_line": 250,
    "legit_surge": None,
    "legit_surge_announced": None,
}

#: Requests per day of each attack scenario at ``attack_scale=1``.
VOLUME_PER_DAY: dict[str, int] = {
    "premium_rate": 300,
    "irsf_range": 600,
    "range_pumping": 400,
    "dos_flood": 1500,
    "combo_recombine": 400,
    "invalid_flood": 500,
    "anonymous_ip": 300,
    "geo_mismatch": 300,
    "night_burst": 200,
    "botnet_flood": 3000,
    "pump_spread": 500,
    "slow_combo": 150,
    "enumeration": 400,
    "harassment": 60,
}

#: Fixed UTC offsets in hours (November: no summer time in Europe).
UTC_OFFSET_H: dict[str, int] = {
    "GB": 0, "IE": 0, "FR": 1, "DE": 1, "ES": 1, "NL": 1, "US": -5,
    "NG": 1, "PK": 5, "VN": 7, "BR": -3, "PT": 0, "IT": 1, "PL": 1, "BE": 1,
}  # fmt: skip

#: Relative share of legitimate customers per business country (others get 0.1).
COUNTRY_WEIGHT: dict[str, float] = {
    "GB": 0.30, "DE": 0.20, "FR": 0.20, "ES": 0.12, "NL": 0.10, "IE": 0.08,
}  # fmt: skip

#: Legitimate demand per local hour 0..23, relative (peak 10:00-20:00, little at night).
DIURNAL: tuple[float, ...] = (
    0.10, 0.06, 0.04, 0.03, 0.03, 0.05, 0.12, 0.30, 0.55, 0.80, 1.00, 1.00,
    0.95, 0.95, 1.00, 1.00, 0.95, 0.95, 1.00, 1.00, 0.85, 0.60, 0.35, 0.18,
)  # fmt: skip

BROWSER_UAS: tuple[str, ...] = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "Mozilla/5.0 (Linux; Android 13; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.6 Mobile/15E148 Safari/604.1",
)
BROWSER_UA_WEIGHTS: tuple[float, ...] = (0.28, 0.22, 0.18, 0.10, 0.07, 0.07, 0.05, 0.03)
SCRIPT_UAS: tuple[str, ...] = (
    "python-requests/2.32.3",
    "curl/8.5.0",
    "Go-http-client/1.1",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/131.0.0.0 Safari/537.36",
)

#: IRSF destinations: (region or "001" for non-geographic, calling code, leading NSN digits).
IRSF_DESTINATIONS: tuple[tuple[str, int, str], ...] = (
    ("SO", 252, "90"),  # Somalia; reads as MOBILE in phonenumbers
    ("CU", 53, "5"),  # Cuba mobile
    ("PG", 675, "7"),  # Papua New Guinea mobile
    ("LV", 371, "90"),  # Latvia premium rate
    ("001", 882, "34"),  # international networks
    ("001", 883, "51"),
)

MOBILE = PhoneNumberType.MOBILE
FIXED_LINE = PhoneNumberType.FIXED_LINE
PREMIUM_RATE = PhoneNumberType.PREMIUM_RATE


@dataclass(frozen=True, slots=True)
class SimConfig:
    """What to simulate. Volumes are per day and scale with ``duration_s``."""

    seed: int = 1
    start: float = 1795305600.0  # 2026-11-22T00:00:00Z
    duration_s: float = 86400.0
    business_countries: tuple[str, ...] = ("GB", "IE", "FR", "DE", "ES", "NL")
    legit_per_day: int = 20000  # legitimate requests over a day (scaled if duration differs)
    attack_scale: float = 1.0  # multiplies every attack scenario's volume
    #: which attacks and legitimate populations to include (the base legit day is always there)
    scenarios: tuple[str, ...] = ALL_SCENARIOS + POPULATIONS
    #: requests per day overriding VOLUME_PER_DAY / POPULATION_PER_DAY for the named scenarios
    #: (attacks are still multiplied by ``attack_scale``; everything scales with ``duration_s``)
    volumes: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        known = ALL_SCENARIOS + POPULATIONS
        unknown = [s for s in self.scenarios if s not in known]
        if unknown:
            raise ValueError(f"unknown scenario(s) {unknown}; expected some of {known}")
        for name, volume in self.volumes:
            if name not in known:
                raise ValueError(f"volume for unknown scenario {name!r}; expected one of {known}")
            if volume < 0:
                raise ValueError(f"volume of {name} must be >= 0, got {volume}")
        if not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.legit_per_day < 0 or self.attack_scale < 0:
            raise ValueError("legit_per_day and attack_scale must be >= 0")
        if not self.business_countries:
            raise ValueError("business_countries must name at least one country")
        for cc in self.business_countries:
            if not blocks_for(cc, "residential") or not blocks_for(cc, "residential_proxy"):
                raise ValueError(
                    f"business country {cc!r} has no residential blocks in IP_PLAN "
                    "(detector.sim.ipdb); add some or choose among GB, IE, FR, DE, ES, NL"
                )
            if phonenumbers.country_code_for_region(cc) == 0:
                raise ValueError(f"business country {cc!r} is not a phonenumbers region")

    @property
    def end(self) -> float:
        return self.start + self.duration_s


@dataclass(frozen=True, slots=True)
class LabeledRequest:
    """One generated request (the JSON object sent to the detector) and its ground truth."""

    request: dict[str, Any]
    scenario: str  # a name in LEGIT_LABELS or in SCENARIOS
    attack: bool


# --------------------------------------------------------------------------- phone numbers


@dataclass(frozen=True, slots=True)
class _Number:
    region: str  # "001" for non-geographic numbers
    cc: int
    nsn: str  # national significant number

    @property
    def e164(self) -> str:
        return f"+{self.cc}{self.nsn}"

    @property
    def range_key(self) -> str:
        return self.e164[:-3]


@dataclass(frozen=True, slots=True)
class _Spec:
    """How to draw random numbers of one type in one region: cells of the plan and their weights.

    A cell is a leading-digit prefix (3 digits, or fewer where the plan is sparse) and a national
    length; its weight is the share of the cell's numbers that the type's pattern accepts, so
    every valid range of the plan (every NDC / area code, every length in use) is drawn, in
    proportion to how much of it is allocated, not only the ranges around example numbers.
    """

    region: str
    cc: int
    ntype: int
    pattern: re.Pattern[str]
    cells: tuple[tuple[str, int], ...]  # (leading digits, national length)
    cum_weights: tuple[float, ...]


def _sample_digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(10**n)).zfill(n) if n > 0 else ""


#: Probes per cell when measuring how much of a prefix the plan allocates.
_PROBES = 32


def _density(pattern: re.Pattern[str], probe: random.Random, head: str, length: int) -> float:
    tail = length - len(head)
    hits = sum(
        1 for _ in range(_PROBES) if pattern.fullmatch(head + _sample_digits(probe, tail))
    )
    return hits / _PROBES


@lru_cache(maxsize=64)
def _spec(region: str, ntype: int) -> _Spec:
    """The plan cells of ``ntype`` numbers in ``region`` (cached: tens of ms each)."""
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
    desc = None
    if meta is not None:
        desc = {
            MOBILE: meta.mobile,
            FIXED_LINE: meta.fixed_line,
            PREMIUM_RATE: meta.premium_rate,
        }.get(ntype)
    if meta is None or desc is None or desc.national_number_pattern is None:
        raise ValueError(f"phonenumbers has no numbers of type {ntype} for region {region!r}")
    general = meta.general_desc.possible_length if meta.general_desc else ()
    lengths = [n for n in (desc.possible_length or general) if n > 0]
    usual = [n for n in lengths if 7 <= n <= 11]  # national lengths people actually have
    pattern = re.compile(desc.national_number_pattern)
    probe = random.Random(f"cells/{region}/{ntype}")
    # descend digit by digit where the plan has numbers (a prefix with no hit is left out)
    weights: dict[tuple[str, int], float] = {}
    for length in usual or lengths:
        frontier = [str(d) for d in range(1, 10)]
        for depth in range(1, 4):
            nxt = []
            for head in frontier:
                if len(head) >= length:
                    continue
                dens = _density(pattern, probe, head, length)
                if dens == 0.0:
                    continue
                if depth == 3 or len(head) + 1 >= length:
                    weights[(head, length)] = dens
                else:
                    nxt += [head + str(d) for d in range(10)]
            frontier = nxt
    # a prefix valid at several lengths counts once (its densest length), lengths share it
    best: dict[str, float] = {}
    for (head, _length), w in weights.items():
        best[head] = max(best.get(head, 0.0), w)
    cells = tuple(sorted(weights))
    total_per_head: dict[str, float] = {}
    for head, length in cells:
        total_per_head[head] = total_per_head.get(head, 0.0) + weights[(head, length)]
    if not cells:
        raise ValueError(f"could not find numbers of type {ntype} for region {region!r}")
    # shorter numbers are fewer (a 7-digit area has a tenth of an 8-digit one's numbers): a length
    # shorter than the plan's main one (most cells) weighs the square root of its relative size,
    # so that short local numbers are present but the main length dominates
    raw = {c: best[c[0]] * weights[c] / total_per_head[c[0]] for c in cells}
    per_length: dict[int, float] = {}
    for (_head, length), w in raw.items():
        per_length[length] = per_length.get(length, 0.0) + w
    main = max(per_length, key=lambda n: (per_length[n], n))
    acc, cum = 0.0, []
    for cell in cells:
        acc += raw[cell] * 10 ** (min(0, cell[1] - main) / 2)
        cum.append(acc)
    return _Spec(
        region, phonenumbers.country_code_for_region(region), ntype, pattern, cells, tuple(cum)
    )


def _is_wanted(num: PhoneNumber, region: str, ntype: int | None) -> bool:
    if not phonenumbers.is_valid_number(num):
        return False
    if region != "001" and phonenumbers.region_code_for_number(num) != region:
        return False
    return ntype is None or phonenumbers.number_type(num) == ntype


def _check(number: _Number, ntype: int | None) -> bool:
    num = PhoneNumber(country_code=number.cc, national_number=int(number.nsn))
    return _is_wanted(num, number.region, ntype)


def random_number(rng: random.Random, region: str, ntype: int) -> _Number:
    """A random valid number of ``ntype`` anywhere in ``region``'s numbering plan.

    A plan cell (leading digits and length, weighted by how much of it is allocated) is drawn
    first, then the remaining digits uniformly until the number is valid and of the right type.
    """
    spec = _spec(region, ntype)
    for _ in range(10_000):
        head, length = rng.choices(spec.cells, cum_weights=spec.cum_weights)[0]
        nsn = head + _sample_digits(rng, length - len(head))
        if spec.pattern.fullmatch(nsn):
            number = _Number(region, spec.cc, nsn)
            if _check(number, ntype):
                return number
    raise RuntimeError(f"no valid number of type {ntype} found for {region}")  # pragma: no cover


def _range_numbers(
    rng: random.Random, stem: _Number, count: int, *, consecutive: bool, ntype: int | None
) -> list[_Number]:
    """``count`` valid numbers sharing ``stem``'s range key (all but the last 3 digits)."""
    head = stem.nsn[:-3]
    if consecutive:
        first = rng.randrange(0, max(1, 1000 - 2 * count))
        suffixes: Iterable[int] = range(first, 1000)
    else:
        suffixes = rng.sample(range(1000), 1000)
    out = []
    for suffix in suffixes:
        number = _Number(stem.region, stem.cc, f"{head}{suffix:03d}")
        if _check(number, ntype):
            out.append(number)
            if len(out) == count:
                break
    return out


def _irsf_stem(rng: random.Random, region: str, cc: int, lead: str) -> _Number:
    """A valid number of an IRSF destination beginning with ``lead``."""
    if region == "001":
        example = phonenumbers.example_number_for_non_geo_entity(cc)
    else:
        example = phonenumbers.example_number_for_type(region, MOBILE)
    lengths = sorted({len(str(example.national_number)) if example else 9, 8, 9, 10, 11})
    for _ in range(20_000):
        length = rng.choice(lengths)
        number = _Number(region, cc, lead + _sample_digits(rng, length - len(lead)))
        if _check(number, None) and _check(_Number(region, cc, number.nsn[:-3] + "999"), None):
            return number
    raise RuntimeError(f"no valid number found for +{cc} {lead}")  # pragma: no cover


def _typed(rng: random.Random, number: _Number, p_national: float = 0.0) -> tuple[str, str | None]:
    """The number as a visitor types it, and the country hint that must go with it (if any).

    Mostly E.164, ~10% international format with spaces, ``p_national`` national format.
    """
    roll = rng.random()
    if roll < p_national and number.region != "001":
        num = PhoneNumber(country_code=number.cc, national_number=int(number.nsn))
        return phonenumbers.format_number(num, PhoneNumberFormat.NATIONAL), number.region
    if roll < p_national + 0.10:
        num = PhoneNumber(country_code=number.cc, national_number=int(number.nsn))
        return phonenumbers.format_number(num, PhoneNumberFormat.INTERNATIONAL), None
    return number.e164, None


# --------------------------------------------------------------------------- event assembly


@dataclass(slots=True)
class _Ctx:
    """The scenario being generated: its config, RNG and the events it produced so far."""

    cfg: SimConfig
    rng: random.Random
    scenario: str
    attack: bool
    events: list[tuple[float, dict[str, Any], str, bool]] = field(default_factory=list)

    def emit(
        self,
        ts: float,
        number: _Number | str,
        ip: str,
        *,
        ua: str,
        session: str | None = None,
        hint: str | None = None,
        user_id: str | None = None,
        authenticated: bool = False,
        scenario: str | None = None,
        p_national: float = 0.0,
    ) -> None:
        """Add one request; a :class:`_Number` is typed by the visitor, a ``str`` is sent as is."""
        if isinstance(number, _Number):
            phone, national_hint = _typed(self.rng, number, p_national)
            hint = national_hint or hint
        else:
            phone = number
        ts = min(max(ts, self.cfg.start), self.cfg.end - 0.001)
        fields: dict[str, Any] = {"ts": round(ts, 3), "phone_number": phone, "ip": ip}
        if hint is not None:
            fields["country_hint"] = hint
        if user_id is not None:
            fields["user_id"] = user_id
        fields["authenticated"] = authenticated
        fields["session_id"] = session or self.session()
        fields["user_agent"] = ua
        self.events.append((fields["ts"], fields, scenario or self.scenario, self.attack))

    def session(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def browser_ua(self) -> str:
        return self.rng.choices(BROWSER_UAS, BROWSER_UA_WEIGHTS)[0]

    def any_ts(self, span: float = 0.0) -> float:
        """A uniform time leaving ``span`` seconds before the end (less if the run is shorter)."""
        return self.cfg.start + self.rng.random() * max(self.cfg.duration_s - span, 0.0)

    def window(self, length: float) -> tuple[float, float]:
        """A random ``[t0, t0 + length)`` within the simulated span (shorter if the span is)."""
        length = min(length, self.cfg.duration_s)
        return self.any_ts(length), length

    def around(self, center: float, sd: float) -> float:
        """A normal time around ``center``, redrawn until inside the simulated span."""
        for _ in range(100):
            ts = self.rng.gauss(center, sd)
            if self.cfg.start <= ts < self.cfg.end:
                return ts
        return self.any_ts()

    def local_ts(
        self, country: str, hours: tuple[float, ...] = DIURNAL, span: float = 0.0
    ) -> float:
        """A time weighted by ``hours`` (per local hour in ``country``), by rejection.

        ``span`` seconds are left before the end, for a burst or a repeat that starts then.
        """
        offset = UTC_OFFSET_H.get(country, 0) * 3600
        top = max(hours)
        for _ in range(1000):
            ts = self.any_ts(span)
            hour = int(((ts + offset) % 86400) // 3600)
            if self.rng.random() * top < hours[hour]:
                return ts
        return self.any_ts(span)

    def unique_ip(self, seen: set[str], draw: Callable[[], str]) -> str:
        for _ in range(100):
            ip = draw()
            if ip not in seen:
                seen.add(ip)
                return ip
        raise RuntimeError("IP block exhausted")  # pragma: no cover


def _count(cfg: SimConfig, name: str) -> int:
    per_day = dict(cfg.volumes).get(name, VOLUME_PER_DAY[name])
    return round(per_day * cfg.attack_scale * cfg.duration_s / 86400.0)


#: ``legit_per_day`` at which :data:`POPULATION_PER_DAY` holds; populations scale with it.
POPULATION_BASE_PER_DAY = 20000


def _population_count(cfg: SimConfig, name: str) -> int | None:
    """Requests of a legitimate population over the run; None: the generator derives it.

    :data:`POPULATION_PER_DAY` is for a business with ``legit_per_day`` = 20,000 and scales with
    it (a smaller business has fewer customers behind each kind of shared address); a volume in
    ``cfg.volumes`` is taken as is.
    """
    volumes = dict(cfg.volumes)
    if name in volumes:
        return round(volumes[name] * cfg.duration_s / 86400.0)
    per_day = POPULATION_PER_DAY[name]
    if per_day is None:
        return None
    return round(per_day * cfg.legit_per_day / POPULATION_BASE_PER_DAY * cfg.duration_s / 86400.0)


def _business_number(ctx: _Ctx, p_mobile: float = 0.8) -> _Number:
    cc = ctx.rng.choice(ctx.cfg.business_countries)
    return random_number(ctx.rng, cc, MOBILE if ctx.rng.random() < p_mobile else FIXED_LINE)


# --------------------------------------------------------------------------- legitimate traffic

_V6_COUNTRIES = {"GB", "FR", "DE"}
_TRAVEL_ABROAD = ("US", "US", "US", "BR", "VN")


def _home_ip(ctx: _Ctx, country: str, mobile_number: bool) -> str:
    rng = ctx.rng
    if country in _V6_COUNTRIES and blocks_for(country, "residential", 6) and rng.random() < 0.25:
        return random_ip(rng, country, "residential", 6)
    kind = "mobile" if rng.random() < (0.35 if mobile_number else 0.1) else "residential"
    return random_ip(rng, country, kind)


def _legit(ctx: _Ctx, target: int) -> None:
    """Customers of the business countries; see :data:`LEGIT_LABELS`."""
    rng, cfg = ctx.rng, ctx.cfg
    countries = cfg.business_countries
    weights = [COUNTRY_WEIGHT.get(c, 0.1) for c in countries]
    recent_ips: dict[str, list[str]] = {c: [] for c in countries}
    produced = 0
    while produced < target:
        home = rng.choices(countries, weights)[0]
        is_mobile = rng.random() < 0.75
        number = random_number(rng, home, MOBILE if is_mobile else FIXED_LINE)
        roll = rng.random()
        label, repeats, returning = "legit", 1, False
        if roll < 0.05:
            label, repeats = "legit_repeat", rng.choice((2, 2, 3))
        elif roll < 0.07:
            label = "legit_traveller"
        elif roll < 0.09:
            returning = True
        # where the customer is
        if label == "legit_traveller":
            others = [c for c in countries if c != home]
            abroad = rng.choice(others) if others and rng.random() < 0.6 else None
            abroad = abroad or rng.choice(_TRAVEL_ABROAD)
            ip = random_ip(rng, abroad, rng.choice(("mobile", "residential")))
        elif rng.random() < 0.01:
            ip = random_ip(rng, None, "vpn")
        elif recent_ips[home] and rng.random() < 0.015:
            ip = rng.choice(recent_ips[home])  # family / office: second number behind one IP
        else:
            ip = _home_ip(ctx, home, is_mobile)
            bucket = recent_ips[home]
            bucket.append(ip)
            if len(bucket) > 200:
                del bucket[: len(bucket) - 200]
        user_id = f"u{rng.randrange(10**8):08d}" if rng.random() < 0.25 else None
        ua = ctx.browser_ua()
        hint = home if rng.random() < 0.3 else None
        phone, national_hint = _typed(rng, number, 0.03)
        ts = ctx.local_ts(home, span=600.0 if repeats > 1 else 0.0)
        session = ctx.session()
        for i in range(min(repeats, target - produced)):
            if i:
                ts += rng.uniform(15.0, 180.0)  # impatient: submits again within minutes
            ctx.emit(
                ts,
                phone,
                ip,
                ua=ua,
                session=session,
                hint=national_hint or hint,
                user_id=user_id,
                authenticated=user_id is not None,
                scenario=label,
            )
            produced += 1
        if returning and produced < target:
            later = ts + rng.uniform(2 * 3600.0, 8 * 3600.0)
            if later < cfg.end:
                again = ip if rng.random() < 0.5 else _home_ip(ctx, home, is_mobile)
                ctx.emit(
                    later,
                    phone,
                    again,
                    ua=ua,
                    hint=national_hint or hint,
                    user_id=user_id,
                    authenticated=user_id is not None,
                )
                produced += 1


# --------------------------------------------------------------------------- attacks


def _premium_rate(ctx: _Ctx, n: int) -> None:
    rng, cfg = ctx.rng, ctx.cfg
    countries = rng.sample(cfg.business_countries, k=min(2, len(cfg.business_countries)))
    numbers: list[_Number] = []
    for cc in countries:
        stem = random_number(rng, cc, PREMIUM_RATE)
        numbers += _range_numbers(
            rng, stem, rng.randint(2, 4), consecutive=True, ntype=PREMIUM_RATE
        ) or [stem]
    home = rng.choice(countries)
    ips = [
        random_ip(rng, None, "hosting"),
        random_ip(rng, None, "hosting"),
        random_ip(rng, home, "residential"),
        random_ip(rng, None, "vpn"),
        random_ip(rng, rng.choice(("NG", "PK", "VN")), "residential"),
    ]
    uas = {ip: rng.choice((SCRIPT_UAS[0], SCRIPT_UAS[3], ctx.browser_ua())) for ip in ips}
    waves = [ctx.any_ts() for _ in range(max(1, rng.randint(4, 7)))]
    for _ in range(n):
        ip = rng.choice(ips)
        ts = ctx.around(rng.choice(waves), 1200.0)
        ctx.emit(ts, rng.choice(numbers), ip, ua=uas[ip])


def _irsf_range(ctx: _Ctx, n: int) -> None:
    rng = ctx.rng
    campaigns = 2 if n >= 40 else 1
    destinations = rng.sample(IRSF_DESTINATIONS, k=campaigns)
    sizes = [n // campaigns + (1 if i < n % campaigns else 0) for i in range(campaigns)]
    for (region, cc, lead), size in zip(destinations, sizes, strict=True):
        per_number = [rng.randint(8, 12) for _ in range(size // 8 + 1)]
        stem = _irsf_stem(rng, region, cc, lead)
        numbers = _range_numbers(rng, stem, len(per_number), consecutive=True, ntype=None)
        ips = [
            random_ip(rng, None, "hosting"),
            random_ip(rng, None, "vpn"),
            random_ip(rng, None, "proxy"),
            random_ip(rng, rng.choice(("NG", "PK", "VN", "BR")), "mobile"),
            random_ip(rng, rng.choice(("NG", "PK", "VN", "BR")), "residential"),
            random_ip(rng, rng.choice(ctx.cfg.business_countries), "residential"),
        ] + [random_ip(rng, None, "hosting") for _ in range(rng.randint(0, 3))]
        uas = {ip: rng.choice(SCRIPT_UAS + (ctx.browser_ua(),)) for ip in ips}
        t0, length = ctx.window(rng.uniform(3.0, 6.0) * 3600.0)
        times = sorted(t0 + rng.random() * length for _ in range(size))
        plan = [num for num, k in zip(numbers, per_number, strict=False) for _ in range(k)]
        for ts, number in zip(times, plan, strict=False):
            ip = rng.choice(ips)
            ctx.emit(ts, number, ip, ua=uas[ip])


_HOME_KINDS = ("residential", "residential", "mobile")


def _range_pumping(ctx: _Ctx, n: int) -> None:
    rng = ctx.rng
    country = rng.choice(ctx.cfg.business_countries)
    n_ranges = 2 if n >= 150 and rng.random() < 0.6 else 1
    ranges = [
        _range_numbers(
            rng, random_number(rng, country, MOBILE), 400, consecutive=False, ntype=MOBILE
        )
        for _ in range(n_ranges)
    ]
    uses: list[_Number] = []
    while len(uses) < n:
        i = rng.randrange(n_ranges)
        if not ranges[i]:  # only at large attack_scale: the pumper moves on to a fresh range
            stem = random_number(rng, country, MOBILE)
            ranges[i] = _range_numbers(rng, stem, 400, consecutive=False, ntype=MOBILE) or [stem]
        uses += [ranges[i].pop()] * rng.choice((1, 1, 1, 2, 2, 3))  # low rate per number
    uses = uses[:n]
    rng.shuffle(uses)
    seen: set[str] = set()
    ips: list[str] = []
    while len(ips) < n:
        kind = "residential_proxy" if rng.random() < 0.35 else rng.choice(_HOME_KINDS)
        ip = ctx.unique_ip(seen, partial(random_ip, rng, country, kind))
        ips += [ip] * (2 if rng.random() < 0.3 else 1)  # each IP used once or twice
    for number, ip in zip(uses, ips, strict=False):
        hint = country if rng.random() < 0.5 else None
        ctx.emit(ctx.local_ts(country), number, ip, ua=ctx.browser_ua(), hint=hint)


def _dos_flood(ctx: _Ctx, n: int) -> None:
    rng = ctx.rng
    n_victim = round(n * 0.6)
    # (a) a few victim numbers hammered for ~10 minutes from a few IPs
    victims = [_business_number(ctx) for _ in range(rng.randint(2, 3))]
    ips = [random_ip(rng, None, "hosting") for _ in range(2)] + [
        random_ip(rng, rng.choice(ctx.cfg.business_countries), "residential") for _ in range(2)
    ]
    sessions = {ip: ctx.session() for ip in ips}
    t0, length = ctx.window(600.0)
    for _ in range(n_victim):
        ip = rng.choice(ips)
        ctx.emit(
            t0 + rng.random() * length,
            rng.choice(victims),
            ip,
            ua=SCRIPT_UAS[0],
            session=sessions[ip],
        )
    # (b) agent flood: many random valid numbers from one hosting block
    block = rng.choice(blocks_for(None, "hosting"))
    seen: set[str] = set()
    flood_ips = [
        ctx.unique_ip(seen, lambda: random_ip_in(rng, block)) for _ in range(rng.randint(20, 40))
    ]
    t0, length = ctx.window(900.0)
    for _ in range(n - n_victim):
        ctx.emit(
            t0 + rng.random() * length,
            _business_number(ctx, 0.6),
            rng.choice(flood_ips),
            ua=rng.choice(SCRIPT_UAS[1:3]),
        )


def _combo_recombine(ctx: _Ctx, n: int) -> None:
    rng = ctx.rng
    countries = rng.sample(ctx.cfg.business_countries, k=min(2, len(ctx.cfg.business_countries)))
    numbers = [random_number(rng, rng.choice(countries), MOBILE) for _ in range(8)]
    ips = [
        random_ip(
            rng, rng.choice(countries), rng.choice(("residential", "mobile", "residential_proxy"))
        )
        for _ in range(8)
    ]
    uas = {ip: ctx.browser_ua() for ip in ips}
    # two IPs send made-up user ids; never authenticated
    fake_users = {ip: f"u{rng.randrange(10**8):08d}" for ip in ips[:2]}
    t0, length = ctx.window(rng.uniform(5.0, 9.0) * 3600.0)
    for _ in range(n):
        ip = rng.choice(ips)
        ctx.emit(
            t0 + rng.random() * length,
            rng.choice(numbers),
            ip,
            ua=uas[ip],
            user_id=fake_users.get(ip),
        )


def _garbage(rng: random.Random, countries: tuple[str, ...]) -> tuple[str, str | None]:
    """An invalid phone number as a script or a careless bot sends it, and an optional hint."""
    cc = phonenumbers.country_code_for_region(rng.choice(countries))
    kind = rng.randrange(7)
    if kind == 0:  # too short
        return f"+{cc}{_sample_digits(rng, rng.randint(2, 5))}", None
    if kind == 1:  # a range that does not exist (national numbers never start with 0)
        return f"+{cc}0{_sample_digits(rng, 9)}", None
    if kind == 2:  # letters in the digits
        digits = list(f"+{cc}7{_sample_digits(rng, 8)}")
        for _ in range(rng.randint(1, 3)):
            digits[rng.randrange(3, len(digits))] = rng.choice("OoIlABxz")
        return "".join(digits), None
    if kind == 3:  # far too long
        return f"+{cc}{_sample_digits(rng, rng.randint(16, 20))}", None
    if kind == 4:  # a country code nobody has
        return f"+{rng.choice((999, 998, 969, 879))}{_sample_digits(rng, 8)}", None
    if kind == 5:  # words
        return rng.choice(("call me", "asdf", "test", "0", "null", "undefined", "1234")), None
    hint = rng.choice(countries)  # a national number that is too short for the hinted country
    return "0" + _sample_digits(rng, rng.randint(3, 5)), hint


def _is_invalid(raw: str, hint: str | None) -> bool:
    try:
        num = phonenumbers.parse(raw, hint)
    except phonenumbers.NumberParseException:
        return True
    return not phonenumbers.is_valid_number(num)


def _invalid_flood(ctx: _Ctx, n: int) -> None:
    rng = ctx.rng
    ips = [
        random_ip(rng, None, "hosting"),
        random_ip(rng, None, "proxy"),
        random_ip(rng, rng.choice(("NG", "PK", "VN", "BR")), "residential"),
    ]
    t0, length = ctx.window(1200.0)
    for _ in range(n):
        raw, hint = _garbage(rng, ctx.cfg.business_countries)
        while not _is_invalid(raw, hint):
            raw, hint = _garbage(rng, ctx.cfg.business_countries)
        ctx.emit(t0 + rng.random() * length, raw, rng.choice(ips), ua=SCRIPT_UAS[0], hint=hint)


def _anonymous_ip(ctx: _Ctx, n: int) -> None:
    rng = ctx.rng
    kinds = ("vpn", "vpn", "vpn", "tor", "tor", "proxy", "proxy", "hosting", "hosting")
    seen: set[str] = set()
    ips = [
        ctx.unique_ip(seen, lambda: random_ip(rng, None, rng.choice(kinds)))
        for _ in range(max(1, min(40, n // 6)))
    ]
    if rng.random() < 0.5:
        ips.append(random_ip(rng, None, "hosting", 6))
    uas = {ip: rng.choice((ctx.browser_ua(), ctx.browser_ua(), SCRIPT_UAS[3])) for ip in ips}
    numbers: list[_Number] = []
    while len(numbers) < n:
        numbers += [_business_number(ctx, 0.7)] * rng.choice((1, 1, 2))
    for number in numbers[:n]:
        ip = rng.choice(ips)
        ctx.emit(ctx.any_ts(), number, ip, ua=uas[ip])


def _geo_mismatch(ctx: _Ctx, n: int) -> None:
    rng = ctx.rng
    seen: set[str] = set()
    ips = [
        ctx.unique_ip(
            seen,
            lambda: random_ip(
                rng, rng.choice(("NG", "PK", "VN", "BR")), rng.choice(("residential", "mobile"))
            ),
        )
        for _ in range(max(1, min(30, n // 8)))
    ]
    uas = {ip: ctx.browser_ua() for ip in ips}
    numbers: list[_Number] = []
    while len(numbers) < n:
        numbers += [_business_number(ctx)] * rng.choice((1, 2, 3))
    for number in numbers[:n]:
        ip = rng.choice(ips)
        hint = rng.choice(ctx.cfg.business_countries) if rng.random() < 0.3 else None
        ctx.emit(ctx.any_ts(), number, ip, ua=uas[ip], hint=hint)


_NIGHT = tuple(1.0 if h < 4 else 0.0 for h in range(24))


def _night_burst(ctx: _Ctx, n: int) -> None:
    rng = ctx.rng
    bursts = 2 if n >= 60 else 1
    sizes = [n // bursts + (1 if i < n % bursts else 0) for i in range(bursts)]
    for size in sizes:
        country = rng.choice(ctx.cfg.business_countries)
        stem = random_number(rng, country, MOBILE)
        numbers = _range_numbers(rng, stem, rng.randint(6, 10), consecutive=False, ntype=MOBILE)
        ips = [random_ip(rng, country, "residential") for _ in range(rng.randint(1, 2))]
        ips += [random_ip(rng, None, "hosting") for _ in range(rng.randint(1, 2))]
        length = rng.uniform(900.0, 1800.0)
        t0 = ctx.local_ts(country, _NIGHT, span=length)
        for _ in range(size):
            ctx.emit(
                t0 + rng.random() * length,
                rng.choice(numbers or [stem]),
                rng.choice(ips),
                ua=rng.choice(SCRIPT_UAS),
            )


_GENERATORS: dict[str, Callable[[_Ctx, int], None]] = {
    "premium_rate": _premium_rate,
    "irsf_range": _irsf_range,
    "range_pumping": _range_pumping,
    "dos_flood": _dos_flood,
    "combo_recombine": _combo_recombine,
    "invalid_flood": _invalid_flood,
    "anonymous_ip": _anonymous_ip,
    "geo_mismatch": _geo_mismatch,
    "night_burst": _night_burst,
}


# --------------------------------------------------------------------------- public API


def simulate(cfg: SimConfig) -> list[LabeledRequest]:
    """Generate the labelled traffic of ``cfg``, sorted by ``ts``; the same seed, the same output.

    Legitimate volume is ``legit_per_day`` scaled to ``duration_s``; each attack scenario's volume
    is :data:`VOLUME_PER_DAY` times ``attack_scale``, scaled likewise; each legitimate population's
    is :data:`POPULATION_PER_DAY` times ``legit_per_day / 20000`` (surges: derived from the
    normal rate), scaled likewise.
    ``cfg.volumes`` overrides either.
    """
    events: list[tuple[float, dict[str, Any], str, bool]] = []
    legit = _Ctx(cfg, random.Random(f"{cfg.seed}/legit"), "legit", False)
    _legit(legit, math.floor(cfg.legit_per_day * cfg.duration_s / 86400.0 + 0.5))
    events += legit.events
    from detector.sim import populations

    for name in POPULATIONS:
        if name in cfg.scenarios:
            ctx = _Ctx(cfg, random.Random(f"{cfg.seed}/{name}"), name, False)
            populations.LEGIT_GENERATORS[name](ctx, _population_count(cfg, name))
            events += ctx.events
    generators = {**_GENERATORS, **populations.ATTACK_GENERATORS}
    for name in ALL_SCENARIOS:
        if name in cfg.scenarios:
            ctx = _Ctx(cfg, random.Random(f"{cfg.seed}/{name}"), name, True)
            generators[name](ctx, _count(cfg, name))
            events += ctx.events
    events.sort(key=lambda e: e[0])  # stable: ties keep generation order
    ids = random.Random(f"{cfg.seed}/ids")
    seen: set[str] = set()
    out = []
    for _, fields, scenario, attack in events:
        request_id = str(uuid.UUID(int=ids.getrandbits(128), version=4))
        while request_id in seen:  # pragma: no cover - 2^-122 per pair
            request_id = str(uuid.UUID(int=ids.getrandbits(128), version=4))
        seen.add(request_id)
        out.append(LabeledRequest({"request_id": request_id, **fields}, scenario, attack))
    return out


def scenario_options(scenarios: str | None, volumes: Iterable[str] = ()) -> dict[str, Any]:
    """``SimConfig`` keywords from the command line's ``--scenarios a,b`` and ``--volume NAME=N``.

    >>> scenario_options("botnet_flood,legit_cgnat", ["legit_cgnat=600"])
    {'scenarios': ('botnet_flood', 'legit_cgnat'), 'volumes': (('legit_cgnat', 600),)}
    """
    out: dict[str, Any] = {}
    if scenarios is not None and scenarios.strip().lower() != "all":
        names = [] if scenarios.strip().lower() == "none" else scenarios.split(",")
        out["scenarios"] = tuple(n.strip() for n in names if n.strip())
    pairs = []
    for item in volumes:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--volume expects NAME=N (requests per day), got {item!r}")
        pairs.append((name.strip(), int(value)))
    if pairs:
        out["volumes"] = tuple(pairs)
    return out


def write_campaigns(cfg: SimConfig, path: Path | str) -> Path:
    """Write :func:`~detector.sim.populations.campaign_windows` of ``cfg`` as a JSON list."""
    from detector.sim.populations import campaign_windows

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(campaign_windows(cfg), indent=1) + "\n", encoding="utf-8")
    return path


def write_jsonl(
    items: Iterable[LabeledRequest], requests_path: Path | str, labels_path: Path | str
) -> None:
    """Write requests (one JSON object a line) and, line for line, their labels to a side file."""
    requests_path, labels_path = Path(requests_path), Path(labels_path)
    for path in (requests_path, labels_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with (
        requests_path.open("w", encoding="utf-8") as req,
        labels_path.open("w", encoding="utf-8") as lab,
    ):
        for item in items:
            req.write(json.dumps(item.request, separators=(",", ":")) + "\n")
            label = {
                "request_id": item.request["request_id"],
                "scenario": item.scenario,
                "attack": item.attack,
            }
            lab.write(json.dumps(label, separators=(",", ":")) + "\n")
