"""Population counters (detector/core/population.py): surges with adaptive baselines and
hysteresis, declared campaigns, block concentration without collateral, bounded state, the SOC's
overrides, and how decide() turns them into under-attack mode and shared-IP relief."""

from __future__ import annotations

from dataclasses import replace

import pytest

from detector.core import population
from detector.core.decide import DecisionContext, decide
from detector.core.lists import ListIndex, make_entry
from detector.core.policy import load_policy, parse_policy
from detector.core.population import MINUTES_KEPT, PopulationView, read, scopes, surging_scopes
from detector.core.records import (
    Action,
    CallbackRequest,
    Counts,
    Enrichment,
    IpCounts,
    IpInfo,
    PhoneInfo,
)
from detector.core.state import shared_ip

POLICY = load_policy()
POP = POLICY.population
T0 = 1795341600.0  # 2026-11-24 06:00 UTC


@pytest.fixture(autouse=True, params=["native", "python"])
def backend(request, monkeypatch):
    """Every test here on both backends of the request scopes: the C store (core/_popcount.c)
    and the Python reference (``PopulationView(native=False)``); tests of the reference's own
    running totals and memos ask for it by name."""
    if request.param == "native":
        assert population._popcount is not None, \
            "detector.core._popcount is not built: pip install -e . with a C compiler"
    monkeypatch.setattr(population, "NATIVE", request.param == "native")
    return request.param


def gb(n: int) -> str:
    """GB mobile numbers spread over the plan (each in its own 100,000 block)."""
    return f"+447{(n * 7919) % 1000:03d}{(n * 104729) % 1000000:06d}"


def count(view: PopulationView, e164: str, ts: float, fresh: bool = True) -> None:
    view.observe(scopes(e164, "GB", POP), ts, fresh=fresh)


def at(view: PopulationView, e164: str, ts: float, policy=POP):
    return read(view, scopes(e164, "GB", policy), ts, "GB", policy)


def steady(view: PopulationView, per_minute: int, minutes: int, start: float = T0) -> float:
    """``per_minute`` spread-out requests each minute for ``minutes``; returns the end time."""
    k = 0
    for m in range(minutes):
        for _ in range(per_minute):
            count(view, gb(k), start + m * 60 + 1)
            k += 1
    return start + minutes * 60


def test_scopes_are_everything_the_country_and_the_blocks():
    assert scopes("+447700900123", "GB", POP) == ("*", "C:GB", "B5:GB:+4477009", "B6:GB:+447700")
    assert scopes(None, None, POP) == ("*",)
    assert scopes("+4412345", "GB", POP) == ("*", "C:GB")  # too short for blocks


def test_a_flood_surges_and_a_steady_rate_does_not():
    view = PopulationView()
    end = steady(view, 3, 60)  # 30 per 10 minutes for an hour: the baseline
    assert not at(view, gb(10**6), end).country_surging
    for i in range(400):  # a botnet: 400 quiet requests in 4 minutes
        count(view, gb(10**6 + i), end + i * 0.6)
    pop = at(view, gb(1), end + 240)
    assert pop.country_surging and pop.country_surge_factor > POP.surge_enter
    assert pop.country_10m >= 400 and pop.global_surging


def test_the_morning_ramp_is_not_a_surge():
    """Doubling every hour (a diurnal ramp) stays under the enter factor."""
    view, t, k = PopulationView(), T0, 0
    for hour in range(4):
        per_min = 2 ** hour
        for m in range(60):
            for _ in range(per_min):
                count(view, gb(k), t + m * 60)
                k += 1
            assert not at(view, gb(0), t + m * 60).country_surging, (hour, m)
        t += 3600


def test_hysteresis_holds_then_releases():
    view = PopulationView()
    end = steady(view, 3, 60)
    for i in range(300):
        count(view, gb(10**6 + i), end + i)
    assert at(view, gb(1), end + 300).country_surging
    # the flood stops; the normal rate goes on: still surging a few minutes later, over by 12 min
    t = steady(view, 3, 15, start=end + 300)
    assert not at(view, gb(1), t).country_surging


