import pytest

from detector.core.errors import PolicyError
from detector.core.policy import load_policy, parse_policy
from detector.core.records import Action


def test_default_policy_is_valid_and_safe():
    p = load_policy()
    assert "GB" in p.allowed_countries and "SO" not in p.allowed_countries
    assert "+252" in p.denied_prefixes and "+882" in p.denied_prefixes
    assert p.number_types["PREMIUM_RATE"].action is Action.BLOCK and p.number_types["PREMIUM_RATE"].silent
    assert p.number_types["VOIP"].action is Action.DEFLECT
    assert (p.velocity["number_15m"], p.velocity["number_1h"], p.velocity["number_24h"]) == (7, 9, 15)
    assert p.velocity["ip_distinct_numbers_1h"] == 3
    assert p.rules["unauthenticated"].action is Action.ALLOW  # off by default


def test_file_overrides_only_what_it_sets(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('version = "t1"\n[velocity]\nnumber_15m = 3\n[destinations]\nallowed_countries = ["GB"]\n')
    p = load_policy(f)
    assert (p.version, p.velocity["number_15m"], p.velocity["number_1h"]) == ("t1", 3, 9)
    assert p.allowed_countries == frozenset({"GB"})


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"nonsense": {}}, "unknown section(s) ['nonsense']"),
        ({"velocity": {"number_15m": 0}}, "velocity.number_15m: expected a positive integer, got 0"),
        ({"velocity": {"numbr_15m": 3}}, "velocity: unknown key(s) ['numbr_15m']"),
        ({"rules": {"geo_mismatch": {"weight": 2}}}, "rules.geo_mismatch.weight: expected a number in [0.0, 1.0], got 2"),
        ({"rules": {"geo_mismatch": {"silent": "yes"}}}, "rules.geo_mismatch.silent: expected true or false"),
        ({"risk": {"deflect_at": 0.9, "block_at": 0.5}}, "risk.block_at (0.5) must be >= risk.deflect_at (0.9)"),
        ({"destinations": {"denied_prefixes": ["252"]}}, "expected '+' and digits, got '252'"),
        ({"destinations": {"allowed_countries": ["GBR"]}}, "expected ISO alpha-2 codes, got 'GBR'"),
        ({"ranges": {"trailing_digits": 9}}, "ranges.trailing_digits: expected an integer 1..6, got 9"),
        ({"deny": {"phones": []}}, "deny: unknown key(s) ['phones']"),
    ],
)
def test_invalid_policies_fail_with_precise_errors(overrides, needle):
    with pytest.raises(PolicyError) as info:
        parse_policy(overrides)
    assert needle in str(info.value)


def test_bad_toml_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("version = \n")
    with pytest.raises(PolicyError, match="bad.toml.*not valid TOML"):
        load_policy(f)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.toml")
