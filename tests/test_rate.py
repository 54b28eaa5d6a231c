"""StepRate: recent steps per second per run, on an injected clock (no sleeping)."""

from __future__ import annotations

import pytest

from app.rate import StepRate


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_is_steps_over_seconds_between_first_and_last_observation() -> None:
    clock = Clock()
    rates = StepRate(window_s=10.0, clock=clock)
    assert rates.rate("a") is None  # never seen
    rates.observe("a", 100)
    assert rates.rate("a") is None  # one observation: no rate yet
    clock.now += 2.0
    rates.observe("a", 300)
    assert rates.rate("a") == pytest.approx(100.0)
    clock.now += 2.0
    rates.observe("a", 400)  # slower now: the average over the window follows
    assert rates.rate("a") == pytest.approx(75.0)
    assert rates.rate("b") is None  # runs are independent


def test_only_the_last_window_counts() -> None:
    clock = Clock()
    rates = StepRate(window_s=10.0, clock=clock)
    for i in range(11):  # 100 steps/s for ten seconds
        rates.observe("a", 100 * i)
        clock.now += 1.0
    for i in range(1, 12):  # then 10 steps/s: the fast stretch must leave the window entirely
        rates.observe("a", 1000 + 10 * i)
        clock.now += 1.0
    assert rates.rate("a") == pytest.approx(10.0)
    clock.now += 30.0  # nothing for longer than a window: unknown, not the stale rate
    assert rates.rate("a") is None


def test_no_rate_without_elapsed_time_or_after_forget() -> None:
    clock = Clock()
    rates = StepRate(clock=clock)
    rates.observe("a", 1)
    rates.observe("a", 50)  # same instant: a burst of frames, no measurable time
    assert rates.rate("a") is None
    clock.now += 1.0
    rates.observe("a", 60)
    assert rates.rate("a") == pytest.approx(59.0)
    rates.forget("a")
    rates.forget("never-seen")
    assert rates.rate("a") is None


def test_a_step_going_backwards_is_ignored() -> None:
    clock = Clock()
    rates = StepRate(clock=clock)
    rates.observe("a", 500)
    clock.now += 1.0
    rates.observe("a", 600)
    clock.now += 1.0
    rates.observe("a", 20)  # a stray earlier step is not negative progress
    assert rates.rate("a") == pytest.approx(100.0)
    with pytest.raises(ValueError, match="window_s"):
        StepRate(window_s=0.0)
