"""The losses agree with SPEC §1, by autograd and against naive float64 formulas.

These are the invariants the dashboard's headline rests on: if the per-sample
slopes were wrong, the saturation panel would show a phenomenon that is not
there (or hide one that is).
"""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from trainer.config import GLoss
from trainer.losses import (
    SHADOW_PAIR,
    d_loss_terms,
    dloss_dh,
    g_loss_per_sample,
    gaussian_kl,
    gaussian_kl_mc,
    gaussian_kl_mc_from_noise,
    gradient_penalty,
)

ALL_LOSSES: tuple[GLoss, ...] = get_args(GLoss)
# A dense sweep plus the extremes the SPEC names (±30): σ(−30) ≈ 1e-13 must still come out right.
H_RANGE = torch.cat([torch.linspace(-30.0, 30.0, 241, dtype=torch.float64), torch.tensor([-30.0, -1e-3, 0.0, 30.0])])
# Exact references: 1 − σ(h) is written σ(−h), because 1.0 − sigmoid(h) cancels catastrophically for h ≫ 0
# (at h = 30 it keeps only ~3 significant digits even in float64).
EXPECTED_SLOPE = {
    "saturating": lambda h: -torch.sigmoid(h),
    "non_saturating": lambda h: -torch.sigmoid(-h),
}
# F.softplus switches to the identity for arguments above 20, which costs up to e^−20 ≈ 2e-9 relative on
# the slope that tends to −1; far below the SPEC's 1e-6, but it bounds how tight a float64 check can be.
REL_TOL = {torch.float64: 1e-8, torch.float32: 1e-5}


def _autograd_slope(name: GLoss, h: torch.Tensor) -> torch.Tensor:
    leaf = h.clone().requires_grad_(True)
    g_loss_per_sample(name, leaf).sum().backward()
    assert leaf.grad is not None
    return leaf.grad


def test_all_five_losses_are_covered() -> None:
    assert set(ALL_LOSSES) == {"saturating", "non_saturating", "hinge", "least_squares", "wasserstein"}
    assert set(SHADOW_PAIR) == {"saturating", "non_saturating"}


