"""IP enrichment: scope, country, ASN and anonymity, from optional MaxMind-format databases and lists.

Every source is optional. A missing source disables its signals; :meth:`IpIntel.describe` lists what
is active so the worker can say so once at start-up. Supported layouts:

* country: MaxMind GeoIP2/GeoLite2 (``country.iso_code``, falling back to
  ``registered_country.iso_code``) or ip-location-db (``country_code``);
* ASN: GeoLite2-ASN / ip-location-db (``autonomous_system_number``, ``autonomous_system_organization``);
* anonymity: MaxMind Anonymous-IP (``is_anonymous_vpn``, ``is_tor_exit_node``, ``is_hosting_provider``,
  ``is_public_proxy``, ``is_residential_proxy``; an unflagged network is ``{}``);
* CIDR list files (one address or CIDR per line, ``#`` comments) tagged ``tor``, ``vpn``, ``proxy``
  or ``hosting``; a file of hosting ASNs (``AS16509`` or ``16509`` per line).
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import maxminddb
import netaddr

from detector.core.errors import ConfigError
from detector.core.records import IpInfo

log = logging.getLogger(__name__)

LIST_KINDS = ("tor", "vpn", "proxy", "hosting")
_KIND_FLAG = {
    "tor": "tor_exit",
    "vpn": "anonymous_vpn",
    "proxy": "public_proxy",
    "hosting": "hosting",
}


def scope_of(ip: str) -> tuple[int, str]:
    """(version, scope) of an address; scope is global/private/loopback/reserved/malformed.

    >>> scope_of("10.1.2.3"), scope_of("8.8.8.8"), scope_of("::1"), scope_of("nope")
    ((4, 'private'), (4, 'global'), (6, 'loopback'), (0, 'malformed'))
    """
    if _V4_STARTS:
        try:
            n = int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
        except (OSError, ValueError, TypeError):
            pass  # not a dotted quad: IPv6 or malformed, asked of ipaddress below
        else:
            return 4, _V4_SCOPES[bisect.bisect_right(_V4_STARTS, n) - 1]
    if _V6_STARTS:
        try:
            packed = socket.inet_pton(socket.AF_INET6, ip)
        except (OSError, ValueError, TypeError):
            pass  # malformed, or a zone index (fe80::1%eth0): asked of ipaddress below
        else:
            # only the canonical text (what the request parser writes): any other spelling is
            # left to ipaddress, which decides what it accepts
            if socket.inet_ntop(socket.AF_INET6, packed) == ip:
                scope = _V6_SCOPES[bisect.bisect_right(_V6_STARTS, int.from_bytes(packed, "big")) - 1]
                if scope is not None:
                    return 6, scope
    return _scope_of(ip)


def _scope_of(ip: str) -> tuple[int, str]:
    """:func:`scope_of` by :mod:`ipaddress` (the definition; the IPv4 table is built from it)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return 0, "malformed"
    if addr.is_loopback:
        return addr.version, "loopback"
    if addr.is_reserved or addr.is_multicast or addr.is_unspecified or addr.is_link_local:
        return addr.version, "reserved"
    if addr.is_private or not addr.is_global:
        # RFC 1918, ULA, CGNAT and documentation ranges: not routable on the internet.
        return addr.version, "private"
    return addr.version, "global"


def _constant_cuts(
    constants: str, network: type[ipaddress.IPv4Network] | type[ipaddress.IPv6Network],
    address: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address],
) -> set[int] | None:
    """The interval bounds of every network and address in ``ipaddress``'s (private) class of
    constants ``constants`` of one IP version (what it classifies addresses by); None if this
    Python's ``ipaddress`` has no such class (the tables are then not used)."""
    try:
        values = list(vars(getattr(ipaddress, constants)).values())
    except AttributeError:  # pragma: no cover - another Python's ipaddress
        return None
    cuts: set[int] = set()
    for v in values:
        for x in v if isinstance(v, list | tuple) else [v]:
            if isinstance(x, network):
                cuts.update((int(x.network_address), int(x.broadcast_address) + 1))
            elif isinstance(x, address):
                cuts.update((int(x), int(x) + 1))
    return cuts


