"""The labelled traffic simulator (detector.sim): contract, determinism, scenarios, IP databases."""

from __future__ import annotations

import ipaddress
import itertools
import json
import random
from collections import Counter, defaultdict
from functools import cache
from pathlib import Path

import jsonschema
import maxminddb
import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import PhoneNumberType

from detector.core.parse import parse_request
from detector.sim import (
    ALL_SCENARIOS,
    ANONYMOUS_FLAGS,
    HOSTING_ASNS,
    IP_PLAN,
    KINDS,
    LEGIT_LABELS,
    POPULATION_PER_DAY,
    POPULATIONS,
    SCENARIOS,
    VOLUME_PER_DAY,
    LabeledRequest,
    SimConfig,
    block_of,
    blocks_for,
    build_ip_databases,
    campaign_windows,
    cgnat_pools,
    random_ip,
    simulate,
    write_jsonl,
)
from detector.sim.ipdb import countries_with, random_ip_in
from detector.sim.populations import surge_plan
from detector.sim.simulate import BROWSER_UAS, UTC_OFFSET_H, random_number, scenario_options

BUSINESS = ("GB", "IE", "FR", "DE", "ES", "NL")
BASE = ("legit", "legit_repeat", "legit_traveller")  # the base day that legit_per_day sizes
REQUIRED = {
    "request_id": str,
    "ts": float,
    "phone_number": str,
    "ip": str,
    "authenticated": bool,
    "session_id": str,
    "user_agent": str,
}
OPTIONAL = {"country_hint": str, "user_id": str}
SMALL = SimConfig(seed=7, duration_s=4 * 3600.0, legit_per_day=3000, attack_scale=0.5)


@pytest.fixture(scope="module")
def day() -> list[LabeledRequest]:
    """A full default day for seed 1 (~1 s)."""
    return simulate(SimConfig(seed=1))


@pytest.fixture(scope="module")
def dbs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_ip_databases(tmp_path_factory.mktemp("ipdb"))


def of(items: list[LabeledRequest], scenario: str) -> list[dict]:
    return [i.request for i in items if i.scenario == scenario]


def parsed(request: dict) -> phonenumbers.PhoneNumber:
    return _parse(request["phone_number"], request.get("country_hint"))


@cache
def _parse(raw: str, hint: str | None) -> phonenumbers.PhoneNumber:
    return phonenumbers.parse(raw, hint)


def e164(request: dict) -> str:
    return _e164(request["phone_number"], request.get("country_hint"))


@cache
def _e164(raw: str, hint: str | None) -> str:
    return phonenumbers.format_number(_parse(raw, hint), phonenumbers.PhoneNumberFormat.E164)


def check_contract(request: dict) -> None:
    assert REQUIRED.keys() <= request.keys(), request
    assert request.keys() <= REQUIRED.keys() | OPTIONAL.keys(), request
    for name, typ in {**REQUIRED, **OPTIONAL}.items():
        if name in request:
            assert type(request[name]) is typ, (name, request)
    assert request["phone_number"].strip() and request["session_id"]
    ipaddress.ip_address(request["ip"])
    if "country_hint" in request:
        hint = request["country_hint"]
        assert len(hint) == 2 and hint.isalpha() and hint.isupper()
    if request["authenticated"]:
        assert request.get("user_id")


# ----------------------------------------------------------------------------- contract


def test_requests_are_sorted_unique_and_well_formed(day: list[LabeledRequest]) -> None:
    stamps = [i.request["ts"] for i in day]
    assert stamps == sorted(stamps)
    assert len({i.request["request_id"] for i in day}) == len(day)
    start, end = SimConfig().start, SimConfig().end
    assert start <= stamps[0] and stamps[-1] < end
    for item in day:
        check_contract(item.request)
        assert item.attack == (item.scenario in SCENARIOS)
        assert item.scenario in SCENARIOS or item.scenario in LEGIT_LABELS


def test_requests_match_the_published_schema_and_the_parser() -> None:
    schema_path = (
        Path(__file__).parents[2] / "detector" / "schemas" / "callback-request.schema.json"
    )
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for item in simulate(SMALL):
        assert not list(validator.iter_errors(item.request)), item.request
        request = parse_request(json.dumps(item.request))
        assert (request.request_id, request.ip) == (item.request["request_id"], item.request["ip"])