@pytest.mark.parametrize("name", ["saturating", "non_saturating"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generator_slope_matches_spec(name: GLoss, dtype: torch.dtype) -> None:
    h = H_RANGE.to(dtype)
    expected = EXPECTED_SLOPE[name](h.double())
    got = _autograd_slope(name, h).double()
    # Absolute 1e-6 (the slopes live in [-1, 0]) and, for the saturating tail, relative too:
    # an absolute check alone would accept 0 for σ(−30) ≈ 9e-14 and miss a vanished-too-early bug.
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0.0)
    tail = expected.abs() > 0
    rel = ((got - expected).abs()[tail] / expected.abs()[tail]).max()
    assert rel < REL_TOL[dtype]


@pytest.mark.parametrize("name", ["saturating", "non_saturating"])
def test_dloss_dh_is_the_spec_formula(name: GLoss) -> None:
    torch.testing.assert_close(dloss_dh(name, H_RANGE), EXPECTED_SLOPE[name](H_RANGE), atol=0.0, rtol=1e-8)
    h32 = H_RANGE.float()
    torch.testing.assert_close(dloss_dh(name, h32), EXPECTED_SLOPE[name](h32), atol=1e-6, rtol=1e-5)


def test_dloss_dh_other_losses() -> None:
    h = torch.tensor([-3.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(dloss_dh("hinge", h), -torch.ones_like(h))
    torch.testing.assert_close(dloss_dh("wasserstein", h), -torch.ones_like(h))
    torch.testing.assert_close(dloss_dh("least_squares", h), h - 1.0)


def test_dloss_dh_does_not_touch_the_callers_graph() -> None:
    # The trainer calls it on live logits: it must neither need nor leak a graph.
    h = torch.tensor([0.3, -2.0], requires_grad=True)
    out = dloss_dh("saturating", h * 2.0)
    assert not out.requires_grad and h.grad is None


def test_saturation_limits() -> None:
    # The SPEC table's last column: saturating slope → 0, non-saturating → −1 as D wins.
    h = torch.tensor([-50.0, -100.0], dtype=torch.float64)
    assert dloss_dh("saturating", h).abs().max() < 1e-21
    torch.testing.assert_close(dloss_dh("non_saturating", h), -torch.ones_like(h), atol=1e-21, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generator_loss_values_match_log_of_probability(dtype: torch.dtype) -> None:
    # Where the naive formulas are finite in float64 they are the reference.
    h = torch.linspace(-20.0, 20.0, 81, dtype=torch.float64)
    d = torch.sigmoid(h)
    torch.testing.assert_close(
        g_loss_per_sample("saturating", h.to(dtype)).double(), torch.log(1.0 - d), atol=1e-5, rtol=1e-6
    )
    torch.testing.assert_close(
        g_loss_per_sample("non_saturating", h.to(dtype)).double(), -torch.log(d), atol=1e-5, rtol=1e-6
    )


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_and_gradients_finite_at_extreme_logits(name: GLoss, dtype: torch.dtype) -> None:
    h = torch.tensor([-1e4, 1e4, -1e4, 1e4], dtype=dtype, requires_grad=True)
    g = g_loss_per_sample(name, h)
    assert torch.isfinite(g).all()
    (grad_g,) = torch.autograd.grad(g.sum(), h)
    assert torch.isfinite(grad_g).all()

    h_real = torch.tensor([1e4, -1e4], dtype=dtype, requires_grad=True)
    h_fake = torch.tensor([-1e4, 1e4], dtype=dtype, requires_grad=True)
    loss_real, loss_fake = d_loss_terms(name, h_real, h_fake)
    total = loss_real + loss_fake
    assert torch.isfinite(total)
    grads = torch.autograd.grad(total, (h_real, h_fake))
    assert all(torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("name", SHADOW_PAIR)
def test_standard_d_loss_equals_cross_entropy(name: GLoss) -> None:
    gen = torch.Generator().manual_seed(0)
    h_real = torch.randn(64, generator=gen, dtype=torch.float64) * 8.0
    h_fake = torch.randn(64, generator=gen, dtype=torch.float64) * 8.0
    loss_real, loss_fake = d_loss_terms(name, h_real, h_fake)
    naive_real = -torch.log(torch.sigmoid(h_real)).mean()
    naive_fake = -torch.log(1.0 - torch.sigmoid(h_fake)).mean()
    assert torch.isfinite(naive_real) and torch.isfinite(naive_fake)
    torch.testing.assert_close(loss_real, naive_real, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss_fake, naive_fake, rtol=1e-9, atol=1e-12)


def test_standard_d_loss_stays_finite_where_naive_form_fails() -> None:
    # Confident and wrong: naive −log σ(−800) is log(0) = inf; the softplus form gives ≈ 800.
    loss_real, loss_fake = d_loss_terms("saturating", torch.tensor([-800.0]), torch.tensor([800.0]))
    assert math.isclose(float(loss_real), 800.0, rel_tol=1e-6)
    assert math.isclose(float(loss_fake), 800.0, rel_tol=1e-6)


def test_hinge_least_squares_wasserstein_definitions() -> None:
    h_real = torch.tensor([-2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    h_fake = torch.tensor([-3.0, -0.5, 0.0, 2.0], dtype=torch.float64)

    # Hinge (Lim & Ye 2017; Miyato et al. 2018): D: E[max(0, 1 − h_r)] + E[max(0, 1 + h_f)]; G: −E[h_f].
    r, f = d_loss_terms("hinge", h_real, h_fake)
    assert math.isclose(float(r), (3.0 + 1.0 + 0.5 + 0.0) / 4)
    assert math.isclose(float(f), (0.0 + 0.5 + 1.0 + 3.0) / 4)
    torch.testing.assert_close(g_loss_per_sample("hinge", h_fake), -h_fake)

    # Least squares (Mao et al. 2017, a=0, b=c=1): D: ½(h_r − 1)² + ½h_f²; G: ½(h_f − 1)².
    r, f = d_loss_terms("least_squares", h_real, h_fake)
    assert math.isclose(float(r), 0.5 * (9.0 + 1.0 + 0.25 + 4.0) / 4)
    assert math.isclose(float(f), 0.5 * (9.0 + 0.25 + 0.0 + 4.0) / 4)
    torch.testing.assert_close(
        g_loss_per_sample("least_squares", h_fake), torch.tensor([8.0, 1.125, 0.5, 0.5], dtype=torch.float64)
    )

    # Wasserstein critic (Arjovsky et al. 2017): D: −E[h_r] + E[h_f]; G: −E[h_f].
    r, f = d_loss_terms("wasserstein", h_real, h_fake)
    assert math.isclose(float(r), -1.5 / 4)
    assert math.isclose(float(f), -1.5 / 4)
    torch.testing.assert_close(g_loss_per_sample("wasserstein", h_fake), -h_fake)


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError):
        g_loss_per_sample("nope", torch.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        d_loss_terms("nope", torch.zeros(1), torch.zeros(1))  # type: ignore[arg-type]


# --- VAE -------------------------------------------------------------------------------------------------


def _mu_logvar(seed: int = 0, b: int = 32, k: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(b, k, generator=gen, dtype=torch.float64) * 2.0
    logvar = torch.randn(b, k, generator=gen, dtype=torch.float64) * 1.5
    return mu, logvar


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_kl_matches_torch_distributions(dtype: torch.dtype) -> None:
    mu, logvar = _mu_logvar()
    # logvar is log σ², so the standard deviation is exp(logvar / 2).
    reference = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    got = gaussian_kl(mu.to(dtype), logvar.to(dtype)).double()
    assert got.shape == mu.shape
    torch.testing.assert_close(got, reference, atol=1e-6, rtol=1e-6)


def test_gaussian_kl_is_zero_at_the_prior_and_uses_log_variance() -> None:
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    torch.testing.assert_close(gaussian_kl(zeros, zeros), zeros)
    # σ = 2 ⇒ log σ² = log 4: KL = ½(4 − 1 − log 4). A log σ convention would give ½(4 − 1 − log 2).
    kl = gaussian_kl(torch.zeros(1, dtype=torch.float64), torch.tensor([math.log(4.0)], dtype=torch.float64))
    assert math.isclose(float(kl), 0.5 * (3.0 - math.log(4.0)), rel_tol=1e-12)


def test_per_dimension_kls_sum_to_the_total() -> None:
    mu, logvar = _mu_logvar(seed=1)
    total = MultivariateNormal(mu, torch.diag_embed(logvar.exp()))
    prior = MultivariateNormal(torch.zeros_like(mu), torch.diag_embed(torch.ones_like(mu)))
    torch.testing.assert_close(gaussian_kl(mu, logvar).sum(-1), kl_divergence(total, prior), atol=1e-9, rtol=1e-9)


def test_gaussian_kl_mc_agrees_with_closed_form() -> None:
    mu, logvar = _mu_logvar(seed=2, b=8, k=5)
    samples = 20_000
    gen = torch.Generator().manual_seed(3)
    eps = torch.randn(samples, *mu.shape, generator=gen, dtype=torch.float64)
    z = mu + torch.exp(0.5 * logvar) * eps
    mc = gaussian_kl_mc(mu, logvar, z)
    assert mc.shape == (samples, mu.shape[0])
    estimate = mc.mean(0)
    stderr = mc.std(0) / math.sqrt(samples)
    closed = gaussian_kl(mu, logvar).sum(-1)
    assert ((estimate - closed).abs() <= 3.0 * stderr).all(), (estimate - closed) / stderr


def test_gaussian_kl_mc_at_the_prior_is_exactly_zero() -> None:
    # q = p ⇒ log q(z) − log p(z) = 0 for every z, not just on average.
    z = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zeros = torch.zeros(3, 2, dtype=torch.float64)
    torch.testing.assert_close(gaussian_kl_mc(zeros, zeros, z), torch.zeros(4, 3, dtype=torch.float64))


# --- WGAN-GP ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.25, 3.0])
def test_gradient_penalty_of_a_linear_critic(scale: float) -> None:
    # For h(x) = w·x, ∇ₓh = w everywhere, so the penalty is (‖w‖ − 1)² whatever the interpolates.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, generator=gen, dtype=torch.float64)
    w = w / w.norm() * scale
    real = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    fake = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    penalty = gradient_penalty(lambda x: x @ w, real, fake, torch.Generator().manual_seed(1))
    assert math.isclose(float(penalty), (scale - 1.0) ** 2, abs_tol=1e-12)


def test_gradient_penalty_handles_image_shapes_and_is_differentiable() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    real = torch.randn(8, 1, 4, 4, generator=gen, dtype=torch.float64)
    fake = torch.randn(8, 1, 4, 4, generator=gen, dtype=torch.float64)
    penalty = gradient_penalty(lambda x: (x * w).flatten(1).sum(1), real, fake, torch.Generator().manual_seed(1))
    assert math.isclose(float(penalty.detach()), (float(w.detach().norm()) - 1.0) ** 2, rel_tol=1e-9)
    # create_graph=True: the penalty must train the critic's weights.
    (grad_w,) = torch.autograd.grad(penalty, w)
    expected = 2.0 * (w.norm() - 1.0) * w / w.norm()
    torch.testing.assert_close(grad_w, expected.detach())


def test_the_noise_form_of_the_mc_kl_is_the_same_estimate() -> None:
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 2
    logvar = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * eps
    torch.testing.assert_close(gaussian_kl_mc_from_noise(z, eps, logvar), gaussian_kl_mc(mu, logvar, z))
