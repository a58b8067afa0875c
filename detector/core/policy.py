"""The detection policy: a TOML file validated at start-up with precise errors.

>>> p = load_policy()          # the packaged default
>>> p.rules["denied_prefix"].action, p.velocity["number_15m"]
(<Action.BLOCK: 'block'>, 7)
>>> parse_policy({"rules": {"geo_mismatch": {"action": "maybe"}}})
Traceback (most recent call last):
...
detector.core.errors.PolicyError: rules.geo_mismatch.action: expected one of allow, deflect, block, ...
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from detector.core.capacity import CapacityPolicy, parse_capacity_policy
from detector.core.errors import PolicyError, _shown
from detector.core.parse import parse_ts
from detector.core.population import Campaign, PopulationPolicy
from detector.core.records import Action
from detector.core.spend import SpendPolicy, parse_spend_policy

DEFAULT_POLICY_TEXT = (
    resources.files("detector.core").joinpath("default_policy.toml").read_text("utf-8")
)
LIST_FIELDS = ("ips", "cidrs", "asns", "numbers", "prefixes", "countries")


@dataclass(frozen=True, slots=True)
class Rule:
    """What one reason code does when it fires. ``weight`` in [0, 1], higher = riskier."""

    action: Action
    silent: bool
    weight: float
    mode: str = "enforce"  # "monitor": evaluated and reported, never changes action or risk


RULE_MODES = ("enforce", "monitor")


@dataclass(frozen=True, slots=True)
class SharedIpPolicy:
    """The ``[shared_ip]`` section: when an IP is a population (carrier or office NAT), and how
    much its per-IP limits are relaxed."""

    min_numbers_24h: int = 4
    max_countries_24h: int = 2
    max_15m: int = 15
    max_1h: int = 40
    min_spread: float = 0.5
    factor: int = 50
    relaxed: tuple[str, ...] = ("ip_15m", "ip_1h", "ip_24h", "ip_distinct_numbers_1h",
                                "ip_distinct_numbers_24h")


@dataclass(frozen=True, slots=True)
class Policy:
    version: str
    deflect_at: float
    block_at: float
    allowed_countries: frozenset[str]
    denied_prefixes: tuple[str, ...]
    number_types: Mapping[str, Rule]
    rules: Mapping[str, Rule]
    velocity: Mapping[str, int]
    pending_ttl: float
    relaxed_codes: frozenset[str]
    auth_weight_factor: float
    range_digits: int
    spam_deny_seconds: float = 604800.0
    machine_threshold: int = 3
    machine_deny_seconds: float = 86400.0
    deny: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    allow: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    population: PopulationPolicy = field(default_factory=PopulationPolicy)
    shared_ip: SharedIpPolicy = field(default_factory=SharedIpPolicy)
    capacity: CapacityPolicy = field(default_factory=CapacityPolicy)
    # Codes that innocent populations produce (shared IPs, travellers, surges): however many of
    # them fire together, the combined risk deflects and never blocks (no silent block of what
    # a real customer could have sent without a corroborating, fraud-specific signal).
    soft_codes: frozenset[str] = frozenset()
    recombination_min: int = 3
    auth_deflect_codes: frozenset[str] = frozenset()
    spend: SpendPolicy = field(default_factory=SpendPolicy)  # [spend]: cost at risk, spend breakers

    def rule(self, code: str) -> Rule:
        return self.rules[code]

    def reason_codes(self) -> frozenset[str]:
        """Every reason code a decision under this policy can carry (bounded: metric labels)."""
        return reason_codes(self)


def reason_codes(policy: Policy) -> frozenset[str]:
    """Reason codes of ``policy``: its rules (``denylist`` as one code per list kind), its number
    types (``number_type_<type>``) and ``combined_risk``."""
    codes = {"combined_risk"}
    for code in policy.rules:
        if code == "denylist":
            codes.update(f"denylist_{k}" for k in ("ip", "cidr", "asn", "number", "prefix", "country"))
        else:
            codes.add(code)
    codes.update(f"number_type_{t.lower()}" for t in policy.number_types)
    return frozenset(codes)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _num(where: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise PolicyError(f"{where}: expected a number in [{lo}, {hi}], got {_shown(value)}")
    return float(value)


def _rule(where: str, raw: Any) -> Rule:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: expected a table {{action, silent, weight}}, got {_shown(raw)}")
    unknown = set(raw) - {"action", "silent", "weight", "mode"}
    if unknown:
        raise PolicyError(
            f"{where}: unknown key(s) {sorted(unknown)}; expected action, silent, weight, mode"
        )
    try:
        action = Action(raw.get("action", "allow"))
    except ValueError:
        raise PolicyError(
            f"{where}.action: expected one of allow, deflect, block, got {_shown(raw.get('action'))}"
        ) from None
    silent = raw.get("silent", False)
    if not isinstance(silent, bool):
        raise PolicyError(f"{where}.silent: expected true or false, got {_shown(silent)}")
    mode = raw.get("mode", "enforce")
    if mode not in RULE_MODES:
        raise PolicyError(f"{where}.mode: expected one of enforce, monitor, got {_shown(mode)}")
    return Rule(action, silent, _num(f"{where}.weight", raw.get("weight", 0.5), 0.0, 1.0), mode)


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise PolicyError(f"{where}: expected a list of strings, got {_shown(value)}")
    return tuple(str(v) for v in value)


# Sections whose keys are not all in the default file (checked where they are parsed).
_OPEN_SECTIONS = {"deny": LIST_FIELDS, "allow": LIST_FIELDS}
_RULE_KEYS = ("action", "silent", "weight", "mode")


def _number_type_names() -> tuple[str, ...]:
    from detector.core.phone import TYPE_NAMES

    return tuple(sorted(set(TYPE_NAMES.values())))


def _check_keys(over: Mapping[str, Any], base: Mapping[str, Any], path: str) -> None:
    """Every key of ``over`` must exist in the default policy (or be a phonenumbers type name
    under ``number_types``, a list field under ``deny``/``allow``), at every level; a typo such
    as ``[risk] deflect`` or ``[number_types] PREMIUM`` is an error naming the known keys."""
    for key, value in over.items():
        where = f"{path}.{key}" if path else str(key)
        if path == "number_types":
            known: tuple[str, ...] = _number_type_names()
            if str(key).upper() not in known:
                raise PolicyError(f"{where}: unknown number type {key!r}; known: {list(known)}")
            sub_base: Any = dict.fromkeys(_RULE_KEYS)
        elif path in _OPEN_SECTIONS:
            continue  # checked against their list fields in parse_policy
        elif path == "rules" or path.startswith("rules."):
            if path == "rules" and key not in base:
                raise PolicyError(f"{where}: unknown rule {key!r}; known: {sorted(base)}")
            sub_base = dict.fromkeys(_RULE_KEYS) if path == "rules" else None
            if path != "rules" and key not in _RULE_KEYS:
                raise PolicyError(f"{where}: unknown key {key!r}; known: {list(_RULE_KEYS)}")
        else:
            if key not in base:
                raise PolicyError(f"{where}: unknown key {key!r}; known: {sorted(base)}")
            sub_base = base[key]
        if isinstance(sub_base, Mapping):
            if not isinstance(value, Mapping):
                raise PolicyError(f"{where}: expected a table, got {type(value).__name__}")
            _check_keys(value, sub_base, where)
        elif isinstance(value, Mapping) and sub_base is not None:
            raise PolicyError(f"{where}: expected a value, got a table")


def parse_policy(overrides: Mapping[str, Any]) -> Policy:
    """Validate ``overrides`` layered over the default policy (so a file may set only what it changes)."""
    base = tomllib.loads(DEFAULT_POLICY_TEXT)
    known_top = set(base)
    unknown = set(overrides) - known_top
    if unknown:
        raise PolicyError(
            f"unknown section(s) {sorted(unknown)}; expected some of {sorted(known_top)}"
        )
    for sec in ("rules", "velocity"):
        extra = set(overrides.get(sec, {})) - set(base[sec])
        if extra:
            raise PolicyError(f"{sec}: unknown key(s) {sorted(extra)}; known: {sorted(base[sec])}")
    _check_keys(overrides, base, "")
    raw = _merge(base, overrides)
    version = raw.get("version")
    if not isinstance(version, str) or not version:
        raise PolicyError(f"version: expected a non-empty string, got {_shown(version)}")
    deflect_at = _num("risk.deflect_at", raw["risk"]["deflect_at"], 0.0, 1.0)
    block_at = _num("risk.block_at", raw["risk"]["block_at"], 0.0, 1.0)
    if block_at < deflect_at:
        raise PolicyError(f"risk.block_at ({block_at}) must be >= risk.deflect_at ({deflect_at})")
    countries = _strings("destinations.allowed_countries", raw["destinations"]["allowed_countries"])
    for c in countries:
        if len(c) != 2 or not c.isalpha():
            raise PolicyError(
                f"destinations.allowed_countries: expected ISO alpha-2 codes, got {_shown(c)}"
            )
    prefixes = _strings("destinations.denied_prefixes", raw["destinations"]["denied_prefixes"])
    for p in prefixes:
        if not p.startswith("+") or not p[1:].isdigit():
            raise PolicyError(f"destinations.denied_prefixes: expected '+' and digits, got {_shown(p)}")
    velocity: dict[str, int] = {}
    for k, v in raw["velocity"].items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PolicyError(f"velocity.{k}: expected a positive integer, got {_shown(v)}")
        velocity[k] = v
    ttl = _num("pending.ttl_seconds", raw["pending"]["ttl_seconds"], 0, 7 * 86400)
    digits = raw["ranges"]["trailing_digits"]
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 6:
        raise PolicyError(f"ranges.trailing_digits: expected an integer 1..6, got {_shown(digits)}")
    lists: dict[str, dict[str, tuple[str, ...]]] = {}
    for sec in ("deny", "allow"):
        extra = set(raw[sec]) - set(LIST_FIELDS)
        if extra:
            raise PolicyError(
                f"{sec}: unknown key(s) {sorted(extra)}; expected {list(LIST_FIELDS)}"
            )
        lists[sec] = {k: _strings(f"{sec}.{k}", raw[sec].get(k, [])) for k in LIST_FIELDS}
    population = _population(raw["population"], raw.get("campaigns", []))
    capacity = parse_capacity_policy(raw["capacity"], error=PolicyError)
    shared = _shared_ip(raw["shared_ip"])
    soft = _strings("risk.soft_codes", raw["risk"].get("soft_codes", []))
    rules = {k: _rule(f"rules.{k}", v) for k, v in raw["rules"].items()}
    _check_capacity_rule(rules["agent_capacity"])
    for code in soft:
        if code not in rules and not code.startswith("number_type_"):
            raise PolicyError(f"risk.soft_codes: unknown reason code {code!r}")
    recomb = raw["velocity"].get("recombination_min", 3)
    return Policy(
        version=version,
        population=population,
        capacity=capacity,
        shared_ip=shared,
        soft_codes=frozenset(soft),
        recombination_min=recomb,
        deflect_at=deflect_at,
        block_at=block_at,
        allowed_countries=frozenset(c.upper() for c in countries),
        denied_prefixes=prefixes,
        number_types={
            k.upper(): _rule(f"number_types.{k}", v) for k, v in raw["number_types"].items()
        },
        rules=rules,
        velocity=velocity,
        pending_ttl=ttl,
        relaxed_codes=frozenset(_strings("auth.relaxed_codes", raw["auth"]["relaxed_codes"])),
        auth_deflect_codes=frozenset(_strings("auth.deflect_codes", raw["auth"].get("deflect_codes", []))),
        auth_weight_factor=_num("auth.weight_factor", raw["auth"]["weight_factor"], 0.0, 1.0),
        range_digits=digits,
        spam_deny_seconds=_num(
            "learning.spam_deny_seconds", raw["learning"]["spam_deny_seconds"], 0, 1e9
        ),
        machine_threshold=int(
            _num("learning.machine_threshold", raw["learning"]["machine_threshold"], 1, 1e6)
        ),
        machine_deny_seconds=_num(
            "learning.machine_deny_seconds", raw["learning"]["machine_deny_seconds"], 0, 1e9
        ),
        deny=lists["deny"],
        allow=lists["allow"],
        spend=parse_spend_policy(raw["spend"]),
    )


def _check_capacity_rule(rule: Rule) -> None:
    """Agent capacity is not fraud: it deflects (or is off), never blocks, never silently, and
    adds no risk."""
    if rule.action == Action.BLOCK:
        raise PolicyError("rules.agent_capacity.action: capacity never blocks; expected deflect "
                          "(or allow to switch it off), got 'block'")
    if rule.silent:
        raise PolicyError("rules.agent_capacity.silent: a capacity deflection is never silent "
                          "(the visitor is offered chat); expected false")
    if rule.weight != 0.0:
        raise PolicyError(f"rules.agent_capacity.weight: capacity is not a risk signal; expected 0, "
                          f"got {rule.weight:g}")


def _int(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PolicyError(f"{where}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def _known(where: str, raw: Mapping[str, Any], known: set[str]) -> None:
    extra = set(raw) - known
    if extra:
        raise PolicyError(f"{where}: unknown key(s) {sorted(extra)}; known: {sorted(known)}")


def _population(raw: Mapping[str, Any], campaigns: Any) -> PopulationPolicy:
    d = PopulationPolicy()
    _known("population", raw, set(PopulationPolicy.__slots__) - {"campaigns"})
    digits = raw.get("block_digits", list(d.block_digits))
    if (not isinstance(digits, list) or not digits
            or not all(isinstance(k, int) and not isinstance(k, bool) and 3 <= k <= 8 for k in digits)):
        raise PolicyError(f"population.block_digits: expected a list of integers 3..8, got {digits!r}")
    if not isinstance(campaigns, list):
        raise PolicyError(f"campaigns: expected an array of tables [[campaigns]], got {campaigns!r}")
    return PopulationPolicy(
        block_digits=tuple(sorted(set(digits))),
        min_national_digits=_int("population.min_national_digits",
                                 raw.get("min_national_digits", d.min_national_digits), 4, 15),
        surge_enter=_num("population.surge_enter", raw.get("surge_enter", d.surge_enter), 1.0, 1e6),
        surge_exit=_num("population.surge_exit", raw.get("surge_exit", d.surge_exit), 1.0, 1e6),
        surge_short_min=_int("population.surge_short_min", raw.get("surge_short_min", d.surge_short_min),
                             1, 10**9),
        country_min_baseline_10m=_num("population.country_min_baseline_10m",
                                      raw.get("country_min_baseline_10m", d.country_min_baseline_10m),
                                      0.1, 1e9),
        global_min_baseline_10m=_num("population.global_min_baseline_10m",
                                     raw.get("global_min_baseline_10m", d.global_min_baseline_10m),
                                     0.1, 1e9),
        prefix_floor_24h=_int("population.prefix_floor_24h",
                              raw.get("prefix_floor_24h", d.prefix_floor_24h), 1, 10**9),
        prefix_floor_1h=_int("population.prefix_floor_1h",
                             raw.get("prefix_floor_1h", d.prefix_floor_1h), 1, 10**9),
        concentration_factor=_num("population.concentration_factor",
                                  raw.get("concentration_factor", d.concentration_factor), 1.0, 1e9),
        fresh_share=_num("population.fresh_share", raw.get("fresh_share", d.fresh_share), 0.0, 1.0),
        child_share=_num("population.child_share", raw.get("child_share", d.child_share), 0.0, 1.0),
        campaigns=tuple(_campaign(f"campaigns[{i}]", c) for i, c in enumerate(campaigns)),
    )


def _campaign(where: str, raw: Any) -> Campaign:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: expected a table {{country, start, end, factor}}, got {raw!r}")
    _known(where, raw, {"country", "start", "end", "factor", "name"})
    country = raw.get("country")
    if not isinstance(country, str) or not (country == "*" or (len(country) == 2 and country.isalpha())):
        raise PolicyError(f"{where}.country: expected an ISO alpha-2 code or '*', got {country!r}")
    times = []
    for name in ("start", "end"):
        value = raw.get(name)
        if isinstance(value, datetime):  # a TOML date-time
            if value.tzinfo is None:
                raise PolicyError(f"{where}.{name}: a date-time needs a zone (e.g. Z), got {value!r}")
            times.append(value.timestamp())
            continue
        try:
            times.append(parse_ts(value))
        except Exception as exc:  # noqa: BLE001 - reported with the field
            raise PolicyError(f"{where}.{name}: expected epoch seconds or RFC 3339, got {value!r}") from exc
    if times[1] <= times[0]:
        raise PolicyError(f"{where}: end must be after start")
    factor = _num(f"{where}.factor", raw.get("factor", 10.0), 1.0, 1e6)
    return Campaign(country.upper() if country != "*" else "*", times[0], times[1], factor)


def _shared_ip(raw: Mapping[str, Any]) -> SharedIpPolicy:
    d = SharedIpPolicy()
    _known("shared_ip", raw, set(SharedIpPolicy.__slots__))
    relaxed = _strings("shared_ip.relaxed", raw.get("relaxed", list(d.relaxed)))
    return SharedIpPolicy(
        min_numbers_24h=_int("shared_ip.min_numbers_24h", raw.get("min_numbers_24h", d.min_numbers_24h),
                             1, 10**6),
        max_countries_24h=_int("shared_ip.max_countries_24h",
                               raw.get("max_countries_24h", d.max_countries_24h), 1, 300),
        max_15m=_int("shared_ip.max_15m", raw.get("max_15m", d.max_15m), 1, 10**6),
        max_1h=_int("shared_ip.max_1h", raw.get("max_1h", d.max_1h), 1, 10**6),
        min_spread=_num("shared_ip.min_spread", raw.get("min_spread", d.min_spread), 0.0, 1.0),
        factor=_int("shared_ip.factor", raw.get("factor", d.factor), 1, 10**6),
        relaxed=relaxed,
    )


def load_policy(path: Path | str | None = None) -> Policy:
    """Load a policy file (layered over the defaults), or the packaged default when ``path`` is None."""
    if path is None:
        return parse_policy({})
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {str(p)!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(f"policy file {str(p)!r} is not UTF-8 (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {str(p)!r} is not valid TOML: {exc}") from exc
    except (RecursionError, ValueError) as exc:  # arrays nested too deep, a 5,000-digit integer
        raise PolicyError(f"policy file {str(p)!r}: a value is nested too deeply or too large "
                          f"({type(exc).__name__})") from None
    try:
        return parse_policy(data)
    except PolicyError as exc:
        raise PolicyError(f"{p}: {exc}") from exc