def test_every_scenario_and_label_occurs(day: list[LabeledRequest]) -> None:
    counts = Counter(i.scenario for i in day)
    assert set(counts) == set(ALL_SCENARIOS) | set(LEGIT_LABELS)
    assert set(LEGIT_LABELS) == set(BASE) | set(POPULATIONS)
    for name in ALL_SCENARIOS:
        assert counts[name] == VOLUME_PER_DAY[name]
    assert sum(counts[name] for name in BASE) == SimConfig().legit_per_day
    for name in POPULATIONS:
        if POPULATION_PER_DAY[name] is not None:
            assert counts[name] == POPULATION_PER_DAY[name], name


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    paths = []
    for n, cfg in enumerate((SMALL, SMALL, SimConfig(**{**_fields(SMALL), "seed": 8}))):
        req, lab = tmp_path / f"r{n}.jsonl", tmp_path / f"l{n}.jsonl"
        write_jsonl(simulate(cfg), req, lab)
        paths.append((req.read_bytes(), lab.read_bytes()))
    assert paths[0] == paths[1]
    assert paths[0][0] != paths[2][0]


def _fields(cfg: SimConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


def test_label_side_file_aligns_and_nothing_leaks(tmp_path: Path) -> None:
    items = simulate(SMALL)
    req_path, lab_path = tmp_path / "out" / "requests.jsonl", tmp_path / "out" / "labels.jsonl"
    write_jsonl(items, req_path, lab_path)
    requests = [json.loads(line) for line in req_path.read_text().splitlines()]
    labels = [json.loads(line) for line in lab_path.read_text().splitlines()]
    assert len(requests) == len(labels) == len(items)
    for item, request, label in zip(items, requests, labels, strict=True):
        assert request == item.request
        assert label == {
            "request_id": request["request_id"],
            "scenario": item.scenario,
            "attack": item.attack,
        }
        assert not {"scenario", "attack", "label"} & request.keys()
        assert item.scenario not in json.dumps(request)  # ids and sessions carry no label


def test_scenarios_select_and_scale() -> None:
    cfg = SimConfig(seed=3, duration_s=21600.0, legit_per_day=400, scenarios=("dos_flood",))
    counts = Counter(i.scenario for i in simulate(cfg))
    assert counts["dos_flood"] == VOLUME_PER_DAY["dos_flood"] // 4
    assert set(counts) - set(LEGIT_LABELS) == {"dos_flood"}
    assert sum(counts[name] for name in LEGIT_LABELS) == 100
    doubled = SimConfig(**{**_fields(cfg), "attack_scale": 2.0})
    assert Counter(i.scenario for i in simulate(doubled))["dos_flood"] == 750


def test_turning_a_scenario_off_leaves_the_others_unchanged() -> None:
    both = simulate(SimConfig(**{**_fields(SMALL), "scenarios": ("premium_rate", "night_burst")}))
    one = simulate(SimConfig(**{**_fields(SMALL), "scenarios": ("premium_rate",)}))

    def strip(items: list[LabeledRequest]) -> list[dict]:
        return [
            {k: v for k, v in i.request.items() if k != "request_id"}
            for i in items
            if i.scenario == "premium_rate"
        ]

    assert strip(both) == strip(one)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scenarios": ("nope",)}, "unknown scenario"),
        ({"duration_s": 0.0}, "duration_s"),
        ({"business_countries": ("XX",)}, "no residential blocks"),
        ({"attack_scale": -1.0}, ">= 0"),
    ],
)
def test_config_errors_say_what_is_wrong(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimConfig(**changes)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    hours=st.floats(0.05, 3.0),
    scale=st.floats(0.0, 1.0),
)
def test_any_small_config_yields_sorted_valid_requests(seed: int, hours: float, scale: float):
    cfg = SimConfig(seed=seed, duration_s=hours * 3600, legit_per_day=1500, attack_scale=scale)
    items = simulate(cfg)
    assert [i.request["ts"] for i in items] == sorted(i.request["ts"] for i in items)
    for item in items:
        check_contract(item.request)
        assert cfg.start <= item.request["ts"] < cfg.end


# ----------------------------------------------------------------------------- legit traffic


def test_legit_numbers_are_valid_business_numbers_in_many_ranges(day: list[LabeledRequest]):
    for request in (i.request for i in day if not i.attack and i.scenario not in BASE):
        num = parsed(request)
        assert phonenumbers.is_valid_number(num), request
        assert phonenumbers.region_code_for_number(num) in BUSINESS, request
    legit = [i.request for i in day if i.scenario in BASE]
    types = Counter()
    for request in legit:
        num = parsed(request)
        assert phonenumbers.is_valid_number(num), request
        assert phonenumbers.region_code_for_number(num) in BUSINESS, request
        types[phonenumbers.number_type(num)] += 1
    assert set(types) == {PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE}
    numbers = {e164(r) for r in legit}
    by_range = defaultdict(set)
    for number in numbers:
        by_range[number[:-3]].add(number)
    sharing = sum(len(v) for v in by_range.values() if len(v) > 1)
    assert sharing / len(numbers) < 0.03  # legit customers rarely share a range


