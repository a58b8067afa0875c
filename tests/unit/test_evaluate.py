"""Per-scenario evaluation (detector.evaluate): rows, consistent totals, the three modes, JSONL input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detector.core.policy import load_policy
from detector.evaluate import (
    LEGIT_VISITS,
    MODES,
    LabelledRow,
    evaluate,
    evaluate_jsonl,
    merge_reports,
    read_labelled_jsonl,
    simulator_intel,
)
from detector.sim import LEGIT_LABELS, SimConfig, simulate, write_jsonl
from detector.train import build_matrix, calibrate_threshold, scorer_for, train

POLICY = load_policy()
# 08:00-11:00 UTC: busy hours, every attack scenario present at ~1/8 of its daily volume
SMALL = SimConfig(seed=21, start=1795334400.0, duration_s=3 * 3600.0, legit_per_day=8000)


@pytest.fixture(scope="module")
def intel():
    with simulator_intel() as ip_intel:
        yield ip_intel


@pytest.fixture(scope="module")
def items():
    return simulate(SMALL)


@pytest.fixture(scope="module")
def scorer(intel):
    """A small model trained on another simulated morning's legitimate traffic."""
    train_items = simulate(SimConfig(seed=22, start=SMALL.start, duration_s=SMALL.duration_s,
                                     legit_per_day=8000))  # fmt: skip
    X, scen = build_matrix(train_items, POLICY, intel)
    legit = np.array([s.startswith("legit") for s in scen])
    s = scorer_for(train(X[legit], n_estimators=50, seed=0), version="small-test")
    s.threshold = calibrate_threshold(s.anomaly(X[legit]), 0.005)
    return s


@pytest.fixture(scope="module")
def report(items, intel, scorer):
    return evaluate(items, POLICY, intel, scorer, source="small morning")


def test_one_row_per_scenario_attacks_first(report, items):
    scenarios = [r.scenario for r in report.rows]
    assert set(scenarios) == {i.scenario for i in items} | {LEGIT_VISITS}
    attack_flags = [r.attack for r in report.rows]
    assert attack_flags == sorted(attack_flags, reverse=True)  # attacks, then legitimate rows
    assert scenarios[-1] == LEGIT_VISITS


def test_totals_are_consistent(report, items):
    for mode in MODES:
        total = report.totals(mode)
        assert total.requests == len(items)
        assert total.allowed + total.deflected + total.blocked + total.rejected == total.requests
        for row in report.rows:
            t = row.modes[mode]
            assert t.allowed + t.stopped == t.requests
            assert 0.0 <= t.stop_rate <= 1.0 and t.stop_rate + t.allow_rate == pytest.approx(1.0)
    for row in report.rows:  # each mode replays every request of the scenario
        assert len({row.modes[m].requests for m in MODES}) == 1
    n_sessions = len({i.request["session_id"] for i in items if not i.attack})
    assert report.row(LEGIT_VISITS).modes["combined"].requests == n_sessions


def test_modes_behave_as_named(items, intel, scorer, report):
    no_model = evaluate(items, POLICY, intel, None)
    for row in report.rows:
        # rules-only ignores the model entirely; model-only without a model allows everything
        assert row.modes["rules"] == no_model.row(row.scenario).modes["rules"]
        assert no_model.row(row.scenario).modes["model"].stopped == 0
        # a model hit only ever adds a deflection: combined stops at least what rules stop,
        # up to state effects (an allowed request leaves an outstanding callback)
        if row.attack:
            assert row.modes["combined"].stopped >= row.modes["rules"].stopped - 2
    legit = report.row("legit").modes
    assert legit["model"].stop_rate <= 0.02  # calibrated at 0.5% on similar traffic
    assert report.totals("model").stopped > 0


def test_render_names_every_scenario_and_the_targets(report):
    text = report.render()
    for row in report.rows:
        assert row.scenario in text
    assert "rules" in text and "model" in text and "combined" in text
    assert "small-test" in text and "targets" in text
    assert json.loads(json.dumps(report.to_dict()))["scenarios"]["legit"]["combined"]["requests"] > 0


def test_unparseable_requests_count_as_rejected(intel):
    rows = [
        LabelledRow({"request_id": "a", "ts": SMALL.start, "phone_number": "+447700900123",
                     "ip": "81.2.3.4"}, "legit", False),  # fmt: skip
        LabelledRow({"request_id": "b", "ts": "yesterday", "phone_number": "1", "ip": "x"}, "junk", True),
    ]
    rep = evaluate(rows, POLICY, intel, None)
    junk = rep.row("junk").modes["combined"]
    assert (junk.requests, junk.rejected, junk.stop_rate) == (1, 1, 1.0)
    assert rep.row("legit").modes["rules"].requests == 1


def test_jsonl_round_trip_gives_the_same_report(tmp_path, items, intel, scorer, report):
    subset = items[:400]
    write_jsonl(subset, tmp_path / "r.jsonl", tmp_path / "r.labels.jsonl")
    read = read_labelled_jsonl(tmp_path / "r.jsonl", tmp_path / "r.labels.jsonl")
    assert [(r.scenario, r.attack, r.request) for r in read] == [
        (i.scenario, i.attack, i.request) for i in subset
    ]
    from_files = evaluate_jsonl(tmp_path / "r.jsonl", tmp_path / "r.labels.jsonl", policy=POLICY,
                                intel=intel, scorer=scorer)  # fmt: skip
    direct = evaluate(subset, POLICY, intel, scorer)
    assert from_files.to_dict()["scenarios"] == direct.to_dict()["scenarios"]


def test_merge_reports_sums_rows(report):
    merged = merge_reports([report, report], source="twice")
    for row in report.rows:
        for mode in MODES:
            assert merged.row(row.scenario).modes[mode].requests == 2 * row.modes[mode].requests
            assert merged.row(row.scenario).modes[mode].stop_rate == pytest.approx(
                row.modes[mode].stop_rate)


def test_train_from_jsonl_trains_on_legit_rows_and_loads(tmp_path, items, intel):
    from detector.core.model import load_model
    from detector.train import train_from_jsonl

    write_jsonl(items, tmp_path / "day.jsonl", tmp_path / "day.labels.jsonl")
    card_path = train_from_jsonl(tmp_path / "day.jsonl", tmp_path / "day.labels.jsonl", tmp_path / "models",
                                 "mine", seed=1, target_fpr=0.01, intel=intel)  # fmt: skip
    card = json.loads(card_path.read_text())
    assert set(card["training"]["rows_by_scenario"]) <= set(LEGIT_LABELS)
    assert card["calibration"]["fpr_at_threshold"] <= 0.01
    scorer = load_model(tmp_path / "models", "mine")
    assert scorer.version == card["version"] and scorer.version.startswith("mine-")
    # unlabelled: every row is presumed normal
    unlabelled = train_from_jsonl(tmp_path / "day.jsonl", None, tmp_path / "models", "all", intel=intel)
    training = json.loads(unlabelled.read_text())["training"]
    assert training["rows_by_scenario"] == {"unlabelled": int(len(items) * 0.75)}  # 25% held out
