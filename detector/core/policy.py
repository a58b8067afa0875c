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

from detector.core.errors import PolicyError
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
    mode: str = "enforce"  # "monitor": evaluated and reported, never changes action or risk


RULE_MODES = ("enforce", "monitor")


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
        raise PolicyError(f"{where}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _rule(where: str, raw: Any) -> Rule:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: expected a table {{action, silent, weight}}, got {raw!r}")
    unknown = set(raw) - {"action", "silent", "weight", "mode"}
    if unknown:
        raise PolicyError(
            f"{where}: unknown key(s) {sorted(unknown)}; expected action, silent, weight, mode"
        )
    try:
        action = Action(raw.get("action", "allow"))
    except ValueError:
        raise PolicyError(
            f"{where}.action: expected one of allow, deflect, block, got {raw.get('action')!r}"
        ) from None
    silent = raw.get("silent", False)
    if not isinstance(silent, bool):
        raise PolicyError(f"{where}.silent: expected true or false, got {silent!r}")
    mode = raw.get("mode", "enforce")
    if mode not in RULE_MODES:
        raise PolicyError(f"{where}.mode: expected one of enforce, monitor, got {mode!r}")
    return Rule(action, silent, _num(f"{where}.weight", raw.get("weight", 0.5), 0.0, 1.0), mode)


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise PolicyError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


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
    raw = _merge(base, overrides)
    version = raw.get("version")
    if not isinstance(version, str) or not version:
        raise PolicyError(f"version: expected a non-empty string, got {version!r}")
    deflect_at = _num("risk.deflect_at", raw["risk"]["deflect_at"], 0.0, 1.0)
    block_at = _num("risk.block_at", raw["risk"]["block_at"], 0.0, 1.0)
    if block_at < deflect_at:
        raise PolicyError(f"risk.block_at ({block_at}) must be >= risk.deflect_at ({deflect_at})")
    countries = _strings("destinations.allowed_countries", raw["destinations"]["allowed_countries"])
    for c in countries:
        if len(c) != 2 or not c.isalpha():
            raise PolicyError(
                f"destinations.allowed_countries: expected ISO alpha-2 codes, got {c!r}"
            )
    prefixes = _strings("destinations.denied_prefixes", raw["destinations"]["denied_prefixes"])
    for p in prefixes:
        if not p.startswith("+") or not p[1:].isdigit():
            raise PolicyError(f"destinations.denied_prefixes: expected '+' and digits, got {p!r}")
    velocity: dict[str, int] = {}
    for k, v in raw["velocity"].items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PolicyError(f"velocity.{k}: expected a positive integer, got {v!r}")
        velocity[k] = v
    ttl = _num("pending.ttl_seconds", raw["pending"]["ttl_seconds"], 0, 7 * 86400)
    digits = raw["ranges"]["trailing_digits"]
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 6:
        raise PolicyError(f"ranges.trailing_digits: expected an integer 1..6, got {digits!r}")
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
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {str(p)!r} is not valid TOML: {exc}") from exc
    try:
        return parse_policy(data)
    except PolicyError as exc:
        raise PolicyError(f"{p}: {exc}") from exc
