"""The demo's simulated dialer: its queue, its staffing, and the loop that feeds its signed queue
states to the detector -- the same application as ``detector replay --queue-states``."""

import json

import pytest

from detector.core.capacity import CapacityPolicy
from detector.core.decide import DecisionContext
from detector.core.ipintel import IpIntel
from detector.core.parse import parse_request
from detector.core.pipeline import Detector
from detector.core.policy import load_policy
from detector.demo_capacity import _episodes, capacity_lines, decide_with_dialer
from detector.replay import _with_queue_states, load_queue_states
from detector.sim import SimConfig, simulate
from detector.sim.dialer import DialerSim, staffing_from_forecast


def test_dialer_queue_grows_over_capacity_and_drains() -> None:
    d = DialerSim("d1", staffing=(4,) * 48, start=0.0, avg_handle_s=240.0)
    d.advance(3600.0)  # an idle hour: the 4 idle agents take the next 4 callbacks, no more
    d.admit(60)
    d.advance(3600.0 + 240.0)  # + 4 callbacks served in 4 x 240 s / 240 s
    assert d.state().callbacks_waiting == 52
    d.advance(3600.0 + 240.0 * 14)
    assert d.state().callbacks_waiting == 0
    with pytest.raises(ValueError):
        DialerSim("d1", staffing=(4,) * 7, start=0.0)


def test_staffing_follows_the_forecast_with_a_floor() -> None:
    s = staffing_from_forecast([10.0] * 300 + [7200.0] * 30, 0.0, margin=0.0, min_agents=2)
    assert len(s) == 48 and s[0] == 40 and s[4] == 4 and s[1] == 2


def test_episodes() -> None:
    tiers = [(t * 30.0, tier, 0.0, 0, 1) for t, tier in enumerate([0, 1, 3, 2, 0, 0, 1])]
    assert _episodes(tiers, 30.0) == [(30.0, 120.0, 3), (180.0, 210.0, 1)]


def _day() -> tuple[list, dict[str, str]]:
    items = simulate(SimConfig(seed=3, legit_per_day=600, attack_scale=0.2))
    reqs = sorted((parse_request(it.request) for it in items), key=lambda r: r.ts)
    return reqs, {r.request_id: it.scenario for r, it in zip(
        (parse_request(it.request) for it in items), items, strict=True)}


def test_demo_loop_equals_replay_of_the_published_states() -> None:
    """Replaying the dialer's signed states with the replay path gives the same decisions as the
    demo's closed loop, and capacity deflects (never blocks) while the queue is over."""
    reqs, label = _day()
    start = SimConfig().start
    dialer = DialerSim("demo", staffing=(4,) * 48, start=start)
    det = Detector(DecisionContext(policy=load_policy()), IpIntel())
    decisions, series = decide_with_dialer(det, reqs, dialer)
    assert len(decisions) == len(reqs)
    assert any(t > 0 for _, t, *_ in series.tiers)
    states = load_queue_states(json.dumps(w) for w in series.wire)
    again = list(_with_queue_states(Detector(DecisionContext(policy=load_policy()), IpIntel()),
                                    reqs, states))
    assert [(d.request_id, d.action, d.reasons) for d in decisions] == \
        [(d.request_id, d.action, d.reasons) for d in again]
    summary = capacity_lines(decisions, {r.request_id: r for r in reqs}, label, series, dialer,
                             CapacityPolicy())
    assert sum(summary.deflected.values()) > 0 and summary.blocked == 0 and summary.after_drain == 0
    assert summary.max_tier >= 1 and summary.minutes_over > 0