def test_a_declared_campaign_is_not_a_surge():
    policy = parse_policy({"campaigns": [{"country": "GB", "start": T0 + 3000, "end": T0 + 7200,
                                          "factor": 30}]}).population
    view = PopulationView()
    end = steady(view, 3, 60)
    for i in range(400):
        count(view, gb(10**6 + i), end + i * 0.6)
    assert not at(view, gb(1), end + 240, policy).country_surging
    assert at(view, gb(1), end + 240).country_surging  # the same traffic, undeclared


def test_a_pumped_block_is_concentrated_and_its_neighbours_are_not():
    view = PopulationView()
    end = steady(view, 3, 120)  # 360 spread-out requests
    for i in range(40):  # a pump: 40 distinct numbers of one 100,000 block, fresh IPs
        count(view, f"+44771234{i:04d}", end + i * 60)
    pumped = at(view, "+447712340077", end + 2400)
    assert pumped.prefix_concentrated and pumped.prefix_concentration >= POP.concentration_factor
    # a number in a sibling 100,000 block of the same 1,000,000 block: not this request's business
    neighbour = PopulationView()
    steady(neighbour, 3, 120)
    for i in range(40):
        count(neighbour, f"+44771234{i:04d}", end + i * 60)
    count(neighbour, "+447712999999", end + 2400)
    assert not at(neighbour, "+447712999999", end + 2400).prefix_concentrated


def test_an_office_block_from_one_address_is_not_a_pump():
    view = PopulationView()
    end = steady(view, 3, 120)
    count(view, "+44771234" + "0000", end, fresh=True)
    for i in range(1, 40):  # the office's DDIs from its NAT address: not fresh after the first
        count(view, f"+44771234{i:04d}", end + i * 60, fresh=False)
    assert not at(view, "+447712340001", end + 2400).prefix_concentrated


def test_state_is_bounded_and_one_far_future_event_wipes_nothing():
    view = PopulationView()
    end = steady(view, 3, 30)
    count(view, gb(1), 4102444800.0)  # 2100-01-01
    assert len(view.scope("C:GB").minutes) <= MINUTES_KEPT
    assert at(view, gb(2), end - 1).country_10m == 30  # present reads ignore the future bucket
    view.prune(end)  # a bounded clock: nothing of the last day goes
    assert view.scope("C:GB") is not None


def test_deltas_merge_to_the_same_view():
    a, b, both = PopulationView(), PopulationView(), PopulationView()
    for i in range(50):
        (a if i % 2 else b).observe(scopes(gb(i), "GB", POP), T0 + i, fresh=True)
        both.observe(scopes(gb(i), "GB", POP), T0 + i, fresh=True)
    a.merge(b.take_delta())
    assert at(a, gb(1), T0 + 60) == at(both, gb(1), T0 + 60)
    assert b.take_delta() == []  # taken once
    # 50 in a minute on a fresh deployment: over 5 x the minimum baseline (6 per 10 minutes)
    assert surging_scopes(both, T0 + 60, POP)[("country", "GB")][1] is True


# --------------------------------------------------------------------------- decide()

REQ = CallbackRequest("r1", T0, "+447700900123", "92.16.0.1")
PHONE = PhoneInfo("+447700900123", True, True, True, "GB", 44, "MOBILE", "+447700900")
IP = IpInfo("92.16.0.1", 4, "global", "GB")


def test_under_attack_mode_deflects_the_unauthenticated_only():
    ctx = DecisionContext(POLICY)
    from detector.core.population import PopulationCounts

    surging = Counts(pop=PopulationCounts(country_surging=True, country_surge_factor=8.0))
    d = decide(REQ, Enrichment(PHONE, IP), surging, ctx, decided_at=0)
    assert (d.action, d.silent, d.reasons) == (Action.DEFLECT, False, ("country_surge",))
    authed = decide(replace(REQ, authenticated=True), Enrichment(PHONE, IP), surging, ctx, decided_at=0)
    assert authed.action is Action.ALLOW