def test_legit_mix(day: list[LabeledRequest]) -> None:
    legit = [i for i in day if i.scenario in BASE]
    n = len(legit)
    national = [i.request for i in legit if not i.request["phone_number"].startswith("+")]
    assert 0.01 < len(national) / n < 0.06
    assert all(r.get("country_hint") for r in national)
    assert 0.20 < sum(i.request["authenticated"] for i in legit) / n < 0.30
    assert 0.05 < sum(":" in i.request["ip"] for i in legit) / n < 0.30
    vpn = sum(block_of(i.request["ip"]).kind == "vpn" for i in legit)
    assert 0.003 < vpn / n < 0.02
    repeat = of(day, "legit_repeat")
    assert 0.04 < len(repeat) / n < 0.15
    pairs = Counter((e164(r), r["ip"]) for r in repeat)
    assert min(pairs.values()) >= 2 and max(pairs.values()) <= 3
    for request in of(day, "legit_traveller"):
        assert block_of(request["ip"]).country != phonenumbers.region_code_for_number(
            parsed(request)
        )
    numbers_per_ip = defaultdict(set)
    for item in legit:
        numbers_per_ip[item.request["ip"]].add(e164(item.request))
    assert any(len(v) == 2 for v in numbers_per_ip.values())  # families and offices


