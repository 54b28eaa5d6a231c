"""Telemetry buffering, histogram packing and alert detection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.telemetry import (
    DLDH_SAMPLES,
    CollapseDetector,
    DropDetector,
    FrameEmitter,
    MetricBuffer,
    StepRow,
    dldh_samples,
    frame_to_json,
    grad_norms,
    hist_frames_fields,
    logit_frames_fields,
    logit_histogram,
    logit_packet,
    metrics_frame_fields,
    total_norm,
)


def test_grad_norms_match_per_tensor_and_global_norms() -> None:
    gen = torch.Generator().manual_seed(0)  # any draw would do: both sides compute the same norms
    grads = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen), torch.randn(2, 2, 2, generator=gen)]
    layers = grad_norms(grads)
    assert torch.allclose(layers, torch.stack([g.norm() for g in grads]))
    assert torch.allclose(total_norm(layers), torch.cat([g.flatten() for g in grads]).norm())


def _row(**values: float) -> StepRow:
    row = StepRow()
    row.add(tuple(values), torch.tensor(list(values.values())))
    return row


def test_buffer_flushes_everything_in_order_with_one_table() -> None:
    buf = MetricBuffer(flush_steps=3, flush_ms=60_000)
    assert not buf.due()
    for step in range(1, 4):
        buf.append(step, _row(a=float(step), b=-float(step)))
    buf.append_hist(2, logit_histogram(torch.tensor([0.0, 1.0]), torch.tensor([-1.0])))
    assert buf.due()
    (group,), hists = buf.flush()
    assert group.keys == ("a", "b")
    assert group.steps == [1, 2, 3]
    assert group.times == sorted(group.times)
    np.testing.assert_array_equal(group.table, [[1, -1], [2, -2], [3, -3]])
    assert hists[0][0] == 2 and hists[0][1].sum() - hists[0][1][:2].sum() == 3
    assert buf.flush() == ([], [])


def test_buffer_is_due_once_its_oldest_step_reaches_flush_ms() -> None:
    buf = MetricBuffer(flush_steps=1000, flush_ms=1000)
    buf.append(1, _row(a=1.0))
    assert not buf.due()
    assert buf._oldest is not None
    buf._oldest -= 1.0  # the oldest step has waited a second
    assert buf.due()


def test_non_finite_values_travel_as_null() -> None:
    table = np.array([[1.0, math.nan], [math.inf, 2.0]])
    fields = metrics_frame_fields(["a", "b"], [1, 2], [10.0, 11.0], table)
    assert fields["data"] == {"a": [1.0, None], "b": [None, 2.0]}


def test_histogram_counts_every_logit_over_shared_edges() -> None:
    real = torch.tensor([0.0, 0.5, 1.0, 1.0])
    fake = torch.tensor([-2.0, -1.0])
    packed = logit_histogram(real, fake, bins=4).numpy()
    frames = hist_frames_fields(7, packed, ["hist/real_logit", "hist/fake_logit"])
    assert [f["key"] for f in frames] == ["hist/real_logit", "hist/fake_logit"]
    assert frames[0]["edges"] == frames[1]["edges"]
    assert frames[0]["edges"][0] == -2.0 and frames[0]["edges"][-1] == 1.0
    assert sum(frames[0]["counts"]) == 4 and sum(frames[1]["counts"]) == 2
    assert frames[1]["counts"][0] == 1  # -2 lands in the first bin
    # edges -2, -1.25, -0.5, 0.25, 1: 0.5 and both 1.0s (right edge included) share the last bin
    assert frames[0]["counts"] == [0, 0, 1, 3]


def test_histogram_of_identical_values_does_not_divide_by_zero() -> None:
    packed = logit_histogram(torch.zeros(3), torch.zeros(2), bins=5)
    assert torch.isfinite(packed).all() and packed[2:].sum() == 5


def test_histogram_leaves_out_non_finite_logits() -> None:
    nan, inf = float("nan"), float("inf")
    packed = logit_histogram(torch.tensor([nan, 1.0, inf, 3.0]), torch.tensor([-inf, nan]), bins=2)
    assert packed[:2].tolist() == [1.0, 3.0]  # edges from the finite values only
    assert packed[2:4].tolist() == [1.0, 1.0] and packed[4:].tolist() == [0.0, 0.0]
    all_nan = logit_histogram(torch.full((3,), nan), torch.full((2,), nan), bins=2)
    assert torch.isfinite(all_nan).all() and all_nan[2:].sum() == 0


def test_dldh_samples_are_the_first_logits_sorted_with_both_weights() -> None:
    fake = torch.linspace(8.0, -8.0, 100)  # descending, so sorting shows
    packed = dldh_samples(fake).numpy()
    n = DLDH_SAMPLES
    assert packed.size == 3 * n
    h, sat, non_sat = packed[:n], packed[n : 2 * n], packed[2 * n :]
    np.testing.assert_array_equal(h, np.sort(fake[:n].numpy()))  # the first 64, not any 64
    sigma = 1.0 / (1.0 + np.exp(-h.astype(np.float64)))
    np.testing.assert_allclose(sat, sigma, atol=1e-6)
    np.testing.assert_allclose(non_sat, 1.0 - sigma, atol=1e-6)
    assert dldh_samples(fake[:5]).numel() == 15  # a batch smaller than the cap sends all it has


def test_logit_packet_unpacks_into_two_hists_then_dldh_with_nulls() -> None:
    real = torch.tensor([0.0, 1.0, 2.0])
    fake = torch.tensor([-1.0, float("nan"), 0.5])
    packed = logit_packet(real, fake).numpy()
    frames = logit_frames_fields(9, packed, ["hist/real_logit", "hist/fake_logit"])
    assert [kind for kind, _ in frames] == ["hist", "hist", "dldh"]
    assert sum(frames[0][1]["counts"]) == 3 and sum(frames[1][1]["counts"]) == 2
    dldh = frames[2][1]
    assert dldh["step"] == 9
    assert dldh["h"] == [-1.0, 0.5, None]  # sort puts NaN last; JSON gets null
    assert dldh["saturating"][2] is None and dldh["non_saturating"][2] is None
    assert dldh["saturating"][:2] == pytest.approx([1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-0.5))], abs=1e-6)
    frame_to_json({"type": "dldh", **dldh})  # strict JSON accepts it
    # A histogram alone (no samples packed after it) gives the hist frames only.
    only = logit_frames_fields(9, logit_histogram(real, fake).numpy(), ["hist/real_logit", "hist/fake_logit"])
    assert [kind for kind, _ in only] == ["hist", "hist"]


def test_emitter_numbers_frames_without_gaps() -> None:
    seen: list[dict] = []
    emitter = FrameEmitter("r1", seen.append)
    for _ in range(5):
        emitter.emit("status", status="running")
    assert [f["seq"] for f in seen] == [1, 2, 3, 4, 5]
    assert all(f["run"] == "r1" and f["type"] == "status" for f in seen)


def test_collapse_detector_fires_once_per_episode_and_rearms() -> None:
    det = CollapseDetector(ratio=0.01, patience=3, ref_steps=2)
    fired = [det.update(v) for v in [1.0, 1.0, 0.5, 1e-3, 1e-3, 1e-3, 1e-3, 1e-4]]
    assert fired == [False, False, False, False, False, True, False, False]
    assert det.reference == 1.0
    assert not det.update(1.0)  # recovered: re-armed
    fired = [det.update(1e-5) for _ in range(3)]
    assert fired == [False, False, True]
    clone = CollapseDetector(ratio=0.01, patience=3)
    clone.load_state_dict(det.state_dict())
    assert clone.state_dict() == det.state_dict()


def test_drop_detector_needs_a_sustained_drop_and_fires_once_per_episode() -> None:
    det = DropDetector(fraction=0.5, rearm=0.75, patience=3, min_peak=2)
    assert not any(det.update(v) for v in [1, 0, 0, 0, 0])  # peak below min_peak: startup noise
    assert not any(det.update(v) for v in [8, 4, 5, 4, 4])  # flickers reset the run
    assert det.update(4)  # third consecutive low value
    assert not any(det.update(v) for v in [5, 4, 4, 4])  # 5 is not above 0.75 × 8: still the same episode
    assert not det.update(7)  # recovered: re-armed
    assert [det.update(v) for v in [3, 3, 3]] == [False, False, True]


def test_collapse_detector_ignores_non_finite_values() -> None:
    det = CollapseDetector(ratio=0.5, patience=1, ref_steps=1)
    assert not det.update(math.nan)
    assert det.reference is None


def _mean_and_max(x: torch.Tensor) -> torch.Tensor:
    """A batched segment's reduction: (N, B) → (N, 2)."""
    return torch.stack([x.mean(1), x.amax(1)], 1)


