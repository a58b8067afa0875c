"""The rate deck: parsing with errors naming file:line, longest prefix wins, the packaged sample."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.core.errors import ConfigError
from detector.core.rates import load_rate_deck, packaged_rate_deck, parse_rate_deck

ROOT = Path(__file__).resolve().parents[2]
GOOD = """# a comment
prefix,cost_per_min,currency,description

+,0.50,EUR,anything else
+44,0.005,EUR,UK fixed
+447,0.02,EUR,"UK mobile, all networks"
+4470,0.30,EUR,UK personal numbers
"""


def test_longest_prefix_wins_and_the_catch_all_takes_the_rest() -> None:
    deck = parse_rate_deck(GOOD, "deck.csv")
    assert len(deck) == 4 and deck.currency == "EUR"
    assert deck.lookup("+447012345678").prefix == "+4470"
    assert deck.lookup("+447400123456").cost_per_min == 0.02
    assert deck.lookup("+447400123456").description == "UK mobile, all networks"
    assert deck.lookup("+442079460018").prefix == "+44"
    assert deck.lookup("+33142685300").prefix == "+"
    assert deck.lookup(None) is None and deck.lookup("") is None
    without_catch_all = parse_rate_deck("+44,0.01,EUR\n", "d.csv")  # no header, no description
    assert without_catch_all.lookup("+33142685300") is None


@pytest.mark.parametrize(("text", "message"), [
    ("+44,0.01,EUR,a\n44,0.01,EUR,b\n", r"deck\.csv:2: prefix: expected '\+' and 0 to 15 digits"),
    ("+44,0.01,EUR,a\n+44x,0.01,EUR,b\n", r"deck\.csv:2: prefix"),
    ("+1234567890123456,0.01,EUR,a\n", r"deck\.csv:1: prefix"),
    ("# c\n+44,cheap,EUR,UK\n", r"deck\.csv:2: cost_per_min: expected a number >= 0, got 'cheap'"),
    ("+44,-0.01,EUR,UK\n", r"deck\.csv:1: cost_per_min: expected a number >= 0"),
    ("+44,nan,EUR,UK\n", r"deck\.csv:1: cost_per_min"),
    ("+44,20000,EUR,UK\n", r"deck\.csv:1: cost_per_min: 20000 is over the limit"),
    ("+44,0.01,eur,UK\n", r"deck\.csv:1: currency: expected an ISO 4217 code"),
    ("+44,0.01,EUR,UK\n+33,0.01,USD,FR\n", r"deck\.csv:2: currency USD differs from EUR \(line 1\)"),
    ("+44,0.01,EUR,UK\n\n+44,0.02,EUR,again\n", r"deck\.csv:3: prefix \+44 appears twice"),
    ("+44,0.01\n", r"deck\.csv:1: expected 4 columns"),
    ("+44,0.01,EUR,UK,extra\n", r"deck\.csv:1: expected 4 columns"),
    ("prefix,price,currency\n+44,0.01,EUR\n", r"deck\.csv:1: header: expected prefix,cost_per_min"),
    ("# only comments\n\n", r"deck\.csv: no rates"),
])
def test_invalid_decks_say_file_line_and_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_rate_deck(text, "deck.csv")


def test_files_bom_and_encoding(tmp_path: Path) -> None:
    p = tmp_path / "deck.csv"
    p.write_bytes("\ufeffprefix,cost_per_min,currency,description\n+44,0.01,GBP,UK\n".encode())
    deck = load_rate_deck(p)
    assert deck.currency == "GBP" and deck.source == str(p) and len(deck.version) == 12
    p.write_bytes(b"+44,0.01,EUR,caf\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_rate_deck(p)
    with pytest.raises(ConfigError, match="cannot read rate deck"):
        load_rate_deck(tmp_path / "missing.csv")


def test_the_sample_deck_is_packaged_marked_illustrative_and_linked_from_examples() -> None:
    text = (ROOT / "detector" / "data" / "rate-deck.sample.csv").read_text(encoding="utf-8")
    assert "ILLUSTRATIVE" in text.splitlines()[0] and "NOT A REAL TARIFF" in text.splitlines()[0]
    assert (ROOT / "examples" / "rate-deck.sample.csv").read_text(encoding="utf-8") == text
    deck = packaged_rate_deck()
    assert deck.version == load_rate_deck(ROOT / "examples" / "rate-deck.sample.csv").version
    assert load_rate_deck(None) is deck and deck.currency == "EUR"


def test_the_sample_deck_prices_every_simulated_destination_on_its_own_line() -> None:
    """Every valid number the simulator produces (business countries, premium and IRSF-like
    ranges) falls on a line of its own country or range, never on the catch-all; premium and
    IRSF-like destinations cost at least 5x a mobile call."""
    from detector.core.parse import parse_request
    from detector.core.phone import enrich_phone
    from detector.sim import SimConfig, simulate

    deck = packaged_rate_deck()
    seen: dict[str, float] = {}
    for it in simulate(SimConfig(seed=3, legit_per_day=3000, attack_scale=1.0)):
        req = parse_request(it.request)
        ph = enrich_phone(req.phone_number, req.country_hint)
        if not ph.valid:
            continue
        rate = deck.lookup(ph.e164)
        assert rate is not None and rate.prefix != "+", (ph.region, ph.number_type, ph.e164[:6])
        seen[f"{ph.region}/{ph.number_type}"] = rate.cost_per_min
    mobile = deck.lookup("+447400123456").cost_per_min
    for kind, cost in seen.items():
        if kind.endswith("PREMIUM_RATE") or kind.startswith(("SO/", "LV/", "CU/", "PG/", "001/")):
            assert cost >= 5 * mobile, kind
    assert any(k.endswith("PREMIUM_RATE") for k in seen) and any(k.startswith("SO/") or k.startswith("LV/")
                                                                  for k in seen)
