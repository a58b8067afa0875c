import phonenumbers
import pytest

from detector.core.phone import enrich_phone, range_key_of, routing_key


@pytest.mark.parametrize(
    ("raw", "hint", "e164", "valid", "region", "ntype"),
    [
        ("+44 20 7946 0018", None, "+442079460018", True, "GB", "FIXED_LINE"),
        ("020 7946 0018", "GB", "+442079460018", True, "GB", "FIXED_LINE"),
        ("0044 20 7946 0018", None, "+442079460018", True, "GB", "FIXED_LINE"),
        ("+33 6 12 34 56 78", None, "+33612345678", True, "FR", "MOBILE"),
        ("+44 909 8790879", None, "+449098790879", True, "GB", "PREMIUM_RATE"),
        ("+44 1", None, None, False, None, "INVALID"),
        ("+44 20 7946", None, "+44207946", False, "GB", "INVALID"),
        ("12345", None, None, False, None, "INVALID"),
        ("call me", "GB", None, False, None, "INVALID"),
    ],
)
def test_enrichment_table(raw, hint, e164, valid, region, ntype):
    info = enrich_phone(raw, hint)
    assert (info.e164, info.valid, info.number_type) == (e164, valid, ntype)
    if valid:
        assert info.region == region


def test_voip_example_is_classified():
    ex = phonenumbers.example_number_for_type("GB", phonenumbers.PhoneNumberType.VOIP)
    e164 = phonenumbers.format_number(ex, phonenumbers.PhoneNumberFormat.E164)
    assert enrich_phone(e164, None).number_type == "VOIP"


def test_range_key_groups_adjacent_numbers():
    a = enrich_phone("+447400123401", None, 3)
    b = enrich_phone("+447400123499", None, 3)
    c = enrich_phone("+447400124401", None, 3)
    assert a.range_key == b.range_key != c.range_key
    assert range_key_of("+447400123401", 2) == "+4474001234"


def test_unparseable_numbers_still_get_a_routing_key():
    info = enrich_phone("12345", None)
    assert info.range_key is None
    assert routing_key(info, "12-345") == "?12"


def _library_zone(num):
    zones = [z for z in phonenumbers.timezone.time_zones_for_number(num) if z != "Etc/Unknown"]
    return zones[0] if zones else None


@pytest.mark.parametrize("region", ["GB", "US", "CA", "DE", "FR", "ES", "NL", "IE", "BR", "AR", "MX",
                                    "RU", "KZ", "AU", "IN", "CN", "SO", "PG", "JE", "IM", "CU"])
def test_time_zone_is_the_libraries_for_every_type(region):
    """The zone enrich_phone carries (one parse, the type reused) is the one
    phonenumbers.timezone.time_zones_for_number gives the number, for each type with an example
    (geographic, country-level and, for one invalid number, its block's 000 number)."""
    seen = 0
    for ntype in vars(phonenumbers.PhoneNumberType).values():
        if not isinstance(ntype, int):
            continue
        ex = phonenumbers.example_number_for_type(region, ntype)
        if ex is None:
            continue
        e164 = phonenumbers.format_number(ex, phonenumbers.PhoneNumberFormat.E164)
        info = enrich_phone(e164, None)
        if info.valid:
            seen += 1
            assert info.time_zone == _library_zone(ex), (region, ntype, e164)
    assert seen
    invalid = enrich_phone("+44 20 7946", None)
    assert not invalid.valid
    assert invalid.time_zone == _library_zone(phonenumbers.parse(invalid.range_key + "000", None))
