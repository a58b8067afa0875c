"""Cost at risk and spend circuit breakers (detector/core/spend.py): the expected cost, budgets
that open and close with their window, default budgets from the scope's own baseline, the SOC's
overrides, and the same decisions however requests are batched or spread over workers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import phonenumbers
import pytest

from detector.core.decide import DecisionContext
from detector.core.errors import ConfigError, InvalidField, PolicyError
from detector.core.lists import ListIndex, make_entry
from detector.core.parse import parse_request
from detector.core.pipeline import Detector
from detector.core.policy import load_policy, parse_policy
from detector.core.population import Campaign, PopulationView
from detector.core.rates import load_rate_deck, packaged_rate_deck, parse_rate_deck
from detector.core.records import Decision
from detector.core.spend import (
    SPEND_UNIT,
    SpendPolicy,
    breaker,
    campaign_boost,
    check_currency,
    expected_minutes,
    price,
    typical_hour,
)

T0 = 1795341600.0  # 2026-11-22T10:00:00Z


def gb_mobiles(n: int, start: int = 0) -> list[str]:
    """Valid GB mobile numbers spread over the plan (no block, range or number is hammered)."""
    out: list[str] = []
    i = start
    while len(out) < n:
        e164 = f"+447{400 + (i * 37) % 500:03d}{(i * 7919 + 12345) % 1_000_000:06d}"
        num = phonenumbers.parse(e164)
        if (phonenumbers.is_valid_number(num) and phonenumbers.region_code_for_number(num) == "GB"
                and phonenumbers.number_type(num) == phonenumbers.PhoneNumberType.MOBILE):
            out.append(e164)
        i += 1
    return out


def req(i: int, ts: float, phone: str, **extra: Any) -> Any:
    return parse_request({"request_id": f"r{i}", "ts": ts, "phone_number": phone,
                          "ip": f"81.2.{i // 200}.{i % 200 + 1}", **extra})


def detector(overrides: dict[str, Any] | None = None, lists: ListIndex | None = None) -> Detector:
    policy = parse_policy(overrides or {})
    return Detector(DecisionContext(policy, lists=lists if lists is not None else ListIndex()))


BUDGET = {"spend": {"budgets": [{"prefix": "+447", "per_hour": 0.5}]}}  # ~6 calls at 0.08


def run(det: Detector, phones: list[str], t0: float, step: float = 60.0, first: int = 0,
        **extra: Any) -> list[Decision]:
    return [det.process(req(first + i, t0 + i * step, p, **extra)) for i, p in enumerate(phones)]


# --------------------------------------------------------------------------- expected cost


def test_expected_cost_is_the_rate_times_risk_weighted_minutes() -> None:
    sp = SpendPolicy()
    assert expected_minutes(0.0, sp) == 4.0 and expected_minutes(1.0, sp) == 60.0
    assert expected_minutes(0.25, sp) == pytest.approx(0.25 * 60 + 0.75 * 4)
    assert price(0.02, 0.0, sp) == 800 and price(None, 0.5, sp) == 0 and price(0.0, 1.0, sp) == 0
    (d,) = run(detector(), gb_mobiles(1), T0)
    assert d.action == "allow" and d.risk == 0.0
    assert (d.cost_per_min, d.expected_cost, d.currency) == (0.02, 0.08, "EUR")
    pumped = detector().process(req(9, T0, "+252901234567"))  # Somalia: denied, priced at its risk
    assert pumped.action == "block" and pumped.cost_per_min == 0.9
    assert pumped.expected_cost == pytest.approx(0.9 * expected_minutes(pumped.risk, sp), abs=1e-4)
    invalid = detector().process(req(10, T0, "+44123"))
    assert invalid.cost_per_min is None and invalid.expected_cost == 0.0


def test_a_stopped_request_spends_nothing_and_only_allowed_spend_counts() -> None:
    det = detector()
    run(det, ["+252901234567", "+252901234568"], T0)
    assert not any(k.startswith("$") for k in det.population.scope_keys())
    run(det, gb_mobiles(2), T0 + 600, first=10)
    sc = det.population.scope("$C:GB")
    assert sum(c[0] for c in sc.minutes.values()) == 2 * 800  # units: 2 x 0.08
    assert sum(c[1] for c in sc.minutes.values()) == 2  # allowed requests


# --------------------------------------------------------------------------- the breaker


def test_the_breaker_opens_at_the_budget_and_closes_when_the_hour_has_passed() -> None:
    det = detector(BUDGET)
    ds = run(det, gb_mobiles(10), T0)  # one a minute, 0.08 each: 0.56 after 7 >= 0.5
    assert [d.action for d in ds] == ["allow"] * 7 + ["deflect"] * 3
    assert ds[7].reasons[0] == "spend_budget_exceeded" and not ds[7].silent
    assert ds[7].budget is not None and ds[7].budget["scope"] == "+447" and ds[7].budget["open"]
    assert ds[7].budget["spend_1h"] == pytest.approx(0.56) and ds[7].budget["limit_1h"] == 0.5
    assert ds[7].budget["source"] == "policy" and ds[7].budget["kind"] == "prefix"
    assert ds[6].budget is not None and not ds[6].budget["open"]
    # 59 minutes after the first allowed call all 7 are still in the window; an hour later not
    (still,) = run(det, gb_mobiles(1, 100), T0 + 59 * 60 + 1, first=100)
    assert still.action == "deflect"
    (later,) = run(det, gb_mobiles(1, 200), T0 + 60 * 60 + 30, first=200)  # the first left the window
    assert later.action == "allow" and later.budget["spend_1h"] == pytest.approx(0.48)


def test_a_day_budget_holds_for_24_hours() -> None:
    det = detector({"spend": {"budgets": [{"country": "GB", "per_day": 0.3}]}})
    ds = run(det, gb_mobiles(6), T0, step=1800.0)  # one every 30 minutes
    assert [d.action for d in ds] == ["allow"] * 4 + ["deflect"] * 2
    assert ds[4].budget["scope"] == "GB" and ds[4].budget["spend_24h"] == pytest.approx(0.32)
    (next_day,) = run(det, gb_mobiles(1, 300), T0 + 25 * 3600, first=300)
    assert next_day.action == "allow"


def test_a_block_budget_blocks_but_an_authenticated_customer_is_deflected_and_monitor_only_reports() -> None:
    policy = {"spend": {"budgets": [{"prefix": "+447", "per_hour": 0.1, "action": "block"}]}}
    det = detector(policy)
    ds = run(det, gb_mobiles(3), T0)
    assert [d.action for d in ds] == ["allow", "allow", "block"] and not ds[2].silent
    (auth,) = run(det, gb_mobiles(1, 50), T0 + 300, first=50, authenticated=True)
    assert auth.action == "deflect" and auth.reasons[0] == "spend_budget_exceeded"
    monitored = {**policy, "rules": {"spend_budget_exceeded": {"action": "deflect", "mode": "monitor"}}}
    ds = run(detector(monitored), gb_mobiles(4), T0)
    assert [d.action for d in ds] == ["allow"] * 4
    assert ds[3].monitored_reasons == ("spend_budget_exceeded",) and ds[3].reasons == ()


def test_default_budgets_are_the_floor_without_history_then_a_multiple_of_the_median_hour() -> None:
    sp = SpendPolicy()
    view = PopulationView()
    view.mark_start(T0 - 30 * 3600)
    state = breaker(view, "$C:GB", T0, sp)  # nothing spent yet: the floors
    assert (state.limit_1h, state.limit_24h, state.source) == (150.0, 1000.0, "default")
    assert breaker(view, "$P:+447", T0, sp).limit_1h == 100.0
    # 24 complete hours: 20 quiet hours at 30, 4 pumped hours at 900: the median ignores the pump
    for k in range(24):
        ts = T0 - (24 - k) * 3600 + 60
        view.observe(("$C:GB",), ts, fresh=True, n=(900 if k >= 20 else 30) * SPEND_UNIT)
    assert typical_hour(view, "$C:GB", T0) == 30 * SPEND_UNIT
    state = breaker(view, "$C:GB", T0, sp)
    assert state.limit_1h == 300.0 and state.limit_24h == 3 * 24 * 30.0  # 10x and 3 x 24 x the median
    assert state.spend_24h == pytest.approx(19 * 30 + 4 * 900, abs=1e-9)  # hours T0-23h .. now
    assert state.open  # the pump itself: 4,170 in the last 24 hours > 2,160


def test_hours_before_the_view_started_are_unknown_not_zero() -> None:
    view = PopulationView()
    view.mark_start(T0 - 3600 - 600)  # started 1 h 10 min ago: one complete hour
    view.observe(("$C:GB",), T0 - 3600 + 60, fresh=True, n=40 * SPEND_UNIT)
    assert typical_hour(view, "$C:GB", T0) == 40 * SPEND_UNIT  # not the median of 23 zeros and 40


def test_a_declared_campaign_raises_default_budgets_while_its_spend_is_in_the_window() -> None:
    c = Campaign("GB", T0, T0 + 1800, 30.0)
    assert campaign_boost((c,), "GB", T0 + 900, 3600.0) == pytest.approx(1 + 29 * 0.25)
    assert campaign_boost((c,), "GB", T0 + 3600, 3600.0) == pytest.approx(1 + 29 * 0.5)  # ended, in window
    assert campaign_boost((c,), "GB", T0 + 5400, 3600.0) == 1.0  # out of the hour window
    assert campaign_boost((c,), "GB", T0 + 5400, 86400.0) == pytest.approx(1 + 29 * 1800 / 86400)
    assert campaign_boost((c,), "FR", T0 + 900, 3600.0) == 1.0
    assert campaign_boost((replace(c, country="*"),), "FR", T0 + 900, 3600.0) > 1.0
    view = PopulationView()
    assert breaker(view, "$P:+447", T0 + 900, SpendPolicy(), (c,)).limit_1h == pytest.approx(100 * 8.25)


# --------------------------------------------------------------------------- the SOC's overrides


def test_the_soc_holds_a_breaker_closed_raises_it_or_forces_it_open_until_the_entry_expires() -> None:
    lists = ListIndex()
    det = detector(BUDGET, lists)
    ds = run(det, gb_mobiles(9), T0)
    assert ds[-1].action == "deflect"
    lists.add(make_entry("allow", "budget", "+447", expires_at=T0 + 900, source="soc"))  # reset
    (held,) = run(det, gb_mobiles(1, 400), T0 + 600, first=400)
    assert held.action == "allow" and held.budget["source"] == "soc"
    (expired,) = run(det, gb_mobiles(1, 410), T0 + 960, first=410)
    assert expired.action == "deflect"
    lists.add(make_entry("allow", "budget", "+447:x3", expires_at=T0 + 7200, source="soc"))  # raise
    (raised,) = run(det, gb_mobiles(1, 420), T0 + 1000, first=420)
    assert raised.action == "allow" and raised.budget["limit_1h"] == pytest.approx(1.5)
    lists.add(make_entry("deny", "budget", "GB", expires_at=T0 + 7200, source="soc"))  # force open
    (forced,) = run(det, gb_mobiles(1, 430), T0 + 1100, first=430)
    assert forced.action == "deflect" and forced.budget["scope"] == "GB"
    lists.add(make_entry("allow", "budget", "*", expires_at=T0 + 7200, source="soc"))  # allow wins
    (everything,) = run(det, gb_mobiles(1, 440), T0 + 1200, first=440)
    assert everything.action == "allow"


def test_budget_list_values() -> None:
    assert make_entry("allow", "budget", "gb:X3").value == "GB:x3"
    assert make_entry("allow", "budget", "0044 70").value == "+4470"
    assert make_entry("deny", "budget", "*").key == "deny:budget:*"
    for bad in ("GB:x0.5", "GB:3", "+44:x2000", "GBR"):
        with pytest.raises(InvalidField):
            make_entry("allow", "budget", bad)
    with pytest.raises(InvalidField, match="without a factor for deny"):
        make_entry("deny", "budget", "GB:x2")


# --------------------------------------------------------------------------- stream == replay


def test_batched_replay_decides_exactly_as_one_request_at_a_time() -> None:
    """process_many decides a batch with one model call, then settles each decision in commit
    order: the breaker (which depends on the allowed spend before it) sees the same state."""
    phones = gb_mobiles(40)
    rows = [req(i, T0 + i * 20.0, p) for i, p in enumerate(phones)]
    det = detector(BUDGET)
    one = [det.process(r).to_dict() for r in rows]
    batched = [d.to_dict() for d in detector(BUDGET).process_many(rows, batch=16)]
    assert one == batched
    assert {d["action"] for d in one} == {"allow", "deflect"}


def test_spend_is_shared_through_the_population_deltas() -> None:
    """Two workers' views: the spend one counted reaches the other through the published delta
    (the same rows as request counts), so both see the breaker open."""
    a, b = detector(BUDGET), detector(BUDGET)
    a.population = PopulationView(deltas=True)  # a stream worker's view (replay keeps no deltas)
    run(a, gb_mobiles(8), T0)
    b.population.merge(a.population.take_delta())
    (seen_by_b,) = run(b, gb_mobiles(1, 500), T0 + 600, first=500)
    assert seen_by_b.action == "deflect" and seen_by_b.budget["spend_1h"] == pytest.approx(0.56)


# --------------------------------------------------------------------------- policy and deck


def test_spend_policy_errors_name_the_key() -> None:
    cases = [
        ({"spend": {"budgets": [{"country": "GB"}]}}, r"spend\.budgets\[0\]: expected per_hour and/or per_day"),
        ({"spend": {"budgets": [{"country": "GB", "prefix": "+44", "per_hour": 1}]}}, "exactly one of"),
        ({"spend": {"budgets": [{"prefix": "4470", "per_hour": 1}]}}, r"spend\.budgets\[0\]\.prefix"),
        ({"spend": {"budgets": [{"country": "GB", "per_hour": -1}]}}, r"spend\.budgets\[0\]\.per_hour"),
        ({"spend": {"budgets": [{"country": "GB", "per_hour": 1, "action": "allow"}]}}, r"\.action"),
        ({"spend": {"budgets": [{"country": "GB", "per_hour": 1}, {"country": "gb", "per_day": 2}]}},
         "a second budget for GB"),
        ({"spend": {"hour_factor": 0.5}}, r"spend\.hour_factor"),
        ({"spend": {"currency": "euro"}}, r"spend\.currency"),
        ({"spend": {"budget": []}}, r"spend\.budget: unknown key"),
    ]
    for overrides, message in cases:
        with pytest.raises(PolicyError, match=message):
            parse_policy(overrides)
    p = parse_policy({"spend": {"budgets": [{"country": "gb", "per_hour": 5}, {"prefix": "+4470", "per_day": 9}]}})
    assert set(p.spend.countries) == {"GB"} and p.spend.prefix_lengths == (5,)
    assert "spend_budget_exceeded" in load_policy().reason_codes()


def test_a_deck_in_another_currency_than_the_policy_is_refused() -> None:
    usd = parse_rate_deck("+44,0.01,USD,UK\n", "usd.csv")
    with pytest.raises(ConfigError, match="currency USD differs from the policy's spend.currency EUR"):
        check_currency(load_policy().spend, usd)
    check_currency(parse_policy({"spend": {"currency": "USD"}}).spend, usd)


def test_the_policy_watcher_reloads_the_deck_and_keeps_the_old_one_when_the_new_is_invalid(tmp_path: Path) -> None:
    from detector.policy_watch import PolicyWatcher

    deck = tmp_path / "deck.csv"
    deck.write_text("+,0.50,EUR,rest\n+44,0.01,EUR,UK\n")
    ctx = DecisionContext(load_policy(), rates=load_rate_deck(deck))
    watcher = PolicyWatcher(None, ctx, deck)
    assert watcher.check_deck() is False  # unchanged
    deck.write_text("+,0.50,EUR,rest\n+44,0.02,EUR,UK dearer\n")
    assert watcher.check_deck() is True and ctx.rates is not None
    assert ctx.rates.lookup("+442079460018").cost_per_min == 0.02
    deck.write_text("+,0.50,EUR,rest\n+44,oops,EUR,UK\n")
    assert watcher.check_deck() is False
    assert ctx.rates.lookup("+442079460018").cost_per_min == 0.02 and "deck.csv:2" in str(watcher.last_error)
    deck.write_text("+,0.50,USD,rest\n")
    assert watcher.check_deck() is False and "USD" in str(watcher.last_error)
    assert ctx.rates.currency == "EUR"


def test_every_context_prices_with_the_packaged_sample_by_default() -> None:
    assert DecisionContext(load_policy()).rates is packaged_rate_deck()


# --------------------------------------------------------------------------- explain, backtest


def test_explain_shows_the_cost_and_the_breaker_in_words() -> None:
    from detector.explain import explain_row, render
    from detector.sink.rows import decision_row

    ds = run(detector(BUDGET), gb_mobiles(9), T0)
    text = render(explain_row(decision_row(ds[-1].to_dict(), b"k"), parse_policy(BUDGET)))
    assert "DEFLECTED" in text and "Cost: 0.0200 EUR/min; expected 0.08 EUR" in text
    assert "spend_budget_exceeded: allowed spend to prefix +447 reached its budget" in text
    assert "0.56 EUR in the last hour (budget 0.50)" in text  # deflected requests spend nothing
    near = render(explain_row(decision_row(ds[5].to_dict(), b"k"), parse_policy(BUDGET)))
    assert "Spend budget (prefix +447): 0.40 of 0.50 EUR in the last hour" in near
    assert ds[0].budget is None  # far from every budget: not named


def test_backtest_reports_the_money_a_candidate_moves() -> None:
    from detector.backtest import BacktestReport, compare

    phones = gb_mobiles(12)
    rows = [req(i, T0 + i * 60.0, p) for i, p in enumerate(phones)]
    base = list(detector().process_many(rows))
    cand = list(detector(BUDGET).process_many(rows))
    report = compare(zip(base, cand, strict=True), BacktestReport("t", {"policy": "a", "model": None},
                                                                 {"policy": "b", "model": None}))
    assert report.currency == "EUR" and report.newly_stopped == 5
    assert report.money_newly_stopped == pytest.approx(5 * 0.08)
    assert report.money_allowed_before == pytest.approx(12 * 0.08)
    assert report.money_allowed_after == pytest.approx(7 * 0.08)
    assert "newly stopped 0.40 EUR" in report.render_text()
    assert report.to_dict()["money"]["newly_stopped"] == pytest.approx(0.4)


@pytest.mark.parametrize("native", [False, True], ids=["python", "c"])
def test_rolled_window_sums_equal_summing_the_buckets_whatever_the_order_of_writes(native: bool) -> None:
    """The breaker's window sums are rolled forward minute by minute (the Python reference) or
    summed (the C store); writes into the past (a late delta from another worker), reads that
    go back in time and evictions must leave them equal to summing every bucket, as the replay
    path and every worker must agree exactly."""
    import random

    from detector.core.population import MINUTE
    from detector.core.spend import window_spend

    rng = random.Random(5)
    view = PopulationView(native=native)
    key = "$C:GB"
    now = T0
    for step in range(4000):
        roll = rng.random()
        if roll < 0.55:
            now += rng.choice((0, 5, 30, 60, 61, 600, 3600))
        elif roll < 0.6:
            now -= rng.choice((60, 3600))  # a read at an earlier event time (another partition)
        at = now - rng.choice((0, 0, 0, 30, 120, 5000, 90000)) if rng.random() < 0.7 else now
        view.observe((key,), at, fresh=True, n=rng.randrange(1, 5000))
        if rng.random() < 0.1:
            view.merge([[key, int(now - rng.choice((60, 700))) // MINUTE, rng.randrange(1, 900), 1]])
        if rng.random() < 0.05:  # far-future buckets: bounded by count, they evict the oldest
            view.observe((key,), now + rng.randrange(1, 400) * 86400.0, fresh=True, n=7)
        got = window_spend(view, key, now)
        sc = view.scope(key)
        m = int(now) // MINUTE
        want_h = sum(c[0] for b, c in sc.minutes.items() if m - 59 <= b <= m)
        want_d = sum(c[0] for b, c in sc.hours.items() if m // 60 - 23 <= b <= m // 60)
        assert got == (want_h, want_d), step
        start = view.start_minute
        vals = sorted(sc.hours.get(b, [0])[0] for b in range(m // 60 - 24, m // 60) if b * 60 >= start)
        assert typical_hour(view, key, now) == (vals[(len(vals) - 1) // 2] if vals else 0), step


def test_a_new_policy_in_another_currency_than_the_running_deck_is_rejected(tmp_path: Path) -> None:
    from detector.policy_watch import PolicyWatcher

    path = tmp_path / "policy.toml"
    path.write_text('version = "eur-1"\n')
    ctx = DecisionContext(load_policy(path))
    watcher = PolicyWatcher(path, ctx)
    path.write_text('version = "usd-1"\n[spend]\ncurrency = "USD"\n')
    assert watcher.check() is None and ctx.policy.version == "eur-1"
    assert "currency EUR differs from the policy's spend.currency USD" in str(watcher.last_error)


def test_the_worker_settings_load_the_deck_and_refuse_a_currency_mismatch(tmp_path: Path) -> None:
    from detector.config import load_settings
    from detector.runtime import build_context

    deck = tmp_path / "deck.csv"
    deck.write_text("+44,0.01,GBP,UK\n")
    settings = load_settings(env={"DETECTOR_RATE_DECK": str(deck)})
    with pytest.raises(ConfigError, match="currency GBP differs"):
        build_context(settings)
    policy = tmp_path / "policy.toml"
    policy.write_text('[spend]\ncurrency = "GBP"\n')
    ctx = build_context(load_settings(env={"DETECTOR_RATE_DECK": str(deck), "DETECTOR_POLICY": str(policy)}))
    assert ctx.rates is not None and ctx.rates.currency == "GBP"
    with pytest.raises(ConfigError, match="DETECTOR_RATE_DECK: file"):
        load_settings(env={"DETECTOR_RATE_DECK": str(tmp_path / "missing.csv")})
    assert build_context(load_settings(env={})).rates is packaged_rate_deck()
