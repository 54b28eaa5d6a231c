"""When buffered telemetry leaves the device (trainer/telemetry.py, issue 15): on idle, on time, never lost.

The rule: a buffered step goes at once when its consumer has nothing in flight; while a frame is in flight,
steps are batched; the oldest never waits past ``flush_ms``, counted from it (not from the last flush); and
another thread (a worker's channel thread) may flush, the host-side checks then running on the training
thread's next flush. No timing is asserted: the clocks the rule reads are set by hand where it matters.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import numpy as np
import torch

from trainer import telemetry
from trainer.telemetry import (
    FrameEmitter,
    MetricBuffer,
    StepRow,
    flush_to_frames,
    flush_when_due,
    logit_packet,
)

LONG_MS = 600_000  # a deadline no test reaches by waiting


def _row(step: int, *keys: str) -> StepRow:
    row = StepRow()
    names = keys or ("a", "b")
    row.add(names, torch.tensor([float(step) + i / 10 for i in range(len(names))]))
    return row


class Consumer:
    """Stands in for a worker's channel: in flight or idle, as the test says."""

    def __init__(self) -> None:
        self.in_flight = False

    def idle(self) -> bool:
        return not self.in_flight


def test_a_buffered_step_goes_at_once_when_nothing_is_in_flight() -> None:
    consumer = Consumer()
    buf = MetricBuffer(flush_steps=1000, flush_ms=LONG_MS, idle=consumer.idle)
    assert not buf.due()  # nothing buffered
    buf.append(1, _row(1))
    assert buf.due()  # idle: no waiting for flush_ms
    assert buf.due_in() == 0.0  # and another thread would flush it too
    consumer.in_flight = True
    assert not buf.due() and buf.due_in() > 0


def test_steps_are_batched_while_a_frame_is_in_flight_then_go_together() -> None:
    consumer = Consumer()
    buf = MetricBuffer(flush_steps=1000, flush_ms=LONG_MS, idle=consumer.idle)
    consumer.in_flight = True
    for step in range(1, 6):
        buf.append(step, _row(step))
        assert not buf.due()
    consumer.in_flight = False  # the acknowledgement came
    assert buf.due()
    (group,), hists = buf.flush()
    assert group.steps == [1, 2, 3, 4, 5] and not hists
    np.testing.assert_allclose(group.table[:, 0], [1, 2, 3, 4, 5])


def test_without_a_consumer_to_ask_the_buffer_flushes_on_its_deadline_alone() -> None:
    buf = MetricBuffer(flush_steps=1000, flush_ms=LONG_MS)
    buf.append(1, _row(1))
    assert not buf.due() and 0 < buf.due_in() <= LONG_MS / 1000


def test_the_deadline_counts_from_the_oldest_buffered_step_not_from_the_last_flush() -> None:
    buf = MetricBuffer(flush_steps=1000, flush_ms=1000)
    buf._last_flush -= 3600.0  # an hour since the last flush: a period would be long over
    buf.append(1, _row(1))
    assert not buf.due()  # but the step itself has just come
    assert buf._oldest is not None
    buf._oldest -= 0.999  # the oldest step has waited 999 ms of its 1000
    buf._last_check = buf._oldest  # and the last step took as long: one more would pass the deadline
    assert buf.due()


def test_the_deadline_holds_however_busy_the_consumer_is() -> None:
    consumer = Consumer()
    consumer.in_flight = True
    buf = MetricBuffer(flush_steps=1000, flush_ms=1000, idle=consumer.idle)
    buf.append(1, _row(1))
    assert not buf.due()
    assert buf._oldest is not None
    buf._oldest -= 2.0
    assert buf.due() and buf.due_in() == 0.0


def test_flush_steps_still_bounds_a_batch() -> None:
    consumer = Consumer()
    consumer.in_flight = True
    buf = MetricBuffer(flush_steps=3, flush_ms=LONG_MS, idle=consumer.idle)
    for step in (1, 2):
        buf.append(step, _row(step))
        assert not buf.due()
    buf.append(3, _row(3))
    assert buf.due() and buf.due_in() == 0.0


