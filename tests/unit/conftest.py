"""Fixtures built in code: small MaxMind-format databases (no downloads)."""

from pathlib import Path

import pytest
from mmdb_writer import MmdbU32, MMDBWriter
from netaddr import IPSet


def write_mmdb(path: Path, db_type: str, networks: dict[str, dict]) -> Path:
    writer = MMDBWriter(ip_version=6, database_type=db_type, ipv4_compatible=True)
    for cidr, record in networks.items():
        writer.insert_network(IPSet([cidr]), record)
    writer.to_db_file(str(path))
    return path


@pytest.fixture(scope="session")
def ip_dbs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mmdb")
    return {
        # MaxMind GeoLite2 layout
        "country": write_mmdb(d / "country.mmdb", "GeoLite2-Country", {
            "81.2.69.0/24": {"country": {"iso_code": "GB"}},
            "2a02:c7f::/32": {"country": {"iso_code": "GB"}},
            "41.58.0.0/16": {"country": {"iso_code": "NG"}},
            "185.220.101.0/24": {"registered_country": {"iso_code": "DE"}},
        }),
        # ip-location-db layout
        "country_iplocdb": write_mmdb(d / "iplocdb.mmdb", "ip-location-db", {
            "81.2.69.0/24": {"country_code": "GB"},
        }),
        "asn": write_mmdb(d / "asn.mmdb", "GeoLite2-ASN", {
            "81.2.69.0/24": {"autonomous_system_number": MmdbU32(64500),
                             "autonomous_system_organization": "Example Residential"},
            "45.33.0.0/16": {"autonomous_system_number": MmdbU32(64511),
                             "autonomous_system_organization": "Example Hosting"},
        }),
        "anonymous": write_mmdb(d / "anon.mmdb", "GeoIP2-Anonymous-IP", {
            "185.220.101.0/24": {"is_anonymous": True, "is_tor_exit_node": True},
            "198.51.100.0/24": {"is_anonymous": True, "is_anonymous_vpn": True},
            "203.0.113.0/25": {"is_anonymous": True, "is_public_proxy": True},
            "192.0.2.0/24": {"is_anonymous": True, "is_residential_proxy": True},
            "45.33.1.0/24": {"is_anonymous": True, "is_hosting_provider": True},
        }),
    }
