"""Deny and allow lists (IPs, CIDRs, ASNs, numbers, prefixes, countries), with optional expiry.

Entries come from the policy file (static) and from the SOC (``detector lists add`` publishes them
to the compacted ``detector-lists`` topic; learned entries come from dialer outcomes). Allow
entries override deny entries.

>>> idx = ListIndex()
>>> idx.add(make_entry("deny", "prefix", "+44 7700", reason="soc ticket 42"))
>>> idx.match("+447700900123", "GB", "203.0.113.9", "GB", None, now=0.0)
(['prefix'], False)
>>> idx.add(make_entry("allow", "number", "+447700900123"))
>>> idx.match("+447700900123", "GB", "203.0.113.9", "GB", None, now=0.0)  # decide() lets allow win
(['prefix'], True)
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from detector.core.errors import InvalidField

KINDS = ("ip", "cidr", "asn", "number", "prefix", "country", "surge", "budget")
#: ``surge`` entries force under-attack mode for a scope (value ``*``, a country code, or an E.164
#: prefix): ``deny`` forces it on, ``allow`` forces it off, until the entry expires.
#: ``budget`` entries act on a spend circuit breaker (core/spend.py; value ``*``, a country code or
#: a spend scope's E.164 prefix): ``allow`` holds it closed (the SOC's reset), ``allow`` with
#: ``:x<factor>`` (``GB:x3``) raises its budgets, ``deny`` forces it open, until the entry expires.
MATCH_KINDS = frozenset({"ip", "cidr", "asn", "number", "prefix", "country"})  # what match() reads
ACTIONS = ("deny", "allow")
SOURCES = ("soc", "policy", "learned")  # who made the entry (a bounded metric label)
MAX_VALUE_LEN = 64
MAX_REASON_LEN = 256


@dataclass(frozen=True, slots=True)
class ListEntry:
    action: str  # deny | allow
    kind: str  # ip | cidr | asn | number | prefix | country | surge | budget
    value: str  # normalized
    reason: str = ""
    expires_at: float | None = None  # epoch seconds; None = never
    added_at: float = 0.0
    source: str = "soc"  # soc | policy | learned

    @property
    def key(self) -> str:
        """Stable identity (the compacted topic's key): ``action:kind:value``."""
        return f"{self.action}:{self.kind}:{self.value}"

    def active(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize(kind: str, value: str) -> str:
    """Canonical form of a list value; raises InvalidField explaining the expected form."""
    if not isinstance(value, str) or len(value) > MAX_VALUE_LEN:
        raise InvalidField("value", f"a string of at most {MAX_VALUE_LEN} characters", value)
    v = value.strip()
    if kind == "ip":
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise InvalidField("value", "an IPv4 or IPv6 address", value) from None
    if kind == "cidr":
        try:
            return str(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise InvalidField("value", "a CIDR like 198.51.100.0/24", value) from None
    if kind == "asn":
        digits = v.upper().removeprefix("AS")
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 10) or int(digits) >= 2**32:
            raise InvalidField("value", "an AS number like AS64500", value)
        return str(int(digits))
    if kind in ("number", "prefix"):
        digits = "".join(ch for ch in v if ch.isascii() and ch.isdigit())
        if v.startswith("00"):
            digits = digits[2:]
        if not v.startswith(("+", "00")) or not digits or len(digits) > 15:
            raise InvalidField("value", f"an international {kind} starting with + (E.164)", value)
        return "+" + digits
    if kind == "budget":  # a spend breaker: scope [":x" factor]
        scope, sep, factor = v.partition(":")
        out = normalize("surge", scope)
        if not sep:
            return out
        try:
            f = float(factor[1:]) if factor[:1] in ("x", "X") else math.nan
        except ValueError:
            f = math.nan
        if not 1.0 <= f <= 1000.0:
            raise InvalidField("value", "a budget scope (*, GB, +4470) with an optional raise "
                               "factor from :x1 to :x1000 (GB:x3)", value)
        return f"{out}:x{f:g}"
    if kind == "surge":  # under-attack mode: everything, a country or an E.164 prefix
        if v == "*":
            return v
        if v.startswith(("+", "00")):
            return normalize("prefix", v)
        return normalize("country", v)
    if kind == "country":
        if len(v) != 2 or not v.isalpha() or not v.isascii():
            raise InvalidField("value", "an ISO 3166 alpha-2 country code", value)
        return v.upper()
    raise InvalidField("kind", f"one of {', '.join(KINDS)}", kind)


def make_entry(
    action: str,
    kind: str,
    value: str,
    *,
    reason: str = "",
    expires_at: float | None = None,
    added_at: float = 0.0,
    source: str = "soc",
) -> ListEntry:
    if action not in ACTIONS:
        raise InvalidField("action", "deny or allow", action)
    if kind not in KINDS:
        raise InvalidField("kind", f"one of {', '.join(KINDS)}", kind)
    if source not in SOURCES:
        raise InvalidField("source", f"one of {', '.join(SOURCES)}", source)
    if not isinstance(reason, str) or len(reason) > MAX_REASON_LEN:
        raise InvalidField("reason", f"a string of at most {MAX_REASON_LEN} characters", reason)
    normalized = normalize(kind, value)
    if kind == "budget" and action == "deny" and ":x" in normalized:
        raise InvalidField("value", "a budget scope without a factor for deny (a raise is an allow entry)",
                           value)
    return ListEntry(action, kind, normalized, reason, expires_at, added_at, source)


def _epoch(d: dict[str, Any], name: str, *, nullable: bool) -> float | None:
    """Epoch seconds in [0, 2100-01-01] (no overflow whatever the JSON held)."""
    v = d.get(name)
    if v is None:
        return None if nullable else 0.0
    expected = "epoch seconds (0 to 4102444800)" + (" or null" if nullable else "")
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidField(name, expected, v)
    if isinstance(v, int) and not 0 <= v <= 4_102_444_800:
        raise InvalidField(name, expected, v)
    if not math.isfinite(v) or not 0 <= v <= 4_102_444_800:
        raise InvalidField(name, expected, v)
    return float(v)


def entry_from_dict(d: dict[str, Any]) -> ListEntry:
    """Parse a list entry message (the ``detector-lists`` topic value); every field is checked
    and a bad one raises :class:`InvalidField` naming it (never another exception)."""
    if not isinstance(d, dict):
        raise InvalidField("entry", "a JSON object", d)
    for name in ("action", "kind", "value"):
        if d.get(name) is None:
            raise InvalidField(name, "a string", None)
        if not isinstance(d[name], str):
            raise InvalidField(name, "a string", d[name])
    reason = d.get("reason")
    source = d.get("source")
    return make_entry(
        d["action"],
        d["kind"],
        d["value"],
        reason="" if reason is None else reason,
        expires_at=_epoch(d, "expires_at", nullable=True),
        added_at=_epoch(d, "added_at", nullable=False) or 0.0,
        source="soc" if source is None else source,
    )


class ListIndex:
    """Index of list entries answering "is this request denied / allowed?" in O(prefix length)."""

    def __init__(self, entries: Iterable[ListEntry] = ()) -> None:
        self._by_key: dict[str, ListEntry] = {}
        self._exact: dict[tuple[str, str, str], ListEntry] = {}  # (action, kind, value)
        self._nets: dict[tuple[str, int, int], dict[int, ListEntry]] = {}  # (action, ver, plen)
        self._prefix_lens: dict[str, set[int]] = {"deny": set(), "allow": set()}
        self._surge_prefix_lens: dict[str, set[int]] = {"deny": set(), "allow": set()}
        self._surge_keys = 0
        self._budget: dict[str, dict[str, ListEntry]] = {}  # spend scope -> entries (kind budget)
        # entries that match() looks at, per action: none (the usual case) skips the look-ups
        self._matchable: dict[str, int] = {"deny": 0, "allow": 0}
        for e in entries:
            self.add(e)

    def __len__(self) -> int:
        return len(self._by_key)

    @property
    def matches_nothing(self) -> bool:
        """True when :meth:`match` cannot find anything (no ip, cidr, asn, number, prefix or
        country entry): the usual case, which callers skip."""
        return not (self._matchable["deny"] or self._matchable["allow"])

    @property
    def has_surge_entries(self) -> bool:
        """False when :meth:`surge_overrides` is certain to be empty."""
        return self._surge_keys > 0

    def entries(self) -> list[ListEntry]:
        return sorted(self._by_key.values(), key=lambda e: e.key)

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of entries per (action, kind)."""
        out: dict[tuple[str, str], int] = {}
        for e in self._by_key.values():
            out[(e.action, e.kind)] = out.get((e.action, e.kind), 0) + 1
        return out

    def add(self, e: ListEntry) -> None:
        self.remove(e.key)
        self._by_key[e.key] = e
        if e.kind in MATCH_KINDS:
            self._matchable[e.action] += 1
        if e.kind == "cidr":
            net = ipaddress.ip_network(e.value)
            self._nets.setdefault((e.action, net.version, net.prefixlen), {})[
                int(net.network_address)
            ] = e
        else:
            self._exact[(e.action, e.kind, e.value)] = e
            if e.kind == "prefix":
                self._prefix_lens[e.action].add(len(e.value))
            if e.kind == "surge":
                self._surge_keys += 1
                if e.value.startswith("+"):
                    self._surge_prefix_lens[e.action].add(len(e.value))
            if e.kind == "budget":
                self._budget.setdefault(e.value.partition(":")[0], {})[e.key] = e

    def remove(self, key: str) -> None:
        e = self._by_key.pop(key, None)
        if e is None:
            return
        if e.kind in MATCH_KINDS:
            self._matchable[e.action] -= 1
        if e.kind == "cidr":
            net = ipaddress.ip_network(e.value)
            self._nets.get((e.action, net.version, net.prefixlen), {}).pop(
                int(net.network_address), None
            )
        else:
            self._exact.pop((e.action, e.kind, e.value), None)
            if e.kind == "surge":
                self._surge_keys -= 1
            if e.kind == "budget":
                scope = e.value.partition(":")[0]
                self._budget.get(scope, {}).pop(e.key, None)
                if not self._budget.get(scope):
                    self._budget.pop(scope, None)

    def surge_overrides(self, e164: str | None, region: str | None, *, now: float) -> dict[str, bool]:
        """The SOC's forced under-attack modes for a request: ``{"global"|"country"|"prefix": on}``
        (absent: no override). An ``allow`` (off) entry wins over a ``deny`` (on) one."""
        if not self._surge_keys:
            return {}
        out: dict[str, bool] = {}
        for action, on in (("deny", True), ("allow", False)):
            for scope, value in (("global", "*"), ("country", region)):
                e = self._exact.get((action, "surge", value)) if value else None
                if e is not None and e.active(now):
                    out[scope] = on
            if e164:
                for n in sorted(self._surge_prefix_lens[action], reverse=True):
                    e = self._exact.get((action, "surge", e164[:n])) if n <= len(e164) else None
                    if e is not None and e.active(now):
                        out["prefix"] = on
                        break
        return out

    def budget_overrides(self, keys: Iterable[str], *, now: float) -> dict[str, tuple[str, float]]:
        """The SOC's overrides of spend breakers ``keys`` (``$C:GB``, ``$P:+4470``): ``{key:
        ("closed" | "raise" | "open", factor)}``, from active ``budget`` entries for the key's
        scope or ``*``. Allow wins over deny: held closed, else raised (the largest factor),
        else forced open."""
        if not self._budget:
            return {}
        out: dict[str, tuple[str, float]] = {}
        every = self._budget.get("*", {})
        for key in keys:
            entries = [*self._budget.get(key[3:], {}).values(), *every.values()]
            best: tuple[str, float] | None = None
            for e in entries:
                if not e.active(now):
                    continue
                if e.action == "deny":
                    found = ("open", 1.0)
                elif ":x" in e.value:
                    found = ("raise", float(e.value.rpartition(":x")[2]))
                else:
                    found = ("closed", 1.0)
                rank = {"open": 0, "raise": 1, "closed": 2}
                if best is None or (rank[found[0]], found[1]) > (rank[best[0]], best[1]):
                    best = found
            if best is not None:
                out[key] = best
        return out

    def _hits(
        self,
        action: str,
        e164: str | None,
        number_cc: str | None,
        ip: str,
        ip_cc: str | None,
        asn: int | None,
        now: float,
    ) -> list[str]:
        found: list[str] = []

        def check(kind: str, value: str) -> None:
            e = self._exact.get((action, kind, value))
            if e is not None and e.active(now) and kind not in found:
                found.append(kind)

        if e164:
            check("number", e164)
            for n in sorted(self._prefix_lens[action], reverse=True):
                if n <= len(e164):
                    check("prefix", e164[:n])
        check("ip", ip)
        addr = None
        if self._nets:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                addr = None
        if addr is not None:
            as_int = int(addr)
            bits = 32 if addr.version == 4 else 128
            for (act, ver, plen), nets in self._nets.items():
                if act != action or ver != addr.version or not nets:
                    continue
                e = nets.get(as_int >> (bits - plen) << (bits - plen))
                if e is not None and e.active(now) and "cidr" not in found:
                    found.append("cidr")
        if asn is not None:
            check("asn", str(asn))
        for cc in (number_cc, ip_cc):
            if cc:
                check("country", cc)
        return found

    def match(
        self,
        e164: str | None,
        number_cc: str | None,
        ip: str,
        ip_cc: str | None,
        asn: int | None,
        *,
        now: float,
    ) -> tuple[list[str], bool]:
        """(kinds of active deny entries that match, whether an active allow entry matches)."""
        matchable = self._matchable
        denied = self._hits("deny", e164, number_cc, ip, ip_cc, asn, now) if matchable["deny"] else []
        allowed = matchable["allow"] > 0 and bool(
            self._hits("allow", e164, number_cc, ip, ip_cc, asn, now))
        return denied, allowed

    @classmethod
    def from_policy(
        cls, deny: dict[str, tuple[str, ...]], allow: dict[str, tuple[str, ...]]
    ) -> ListIndex:
        plural = {
            "ips": "ip",
            "cidrs": "cidr",
            "asns": "asn",
            "numbers": "number",
            "prefixes": "prefix",
            "countries": "country",
        }
        idx = cls()
        for action, table in (("deny", deny), ("allow", allow)):
            for field_name, values in table.items():
                for v in values:
                    idx.add(
                        make_entry(action, plural[field_name], v, reason="policy", source="policy")
                    )
        return idx