def _v4_table() -> tuple[list[int], list[str]]:
    """IPv4 scopes as sorted interval starts and the scope of each interval: ~4 us of
    ``ipaddress`` properties per address become a bisection. The intervals are cut at every
    network and address :mod:`ipaddress` classifies IPv4 by (``_IPv4Constants``), so the scope
    is constant inside each; both ends of every interval are checked against :func:`_scope_of`
    here, and the table is not used (empty) if any disagrees or the constants are not found."""
    cuts = _constant_cuts("_IPv4Constants", ipaddress.IPv4Network, ipaddress.IPv4Address)
    if cuts is None:  # pragma: no cover - another Python's ipaddress
        return [], []
    bounds = sorted(cuts | {0, 1 << 32})
    starts: list[int] = []
    scopes: list[str] = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        scope = _scope_of(str(ipaddress.IPv4Address(lo)))
        if scope != _scope_of(str(ipaddress.IPv4Address(hi - 1))) or scope[0] != 4:
            return [], []  # pragma: no cover - classified by something else than the constants
        if not scopes or scopes[-1] != scope[1]:
            starts.append(lo)
            scopes.append(scope[1])
    return starts, scopes


_V4_STARTS, _V4_SCOPES = _v4_table()

#: IPv4-mapped IPv6 (::ffff:0:0/96): ipaddress judges these by the IPv4 address inside (some
#: properties, depending on the Python version), so the IPv6 table leaves them to ipaddress.
_V6_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _v6_table() -> tuple[list[int], list[str | None]]:
    """IPv6 scopes as sorted interval starts and each interval's scope (None: ask
    :mod:`ipaddress`), built and checked as :func:`_v4_table` is: ~12 us of ``ipaddress``
    per IPv6 address (its ``is_private`` tests the networks one by one) become a bisection.
    The IPv4-mapped block is cut out and left to ``ipaddress``."""
    cuts = _constant_cuts("_IPv6Constants", ipaddress.IPv6Network, ipaddress.IPv6Address)
    if cuts is None:  # pragma: no cover - another Python's ipaddress
        return [], []
    mapped = (int(_V6_MAPPED.network_address), int(_V6_MAPPED.broadcast_address) + 1)
    cuts.update((0, 1 << 128, *mapped))
    for special in (0, 1):  # is_unspecified and is_loopback compare the integer itself
        cuts.update((special, special + 1))
    bounds = sorted(cuts)
    starts: list[int] = []
    scopes: list[str | None] = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if lo == mapped[0]:
            scope: str | None = None
        else:
            version, scope = _scope_of(str(ipaddress.IPv6Address(lo)))
            if (version, scope) != _scope_of(str(ipaddress.IPv6Address(hi - 1))) or version != 6:
                return [], []  # pragma: no cover - classified by something else than the constants
        if not scopes or scopes[-1] != scope:
            starts.append(lo)
            scopes.append(scope)
    return starts, scopes


_V6_STARTS, _V6_SCOPES = _v6_table()


def _open(path: Path | None, what: str) -> Any:
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"{what} database {str(path)!r} does not exist")
    try:
        reader = maxminddb.open_database(str(path))
    except (ValueError, OSError, maxminddb.InvalidDatabaseError) as exc:
        raise ConfigError(f"{what} database {str(path)!r} is not a MaxMind DB file: {exc}") from exc
    return reader


def read_cidr_file(path: Path) -> list[str]:
    """Addresses/CIDRs from a list file; raises ConfigError naming the bad line."""
    out: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            out.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise ConfigError(f"{path}:{n}: expected an IP address or CIDR, got {text!r}") from None
    return out


def read_asn_file(path: Path) -> set[int]:
    out: set[int] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip().upper().removeprefix("AS")
        if not text:
            continue
        if not text.isdigit():
            raise ConfigError(
                f"{path}:{n}: expected an AS number like AS16509, got {line.strip()!r}"
            )
        out.add(int(text))
    return out


