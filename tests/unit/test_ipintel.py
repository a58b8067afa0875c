import pytest

from detector.core.errors import ConfigError
from detector.core.ipintel import IpIntel, read_asn_file, read_cidr_file, scope_of


@pytest.mark.parametrize(
    ("ip", "scope"),
    [("8.8.8.8", "global"), ("10.0.0.1", "private"), ("192.168.1.1", "private"), ("127.0.0.1", "loopback"),
     ("::1", "loopback"), ("224.0.0.1", "reserved"), ("240.0.0.1", "reserved"), ("fe80::1", "reserved"),
     ("0.0.0.0", "reserved"), ("not-an-ip", "malformed")],
)
def test_scope(ip, scope):
    assert scope_of(ip)[1] == scope


def test_maxmind_layouts(ip_dbs):
    intel = IpIntel.from_paths(ip_dbs["country"], ip_dbs["asn"], ip_dbs["anonymous"])
    gb = intel.lookup("81.2.69.142")
    assert (gb.country, gb.asn, gb.as_org, gb.anonymous) == ("GB", 64500, "Example Residential", False)
    assert intel.lookup("2a02:c7f::1").country == "GB"
    tor = intel.lookup("185.220.101.5")
    assert tor.tor_exit and tor.country == "DE" and tor.flags() == ["tor_exit"]
    assert intel.lookup("198.51.100.9").anonymous_vpn
    assert intel.lookup("203.0.113.9").public_proxy
    assert not intel.lookup("203.0.113.200").anonymous  # outside the /25: unflagged returns {}
    assert intel.lookup("192.0.2.77").residential_proxy
    assert intel.lookup("45.33.1.1").hosting
    unknown = intel.lookup("1.1.1.1")
    assert unknown.country is None and unknown.asn is None and not unknown.anonymous
    intel.close()


def test_ip_location_db_layout(ip_dbs):
    intel = IpIntel.from_paths(country_db=ip_dbs["country_iplocdb"])
    assert intel.lookup("81.2.69.1").country == "GB"


def test_lists_and_hosting_asns(tmp_path, ip_dbs):
    tor = tmp_path / "tor.txt"
    tor.write_text("# tor exits\n100.64.1.1\n2001:db8::/48  # v6 block\n")
    asns = tmp_path / "hosting.txt"
    asns.write_text("AS64511\n")
    intel = IpIntel.from_paths(asn_db=ip_dbs["asn"], list_files={"tor": tor}, hosting_asn_file=asns)
    assert intel.lookup("100.64.1.1").tor_exit
    assert intel.lookup("2001:db8:0:1::1").tor_exit
    assert intel.lookup("45.33.7.7").hosting  # via ASN list
    assert not intel.lookup("81.2.69.1").hosting


def test_missing_sources_are_reported(tmp_path):
    intel = IpIntel()
    assert any("DISABLED" in line for line in intel.describe())
    with pytest.raises(ConfigError, match="does not exist"):
        IpIntel.from_paths(country_db=tmp_path / "nope.mmdb")
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(b"not a database")
    with pytest.raises(ConfigError, match="not a MaxMind DB"):
        IpIntel.from_paths(country_db=bad)


def test_list_files_errors_name_the_line(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("1.2.3.4\nbogus\n")
    with pytest.raises(ConfigError, match=r"l.txt:2: expected an IP address or CIDR, got 'bogus'"):
        read_cidr_file(f)
    g = tmp_path / "a.txt"
    g.write_text("AS1\nASX\n")
    with pytest.raises(ConfigError, match="a.txt:2"):
        read_asn_file(g)


def test_c_extension_is_used(ip_dbs):
    intel = IpIntel.from_paths(country_db=ip_dbs["country"])
    assert "C extension" in intel.describe()[0]


def test_connection_type_and_mobile_asns_mark_carrier_addresses(tmp_path):
    """GeoIP2 Connection-Type ``Cellular`` (or a mobile carrier's ASN) marks carrier-NAT
    addresses, which the shared-IP rules then treat as populations."""
    import random

    from detector.core.ipintel import IpIntel
    from detector.sim.ipdb import build_ip_databases, random_ip

    paths = build_ip_databases(tmp_path)
    mobile, home = random_ip(random.Random(1), "GB", "mobile"), random_ip(random.Random(1), "GB", "residential")
    intel = IpIntel.from_paths(country_db=paths["country"], asn_db=paths["asn"],
                               connection_type_db=paths["connection_type"])
    assert intel.lookup(mobile).cellular and not intel.lookup(home).cellular
    assert any(line.startswith("connection-type: ") and "DISABLED" not in line for line in intel.describe())
    asn = intel.lookup(home).asn
    (tmp_path / "mobile_asns.txt").write_text(f"AS{asn}\n")
    by_asn = IpIntel.from_paths(asn_db=paths["asn"], mobile_asn_file=tmp_path / "mobile_asns.txt")
    assert by_asn.lookup(home).cellular
    assert any("DISABLED" in line for line in IpIntel().describe() if line.startswith("connection-type"))


def test_scope_tables_agree_with_ipaddress():
    """scope_of answers IPv4 and canonical IPv6 text from interval tables: it must say what
    ipaddress says (the definition, ipintel._scope_of) at every interval edge, on random
    addresses, IPv4-mapped IPv6, zone indexes, other spellings and malformed strings."""
    import ipaddress
    import random

    from detector.core import ipintel

    assert ipintel._V4_STARTS and ipintel._V6_STARTS  # the tables are in use on this Python
    rnd = random.Random(7)
    texts = []
    for starts, bits, cls in ((ipintel._V4_STARTS, 32, ipaddress.IPv4Address),
                              (ipintel._V6_STARTS, 128, ipaddress.IPv6Address)):
        for start in starts:
            for n in (start - 1, start, start + 1):
                if 0 <= n < 1 << bits:
                    texts.append(str(cls(n)))
        texts += [str(cls(rnd.getrandbits(bits))) for _ in range(3000)]
        # addresses near the start of each interval, where special networks sit
        texts += [str(cls(min(s + rnd.getrandbits(rnd.randint(1, bits // 2)), (1 << bits) - 1)))
                  for s in starts for _ in range(50)]
    texts += [str(ipaddress.IPv6Address(0xFFFF << 32 | rnd.getrandbits(32))) for _ in range(500)]
    texts += ["::ffff:10.0.0.1", "::ffff:8.8.8.8", "::ffff:127.0.0.1", "::10.0.0.1", "::1",
              "::", "fe80::1%eth0", "FE80::1", "2001:DB8::1", "2001:0db8::1", "2001:db8:0:0::1",
              "1::2:3:4:5:6:7:8", "::ffff:1.2.3.04", "2001:db8::1/64", "", "nope", "1.2.3",
              "01.2.3.4", "1.2.3.4 ", " ::1", "2a0a:1000:a941:d54:a272:44f4:e233:eaa0"]
    for text in texts:
        assert scope_of(text) == ipintel._scope_of(text), text
