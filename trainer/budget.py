"""The telemetry budget: the expensive pieces of a logged step, measured on the device and sampled to fit.

A user who sees training slow by a third turns the dashboard off. Most of what
a logged GAN step costs beyond the bare step is a few pieces whose value does
not need every step: the shadow gradient (one more backward pass through G),
the per-layer norms (dozens of keys to copy, encode, send and store) and the
logit histograms. :class:`TelemetryBudget` times each piece where it runs,
keeps a moving average of its cost and of the whole step's time, and gives
each piece the smallest interval (in logged steps) at which everything fits
``share`` of the step: what the always-on telemetry (losses, the applied
gradient norms the collapse alert reads, the row's copy to the host) costs
comes off the top, the rest is split evenly between the pieces.

Nothing here changes training: a piece only measures, so the parameters after
N steps are the same whatever the budget (``tests/test_budget.py``). A share
of 1 (``intervals.telemetry_budget = 1``) runs every piece on every logged
step and measures nothing, the old behaviour, and the reference the benchmarks
compare against.

Timing never waits for the device. On a CPU the ops run as they are called,
so a ``perf_counter`` pair measures them. On CUDA the same pair measures what
the host spends launching them (what bounds a small model); a pair of CUDA
events recorded around the piece measures the device's own time, read once
the events have completed (``Event.query``, no sync) and taken when larger.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

#: A sampled piece runs at least once every this many steps, whatever it costs: its line stays a line.
MAX_INTERVAL_STEPS = 100
#: Weight of a new measurement in a cost's or the step time's moving average.
EMA_WEIGHT = 0.1
#: The first runs of a piece pay one-off costs (allocations, lazy initialisation): measured, then discarded.
WARMUP_RUNS = 1
#: Intervals are recomputed from the averages every this many logged steps (a few float operations).
REPLAN_EVERY = 8


@dataclass
class Piece:
    """One sampled piece: its average cost, and the interval it runs at, counted in its own requests.

    ``period`` is how many steps lie between two requests (``log_every`` for a piece of every logged step,
    ``hist_every`` for the histograms), so a piece run every ``interval`` requests costs
    ``cost_s / (interval × period)`` per step.
    """

    period: int = 1
    cost_s: float | None = None
    interval: int = 1
    requests: int = 0
    runs: int = 0
    pending: list[tuple[torch.cuda.Event, torch.cuda.Event, float]] = field(default_factory=list)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else old + EMA_WEIGHT * (new - old)


class TelemetryBudget:
    """Which expensive telemetry pieces a step runs, so that telemetry takes about ``share`` of step time.

    ``pieces`` maps each sampled piece to its period (steps between two requests for it). Call
    :meth:`begin_step` once per step; ask :meth:`wants` once per request for a piece, and wrap what the piece
    then does in :meth:`timed`; wrap the always-on telemetry in ``timed("core")``; :meth:`charge` the cost of
    a flush (measured by its caller). A piece runs on every ``interval``-th request, so pieces with the same
    period and interval run on the same steps, and a run's rows keep few distinct layouts.
    """

    def __init__(self, share: float, pieces: Mapping[str, int], device: torch.device | None = None) -> None:
        if not 0 < share <= 1 or not math.isfinite(share):
            raise ValueError(f"telemetry_budget: must be above 0 and at most 1, got {share!r}")
        self.share = float(share)
        self.pieces = {name: Piece(period=max(1, int(period))) for name, period in pieces.items()}
        self._cuda = device is not None and device.type == "cuda"
        self._steps = 0
        self._last_begin: float | None = None
        self.step_s: float | None = None  # average wall time of a step, telemetry included
        self.core_s: float | None = None  # average always-on telemetry per step, flushes included
        self._core_now = 0.0
        self._timers: dict[str, _Timer] = {}

    @property
    def every_step(self) -> bool:
        """A share of 1: every piece on every request, nothing measured."""
        return self.share >= 1.0

    # -- the step ---------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """A step starts: the last one's wall time and always-on cost are folded into the averages."""
        if self.every_step:
            return
        now = time.perf_counter()
        if self._last_begin is not None:
            self.step_s = _ema(self.step_s, now - self._last_begin)
            self.core_s = _ema(self.core_s, self._core_now)
        self._last_begin = now
        self._core_now = 0.0
        self._steps += 1
        if self._cuda:
            self._poll()
        if self._steps % REPLAN_EVERY == 0:
            self._replan()

    def wants(self, name: str) -> bool:
        """One request for piece ``name``: whether it runs now. A run must then be wrapped in :meth:`timed`."""
        if self.every_step:
            return True
        piece = self.pieces[name]
        piece.requests += 1
        return piece.cost_s is None or piece.requests % piece.interval == 0

    # -- measuring --------------------------------------------------------------------------------
    def timed(self, name: str) -> _Timer:
        """Measure what the block costs, as piece ``name`` (or ``"core"``, the always-on telemetry).

        A ``with`` block on a timer kept per name: this runs several times on every logged step, where a
        generator-based context manager's own cost (a few microseconds) would be a visible part of the budget.
        """
        timer = self._timers.get(name)
        if timer is None:
            if name != "core" and name not in self.pieces:
                raise KeyError(name)
            timer = self._timers[name] = _Timer(self, name)
        return timer

    def charge(self, seconds: float) -> None:
        """Always-on telemetry measured by the caller between steps (a flush): counted in the current step."""
        if not self.every_step:
            self._core_now += seconds

    def _timed(self, name: str, host_s: float, start_event: torch.cuda.Event | None) -> None:
        """A timed block of ``name`` took ``host_s`` on the host (and on CUDA began at ``start_event``)."""
        if name == "core":
            self._core_now += host_s
            return
        piece = self.pieces[name]
        piece.runs += 1
        if start_event is not None:
            end_event = torch.cuda.Event(enable_timing=True)
            end_event.record()
            piece.pending.append((start_event, end_event, host_s))
        else:
            self._measured(piece, host_s)

    def _measured(self, piece: Piece, seconds: float) -> None:
        if piece.runs <= WARMUP_RUNS:
            return  # the first run pays one-off costs: measure again
        first = piece.cost_s is None
        piece.cost_s = _ema(piece.cost_s, seconds)
        if first:
            self._replan()  # a piece is not run every step longer than it takes to know what it costs

    def _poll(self) -> None:
        """Fold in CUDA timings whose events have completed; never waits."""
        for piece in self.pieces.values():
            while piece.pending and piece.pending[0][1].query():
                start, end, host_s = piece.pending.pop(0)
                self._measured(piece, max(host_s, start.elapsed_time(end) / 1000.0))

    # -- planning ---------------------------------------------------------------------------------
    def _replan(self) -> None:
        """Each piece's interval: its cost over an even split of what the budget leaves after the always-on part."""
        if self.step_s is None:
            return
        spare = self.share * self.step_s - (self.core_s or 0.0)
        allowance = spare / max(1, len(self.pieces))  # per step, per piece
        for piece in self.pieces.values():
            if piece.cost_s is None:
                continue
            cap = max(1, MAX_INTERVAL_STEPS // piece.period)
            wanted = cap if allowance <= 0 else math.ceil(piece.cost_s / (allowance * piece.period))
            piece.interval = min(cap, max(1, wanted))

    def intervals(self) -> dict[str, int]:
        """Each piece's current interval, in its own requests (1 for every request)."""
        return {name: (1 if self.every_step else piece.interval) for name, piece in self.pieces.items()}

    def every(self, name: str) -> int:
        """How many steps lie between two runs of piece ``name`` now."""
        piece = self.pieces[name]
        return piece.period * (1 if self.every_step else piece.interval)

    def spent(self) -> float | None:
        """The measured share of step time telemetry takes at the current intervals; None until measured."""
        if self.every_step or self.step_s is None or self.step_s <= 0:
            return None
        pieces = sum(p.cost_s / (p.interval * p.period) for p in self.pieces.values() if p.cost_s is not None)
        return ((self.core_s or 0.0) + pieces) / self.step_s


class _Timer:
    """The ``with`` block of :meth:`TelemetryBudget.timed` for one name (blocks of one name never nest)."""

    __slots__ = ("_budget", "_event", "_name", "_start")

    def __init__(self, budget: TelemetryBudget, name: str) -> None:
        self._budget, self._name = budget, name
        self._start = 0.0
        self._event: torch.cuda.Event | None = None

    def __enter__(self) -> None:
        budget = self._budget
        if budget.every_step:
            return
        self._event = None
        if budget._cuda and self._name != "core" and not budget.pieces[self._name].pending:
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        budget = self._budget
        if not budget.every_step:
            budget._timed(self._name, time.perf_counter() - self._start, self._event)
