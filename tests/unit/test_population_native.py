"""The request scopes in C (detector/core/_popcount.c) against the Python reference
(detector/core/population.py, ``PopulationView(native=False)``): the same writes in the same
order (in order, late, far-past, far-future and evicting, merged deltas, a declared start, a
day of history, campaigns, prunes) give the same reads, gauges, buckets and state, and a replay
gives the same decisions."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from detector.core import population
from detector.core.policy import load_policy
from detector.core.population import (
    Campaign,
    PopulationView,
    read,
    scopes,
    surging_scopes,
)
from detector.core.spend import typical_hour, window_spend

POLICY = load_policy()
POP = POLICY.population
T0 = 1795341600.0  # 2026-11-24 06:00 UTC

def test_the_extension_is_built():
    """``make setup`` (``pip install -e .``) builds it; without it the detector runs the Python
    reference, slower: a test environment must not fall back unnoticed."""
    assert population._popcount is not None, \
        "detector.core._popcount is not built: pip install -e . with a C compiler"
    assert population.NATIVE
    assert PopulationView().native is not None
    assert population._popcount.MINUTES_KEPT == population.MINUTES_KEPT
    assert population._popcount.HOURS_KEPT == population.HOURS_KEPT


def _number(rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    if r < 0.5:  # GB numbers over a few hundred 100,000-blocks
        return f"+447{rng.randrange(40):03d}{rng.randrange(10**6):06d}", "GB"
    if r < 0.8:  # one pumped block
        return f"+44771234{rng.randrange(60):04d}", "GB"
    if r < 0.95:
        return f"+3361{rng.randrange(10**7):07d}", "FR"
    return f"+88{rng.randrange(100):02d}", "XX"  # too short for blocks


def _state(view: PopulationView) -> dict:
    out = {}
    for key in sorted(view.scope_keys()):
        sc = view.scope(key)
        out[key] = (dict(sorted(sc.minutes.items())), dict(sorted(sc.hours.items())),
                    sc.newest_minute, sc.newest_hour)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_the_c_store_reads_what_the_python_reference_reads(seed):
    rng = random.Random(seed)
    policy = POP
    if seed == 4:  # declared campaigns: the factors are the caller's, the same in both
        policy = replace(POP, campaigns=(Campaign("GB", T0 + 3600, T0 + 86400, 3.0),
                                         Campaign("*", T0 + 7200, T0 + 9000, 2.0)))
    c, py = PopulationView(native=True), PopulationView(native=False)
    c_other, py_other = PopulationView(native=True), PopulationView(native=False)
    assert c.native is not None and py.native is None
    t = T0
    for step in range(6000):
        # bursts, quiet stretches and steps back in time; some writes late, far past or future
        quiet = step % 1500 < 1100  # quiet stretches, then floods: surges enter and end
        t += rng.choice((20.0, 61.0, 90.0, 600.0) if quiet else (0.1, 0.5, 2.0)) \
            if rng.random() < 0.97 else -rng.choice((60.0, 4000.0))
        r = rng.random()
        ts = t if r < 0.8 else t - rng.choice((30, 120, 600, 3700, 8000, 30 * 3600)) if r < 0.97 \
            else t + rng.choice((600, 86400 * 400)) + 60 * rng.randrange(200)
        e164, region = _number(rng)
        keys = scopes(e164, region, policy)
        fresh = rng.random() < 0.6
        full = (1 << len(keys)) - 1  # every scope; or the pipeline's halves; or any subset
        mask = full if rng.random() < 0.6 else rng.choice((3 & full, full & ~3, rng.randrange(full + 1)))
        if rng.random() < 0.15:  # another worker's request, merged below as a delta
            counted = tuple(k for i, k in enumerate(keys) if mask >> i & 1)
            c_other.observe(counted, ts, fresh=fresh)
            py_other.observe(counted, ts, fresh=fresh)
        elif rng.random() < 0.05:  # invalid number: no scope counted, everything read
            assert read(c, (), ts, None, policy) == read(py, (), ts, None, policy), step
        else:
            assert (c.count_read(keys, mask, ts, fresh, region, policy)
                    == py.count_read(keys, mask, ts, fresh, region, policy)), step
        if rng.random() < 0.05:  # spend scopes stay in Python on both
            units = rng.randrange(1, 900)
            for v in (c, py):
                v.observe(("$C:" + region,), ts, fresh=True, n=units)
            assert window_spend(c, "$C:" + region, t) == window_spend(py, "$C:" + region, t)
            assert typical_hour(c, "$C:" + region, t) == typical_hour(py, "$C:" + region, t)
        if step % 41 == 0:
            da, db = c_other.take_delta(), py_other.take_delta()
            assert sorted(da) == sorted(db)
            c.merge(da)
            py.merge(db)
        if step == 3000:
            c.mark_start(t - 3 * 86400)
            py.mark_start(t - 3 * 86400)
        if step % 7 == 0:
            at_t = t - rng.choice((0, 0, 0, 90, 7200))
            assert read(c, keys, at_t, region, policy) == read(py, keys, at_t, region, policy), step
            assert surging_scopes(c, at_t, policy) == surging_scopes(py, at_t, policy), step
        if step % 500 == 499:
            now = t - rng.choice((0, 86400))
            assert c.prune(now) == py.prune(now), step
            assert c.blocks == py.blocks, step
            assert len(c) == len(py), step
            assert _state(c) == _state(py), step
    assert c.start_minute == py.start_minute
    assert _state(c) == _state(py)
    assert c.blocks == py.blocks


def test_deltas_are_recorded_for_the_other_workers_on_both():
    """A stream worker's view (``deltas=True``) counts through ``observe`` and records each
    (scope, minute) delta, whichever backend holds the buckets."""
    c, py = PopulationView(native=True), PopulationView(native=False)
    for i in range(50):
        e164 = f"+4477123400{i:02d}"
        for v in (c, py):
            got = v.count_read(scopes(e164, "GB", POP), 0b1111, T0 + 7 * i, i % 3 == 0, "GB", POP)
        assert got == py.count_read(scopes(e164, "GB", POP), 0, T0 + 7 * i, False, "GB", POP)
    assert sorted(c.take_delta()) == sorted(py.take_delta())
    assert c.take_delta() == [] == py.take_delta()


def test_ratios_are_rounded_as_pythons_round_even_at_ties():
    """The C store rounds the ratios to 3 places itself (core/_popcount.c, round3): exactly
    Python's round(x, 3), ties and near-ties included (those it hands to Python)."""
    view = PopulationView(native=True)
    never = {"surge_enter": 1e12, "surge_exit": 1e12, "surge_short_min": 10**9}  # ratio = 10 min / base
    policy = replace(POP, global_min_baseline_10m=16.0, **never)  # k/16: exact ties (0.0625)
    ties = 0
    for i in range(1, 200):
        view.observe(("*",), T0 + i * 3, fresh=False)
        got = read(view, (), T0 + i * 3, None, policy)
        assert got.global_surge_factor == round(got.global_10m / 16.0, 3), i
        ties += got.global_10m % 2 == 1  # odd k: k/16 ends in 5 at the 4th place
    assert ties > 50
    rng = random.Random(9)
    for _ in range(2000):
        n, base = rng.randrange(1, 5000), rng.choice((3.0, 7.0, 12.0, 0.001, 1e-7, 6e7))
        policy = replace(POP, global_min_baseline_10m=base, **never)
        v = PopulationView(native=True)
        v.native.add("*", int(T0) // 60, n, 0)
        assert read(v, (), T0, None, policy).global_surge_factor == round(n / base, 3), (n, base)


def test_the_records_the_c_store_builds_are_the_records_python_builds():
    """count_read returns PopulationCounts filled in C (their slots, in order): equal to the
    Python-built ones, the same field types, frozen, and copied and pickled like them."""
    import copy
    import pickle
    from dataclasses import FrozenInstanceError, fields

    from detector.core.population import PopulationCounts

    c, py = PopulationView(native=True), PopulationView(native=False)
    for i in range(300):
        e164 = f"+4477123400{i % 40:02d}"
        keys = scopes(e164, "GB", POP)
        for region in ("GB", None):
            got = c.count_read(keys, 0b1111 if region else 0, T0 + 5 * i, i % 2 == 0, region, POP)
            want = py.count_read(keys, 0b1111 if region else 0, T0 + 5 * i, i % 2 == 0, region, POP)
            assert type(got) is PopulationCounts and got == want
            assert [type(getattr(got, f.name)) for f in fields(got)] == \
                [type(getattr(want, f.name)) for f in fields(want)]
            if region:
                assert got.prefix_24h > 0 and got.country_10m > 0
    assert read(PopulationView(native=True), (), T0, None, POP) == PopulationCounts(0, 0.0, False)
    with pytest.raises(FrozenInstanceError):
        got.global_10m = 5  # type: ignore[misc]
    assert copy.copy(got) == got == pickle.loads(pickle.dumps(got)) and hash(got) == hash(want)
    names = PopulationCounts.__slots__  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="slot"):  # (refused: the registered type is unchanged)
        population._popcount.set_counts_type(PopulationCounts, names[:10] + ("to_dict",))
    with pytest.raises(AttributeError):
        population._popcount.set_counts_type(PopulationCounts, names[:10] + ("nope",))
    assert c.count_read(keys, 0, T0, False, "GB", POP) == py.count_read(keys, 0, T0, False, "GB", POP)


def test_bad_scope_keys_are_errors_not_crashes():
    view = PopulationView(native=True)
    with pytest.raises(ValueError, match="not a block scope"):
        view.merge([["B5-no-colons", 29921700, 1, 0]])
    with pytest.raises(TypeError):
        view.native.add(5, 29921700, 1, 0)
    view.merge([["C:GB", 29921700, 1, 0]])
    assert len(view) == 1


def test_a_replay_decides_the_same_with_either_backend():
    """The whole detector on a simulated day: every decision equal, C store or Python."""
    import io
    import json

    from detector.config import load_settings
    from detector.core.pipeline import Detector
    from detector.replay import replay
    from detector.runtime import build_context
    from detector.sim import SimConfig, simulate

    lines = [json.dumps(it.request).encode()
             for it in simulate(SimConfig(seed=4242, start=1795305600.0, duration_s=6 * 3600.0))]
    outs = []
    for native in (True, False):
        det = Detector(build_context(load_settings()))
        det.population = PopulationView(deltas=False, native=native)
        out = io.StringIO()
        replay(lines, det, out=out)
        outs.append(out.getvalue())
    assert outs[0] == outs[1]
    assert outs[0].count("\n") == len(lines)
