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


def _numbers_around_every_example(per_example: int = 6, random_per_code: int = 40):
    """Example numbers of every type of every region and non-geographic code, variations of
    their last digits (valid and invalid neighbours), and random numbers of every length per
    calling code (deterministic)."""
    import random

    rnd = random.Random(11)
    for cc, regions in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.items():
        examples = []
        for region in regions:
            if region == "001":
                examples.append(phonenumbers.example_number_for_non_geo_entity(cc))
                continue
            for ntype in range(12):
                examples.append(phonenumbers.example_number_for_type(region, ntype))
        for ex in examples:
            if ex is None:
                continue
            yield ex
            nsn = str(ex.national_number)
            for _ in range(per_example):
                k = rnd.randint(1, min(4, len(nsn)))
                yield f"+{cc}{nsn[:-k]}{rnd.randrange(10 ** k):0{k}d}"
        for _ in range(random_per_code):
            length = rnd.randint(2, 17)
            yield f"+{cc}{rnd.randint(1, 9)}{rnd.randrange(10 ** (length - 1)):0{length - 1}d}"


def test_region_type_and_possible_are_the_libraries():
    """enrich_phone computes region, type and is_possible_number its own (cheaper) way: they
    must be exactly phonenumbers' region_code_for_number, number_type and is_possible_number."""
    from detector.core.phone import TYPE_NAMES

    checked = 0
    for item in _numbers_around_every_example():
        try:
            num = item if isinstance(item, phonenumbers.PhoneNumber) else phonenumbers.parse(item)
        except phonenumbers.NumberParseException:
            continue
        e164 = phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)
        info = enrich_phone(e164, None)
        region = phonenumbers.region_code_for_number(num)
        ntype = phonenumbers.number_type(num) if region else phonenumbers.PhoneNumberType.UNKNOWN
        valid = ntype != phonenumbers.PhoneNumberType.UNKNOWN
        assert info.valid == valid == phonenumbers.is_valid_number(num), e164
        assert info.number_type == (TYPE_NAMES[ntype] if valid else "INVALID"), e164
        assert info.region == (region if region != "ZZ" else None), e164
        assert info.possible == phonenumbers.is_possible_number(num), e164
        checked += 1
    assert checked > 15_000


def test_plain_digits_parse_is_the_libraries():
    """_parse_plain (the fast path for digits, with or without "+") gives exactly
    phonenumbers.parse's PhoneNumber, or None where the library raises or the text is not
    "+", digits and spaces: example numbers of every calling code in E.164, international and
    national format (with their own region, another one, an IDD prefix, a national prefix or
    leading zeros), their variations and random digit strings with random regions."""
    import random

    from detector.core.phone import _parse_plain

    rnd = random.Random(3)
    regions = sorted(phonenumbers.SUPPORTED_REGIONS)
    cases = [("+", None), ("+1", None), ("+12", None), ("+123", None), ("+ 44 20", None),
             ("+44 ", None), ("+0044", None), ("+00", None), ("+4 4 20 7946 0018", None),
             ("+44 20 7946 0018 x12", None), ("+44-20-7946-0018", None), ("123", None),
             ("+44 (0)20 7946 0018", None), ("+٤٤٢٠٧٩٤٦٠٠١٨", None), ("123", "ZZ"),
             ("020 7946 0018", "gb"), ("12", "GB"), ("1 2 3", "GB"), ("000", "GB")]
    for item in _numbers_around_every_example(per_example=3, random_per_code=10):
        if not isinstance(item, phonenumbers.PhoneNumber):
            cases.append((item, None))
            continue
        cc, nsn = item.country_code, phonenumbers.national_significant_number(item)
        region = phonenumbers.region_code_for_number(item)
        fmt = phonenumbers.PhoneNumberFormat
        cases += [(phonenumbers.format_number(item, fmt.E164), None),
                  (phonenumbers.format_number(item, fmt.INTERNATIONAL), None),
                  (f"+{cc}0{nsn}", None), (f"+{cc}00{nsn}", None)]
        if region and region != "001":
            national = phonenumbers.format_number(item, fmt.NATIONAL)
            cases += [(national, region), (national, rnd.choice(regions)), (nsn, region),
                      (f"0{nsn}", region), (f"{cc}{nsn}", region),
                      (f"00{cc}{nsn}", rnd.choice(regions)), (f"011{cc}{nsn}", "US")]
    cases += [(("+" if rnd.random() < 0.4 else "")
               + "".join(rnd.choice("0123456789") for _ in range(rnd.randint(0, 21))),
               rnd.choice([*regions, None])) for _ in range(5000)]
    fast = 0
    for text, region in cases:
        try:
            want = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            want = None
        got = _parse_plain(text, region)
        if got is not None:
            fast += 1
            assert want is not None and got == want and repr(got) == repr(want), (text, region)
    assert fast > 15_000