def test_a_pumped_block_blocks_silently_and_deflects_an_authenticated_customer():
    from detector.core.population import PopulationCounts

    ctx = DecisionContext(POLICY)
    pumped = Counts(pop=PopulationCounts(prefix_concentrated=True, prefix_concentration=40.0))
    d = decide(REQ, Enrichment(PHONE, IP), pumped, ctx, decided_at=0)
    assert (d.action, d.silent, d.reasons[0]) == (Action.BLOCK, True, "prefix_concentration")
    d = decide(replace(REQ, authenticated=True), Enrichment(PHONE, IP), pumped, ctx, decided_at=0)
    assert (d.action, d.silent) == (Action.DEFLECT, False)


@pytest.mark.parametrize(("value", "scope"), [("*", "global"), ("GB", "country"), ("+4477009", "prefix")])
def test_the_soc_forces_the_mode_on_and_off(value, scope):
    lists = ListIndex([make_entry("deny", "surge", value, expires_at=T0 + 3600)])
    ctx = DecisionContext(POLICY, lists)
    assert lists.surge_overrides("+447700900123", "GB", now=T0) == {scope: True}
    code = {"global": "global_surge", "country": "country_surge", "prefix": "prefix_surge"}[scope]
    assert code in decide(REQ, Enrichment(PHONE, IP), Counts(), ctx, decided_at=0).reasons
    assert lists.surge_overrides("+447700900123", "GB", now=T0 + 3601) == {}  # expired
    lists.add(make_entry("allow", "surge", value))
    assert lists.surge_overrides("+447700900123", "GB", now=T0) == {scope: False}  # off wins


@pytest.mark.parametrize(
    ("ip", "c15", "c1h", "n24", "k24", "r24", "shared"),
    [
        (IP, 2, 6, 12, 1, 11, True),  # carrier NAT: many numbers, many ranges, no burst
        (IP, 40, 60, 12, 1, 11, False),  # a burst is not a population
        (IP, 2, 6, 12, 1, 2, False),  # numbers of one range: enumeration, not people
        (IP, 2, 6, 3, 1, 3, False),  # too little evidence
        (replace(IP, cellular=True), 1, 1, 1, 1, 1, True),  # a carrier address per the data
        (replace(IP, residential_proxy=True), 2, 6, 12, 1, 11, False),  # shared with anyone
        (IP, 2, 6, 12, 4, 11, False),  # many destination countries
    ],
)
def test_shared_ip_recognition(ip, c15, c1h, n24, k24, r24, shared):
    assert shared_ip(Enrichment(PHONE, ip), c15, c1h, n24, k24, POLICY.shared_ip, r24) is shared


def test_a_shared_ip_is_relaxed_but_not_unlimited():
    ctx = DecisionContext(POLICY)
    cgnat = Counts(ip=IpCounts(ip_15m=6, ip_1h=30, ip_24h=250, ip_distinct_numbers_1h=28,
                               ip_distinct_numbers_24h=240, ip_distinct_countries_24h=1, ip_shared=1))
    assert decide(REQ, Enrichment(PHONE, IP), cgnat, ctx, decided_at=0).action is Action.ALLOW
    same_unshared = replace(cgnat, ip=replace(cgnat.ip, ip_shared=0))
    d = decide(REQ, Enrichment(PHONE, IP), same_unshared, ctx, decided_at=0)
    assert (d.action, d.silent) == (Action.DEFLECT, False)  # never a silent block on its own