def test_legit_follows_local_business_hours(day: list[LabeledRequest]) -> None:
    hours = Counter()
    for request in of(day, "legit"):
        country = phonenumbers.region_code_for_number(parsed(request))
        hours[int((request["ts"] + UTC_OFFSET_H[country] * 3600) % 86400 // 3600)] += 1
    night = sum(hours[h] for h in range(0, 6))
    business = sum(hours[h] for h in range(10, 20))
    assert business > 0.5 * sum(hours.values())
    assert night < 0.05 * sum(hours.values())


# ----------------------------------------------------------------------------- attacks


def test_attacks_are_unauthenticated(day: list[LabeledRequest]) -> None:
    attacks = [i.request for i in day if i.attack and i.scenario != "pump_spread"]
    assert not any(r["authenticated"] for r in attacks)
    assert sum("user_id" in r for r in attacks) < 0.05 * len(attacks)
    assert Counter(r["user_agent"] for r in attacks)["python-requests/2.32.3"] > 100


def test_premium_rate_numbers_are_premium_rate(day: list[LabeledRequest]) -> None:
    requests = of(day, "premium_rate")
    for request in requests:
        num = parsed(request)
        assert phonenumbers.number_type(num) == PhoneNumberType.PREMIUM_RATE
        assert phonenumbers.region_code_for_number(num) in BUSINESS
    assert len({r["ip"] for r in requests}) <= 8
    assert len({e164(r) for r in requests}) <= 10


def test_irsf_range_walks_adjacent_numbers_about_every_ten_calls(day: list[LabeledRequest]):
    requests = of(day, "irsf_range")
    by_range = defaultdict(list)
    for request in requests:
        assert phonenumbers.is_valid_number(parsed(request))
        by_range[e164(request)[:-3]].append(request)
    assert 1 <= len(by_range) <= 2
    runs: list[int] = []
    for calls in by_range.values():
        sequence = [int(e164(r)[-3:]) for r in sorted(calls, key=lambda r: r["ts"])]
        distinct = list(dict.fromkeys(sequence))
        assert distinct == sorted(distinct)  # the range is walked upwards
        assert distinct[-1] - distinct[0] < 2 * len(distinct)  # adjacent numbers
        current, run = sequence[0], 0
        for suffix in sequence:
            if suffix != current:
                runs.append(run)
                current, run = suffix, 0
            run += 1
        runs.append(run)
    assert 8 <= sum(runs) / len(runs) <= 12
    assert len({r["ip"] for r in requests}) >= 5


def test_range_pumping_rotates_residential_ips_over_one_or_two_ranges(day):
    requests = of(day, "range_pumping")
    ips = Counter(r["ip"] for r in requests)
    numbers = Counter(e164(r) for r in requests)
    assert len(ips) >= 100 and max(ips.values()) <= 2
    assert max(numbers.values()) <= 3
    assert 1 <= len({n[:-3] for n in numbers}) <= 2
    countries = {phonenumbers.region_code_for_number(parsed(r)) for r in requests}
    assert len(countries) == 1 and countries <= set(BUSINESS)
    for request in requests:
        num = parsed(request)
        assert phonenumbers.number_type(num) == PhoneNumberType.MOBILE
        block = block_of(request["ip"])
        assert block.country in countries
        assert block.kind in {"residential", "mobile", "residential_proxy"}
    stamps = sorted(r["ts"] for r in requests)
    assert stamps[-1] - stamps[0] > 12 * 3600  # spread over the day


def test_dos_flood_is_bursty(day: list[LabeledRequest]) -> None:
    requests = of(day, "dos_flood")
    numbers = Counter(e164(r) for r in requests)
    victims = [n for n, c in numbers.items() if c >= 100]
    assert 2 <= len(victims) <= 3
    victim_ts = sorted(r["ts"] for r in requests if e164(r) in victims)
    assert victim_ts[-1] - victim_ts[0] <= 600
    rest = [r for r in requests if e164(r) not in victims]
    assert len({e164(r) for r in rest}) > 0.9 * len(rest)  # many random valid numbers
    assert len({block_of(r["ip"]) for r in rest}) == 1
    assert block_of(rest[0]["ip"]).kind == "hosting"


def test_combo_recombine_reuses_pairs(day: list[LabeledRequest]) -> None:
    requests = of(day, "combo_recombine")
    assert len({r["ip"] for r in requests}) <= 8
    assert len({e164(r) for r in requests}) <= 8
    pairs = Counter((r["ip"], e164(r)) for r in requests)
    assert sum(pairs.values()) / len(pairs) >= 4


def test_invalid_flood_numbers_are_invalid(day: list[LabeledRequest]) -> None:
    requests = of(day, "invalid_flood")
    for request in requests:
        try:
            assert not phonenumbers.is_valid_number(parsed(request)), request
        except phonenumbers.NumberParseException:
            pass
    assert len({r["ip"] for r in requests}) <= 3
    stamps = [r["ts"] for r in requests]
    assert max(stamps) - min(stamps) <= 1200


def test_anonymous_and_geo_mismatch_come_from_the_intended_networks(day: list[LabeledRequest]):
    for request in of(day, "anonymous_ip"):
        assert block_of(request["ip"]).kind in ANONYMOUS_FLAGS
        assert phonenumbers.is_valid_number(parsed(request))
    for request in of(day, "geo_mismatch"):
        assert block_of(request["ip"]).country in {"NG", "PK", "VN", "BR"}
        assert phonenumbers.region_code_for_number(parsed(request)) in BUSINESS


def test_night_burst_hits_one_range_after_local_midnight(day: list[LabeledRequest]) -> None:
    by_range = defaultdict(list)
    for request in of(day, "night_burst"):
        by_range[e164(request)[:-3]].append(request)
    assert 1 <= len(by_range) <= 2
    for calls in by_range.values():
        country = phonenumbers.region_code_for_number(parsed(calls[0]))
        for request in calls:
            local_hour = (request["ts"] + UTC_OFFSET_H[country] * 3600) % 86400 / 3600
            assert local_hour < 5, request
        assert len({e164(r) for r in calls}) >= 3


# ----------------------------------------------------------------------------- IP world


def test_plan_blocks_are_global_and_disjoint() -> None:
    nets = [ipaddress.ip_network(b.cidr) for b in IP_PLAN]
    for n, net in enumerate(nets):
        assert net.is_global, net
        assert not any(
            net.overlaps(other) for other in nets[n + 1 :] if other.version == net.version
        )
    assert {b.kind for b in IP_PLAN} == set(KINDS)
    assert {6} < {ipaddress.ip_network(b.cidr).version for b in IP_PLAN}


def test_random_ip_stays_in_its_block() -> None:
    rng = random.Random(5)
    for _ in range(200):
        ip = random_ip(rng, "DE", "mobile")
        assert block_of(ip).country == "DE" and block_of(ip).kind == "mobile"
    assert block_of(random_ip(rng, "GB", "residential", 6)).country == "GB"
    assert block_of("8.8.8.8") is None
    with pytest.raises(ValueError, match="no IPv4 'tor' block in country 'GB'"):
        random_ip(rng, "GB", "tor")


def test_databases_describe_every_block(dbs: dict[str, Path]) -> None:
    rng = random.Random(11)
    with (
        maxminddb.open_database(str(dbs["country"])) as country,
        maxminddb.open_database(str(dbs["asn"])) as asn,
        maxminddb.open_database(str(dbs["anonymous"])) as anonymous,
    ):
        for block in IP_PLAN:
            net = ipaddress.ip_network(block.cidr)
            for ip in (str(net[1]), str(net[-2]), random_ip_in(rng, block)):
                assert country.get(ip) == {"country": {"iso_code": block.country}}, ip
                rec = asn.get(ip)
                assert rec["autonomous_system_number"] == block.asn
                assert type(rec["autonomous_system_number"]) is int
                assert rec["autonomous_system_organization"] == block.org
                assert anonymous.get(ip) == ANONYMOUS_FLAGS.get(block.kind), ip
        for outside in ("8.8.8.8", "81.1.255.255", "2001:4860::8888"):
            assert country.get(outside) is None and anonymous.get(outside) is None
        assert asn.metadata().database_type == "GeoLite2-ASN"
    lines = dbs["hosting_asns"].read_text().splitlines()
    assert [line for line in lines if not line.startswith("#")] == [f"AS{a}" for a in HOSTING_ASNS]
    assert HOSTING_ASNS == (64520, 64521)


def test_databases_are_reproducible(tmp_path: Path, dbs: dict[str, Path]) -> None:
    again = build_ip_databases(tmp_path)
    for name, path in dbs.items():
        assert again[name].read_bytes() == path.read_bytes(), name


def test_simulated_ips_resolve_to_what_the_scenario_intended(day, dbs: dict[str, Path]):
    with (
        maxminddb.open_database(str(dbs["country"])) as country,
        maxminddb.open_database(str(dbs["anonymous"])) as anonymous,
    ):
        flagged = Counter()
        for item in day:
            ip = item.request["ip"]
            block = block_of(ip)
            assert block is not None, ip
            assert country.get(ip)["country"]["iso_code"] == block.country
            flags = anonymous.get(ip)
            if block.kind in ANONYMOUS_FLAGS:
                assert flags and flags["is_anonymous"]
                flagged[item.scenario] += 1
            else:
                assert flags is None
    assert flagged["anonymous_ip"] == VOLUME_PER_DAY["anonymous_ip"]
    assert flagged["geo_mismatch"] == 0
    assert flagged["legit"] < 0.02 * Counter(i.scenario for i in day)["legit"]


# ----------------------------------------------------------------------------- numbering plan


@pytest.mark.parametrize("region", BUSINESS)
@pytest.mark.parametrize("ntype", [PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE])
def test_numbers_cover_the_whole_plan(region: str, ntype: int) -> None:
    rng = random.Random(f"plan/{region}/{ntype}")
    numbers = [random_number(rng, region, ntype) for _ in range(1500)]
    for number in numbers[:200]:
        num = phonenumbers.parse(number.e164)
        assert phonenumbers.is_valid_number(num)
        assert phonenumbers.number_type(num) == ntype
        assert phonenumbers.region_code_for_number(num) == region
    # many leading-digit blocks (area codes, mobile prefixes) are drawn, and none dominates
    heads = Counter(n.nsn[:3] for n in numbers)
    ranges = {n.nsn[:-3] for n in numbers}
    assert len(ranges) > 0.97 * len(numbers)
    assert max(heads.values()) < 0.1 * len(numbers), heads.most_common(3)
    assert len(heads) >= (10 if ntype == PhoneNumberType.MOBILE and region == "DE" else 30)
    example = phonenumbers.example_number_for_type(region, ntype)
    near = str(example.national_number)[:4]
    assert sum(n.nsn.startswith(near) for n in numbers) < 0.05 * len(numbers)


def test_nl_mobile_is_mostly_06_numbers() -> None:
    rng = random.Random(4)
    numbers = [random_number(rng, "NL", PhoneNumberType.MOBILE) for _ in range(1000)]
    assert sum(n.nsn.startswith("6") for n in numbers) > 0.9 * len(numbers)  # 970x is M2M


def test_ip_plan_has_many_networks_and_cgnat_pools() -> None:
    for cc in BUSINESS:
        assert len(blocks_for(cc, "residential")) >= 4, cc
        assert len({b.asn for b in blocks_for(cc, "mobile")}) >= 3, cc
        pools = cgnat_pools(cc)
        assert len(pools) >= 3 and all(b.kind == "mobile" and b.cgnat for b in pools)
        assert {b.asn for b in pools} == {b.asn for b in blocks_for(cc, "mobile")}
        assert blocks_for(cc, "business")
    assert not set(cgnat_pools(None)) & set(blocks_for(None, "mobile"))
    assert len(countries_with("residential")) >= 30


# ----------------------------------------------------------------------------- populations


def _span(requests: list[dict]) -> float:
    stamps = [r["ts"] for r in requests]
    return max(stamps) - min(stamps)


def _local_hour(request: dict) -> int:
    country = phonenumbers.region_code_for_number(parsed(request))
    return int((request["ts"] + UTC_OFFSET_H[country] * 3600) % 86400 // 3600)


def test_cgnat_addresses_carry_tens_to_hundreds_of_customers(day: list[LabeledRequest]) -> None:
    requests = of(day, "legit_cgnat")
    numbers_per_ip: dict[str, set[str]] = defaultdict(set)
    for request in requests:
        block = block_of(request["ip"])
        assert block.cgnat and block.kind == "mobile"
        num = parsed(request)
        assert phonenumbers.number_type(num) == PhoneNumberType.MOBILE
        assert phonenumbers.region_code_for_number(num) == block.country
        numbers_per_ip[request["ip"]].add(e164(request))
    sizes = sorted(len(v) for v in numbers_per_ip.values())
    assert sum(size >= 20 for size in sizes) >= 0.9 * len(sizes)
    assert 35 <= sizes[len(sizes) // 2] <= 90 and sizes[-1] >= 100  # ~60 typical, some hundreds
    for numbers in numbers_per_ip.values():  # from many ranges of the country, not one
        assert len({n[:-3] for n in numbers}) >= 0.9 * len(numbers)
    assert len({block_of(ip).country for ip in numbers_per_ip}) == len(BUSINESS)
    repeated = Counter(e164(r) for r in requests)
    assert 0.03 < sum(c > 1 for c in repeated.values()) / len(repeated) < 0.15  # some retry
    night = sum(_local_hour(r) < 6 for r in requests)
    assert night < 0.05 * len(requests)


def test_offices_are_10_to_60_staff_behind_one_address_in_office_hours(day) -> None:
    requests = of(day, "legit_office")
    numbers_per_ip: dict[str, set[str]] = defaultdict(set)
    for request in requests:
        assert block_of(request["ip"]).kind == "business"
        assert 8 <= _local_hour(request) < 20  # a few call again after a meeting
        numbers_per_ip[request["ip"]].add(e164(request))
    assert sum(_local_hour(r) < 18 for r in requests) > 0.9 * len(requests)
    sizes = sorted(len(v) for v in numbers_per_ip.values())
    assert len(sizes) >= 5 and 10 <= sizes[len(sizes) // 2] <= 60 and sizes[-1] <= 60
    for numbers in numbers_per_ip.values():
        assert len({n[:-3] for n in numbers}) >= 0.3 * len(numbers)  # mobiles and direct dials


def test_households_ask_on_two_or_three_numbers_from_one_home(day) -> None:
    per_ip: dict[str, set[str]] = defaultdict(set)
    for request in of(day, "legit_household"):
        assert block_of(request["ip"]).kind == "residential"
        per_ip[request["ip"]].add(e164(request))
    sizes = Counter(len(v) for v in per_ip.values())
    assert set(sizes) <= {1, 2, 3} and sizes[1] <= 1 and sizes[2] > sizes[3] > 0


def test_retries_come_20_to_60_minutes_later_on_the_same_number(day) -> None:
    by_number: dict[str, list[dict]] = defaultdict(list)
    for request in of(day, "legit_retry"):
        by_number[e164(request)].append(request)
    gaps, same_ip = [], []
    for calls in by_number.values():
        calls.sort(key=lambda r: r["ts"])
        assert len(calls) <= 3
        for a, b in itertools.pairwise(calls):
            gaps.append(b["ts"] - a["ts"])
            same_ip.append(a["ip"] == b["ip"])
    assert gaps and min(gaps) >= 20 * 60 and max(gaps) <= 60 * 60
    assert 0.6 < sum(same_ip) / len(same_ip) < 0.95  # mostly the same IP, sometimes not


def test_returning_customers_come_back_hours_later_from_another_network(day) -> None:
    by_number: dict[str, list[dict]] = defaultdict(list)
    for request in of(day, "legit_returning"):
        by_number[e164(request)].append(request)
    pairs = [sorted(v, key=lambda r: r["ts"]) for v in by_number.values() if len(v) == 2]
    assert len(pairs) >= 0.95 * len(by_number)
    for first, later in pairs:
        assert later["ts"] - first["ts"] >= 2 * 3600
        assert later["ip"] != first["ip"]


def test_shared_lines_are_asked_for_by_several_staff_from_several_ips(day) -> None:
    by_number: dict[str, list[dict]] = defaultdict(list)
    for request in of(day, "legit_shared_line"):
        assert phonenumbers.number_type(parsed(request)) == PhoneNumberType.FIXED_LINE
        by_number[e164(request)].append(request)
    full = [v for v in by_number.values() if len(v) >= 3]
    assert len(full) >= 0.9 * len(by_number)
    assert all(len({r["ip"] for r in v}) >= 2 for v in full)


@pytest.mark.parametrize("name", ["legit_surge", "legit_surge_announced"])
def test_surge_is_10_to_50_times_the_normal_rate_for_half_an_hour(day, name: str) -> None:
    plan = surge_plan(SimConfig(seed=1), name)
    requests = of(day, name)
    assert {phonenumbers.region_code_for_number(parsed(r)) for r in requests} == {plan.country}
    assert all(plan.start <= r["ts"] < plan.start + plan.length + 120 for r in requests)
    assert 25 * 60 <= plan.length <= 35 * 60
    # the measured normal rate of the country's ordinary customers around the surge
    base = [r for r in of(day, "legit") if phonenumbers.region_code_for_number(parsed(r)) == plan.country
            and plan.start - 3600 <= r["ts"] < plan.start + plan.length + 3600]  # fmt: skip
    in_window = sum(plan.start <= r["ts"] < plan.start + plan.length for r in base)
    normal = (len(base) - in_window) / (2 * 3600)
    factor = (len(requests) + in_window) / plan.length / normal
    assert 10 <= plan.factor <= 50
    assert len(requests) / (plan.base_rate * plan.length) + 1 == pytest.approx(plan.factor, rel=0.02)
    assert 0.6 * plan.factor <= factor <= 1.6 * plan.factor, (factor, plan.factor)  # measured
    assert len({r["ip"] for r in requests}) > 0.9 * len(requests)
    assert len({e164(r) for r in requests}) > 0.95 * len(requests)
    assert {block_of(r["ip"]).kind for r in requests} <= {"residential", "mobile"}


def test_campaign_windows_declare_the_announced_surge_only(day) -> None:
    cfg = SimConfig(seed=1)
    windows = campaign_windows(cfg)
    assert len(windows) == 1
    (window,) = windows
    assert set(window) == {"country", "start", "end", "factor"}
    assert isinstance(window["start"], int) and isinstance(window["end"], int)
    announced = of(day, "legit_surge_announced")
    assert all(window["start"] <= r["ts"] < window["end"] for r in announced)
    assert window["country"] == phonenumbers.region_code_for_number(parsed(announced[0]))
    assert 10 <= window["factor"] <= 50
    assert campaign_windows(SimConfig(seed=1, scenarios=("legit_surge",))) == []
    assert campaign_windows(cfg) == windows  # deterministic


# ----------------------------------------------------------------------------- quiet attacks


def test_botnet_flood_uses_every_ip_and_number_once(day) -> None:
    requests = of(day, "botnet_flood")
    assert len(requests) == VOLUME_PER_DAY["botnet_flood"] >= 2000
    assert len({r["ip"] for r in requests}) == len(requests)
    assert len({e164(r) for r in requests}) == len(requests)
    assert 180 <= _span(requests) <= 600
    assert len({e164(r)[:-3] for r in requests}) > 0.98 * len(requests)
    countries = Counter(block_of(r["ip"]).country for r in requests)
    assert len(countries) >= 20 and set(BUSINESS) <= set(countries)
    assert {block_of(r["ip"]).kind for r in requests} <= {"residential", "mobile"}
    assert {phonenumbers.region_code_for_number(parsed(r)) for r in requests} == set(BUSINESS)
    assert {r["user_agent"] for r in requests} <= set(BROWSER_UAS)


def test_pump_spread_covers_one_100k_block_evenly_from_fresh_residential_ips(day) -> None:
    requests = of(day, "pump_spread")
    numbers = [e164(r) for r in requests]
    assert len({n[:-5] for n in numbers}) == 1  # one leased 100,000-number block
    per_range = Counter(n[:-3] for n in numbers)
    assert len(per_range) == 100 and max(per_range.values()) <= 6  # a few per 1,000-number range
    assert len({r["ip"] for r in requests}) == len(requests)
    country = phonenumbers.region_code_for_number(parsed(requests[0]))
    assert country in BUSINESS
    for request in requests:
        block = block_of(request["ip"])
        assert block.country == country and block.kind in {"residential", "residential_proxy"}
    assert 0.095 < sum(r["authenticated"] for r in requests) / len(requests) < 0.155
    assert _span(requests) > 16 * 3600
    night = sum(_local_hour(r) < 6 for r in requests)
    assert night < 0.06 * len(requests)  # diurnal, like the customers it hides among


def test_slow_combo_recombines_6_ips_and_6_numbers_all_day(day) -> None:
    requests = of(day, "slow_combo")
    assert len({r["ip"] for r in requests}) == 6 and len({e164(r) for r in requests}) == 6
    assert len(Counter((r["ip"], e164(r)) for r in requests)) >= 30
    assert _span(requests) > 20 * 3600


def test_enumeration_walks_consecutive_numbers(day) -> None:
    requests = sorted(of(day, "enumeration"), key=lambda r: r["ts"])
    values = list(dict.fromkeys(int(e164(r)[1:]) for r in requests))
    assert values == list(range(values[0], values[0] + len(values)))
    assert len({r["ip"] for r in requests}) <= 6
    per_minute = len(requests) / (_span(requests) / 60)
    assert 1.5 <= per_minute <= 6


def test_harassment_rotates_ips_against_one_victim(day) -> None:
    requests = of(day, "harassment")
    assert len({e164(r) for r in requests}) == 1 and 30 <= len(requests) <= 100
    ips = Counter(r["ip"] for r in requests)
    assert max(ips.values()) <= 2 and len(ips) >= len(requests) / 2
    assert _span(requests) <= 5 * 3600


def test_populations_and_attacks_are_deterministic_and_independent() -> None:
    cfg = SimConfig(seed=9, duration_s=6 * 3600.0, legit_per_day=2000,
                    scenarios=("legit_cgnat", "pump_spread", "botnet_flood"))  # fmt: skip
    one = SimConfig(seed=9, duration_s=6 * 3600.0, legit_per_day=2000, scenarios=("legit_cgnat",))

    def strip(items: list[LabeledRequest], name: str) -> list[dict]:
        return [{k: v for k, v in i.request.items() if k != "request_id"}
                for i in items if i.scenario == name]  # fmt: skip

    a, b = simulate(cfg), simulate(cfg)
    assert [i.request for i in a] == [i.request for i in b]
    assert strip(a, "legit_cgnat") == strip(simulate(one), "legit_cgnat")
    assert Counter(i.scenario for i in a)["legit_cgnat"] == POPULATION_PER_DAY["legit_cgnat"] // 40
    assert all(not i.attack for i in a if i.scenario in LEGIT_LABELS)


def test_volumes_and_scenarios_are_configurable(tmp_path: Path) -> None:
    from detector.cli import main

    opts = scenario_options("botnet_flood,legit_office", ["botnet_flood=800", "legit_office=120"])
    cfg = SimConfig(seed=2, legit_per_day=100, **opts)
    counts = Counter(i.scenario for i in simulate(cfg))
    assert counts["botnet_flood"] == 800 and counts["legit_office"] == 120
    assert set(counts) - set(BASE) == {"botnet_flood", "legit_office"}
    with pytest.raises(ValueError, match="NAME=N"):
        scenario_options(None, ["botnet_flood"])
    with pytest.raises(ValueError, match="unknown scenario"):
        SimConfig(volumes=(("nope", 1),))
    out = tmp_path / "d.jsonl"
    assert main(["simulate", "--seed", "4", "--out", str(out), "--legit", "200", "--scenarios",
                 "legit_surge_announced,harassment", "--volume", "harassment=40"]) == 0  # fmt: skip
    labels = Counter(json.loads(line)["scenario"] for line in (tmp_path / "d.labels.jsonl").open())
    assert labels["harassment"] == 40 and labels["legit_surge_announced"] > 0
    declared = json.loads((tmp_path / "d.campaigns.json").read_text())
    assert declared == campaign_windows(SimConfig(seed=4, legit_per_day=200, scenarios=(
        "legit_surge_announced", "harassment"), volumes=(("harassment", 40),)))  # fmt: skip
    assert main(["simulate", "--out", str(out), "--scenarios", "nope"]) == 2
