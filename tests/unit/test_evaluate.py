"""Per-scenario evaluation (detector.evaluate): rows, consistent totals, the three modes, JSONL input."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from detector.core.errors import ConfigError
from detector.core.policy import load_policy, parse_policy
from detector.evaluate import (
    DEFLECT_ONLY_LEGIT,
    LEGIT_VISITS,
    MODES,
    LabelledRow,
    evaluate,
    evaluate_jsonl,
    evaluate_seeds,
    merge_reports,
    policy_with_campaigns,
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
    n_sessions = len({i.request["session_id"] for i in items if not i.attack and i.scenario not in DEFLECT_ONLY_LEGIT})
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
    assert "small-test" in text and "floors" in text
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
    # unlabelled, no outcomes: what the rules stopped is not learned as normal, and the share
    # they stopped is the contamination the forest assumes in the rest
    unlabelled = train_from_jsonl(tmp_path / "day.jsonl", None, tmp_path / "models", "all", intel=intel)
    training = json.loads(unlabelled.read_text())["training"]
    assert training["presumed_normal"].startswith("requests the rules allowed")
    stopped = training["rules_stopped_share"]
    assert 0.05 < stopped < 0.9 and training["assumed_contamination"] == pytest.approx(min(stopped, 0.2))
    assert training["presumed_normal_share"] == pytest.approx(1.0 - stopped, abs=1e-6)


def test_train_from_outcomes_learns_only_what_customers_answered(tmp_path, items, intel):
    """A deployment's own traffic with dialer outcomes: only requests whose callback was completed
    with talk time are normal, whatever else (attacks included) the file holds."""
    from detector.train import train_from_jsonl

    write_jsonl(items, tmp_path / "day.jsonl", tmp_path / "day.labels.jsonl")
    legit = [i for i in items if not i.attack]
    talked = {i.request["request_id"] for i in legit[::2]}
    with (tmp_path / "outcomes.jsonl").open("w") as fh:
        for i in items:
            rid = i.request["request_id"]
            outcome = ("completed", 95.0) if rid in talked else ("completed", 3.0) if not i.attack else ("no_answer", 0)
            fh.write(json.dumps({"request_id": rid, "phone_number": "+447700900123", "outcome": outcome[0],
                                 "ts": i.request["ts"], "duration_s": outcome[1]}) + "\n")
        fh.write("not json\n")  # a bad line is skipped, not fatal
    card = json.loads(train_from_jsonl(tmp_path / "day.jsonl", None, tmp_path / "models", "dep",
                                       intel=intel, outcomes_path=tmp_path / "outcomes.jsonl").read_text())
    training = card["training"]
    assert training["presumed_normal"].startswith("callbacks completed with >= 30 s")
    assert training["presumed_normal_share"] == pytest.approx(len(talked) / len(items), abs=0.01)
    assert training["rows"] == int(len(talked) * 0.75)  # 25% of them held out for the threshold


def test_silent_blocks_are_counted_per_mode(items, intel, scorer, report):
    from detector.core.records import Action
    from detector.evaluate import _context, replay_labelled

    for mode in ("rules", "combined"):
        decisions = replay_labelled(items, _context(POLICY, None, scorer, mode), intel)
        expected = Counter(
            item.scenario for item, d in zip(items, decisions, strict=True)
            if d is not None and d.action == Action.BLOCK and d.silent
        )  # fmt: skip
        for row in report.rows:
            if row.scenario == LEGIT_VISITS:
                continue
            t = row.modes[mode]
            assert t.silent_blocked == expected[row.scenario], (mode, row.scenario)
            assert t.silent_blocked <= t.blocked
            assert sum(t.silent_reasons.values()) == t.silent_blocked
    assert report.totals("combined").silent_blocked > 0
    scen = json.loads(json.dumps(report.to_dict()))["scenarios"]
    assert all("silent_blocked" in scen[r.scenario]["rules"] for r in report.rows)
    assert "silent r/m/c" in report.render() and "blocked silently (combined)" in report.render()


def test_campaigns_are_declared_only_when_the_policy_accepts_them():
    window = {"country": "GB", "start": int(SMALL.start), "end": int(SMALL.start) + 3600, "factor": 30.0}
    try:
        parse_policy({"campaigns": [window]})
        accepted = True
    except ConfigError:
        accepted = False
    policy, note = policy_with_campaigns(POLICY, {}, [window])
    if accepted:
        assert note.startswith("campaigns declared") and "GB" in note
    else:  # an older parser: the evaluation goes on without declaring, and says so
        assert policy is POLICY and note.startswith("campaigns NOT declared")
    assert policy_with_campaigns(POLICY, {}, []) == (POLICY, "no campaigns declared")


def test_several_seeds_are_reported_per_seed_and_summed(intel):
    config = {"duration_s": 2 * 3600.0, "start": SMALL.start, "legit_per_day": 3000,
              "scenarios": ("botnet_flood", "legit_cgnat", "legit_surge_announced"),
              "volumes": (("botnet_flood", 400),)}  # fmt: skip
    rep = evaluate_seeds([5, 6], POLICY, intel, None, **config)
    assert list(rep.per_seed) == [5, 6]
    for row in rep.aggregate.rows:
        for mode in MODES:
            total = rep.aggregate.row(row.scenario).modes[mode]
            parts = [r.row(row.scenario).modes[mode] for r in rep.per_seed.values()]
            assert total.requests == sum(p.requests for p in parts)
            assert total.silent_blocked == sum(p.silent_blocked for p in parts)
    assert rep.aggregate.row("botnet_flood").modes["rules"].requests == 2 * round(400 * 2 / 24)
    assert set(rep.seconds) == {5, 6} and all(s["replay"] > 0 and s["cpu"] > 0 for s in rep.seconds.values())
    data = json.loads(json.dumps(rep.to_dict()))
    assert data["seeds"] == [5, 6] and set(data["per_seed"]) == {"5", "6"}
    assert data["per_seed"]["5"]["legit_cgnat"]["combined"]["requests"] > 0
    text = rep.render()
    assert "seed 5:" in text and "seed 6:" in text and "per seed (rules/model/combined %)" in text


def test_evaluate_command_takes_seeds_and_prints_json(capsys):
    from detector.cli import main

    argv = ["evaluate", "--seeds", "3,4", "--json", "--no-model", "--legit", "600", "--duration", "3600",
            "--scenarios", "harassment,legit_household"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["seeds"] == [3, 4] and data["model_version"] is None
    assert {"harassment", "legit_household", "legit"} <= set(data["scenarios"])
    assert main(["evaluate", "--seeds", "x", "--no-model"]) == 2