def test_an_early_flush_waits_until_the_last_one_has_paid_for_itself() -> None:
    """A flush costs the thread that makes it: an early one (the consumer idle) follows the previous one by at
    least its cost per entry over IDLE_FLUSH_SHARE. The deadline is not held back."""
    buf = MetricBuffer(flush_steps=1000, flush_ms=1000, idle=lambda: True)
    buf.append(1, _row(1))
    flush_to_frames(buf, lambda kind, **fields: None)
    buf.cost(10.0)  # the flush took (as if) 10 s of the thread's time for its one entry
    buf.append(2, _row(2))
    assert not buf.due() and buf.due_in() > 0  # idle, but too soon after so costly a flush
    assert buf._oldest is not None
    buf._oldest -= 2.0
    assert buf.due()  # the deadline is never held back
    buf.cost(0.0)
    assert buf.due()


def test_another_thread_flushes_and_the_training_thread_runs_the_checks() -> None:
    """flush_when_due sends the frames from the calling thread; the groups' host-side checks (alerts, divergence)
    wait for the training thread's next flush_to_frames, which due() asks for at once."""
    frames: list[dict[str, Any]] = []
    emitter = FrameEmitter("r", frames.append)
    buf = MetricBuffer(flush_steps=1000, flush_ms=LONG_MS, idle=lambda: True)
    buf.append(1, _row(1))
    buf.append(2, _row(2, "a", "b", "c"))  # another key set: a second group
    flush_when_due(buf, emitter.emit)
    assert [(f["type"], f["seq"], f["step"]) for f in frames] == [("metrics", 1, [1]), ("metrics", 2, [2])]
    assert buf.due()  # the checks are owed
    groups = flush_to_frames(buf, emitter.emit)  # the training thread's flush: nothing new to send
    assert [g.steps for g in groups] == [[1], [2]] and len(frames) == 2
    assert not buf.due() and buf.due_in() == float("inf")


def test_off_thread_flushes_wait_while_a_frame_is_in_flight_and_never_sleep_past_a_deadline() -> None:
    """The other thread is not told when a step is appended: with nothing buffered it asks to be called again
    within half of flush_ms, so it finds any new step with at least half its time left; with a step buffered,
    by that step's deadline."""
    consumer = Consumer()
    consumer.in_flight = True
    frames: list[dict[str, Any]] = []
    emit = FrameEmitter("r", frames.append).emit
    buf = MetricBuffer(flush_steps=1000, flush_ms=5000, idle=consumer.idle)
    assert flush_when_due(buf, emit) == 2.5  # nothing buffered
    buf.append(1, _row(1))
    assert buf._oldest is not None
    buf._oldest -= 4.0  # 1 s left
    assert 0 < flush_when_due(buf, emit) <= 1.0 and not frames  # in flight: wait, at most until the deadline
    buf._oldest -= 1.0
    assert flush_when_due(buf, emit) == 2.5 and len(frames) == 1  # the deadline: flushed, however busy


def test_early_flushes_stop_while_the_training_thread_waits_for_a_cpu() -> None:
    """On an oversubscribed machine a frame's cost comes out of training: while the thread that appends got under
    UNCONTENDED_CPU_SHARE of the wall time on a CPU between two flushes, steps wait for the deadline."""
    buf = MetricBuffer(flush_steps=1000, flush_ms=LONG_MS, idle=lambda: True)
    buf.append(1, _row(1))
    assert buf.due()
    flush_to_frames(buf, lambda kind, **fields: None)  # the first reading of the thread's CPU clock
    assert buf._cpu_at is not None
    cpu, wall = buf._cpu_at
    buf._cpu_at = (cpu, wall - 10.0)  # as if 10 s had passed since, with hardly any CPU for the thread
    buf.cost(0.0)
    buf.append(2, _row(2))
    assert not buf.due() and buf.due_in() > 0  # idle, but contended: no early flush
    assert buf._oldest is not None
    buf._oldest -= LONG_MS  # the deadline still holds
    assert buf.due() and buf.due_in() == 0.0
    flush_to_frames(buf, lambda kind, **fields: None)
    assert buf._cpu_at is not None
    cpu, wall = buf._cpu_at
    buf._cpu_at = (cpu - 0.5, wall - 0.5)  # the last half second, all of it on a CPU: free again
    buf.cost(0.0)
    buf.append(3, _row(3))
    assert buf.due()


