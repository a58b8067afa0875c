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
from importlib import resources
from pathlib import Path
from typing import Any

from detector.core.errors import PolicyError, _shown
from detector.core.records import Action

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

    def rule(self, code: str) -> Rule:
        return self.rules[code]


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
    unknown = set(raw) - {"action", "silent", "weight"}
    if unknown:
        raise PolicyError(
            f"{where}: unknown key(s) {sorted(unknown)}; expected action, silent, weight"
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
    return Rule(action, silent, _num(f"{where}.weight", raw.get("weight", 0.5), 0.0, 1.0))


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise PolicyError(f"{where}: expected a list of strings, got {_shown(value)}")
    return tuple(str(v) for v in value)


# Sections whose keys are not all in the default file (checked where they are parsed).
_OPEN_SECTIONS = {"deny": LIST_FIELDS, "allow": LIST_FIELDS}
_RULE_KEYS = ("action", "silent", "weight")


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
    return Policy(
        version=version,
        deflect_at=deflect_at,
        block_at=block_at,
        allowed_countries=frozenset(c.upper() for c in countries),
        denied_prefixes=prefixes,
        number_types={
            k.upper(): _rule(f"number_types.{k}", v) for k, v in raw["number_types"].items()
        },
        rules={k: _rule(f"rules.{k}", v) for k, v in raw["rules"].items()},
        velocity=velocity,
        pending_ttl=ttl,
        relaxed_codes=frozenset(_strings("auth.relaxed_codes", raw["auth"]["relaxed_codes"])),
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