@dataclass
class IpIntel:
    """Looks up one IP in every configured source. Results are cached (bounded)."""

    country_db: Path | None = None
    asn_db: Path | None = None
    anonymous_db: Path | None = None
    cidr_lists: Mapping[str, Iterable[str]] = field(default_factory=dict)  # kind -> CIDRs
    hosting_asns: set[int] = field(default_factory=set)
    cache_size: int = 200_000  # ~50 MB when full; a worker keeps fewer (stream/worker.py)
    connection_type_db: Path | None = None  # MaxMind GeoIP2 Connection-Type: "Cellular" = mobile
    mobile_asns: set[int] = field(default_factory=set)  # mobile carriers' ASNs (CGNAT pools)

    def __post_init__(self) -> None:
        self._country = _open(self.country_db, "country")
        self._asn = _open(self.asn_db, "ASN")
        self._anon = _open(self.anonymous_db, "anonymous-IP")
        self._conn = _open(self.connection_type_db, "connection-type")
        unknown = set(self.cidr_lists) - set(LIST_KINDS)
        if unknown:
            raise ConfigError(
                f"unknown IP list kind(s) {sorted(unknown)}; expected one of {LIST_KINDS}"
            )
        self._sets = {k: netaddr.IPSet(list(v)) for k, v in self.cidr_lists.items()}
        self._cache: dict[str, IpInfo] = {}

    @classmethod
    def from_paths(
        cls,
        country_db: Path | None = None,
        asn_db: Path | None = None,
        anonymous_db: Path | None = None,
        list_files: Mapping[str, Path] | None = None,
        hosting_asn_file: Path | None = None,
        connection_type_db: Path | None = None,
        mobile_asn_file: Path | None = None,
    ) -> IpIntel:
        lists = {kind: read_cidr_file(p) for kind, p in (list_files or {}).items()}
        asns = read_asn_file(hosting_asn_file) if hosting_asn_file else set()
        mobile = read_asn_file(mobile_asn_file) if mobile_asn_file else set()
        return cls(country_db, asn_db, anonymous_db, lists, asns,
                   connection_type_db=connection_type_db, mobile_asns=mobile)

    def describe(self) -> list[str]:
        """One line per signal source: active (with its path) or DISABLED."""
        lines = []
        for name, reader, path in (
            ("country", self._country, self.country_db),
            ("asn", self._asn, self.asn_db),
            ("anonymous-ip", self._anon, self.anonymous_db),
            ("connection-type", self._conn, self.connection_type_db),
        ):
            if reader is None:
                lines.append(f"{name}: DISABLED (no database configured; its signals are off)")
            else:
                ext = (
                    "C extension"
                    if "extension" in type(reader).__module__
                    else "PURE PYTHON (slow)"
                )
                lines.append(f"{name}: {path} [{ext}]")
        for kind in LIST_KINDS:
            n = len(self._sets[kind].iter_cidrs()) if kind in self._sets else 0
            lines.append(f"list {kind}: {n} networks" if n else f"list {kind}: none")
        lines.append(f"hosting ASNs: {len(self.hosting_asns)}")
        lines.append(
            f"mobile-carrier ASNs: {len(self.mobile_asns)}" if self.mobile_asns
            else "mobile-carrier ASNs: none (shared carrier IPs are learned from traffic only)"
        )
        return lines

    def close(self) -> None:
        for reader in (self._country, self._asn, self._anon, self._conn):
            if reader is not None:
                reader.close()

    def lookup(self, ip: str) -> IpInfo:
        hit = self._cache.get(ip)
        if hit is not None:
            return hit
        info = self._lookup(ip)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[ip] = info
        return info

    def _lookup(self, ip: str) -> IpInfo:
        version, scope = scope_of(ip)
        if scope == "malformed":
            return IpInfo(ip=ip, version=version, scope=scope)
        # (locals and one positional IpInfo: 0.75 new addresses a request in a replay, and a
        # dict of updates passed as keywords cost ~1 us more each)
        country: str | None = None
        asn: int | None = None
        as_org = None
        vpn = tor = proxy = residential = hosting = cellular = False
        if self._country is not None:
            rec = self._country.get(ip) or {}
            cc = (
                (rec.get("country") or {}).get("iso_code")
                or rec.get("country_code")
                or (rec.get("registered_country") or {}).get("iso_code")
            )
            if cc:
                country = str(cc).upper()
        if self._asn is not None:
            rec = self._asn.get(ip) or {}
            if rec.get("autonomous_system_number") is not None:
                asn = int(rec["autonomous_system_number"])
                as_org = rec.get("autonomous_system_organization")
        if self._anon is not None:
            rec = self._anon.get(ip) or {}
            vpn = bool(rec.get("is_anonymous_vpn"))
            tor = bool(rec.get("is_tor_exit_node"))
            proxy = bool(rec.get("is_public_proxy"))
            residential = bool(rec.get("is_residential_proxy"))
            hosting = bool(rec.get("is_hosting_provider"))
        for kind, ipset in self._sets.items():
            if ip in ipset:
                flag = _KIND_FLAG[kind]
                if flag == "tor_exit":
                    tor = True
                elif flag == "anonymous_vpn":
                    vpn = True
                elif flag == "public_proxy":
                    proxy = True
                else:
                    hosting = True
        if asn in self.hosting_asns:
            hosting = True
        if self._conn is not None:
            rec = self._conn.get(ip) or {}
            if rec.get("connection_type") == "Cellular":
                cellular = True
        if asn is not None and asn in self.mobile_asns:
            cellular = True
        return IpInfo(ip, version, scope, country, asn, as_org, vpn, tor, proxy, residential,
                      hosting, cellular)