def test_concurrent_appends_and_flushes_lose_duplicate_and_reorder_nothing(monkeypatch: Any) -> None:
    """A training thread appends rows (two layouts) and histograms and flushes when due, while another thread
    flushes whenever it may, the consumer flipping between busy and idle: every step arrives once, with its
    values, steps in order within each key set, and the seqs the sink sees are 1, 2, 3, ..."""
    monkeypatch.setattr(telemetry, "UNCONTENDED_CPU_SHARE", 0.0)  # this thread sleeps on purpose: never contended
    rng = random.Random(15)
    gen = torch.Generator().manual_seed(15)
    n_steps = 2000
    expected = {step: torch.randn(3, generator=gen) for step in range(1, n_steps + 2)}
    consumer = Consumer()
    frames: list[dict[str, Any]] = []
    channel_flushed = threading.Event()

    def sink(frame: dict[str, Any]) -> None:
        frames.append(frame)
        if threading.current_thread().name == "channel":
            channel_flushed.set()

    emitter = FrameEmitter("r", sink)
    buf = MetricBuffer(flush_steps=64, flush_ms=LONG_MS, idle=consumer.idle)
    checked: list[int] = []
    done = threading.Event()
    failures: list[BaseException] = []

    def channel_thread() -> None:
        try:
            while not done.wait(0.0002):  # a channel thread wakes on acks and timers, not in a spin
                flush_when_due(buf, emitter.emit)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    other = threading.Thread(target=channel_thread, name="channel")
    other.start()
    try:
        for step in range(1, n_steps + 1):
            row = StepRow()
            row.add(("a", "b"), expected[step][:2])
            if step % 7 == 0:
                row.add(("extra",), expected[step][2:])
            buf.append(step, row)
            if step % 50 == 0:
                buf.append_hist(step, logit_packet(expected[step], -expected[step]))
            consumer.in_flight = rng.random() < 0.5
            if buf.due():
                checked.extend(s for g in flush_to_frames(buf, emitter.emit) for s in g.steps)
            if step % 100 == 0:
                time.sleep(0.002)  # a slow step: the other thread gets its turn
        # However the scheduler interleaved the loop, one last step is left to the channel thread (idle consumer):
        last = StepRow()
        last.add(("a", "b"), expected[n_steps + 1][:2])
        buf.append(n_steps + 1, last)
        consumer.in_flight = False
        assert channel_flushed.wait(60.0)  # both threads flushed
    finally:
        done.set()
        other.join()
    assert not failures
    checked.extend(s for g in flush_to_frames(buf, emitter.emit) for s in g.steps)

    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    got: dict[int, dict[str, float]] = {}
    last_by_keys: dict[tuple[str, ...], int] = {}
    for frame in (f for f in frames if f["type"] == "metrics"):
        keys = tuple(frame["data"])
        assert frame["step"][0] > last_by_keys.get(keys, 0) and frame["step"] == sorted(frame["step"])
        last_by_keys[keys] = frame["step"][-1]
        for i, step in enumerate(frame["step"]):
            assert step not in got
            got[step] = {key: column[i] for key, column in frame["data"].items()}
    assert sorted(got) == list(range(1, n_steps + 2))
    for step, values in got.items():
        assert values["a"] == float(expected[step][0]) and values["b"] == float(expected[step][1])
        assert ("extra" in values) == (step % 7 == 0)
    assert sorted(f["step"] for f in frames if f["type"] == "dldh") == list(range(50, n_steps + 1, 50))
    assert sorted(checked) == list(range(1, n_steps + 2))  # every group checked once, on this thread
