"""The time that window expiry (sweeps) runs at: never pushed ahead by one message's event time.

Sweeping deletes every key whose windows are over at the sweep time. If that time were the
newest event time seen, one request dated 2099 would make every counter look dead and wipe it
(an attacker resets all velocity limits with one message). Sweeping late only costs memory for a
while; sweeping early loses counts. So both clocks below lag rather than lead:

* with a wall clock (the stream): ``min(newest event time, wall clock + max_future_skew)``;
* without one (replay of a file): the file's clock, which follows the event times but moves at
  most ``max_step`` seconds past its previous value per event, so one far-future event moves it
  ``max_step`` at most (and the next ordinary event brings it back).

>>> c = EventClock(max_step=300.0)
>>> [c.observe(t) for t in (1000.0, 1010.0, 4.0e9, 1020.0)]
[1000.0, 1010.0, 1310.0, 1020.0]
>>> sweep_time(newest_event=4.0e9, wall=1.8e9, max_future_skew=300.0)
1800000300.0
"""

from __future__ import annotations

DEFAULT_MAX_STEP_S = 300.0


def sweep_time(*, newest_event: float, wall: float, max_future_skew: float) -> float:
    """The stream's sweep time: the newest event time, but never past the wall clock plus skew."""
    return min(newest_event, wall + max(max_future_skew, 0.0))


class EventClock:
    """A clock driven by event times that one event cannot push far ahead (see module doc)."""

    def __init__(self, max_step: float = DEFAULT_MAX_STEP_S) -> None:
        self.max_step = max_step
        self.now: float | None = None

    def observe(self, ts: float) -> float:
        """Advance with an event at ``ts``; returns the clock's new time."""
        if self.now is None or ts <= self.now + self.max_step:
            self.now = ts
        else:
            self.now = self.now + self.max_step
        return self.now
