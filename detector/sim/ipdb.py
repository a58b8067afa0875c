"""The simulator's synthetic IP world, and MaxMind-format databases that describe it.

:data:`IP_PLAN` is the single source of truth: the simulator draws every address from it
(:func:`random_ip`) and :func:`build_ip_databases` writes the same table as three ``.mmdb`` files
plus a hosting-ASN list, so enrichment of simulated traffic agrees with the labels.

Address plan (ASNs are from the private-use range 64512-65534; org names are generic)::

    kind               where                                    anonymous-IP flag
    residential        4 x /16 per business country (4 ISPs), 1-2 /16
                       in each of 30 foreign countries; IPv6 /32
                       in GB, FR, DE                             (none)
    mobile             3 x /16 per business country (3 operators)
                       and 1-2 per foreign country               (none)
      CGNAT pools      1 x /24 per operator of a business country
                       (``cgnat=True``: many subscribers share one
                       address; see :func:`cgnat_pools`)         (none)
    business           1 x /16 per business country: office
                       broadband / leased lines (office NAT)     (none)
    residential_proxy  1 x /20 per business country (same ASN as
                       a residential ISP of that country)        is_residential_proxy
    hosting            95.216/16 DE, 34.96/16 US, 2a0a:4000::/32 is_hosting_provider
                       (AS64520, AS64521: the hosting-ASN file)
    vpn                185.212/20 NL, 185.213/20 US, 185.214/20 GB  is_anonymous_vpn
    tor                185.220.100/22 DE                          is_tor_exit_node
    proxy              45.148/20 RU, 103.151/20 VN                is_public_proxy

Every block is globally routable per :mod:`ipaddress` (no RFC 1918, CGNAT, TEST-NET or
benchmarking space), so the detector sees scope ``global``. Only flagged kinds appear in the
anonymous-IP database; any other address returns ``None`` from it, as with MaxMind's own.

>>> block_of("185.220.100.7").kind
'tor'
>>> block_of(random_ip(random.Random(3), "GB", "mobile")).org.startswith("GB mobile operator")
True
>>> len(cgnat_pools("GB")), cgnat_pools("GB")[0].kind
(3, 'mobile')
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mmdb_writer import MmdbU32, MMDBWriter
from netaddr import IPSet

KINDS = (
    "residential", "mobile", "hosting", "vpn", "tor", "proxy", "residential_proxy", "business",
)

#: Kinds that the anonymous-IP database flags, and the MaxMind flags it sets for each.
ANONYMOUS_FLAGS: dict[str, dict[str, bool]] = {
    "vpn": {"is_anonymous": True, "is_anonymous_vpn": True},
    "tor": {"is_anonymous": True, "is_tor_exit_node": True},
    "proxy": {"is_anonymous": True, "is_public_proxy": True},
    "residential_proxy": {"is_anonymous": True, "is_residential_proxy": True},
    "hosting": {"is_anonymous": True, "is_hosting_provider": True},
}

#: ``build_epoch`` written into every database, fixed so that the files are reproducible.
BUILD_EPOCH = 1795305600


@dataclass(frozen=True, slots=True)
class IpBlock:
    """One network of the synthetic plan: where it is, who announces it, what it is used for."""

    cidr: str
    country: str  # ISO 3166 alpha-2 of the country database
    asn: int
    org: str
    kind: str  # one of KINDS
    cgnat: bool = False  # a mobile operator's carrier-grade NAT pool (many subscribers per address)


def _b(cidr: str, country: str, asn: int, org: str, kind: str, *, cgnat: bool = False) -> IpBlock:
    return IpBlock(cidr, country, asn, org, kind, cgnat)


IP_PLAN: tuple[IpBlock, ...] = (
    # --- business countries: residential ISPs, a mobile operator, a residential-proxy pool
    _b("81.2.0.0/16", "GB", 64601, "GB residential ISP 1", "residential"),
    _b("86.12.0.0/16", "GB", 64602, "GB residential ISP 2", "residential"),
    _b("92.16.0.0/16", "GB", 64603, "GB mobile operator", "mobile"),
    _b("81.3.0.0/20", "GB", 64602, "GB residential ISP 2", "residential_proxy"),
    _b("2a0a:1000::/32", "GB", 64601, "GB residential ISP 1", "residential"),
    _b("87.32.0.0/16", "IE", 64611, "IE residential ISP 1", "residential"),
    _b("89.101.0.0/16", "IE", 64612, "IE residential ISP 2", "residential"),
    _b("37.228.0.0/16", "IE", 64613, "IE mobile operator", "mobile"),
    _b("87.33.0.0/20", "IE", 64611, "IE residential ISP 1", "residential_proxy"),
    _b("90.8.0.0/16", "FR", 64621, "FR residential ISP 1", "residential"),
    _b("82.64.0.0/16", "FR", 64622, "FR residential ISP 2", "residential"),
    _b("80.214.0.0/16", "FR", 64623, "FR mobile operator", "mobile"),
    _b("90.9.0.0/20", "FR", 64621, "FR residential ISP 1", "residential_proxy"),
    _b("2a0a:2000::/32", "FR", 64622, "FR residential ISP 2", "residential"),
    _b("84.128.0.0/16", "DE", 64631, "DE residential ISP 1", "residential"),
    _b("91.32.0.0/16", "DE", 64632, "DE residential ISP 2", "residential"),
    _b("109.40.0.0/16", "DE", 64633, "DE mobile operator", "mobile"),
    _b("84.129.0.0/20", "DE", 64631, "DE residential ISP 1", "residential_proxy"),
    _b("2a0a:3000::/32", "DE", 64631, "DE residential ISP 1", "residential"),
    _b("83.32.0.0/16", "ES", 64641, "ES residential ISP 1", "residential"),
    _b("88.6.0.0/16", "ES", 64642, "ES residential ISP 2", "residential"),
    _b("188.76.0.0/16", "ES", 64643, "ES mobile operator", "mobile"),
    _b("83.33.0.0/20", "ES", 64641, "ES residential ISP 1", "residential_proxy"),
    _b("84.24.0.0/16", "NL", 64651, "NL residential ISP 1", "residential"),
    _b("77.160.0.0/16", "NL", 64652, "NL residential ISP 2", "residential"),
    _b("31.20.0.0/16", "NL", 64653, "NL mobile operator", "mobile"),
    _b("84.25.0.0/20", "NL", 64651, "NL residential ISP 1", "residential_proxy"),
    # --- foreign countries: travellers' destinations and attackers' home networks
    _b("73.16.0.0/16", "US", 64661, "US residential ISP", "residential"),
    _b("172.56.0.0/16", "US", 64662, "US mobile operator", "mobile"),
    _b("102.88.0.0/16", "NG", 64671, "NG mobile operator 1", "mobile"),
    _b("105.112.0.0/16", "NG", 64672, "NG mobile operator 2", "mobile"),
    _b("129.205.0.0/16", "NG", 64673, "NG residential ISP", "residential"),
    _b("39.32.0.0/16", "PK", 64681, "PK residential ISP", "residential"),
    _b("111.88.0.0/16", "PK", 64682, "PK mobile operator", "mobile"),
    _b("113.160.0.0/16", "VN", 64691, "VN residential ISP", "residential"),
    _b("171.224.0.0/16", "VN", 64692, "VN mobile operator", "mobile"),
    _b("177.32.0.0/16", "BR", 64701, "BR residential ISP", "residential"),
    _b("179.96.0.0/16", "BR", 64702, "BR mobile operator", "mobile"),
    # GB: more ISPs and mobile operators, CGNAT pools, business broadband
    _b("82.132.0.0/16", "GB", 64605, "GB residential ISP 3", "residential"),
    _b("94.0.0.0/16", "GB", 64606, "GB residential ISP 4", "residential"),
    _b("92.40.0.0/24", "GB", 64603, "GB mobile operator", "mobile", cgnat=True),
    _b("31.94.0.0/16", "GB", 64802, "GB mobile operator 2", "mobile"),
    _b("31.95.0.0/24", "GB", 64802, "GB mobile operator 2", "mobile", cgnat=True),
    _b("148.252.0.0/16", "GB", 64803, "GB mobile operator 3", "mobile"),
    _b("148.253.0.0/24", "GB", 64803, "GB mobile operator 3", "mobile", cgnat=True),
    _b("212.56.0.0/16", "GB", 64900, "GB business broadband", "business"),
    # IE: more ISPs and mobile operators, CGNAT pools, business broadband
    _b("79.97.0.0/16", "IE", 64615, "IE residential ISP 3", "residential"),
    _b("46.7.0.0/16", "IE", 64616, "IE residential ISP 4", "residential"),
    _b("37.229.0.0/24", "IE", 64613, "IE mobile operator", "mobile", cgnat=True),
    _b("86.40.0.0/16", "IE", 64812, "IE mobile operator 2", "mobile"),
    _b("86.41.0.0/24", "IE", 64812, "IE mobile operator 2", "mobile", cgnat=True),
    _b("92.251.0.0/16", "IE", 64813, "IE mobile operator 3", "mobile"),
    _b("92.252.0.0/24", "IE", 64813, "IE mobile operator 3", "mobile", cgnat=True),
    _b("193.120.0.0/16", "IE", 64901, "IE business broadband", "business"),
    # FR: more ISPs and mobile operators, CGNAT pools, business broadband
    _b("86.192.0.0/16", "FR", 64625, "FR residential ISP 3", "residential"),
    _b("78.192.0.0/16", "FR", 64626, "FR residential ISP 4", "residential"),
    _b("80.215.0.0/24", "FR", 64623, "FR mobile operator", "mobile", cgnat=True),
    _b("92.184.0.0/16", "FR", 64822, "FR mobile operator 2", "mobile"),
    _b("92.185.0.0/24", "FR", 64822, "FR mobile operator 2", "mobile", cgnat=True),
    _b("176.128.0.0/16", "FR", 64823, "FR mobile operator 3", "mobile"),
    _b("176.129.0.0/24", "FR", 64823, "FR mobile operator 3", "mobile", cgnat=True),
    _b("194.2.0.0/16", "FR", 64902, "FR business broadband", "business"),
    # DE: more ISPs and mobile operators, CGNAT pools, business broadband
    _b("79.192.0.0/16", "DE", 64635, "DE residential ISP 3", "residential"),
    _b("93.192.0.0/16", "DE", 64636, "DE residential ISP 4", "residential"),
    _b("109.41.0.0/24", "DE", 64633, "DE mobile operator", "mobile", cgnat=True),
    _b("80.187.0.0/16", "DE", 64832, "DE mobile operator 2", "mobile"),
    _b("80.188.0.0/24", "DE", 64832, "DE mobile operator 2", "mobile", cgnat=True),
    _b("176.0.0.0/16", "DE", 64833, "DE mobile operator 3", "mobile"),
    _b("176.1.0.0/24", "DE", 64833, "DE mobile operator 3", "mobile", cgnat=True),
    _b("194.25.0.0/16", "DE", 64903, "DE business broadband", "business"),
    # ES: more ISPs and mobile operators, CGNAT pools, business broadband
    _b("79.144.0.0/16", "ES", 64645, "ES residential ISP 3", "residential"),
    _b("90.160.0.0/16", "ES", 64646, "ES residential ISP 4", "residential"),
    _b("188.77.0.0/24", "ES", 64643, "ES mobile operator", "mobile", cgnat=True),
    _b("37.132.0.0/16", "ES", 64842, "ES mobile operator 2", "mobile"),
    _b("37.133.0.0/24", "ES", 64842, "ES mobile operator 2", "mobile", cgnat=True),
    _b("5.224.0.0/16", "ES", 64843, "ES mobile operator 3", "mobile"),
    _b("5.225.0.0/24", "ES", 64843, "ES mobile operator 3", "mobile", cgnat=True),
    _b("195.53.0.0/16", "ES", 64904, "ES business broadband", "business"),
    # NL: more ISPs and mobile operators, CGNAT pools, business broadband
    _b("83.80.0.0/16", "NL", 64655, "NL residential ISP 3", "residential"),
    _b("62.194.0.0/16", "NL", 64656, "NL residential ISP 4", "residential"),
    _b("31.21.0.0/24", "NL", 64653, "NL mobile operator", "mobile", cgnat=True),
    _b("62.140.0.0/16", "NL", 64852, "NL mobile operator 2", "mobile"),
    _b("62.141.0.0/24", "NL", 64852, "NL mobile operator 2", "mobile", cgnat=True),
    _b("94.208.0.0/16", "NL", 64853, "NL mobile operator 3", "mobile"),
    _b("94.209.0.0/24", "NL", 64853, "NL mobile operator 3", "mobile", cgnat=True),
    _b("194.151.0.0/16", "NL", 64905, "NL business broadband", "business"),
    # --- more foreign residential and mobile networks (botnets, travellers, proxies)
    _b("98.192.0.0/16", "US", 64710, "US residential ISP 2", "residential"),
    _b("67.160.0.0/16", "US", 64711, "US residential ISP 3", "residential"),
    _b("174.192.0.0/16", "US", 64712, "US mobile operator 2", "mobile"),
    _b("70.48.0.0/16", "CA", 64713, "CA residential ISP 1", "residential"),
    _b("142.160.0.0/16", "CA", 64714, "CA mobile operator 1", "mobile"),
    _b("79.0.0.0/16", "IT", 64715, "IT residential ISP 1", "residential"),
    _b("5.88.0.0/16", "IT", 64716, "IT mobile operator 1", "mobile"),
    _b("83.0.0.0/16", "PL", 64717, "PL residential ISP 1", "residential"),
    _b("37.47.0.0/16", "PL", 64718, "PL mobile operator 1", "mobile"),
    _b("85.240.0.0/16", "PT", 64719, "PT residential ISP 1", "residential"),
    _b("94.60.0.0/16", "PT", 64720, "PT mobile operator 1", "mobile"),
    _b("81.240.0.0/16", "BE", 64721, "BE residential ISP 1", "residential"),
    _b("37.62.0.0/16", "BE", 64722, "BE mobile operator 1", "mobile"),
    _b("86.120.0.0/16", "RO", 64723, "RO residential ISP 1", "residential"),
    _b("5.12.0.0/16", "RO", 64724, "RO mobile operator 1", "mobile"),
    _b("78.160.0.0/16", "TR", 64725, "TR residential ISP 1", "residential"),
    _b("31.140.0.0/16", "TR", 64726, "TR mobile operator 1", "mobile"),
    _b("117.192.0.0/16", "IN", 64727, "IN residential ISP 1", "residential"),
    _b("49.32.0.0/16", "IN", 64728, "IN residential ISP 2", "residential"),
    _b("106.192.0.0/16", "IN", 64729, "IN mobile operator 1", "mobile"),
    _b("36.64.0.0/16", "ID", 64730, "ID residential ISP 1", "residential"),
    _b("114.120.0.0/16", "ID", 64731, "ID mobile operator 1", "mobile"),
    _b("112.198.0.0/16", "PH", 64732, "PH residential ISP 1", "residential"),
    _b("110.54.0.0/16", "PH", 64733, "PH mobile operator 1", "mobile"),
    _b("41.32.0.0/16", "EG", 64734, "EG residential ISP 1", "residential"),
    _b("197.32.0.0/16", "EG", 64735, "EG mobile operator 1", "mobile"),
    _b("105.128.0.0/16", "MA", 64736, "MA residential ISP 1", "residential"),
    _b("41.140.0.0/16", "MA", 64737, "MA mobile operator 1", "mobile"),
    _b("187.128.0.0/16", "MX", 64738, "MX residential ISP 1", "residential"),
    _b("189.192.0.0/16", "MX", 64739, "MX mobile operator 1", "mobile"),
    _b("181.48.0.0/16", "CO", 64740, "CO residential ISP 1", "residential"),
    _b("191.88.0.0/16", "CO", 64741, "CO mobile operator 1", "mobile"),
    _b("181.0.0.0/16", "AR", 64742, "AR residential ISP 1", "residential"),
    _b("186.96.0.0/16", "AR", 64743, "AR mobile operator 1", "mobile"),
    _b("93.72.0.0/16", "UA", 64744, "UA residential ISP 1", "residential"),
    _b("46.211.0.0/16", "UA", 64745, "UA mobile operator 1", "mobile"),
    _b("95.24.0.0/16", "RU", 64746, "RU residential ISP 1", "residential"),
    _b("188.162.0.0/16", "RU", 64747, "RU mobile operator 1", "mobile"),
    _b("123.112.0.0/16", "CN", 64748, "CN residential ISP 1", "residential"),
    _b("223.104.0.0/16", "CN", 64749, "CN mobile operator 1", "mobile"),
    _b("184.22.0.0/16", "TH", 64750, "TH residential ISP 1", "residential"),
    _b("49.228.0.0/16", "TH", 64751, "TH mobile operator 1", "mobile"),
    _b("103.4.0.0/16", "BD", 64752, "BD residential ISP 1", "residential"),
    _b("37.111.0.0/16", "BD", 64753, "BD mobile operator 1", "mobile"),
    _b("41.80.0.0/16", "KE", 64754, "KE residential ISP 1", "residential"),
    _b("105.160.0.0/16", "KE", 64755, "KE mobile operator 1", "mobile"),
    _b("41.112.0.0/16", "ZA", 64756, "ZA residential ISP 1", "residential"),
    _b("105.224.0.0/16", "ZA", 64757, "ZA mobile operator 1", "mobile"),
    _b("121.208.0.0/16", "AU", 64758, "AU residential ISP 1", "residential"),
    _b("1.128.0.0/16", "AU", 64759, "AU mobile operator 1", "mobile"),
    _b("126.0.0.0/16", "JP", 64760, "JP residential ISP 1", "residential"),
    _b("49.96.0.0/16", "JP", 64761, "JP mobile operator 1", "mobile"),
    _b("189.0.0.0/16", "BR", 64762, "BR residential ISP 2", "residential"),
    # --- datacentres and anonymisers
    _b("95.216.0.0/16", "DE", 64520, "Example Cloud Hosting DE", "hosting"),
    _b("34.96.0.0/16", "US", 64521, "Example Cloud Hosting US", "hosting"),
    _b("2a0a:4000::/32", "DE", 64520, "Example Cloud Hosting DE", "hosting"),
    _b("185.212.0.0/20", "NL", 64530, "Example VPN provider", "vpn"),
    _b("185.213.0.0/20", "US", 64530, "Example VPN provider", "vpn"),
    _b("185.214.0.0/20", "GB", 64530, "Example VPN provider", "vpn"),
    _b("185.220.100.0/22", "DE", 64540, "Example Tor exit operator", "tor"),
    _b("45.148.0.0/20", "RU", 64550, "Example open proxy network", "proxy"),
    _b("103.151.0.0/20", "VN", 64551, "Example open proxy network 2", "proxy"),
)

#: ASNs of the datacentre blocks, as written to the hosting-ASN list file.
HOSTING_ASNS: tuple[int, ...] = tuple(sorted({b.asn for b in IP_PLAN if b.kind == "hosting"}))


@dataclass(frozen=True, slots=True)
class _Net:
    block: IpBlock
    version: int
    first: int  # integer value of the network address
    size: int  # number of addresses


@lru_cache(maxsize=1)
def _nets() -> tuple[_Net, ...]:
    out = []
    for block in IP_PLAN:
        net = ipaddress.ip_network(block.cidr)
        out.append(_Net(block, net.version, int(net.network_address), net.num_addresses))
    return tuple(out)


@lru_cache(maxsize=1)
def _net_by_block() -> dict[IpBlock, _Net]:
    return {n.block: n for n in _nets()}


@lru_cache(maxsize=256)
def blocks_for(country: str | None, kind: str, version: int = 4) -> tuple[IpBlock, ...]:
    """Blocks of ``kind`` (and IP ``version``) in ``country``; ``None`` means any country."""
    if kind not in KINDS:
        raise ValueError(f"IP kind {kind!r} is not one of {KINDS}")
    return tuple(
        n.block
        for n in _nets()
        if n.block.kind == kind
        and n.version == version
        and (country is None or n.block.country == country)
        and not n.block.cgnat
    )


@lru_cache(maxsize=64)
def cgnat_pools(country: str | None) -> tuple[IpBlock, ...]:
    """The carrier-grade NAT pools of mobile operators in ``country`` (``None``: any country).

    :func:`blocks_for` leaves them out: an address of a pool is shared by many subscribers, so a
    scenario asks for one on purpose.
    """
    return tuple(
        n.block
        for n in _nets()
        if n.block.cgnat and (country is None or n.block.country == country)
    )


def countries_with(kind: str, version: int = 4) -> tuple[str, ...]:
    """Countries having at least one block of ``kind``, sorted."""
    return tuple(sorted({b.country for b in blocks_for(None, kind, version)}))


def random_ip_in(rng: random.Random, block: IpBlock) -> str:
    """A random host address of ``block`` (IPv4: last octet 1-254; IPv6: non-zero host part)."""
    net = _net_by_block()[block]
    if net.version == 4:
        host = rng.randrange(net.size // 256) * 256 + rng.randint(1, 254)
        return str(ipaddress.IPv4Address(net.first + host))
    return str(ipaddress.IPv6Address(net.first + rng.randrange(1, net.size)))


def random_ip(rng: random.Random, country: str | None, kind: str, version: int = 4) -> str:
    """A random address of a ``kind`` block in ``country`` (``None``: any country).

    Raises ValueError naming what was asked when the plan has no such block.
    """
    blocks = blocks_for(country, kind, version)
    if not blocks:
        raise ValueError(f"IP_PLAN has no IPv{version} {kind!r} block in country {country!r}")
    return random_ip_in(rng, blocks[0] if len(blocks) == 1 else rng.choice(blocks))


def block_of(ip: str) -> IpBlock | None:
    """The plan block containing ``ip``, or None when the address is outside the plan."""
    addr = ipaddress.ip_address(ip)
    value = int(addr)
    for net in _nets():
        if net.version == addr.version and net.first <= value < net.first + net.size:
            return net.block
    return None


class _ReproducibleWriter(MMDBWriter):
    """MMDBWriter with a fixed ``build_epoch`` so that rebuilding gives byte-identical files."""

    def _build_meta(self) -> dict[str, Any]:
        meta = super()._build_meta()
        meta["build_epoch"] = BUILD_EPOCH
        return meta


def _write(path: Path, database_type: str, rows: Sequence[tuple[IpBlock, dict[str, Any]]]) -> Path:
    writer = _ReproducibleWriter(
        ip_version=6,
        database_type=database_type,
        languages=["en"],
        description={"en": f"synthetic {database_type} for the callback-fraud simulator"},
        ipv4_compatible=True,
    )
    for block, record in rows:
        writer.insert_network(IPSet([block.cidr]), record)
    writer.to_db_file(str(path))
    return path


def build_ip_databases(out_dir: Path) -> dict[str, Path]:
    """Write the plan as MaxMind-format databases into ``out_dir`` (created if missing).

    Returns ``{"country": ..., "asn": ..., "anonymous": ..., "hosting_asns": ...,
    "connection_type": ...}`` (the last in the GeoIP2-Connection-Type layout): databases in
    the GeoLite2-Country and GeoLite2-ASN layouts, an Anonymous-IP database holding flagged networks
    only, and a text file with one ``AS<number>`` per line. IPv4 networks are stored
    IPv4-compatibly (``::a.b.c.d``) in IPv6 trees, as MaxMind's readers expect.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    country = _write(
        out_dir / "country.mmdb",
        "GeoLite2-Country",
        [(b, {"country": {"iso_code": b.country}}) for b in IP_PLAN],
    )
    asn = _write(
        out_dir / "asn.mmdb",
        "GeoLite2-ASN",
        [
            (
                b,
                {
                    "autonomous_system_number": MmdbU32(b.asn),
                    "autonomous_system_organization": b.org,
                },
            )
            for b in IP_PLAN
        ],
    )
    anonymous = _write(
        out_dir / "anonymous.mmdb",
        "GeoIP2-Anonymous-IP",
        [(b, dict(ANONYMOUS_FLAGS[b.kind])) for b in IP_PLAN if b.kind in ANONYMOUS_FLAGS],
    )
    hosting = out_dir / "hosting_asns.txt"
    hosting.write_text(
        "# hosting / datacentre ASNs of the simulator's IP plan\n"
        + "".join(f"AS{asn_}\n" for asn_ in HOSTING_ASNS),
        encoding="utf-8",
    )
    connection = _write(
        out_dir / "connection_type.mmdb",
        "GeoIP2-Connection-Type",
        [(b, {"connection_type": CONNECTION_TYPES.get(b.kind, "Corporate")}) for b in IP_PLAN],
    )
    return {"country": country, "asn": asn, "anonymous": anonymous, "hosting_asns": hosting,
            "connection_type": connection}


#: GeoIP2 Connection-Type values of the plan's kinds (MaxMind: Dialup, Cable/DSL, Corporate,
#: Cellular, Satellite); mobile operators' addresses (their CGNAT pools included) are Cellular.
CONNECTION_TYPES: dict[str, str] = {"mobile": "Cellular", "residential": "Cable/DSL",
                                    "residential_proxy": "Cable/DSL"}