def test_memoized_reads_equal_fresh_sums_under_late_and_out_of_order_writes():
    """The memo of completed buckets never changes an answer: reads after interleaved
    observations, late deltas from another worker, out-of-order and far-future events equal
    reads of the same counts with nothing memoized."""
    import copy
    import random

    rng = random.Random(7)
    view, other = PopulationView(native=False), PopulationView(native=False)
    t = T0
    for step in range(1200):
        t += rng.expovariate(1 / 4.0)
        ts = t - rng.choice((0, 0, 0, 0, 30, 200, 3700))  # some out of order, a few hours late
        if step % 397 == 0:
            ts = 4102444800.0  # 2100
        target = other if rng.random() < 0.3 else view
        e164 = gb(rng.randrange(400)) if rng.random() < 0.8 else f"+44771234{rng.randrange(60):04d}"
        target.observe(scopes(e164, "GB", POP), ts, fresh=rng.random() < 0.7)
        if step % 50 == 0:
            view.merge(other.take_delta())  # another worker's late delta
        if step % 9 == 0:
            keys = scopes(e164, "GB", POP)
            got = read(view, keys, t, "GB", POP)
            fresh = copy.deepcopy(view)
            for sc in fresh.scopes.values():
                sc.forget_derived()
            assert got == read(fresh, keys, t, "GB", POP), step


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_running_totals_equal_fresh_sums_whatever_the_order_of_writes(seed):
    """The running minute totals, the hour sums and the surge memo are derived from the buckets:
    after in-order, late, far-past, far-future and evicting writes, reads going back in time,
    another start minute and a day of history, every read (surges, blocks, spend windows) equals
    a read of a twin view given the same writes whose derived state is dropped before each read."""
    import random

    from detector.core.spend import typical_hour, window_spend

    rng = random.Random(seed)
    view, twin, other = (PopulationView(native=False), PopulationView(native=False),
                         PopulationView(native=False))
    t = T0
    for step in range(4000):
        t += rng.choice((0.5, 3.0, 20.0, 61.0, 200.0, 3000.0) if step % 1000 < 500 else (0.5, 3.0, 20.0)) \
            if rng.random() < 0.95 else -rng.choice((60.0, 4000.0))
        r = rng.random()
        ts = t if r < 0.7 else t - rng.choice((30, 60, 120, 600, 3700, 8000, 30 * 3600)) if r < 0.95 \
            else t + rng.choice((600, 86400 * 400)) + 60 * rng.randrange(200)  # evicts recent minutes
        e164 = gb(rng.randrange(60)) if rng.random() < 0.7 else f"+44771234{rng.randrange(30):04d}"
        fresh, units = rng.random() < 0.6, rng.randrange(1, 900)
        for target in ((other,) if rng.random() < 0.2 else (view, twin)):
            target.observe(scopes(e164, "GB", POP), ts, fresh=fresh)
            target.observe(("$C:GB",), ts, fresh=True, n=units)
        if step % 37 == 0:
            delta = other.take_delta()
            view.merge(delta)
            twin.merge(delta)
        if step == 2000:
            view.mark_start(t - 5 * 86400)
            twin.mark_start(t - 5 * 86400)
        if step % 3 == 0:
            keys = scopes(e164, "GB", POP)
            at_t = t - rng.choice((0, 0, 0, 90, 7200))
            for sc in twin.scopes.values():
                sc.forget_derived()
            assert read(view, keys, at_t, "GB", POP) == read(twin, keys, at_t, "GB", POP), step
            assert surging_scopes(view, at_t, POP) == surging_scopes(twin, at_t, POP), step
            assert window_spend(view, "$C:GB", at_t) == window_spend(twin, "$C:GB", at_t), step
            assert typical_hour(view, "$C:GB", at_t) == typical_hour(twin, "$C:GB", at_t), step


def test_buckets_are_bounded_by_count_keeping_the_newest_whatever_the_order():
    """Eviction takes the oldest bucket without a scan while buckets arrive in order, and still
    the oldest after out-of-order ones: the kept buckets are the newest MINUTES_KEPT minutes
    and HOURS_KEPT hours ever written, as with a scan."""
    import random

    from detector.core.population import HOURS_KEPT, MINUTE

    rng = random.Random(3)
    view = PopulationView()
    minutes: set[int] = set()
    t = T0
    for _ in range(5000):
        t += rng.choice((1.0, 30.0, 90.0, 4000.0))
        ts = t - rng.choice((0, 0, 0, 120, 7200, 90000)) if rng.random() < 0.97 else t + 86400 * 30
        view.observe(("*",), ts, fresh=False)
        minutes.add(int(ts) // MINUTE)
        sc = view.scope("*")
        assert sorted(sc.minutes) == sorted(minutes)[-MINUTES_KEPT:]
        assert sorted(sc.hours) == sorted({m // 60 for m in minutes})[-HOURS_KEPT:]
