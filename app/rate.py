"""Recent training speed per run, from the steps the server sees arrive.

The runs table wants "how fast is it going now", not the average since the
start: a run slows down when a second one shares its GPU, and a lifetime
average would hide that for hours. So the rate comes from a short sliding
window of (arrival time, step) observations. Arrival times are the server's
monotonic clock, not the worker's timestamps: a worker on another machine
may have a clock that is off or that jumps.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

#: Seconds of observations a rate is measured over: long enough to smooth the bursts in which frames
#: arrive (one per flush), short enough to follow a slowdown within a few seconds.
RATE_WINDOW_S = 10.0


class StepRate:
    """Per run, the steps per second over the last ``window_s`` seconds of observations.

    Not thread-safe: the run manager feeds and reads it from the event loop only.
    """

    def __init__(self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[str, deque[tuple[float, int]]] = {}

    def observe(self, run_id: str, step: int) -> None:
        """Record that ``run_id`` has reached ``step`` now.

        A step below the newest one (an evaluation frame re-reporting an earlier step, say) is not
        progress backwards; it is ignored so that the rate never turns negative.
        """
        now = self._clock()
        seen = self._seen.setdefault(run_id, deque())
        if seen and step < seen[-1][1]:
            return
        seen.append((now, step))
        self._prune(seen, now)

    def rate(self, run_id: str) -> float | None:
        """Steps per second between the oldest and newest observation in the window.

        None with fewer than two observations in the window (a run that just started, or one that
        has reported nothing for a whole window) or when they share one instant: no rate is known,
        which is not the same as a rate of zero.
        """
        seen = self._seen.get(run_id)
        if seen is None:
            return None
        self._prune(seen, self._clock())
        if len(seen) < 2:
            return None
        (t0, s0), (t1, s1) = seen[0], seen[-1]
        if t1 <= t0:
            return None
        return (s1 - s0) / (t1 - t0)

    def forget(self, run_id: str) -> None:
        """Drop a run's observations (it ended or was deleted); unknown runs are fine."""
        self._seen.pop(run_id, None)

    def _prune(self, seen: deque[tuple[float, int]], now: float) -> None:
        while seen and seen[0][0] < now - self.window_s:
            seen.popleft()