def test_batched_segments_are_reduced_over_every_buffered_step_at_the_flush() -> None:
    """A batched segment keeps its inputs and is reduced at the flush: the same values, in their key order,
    as reducing each step on its own; a step whose inputs differ in shape (a last, smaller batch) included."""
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(8, generator=gen) for _ in range(5)] + [torch.randn(3, generator=gen)]
    buf = MetricBuffer(flush_steps=100, flush_ms=60_000)
    rows = []
    for step, x in enumerate(batches, start=1):
        row = StepRow()
        row.add(("a",), x[:1] * 2)
        row.add_batched(("mean", "max"), _mean_and_max, x)
        row.add_scalar("lr", 0.5)
        rows.append(row)
        buf.append(step, row)
    (group,), _ = buf.flush()
    assert group.keys == ("a", "mean", "max", "lr")
    assert group.steps == [1, 2, 3, 4, 5, 6]
    for i, x in enumerate(batches):
        assert group.table[i] == pytest.approx([2 * float(x[0]), float(x.mean()), float(x.max()), 0.5], rel=1e-6)
        assert rows[i].values().tolist() == pytest.approx(group.table[i].tolist(), rel=1e-6)  # one step alone


def test_rows_with_another_reduction_are_another_layout() -> None:
    """The reduction names the layout: rows alike but for it are reduced apart, never with the other's function."""
    def double(x: torch.Tensor) -> torch.Tensor:
        return 2 * x.mean(1, keepdim=True)

    buf = MetricBuffer(flush_steps=100, flush_ms=60_000)
    for step, reduce in ((1, double), (2, _mean_and_max), (3, double)):
        row = StepRow()
        names = ("v",) if reduce is double else ("v", "w")
        row.add_batched(names, reduce, torch.full((4,), float(step)))
        buf.append(step, row)
    groups, _ = buf.flush()
    by_steps = {tuple(g.steps): g.table[:, 0].tolist() for g in groups}
    # (The two layouts share "v" and interleave: cut into runs, so that "v"'s steps go out in order.)
    assert by_steps == {(1,): [2.0], (2,): [2.0], (3,): [6.0]}
    assert [g.steps for g in groups] == [[1], [2], [3]]
