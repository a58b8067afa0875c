"""A simulated callback dialer for the demo: its agents, its queue, its signed queue states.

The contact centre staffs its callback agents per half hour (as workforce planning does) from a
forecast: the day's legitimate demand, including the *announced* marketing campaign, plus a
margin, with a night floor. Every callback the detector allows joins the dialer's queue; the
agents work it off at ``agents / avg_handle_s`` callbacks per second (a fluid model: no
randomness; idle agents take the next callbacks at once and bank nothing more). Every ``tick_s``
the caller (:func:`detector.demo_capacity.decide_with_dialer`) has the dialer publish its queue
state (``callbacks_waiting``: accepted and not yet dialled; ``agents_available``: staffed agents,
busy or idle), signed with its Ed25519 key as a real dialer does
(:class:`detector.core.capacity.QueueStateSigner`).

Deflected and blocked requests never reach the dialer, so the loop is closed: when the detector
raises the bar, fewer callbacks join and the queue drains.

>>> d = DialerSim("demo-1", staffing=(4,) * 48, start=0.0, avg_handle_s=240.0)
>>> d.admit(30)
>>> d.advance(600.0)  # 4 agents x 600 s / 240 s = 10 callbacks served
>>> d.state().callbacks_waiting, d.state().agents_available
(20, 4)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from detector.core.capacity import QueueState

DEFAULT_AVG_HANDLE_S = 240.0  # a callback: dialling, talk and wrap-up
DEFAULT_MARGIN = 0.25  # staffing above the forecast
DEFAULT_MIN_AGENTS = 4  # the night floor
DAY_S = 86400.0


def staffing_from_forecast(
    timestamps: Iterable[float], start: float, *, avg_handle_s: float = DEFAULT_AVG_HANDLE_S,
    margin: float = DEFAULT_MARGIN, min_agents: int = DEFAULT_MIN_AGENTS,
    interval_s: float = 1800.0,
) -> tuple[int, ...]:
    """Agents per interval of the day (UTC, from ``start``): the forecast callbacks of each
    interval (``timestamps``, epoch seconds) times ``avg_handle_s`` over ``interval_s``, plus
    ``margin``, at least ``min_agents``.

    >>> staffing_from_forecast([0.0] * 75 + [1800.0] * 15, 0.0)[:3]
    (13, 4, 4)
    """
    per = [0] * round(DAY_S / interval_s)
    for ts in timestamps:
        per[int((ts - start) // interval_s) % len(per)] += 1
    return tuple(max(min_agents, math.ceil(n * avg_handle_s / interval_s * (1.0 + margin)))
                 for n in per)


@dataclass
class DialerSim:
    dialer_id: str
    staffing: tuple[int, ...]  # agents per interval of the day (UTC), e.g. 48 half hours
    start: float  # the day's midnight UTC (epoch seconds)
    avg_handle_s: float = DEFAULT_AVG_HANDLE_S
    waiting: int = 0
    now: float = field(default=0.0)
    _credit: float = 0.0  # service capacity not yet used up by whole callbacks
    interval_s: float = field(init=False, default=1800.0)

    def __post_init__(self) -> None:
        if not self.staffing or DAY_S % len(self.staffing):
            raise ValueError("staffing: expected one value per equal interval of the day")
        self.interval_s = DAY_S / len(self.staffing)
        self.now = self.start

    def agents(self, ts: float | None = None) -> int:
        t = self.now if ts is None else ts
        return self.staffing[int((t - self.start) // self.interval_s) % len(self.staffing)]

    def admit(self, n: int = 1) -> None:
        """``n`` allowed callbacks join the queue."""
        self.waiting += n

    def advance(self, to: float) -> None:
        """Work the queue off until ``to`` (interval by interval, at each one's staffing)."""
        while self.now < to:
            end = self.start + (int((self.now - self.start) // self.interval_s) + 1) * self.interval_s
            step = min(to, end) - self.now
            self._credit += self.agents() * step / self.avg_handle_s
            served = min(self.waiting, int(self._credit))
            self.waiting -= served
            self._credit -= served
            if self.waiting == 0:  # idle agents take the next callbacks at once, bank no more
                self._credit = min(self._credit, float(self.agents()))
            self.now += step

    def state(self) -> QueueState:
        return QueueState(self.dialer_id, self.now, self.waiting, self.agents(), self.avg_handle_s)
