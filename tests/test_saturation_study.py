"""A fast, seeded version of the Arjovsky & Bottou (2017) fig. 2 reproduction.

The full study's networks (4 × 128 MLPs, batch 256) with 400 D steps at twice
the study's learning rate (2e-3): enough for a fresh discriminator to beat a
frozen, freshly initialised generator on ring8 (mean D(G(z)) ≈ 0.5 → ≈ 1e-5)
in about two seconds. The thresholds leave a factor of several to spare on
every assertion, so the test is about the phenomenon, not about the last
digits of one seed.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from trainer.saturation_study import StudyRow, main, markdown_table, run_study

STEPS, EVERY, LR_D = 400, 100, 2e-3


@pytest.fixture(scope="module")
def rows() -> list[StudyRow]:
    return run_study(d_steps=STEPS, record_every=EVERY, lr_d=LR_D, seed=0)


def test_records_at_the_right_steps(rows: list[StudyRow]) -> None:
    assert [r.d_step for r in rows] == list(range(0, STEPS + 1, EVERY))
    for r in rows:
        assert all(math.isfinite(v) for v in (r.fake_prob, r.g_norm_saturating, r.g_norm_non_saturating))


def test_discriminator_wins(rows: list[StudyRow]) -> None:
    first, last = rows[0], rows[-1]
    # A fresh D is undecided: its sigmoid outputs sit near ½.
    assert 0.2 < first.fake_prob < 0.8
    assert last.fake_prob < 1e-2
    assert all(b.fake_prob < a.fake_prob for a, b in itertools.pairwise(rows))


def test_saturating_gradient_vanishes_non_saturating_survives(rows: list[StudyRow]) -> None:
    first, last = rows[0], rows[-1]
    # The headline: at least two orders of magnitude lost (the run shows about three) ...
    assert last.g_norm_saturating < 1e-2 * first.g_norm_saturating
    # ... while the non-saturating gradient is kept (here it even grows, by two orders of magnitude).
    assert last.g_norm_non_saturating > 0.3 * first.g_norm_non_saturating
    # Both losses have the same gradient up to the weights σ(h) vs 1 − σ(h): at D ≈ ½ they are comparable.
    assert 0.5 < first.norm_ratio < 2.0


def test_norm_ratio_tracks_fake_probability(rows: list[StudyRow]) -> None:
    # ∇θL_sat = (1/B) Σ σ(h_i) ∇θh_i and ∇θL_ns = (1/B) Σ (1 − σ(h_i)) ∇θh_i: once D wins, 1 − σ ≈ 1 and
    # the ratio of norms is a σ-weighted average, i.e. of the order of mean D(G(z)).
    won = [r for r in rows if r.fake_prob < 1e-2]
    assert won, "the discriminator never won"
    for r in won:
        assert 0.1 < r.norm_ratio / r.fake_prob < 10.0, r


def test_per_sample_ratio_is_d_over_one_minus_d(rows: list[StudyRow]) -> None:
    # (∂L_sat/∂h) / (∂L_ns/∂h) = σ(h)/(1 − σ(h)) = exp(h), checked in float64 on every fake sample.
    for r in rows:
        assert r.ratio_max_rel_err <= 1e-9, r


def test_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = run_study(d_steps=10, record_every=5, seed=7, width=32, depth=2, batch_size=64)
    assert torch.equal(torch.get_rng_state(), state)
    b = run_study(d_steps=10, record_every=5, seed=7, width=32, depth=2, batch_size=64)
    assert a == b
    c = run_study(d_steps=10, record_every=5, seed=8, width=32, depth=2, batch_size=64)
    assert a != c
    # A final step that is not a multiple of record_every is still recorded.
    assert [r.d_step for r in run_study(d_steps=7, record_every=5, width=16, depth=1, batch_size=16)] == [0, 5, 7]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        run_study(d_steps=10, record_every=0)


def test_markdown_table_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    table = markdown_table([StudyRow(0, 0.5, 1e-2, 1e-2, 1e-16), StudyRow(10, 1e-6, 1e-8, 1.0, 2e-16)])
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| D step")
    assert lines[3].startswith("| 10 | 1.000e-06 | 1.000e-08 | 1.000e+00 | 1.000e-08 |")

    assert main(["--steps", "4", "--every", "2", "--width", "16", "--depth", "1", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 + 3 and out[-1].startswith("| 4 |")
