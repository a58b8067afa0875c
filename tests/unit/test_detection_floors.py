"""The release floors on a simulator day never used for tuning (seed 401; the policy was tuned on
seeds 1, 2, 201 and 501-503, the model trained on 101-104): every attack scenario >= 80% stopped and >= 90%
on average, every legitimate population >= 97% served, no legitimate request blocked silently by a
shared-IP signal, the unannounced marketing surge deflected at most. The shipped policy and model,
combined, as a worker runs them. ``bench/bench_detection.py`` measures a second seed set."""

from __future__ import annotations

import pytest

from detector.core.model import load_model
from detector.core.policy import load_policy
from detector.evaluate import evaluate, policy_with_campaigns, simulator_intel

SEED = 401


@pytest.fixture(scope="module")
def report():
    from detector.sim.populations import campaign_windows
    from detector.sim.simulate import SimConfig, simulate

    cfg = SimConfig(seed=SEED)
    policy, note = policy_with_campaigns(load_policy(), {}, campaign_windows(cfg))
    assert note.startswith("campaigns declared")
    with simulator_intel() as intel:
        return evaluate(simulate(cfg), policy, intel, load_model("models", "default"),
                        source=f"simulator seed {SEED}", modes=("combined",))


def test_release_floors_hold_on_a_held_out_day(report):
    assert not report.shortfalls(mode="combined"), report.render()


def test_the_day_has_every_population_and_attack(report):
    from detector.sim.simulate import LEGIT_LABELS, SCENARIOS

    rows = {r.scenario for r in report.rows}
    assert set(SCENARIOS) <= rows and set(LEGIT_LABELS) <= rows
    surge = report.row("legit_surge").modes["combined"]
    assert surge.deflected > 0 and surge.blocked == surge.pending_duplicates  # deflected, never blocked
