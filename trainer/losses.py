"""GAN and VAE losses, written from logits exactly as SPEC §1 states them.

Every GAN loss is computed from the discriminator's logit ``h`` with
``softplus`` rather than as the log of a probability, so it stays finite at
any logit: ``log σ(h) = -softplus(-h)`` and ``log(1 - σ(h)) = -softplus(h)``.

Generator losses are given *per sample*: the generator gradient of any of
them is (1/B) Σ_i ∂loss/∂h_i · ∇θ h_i, so they differ only in a per-sample
weight, which :func:`dloss_dh` exposes for telemetry (``dldh/*``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import GLoss

#: The two losses the saturation panel compares, whichever one trains.
SHADOW_PAIR: tuple[GLoss, GLoss] = ("saturating", "non_saturating")


def g_loss_per_sample(name: GLoss, h: Tensor) -> Tensor:
    """Generator loss for each fake logit ``h`` (minimised)."""
    if name == "saturating":
        # log(1 - σ(h)): minimising it pushes h up, but its slope -σ(h) dies as h → -∞.
        return -F.softplus(h)
    if name == "non_saturating":
        # -log σ(h): slope -(1 - σ(h)) → -1 as h → -∞, so the gradient survives.
        return F.softplus(-h)
    if name in ("hinge", "wasserstein"):
        return -h
    if name == "least_squares":
        return 0.5 * (h - 1.0) ** 2
    raise ValueError(f"unknown generator loss {name!r}")


def d_loss_terms(name: GLoss, h_real: Tensor, h_fake: Tensor) -> tuple[Tensor, Tensor]:
    """Discriminator loss split into its real and fake terms (each a scalar mean).

    The saturating and non-saturating generator losses share the standard
    cross-entropy discriminator; the other families bring their own.
    """
    if name in SHADOW_PAIR:
        # -log σ(h_real) - log(1 - σ(h_fake)) = softplus(-h_real) + softplus(h_fake)
        return F.softplus(-h_real).mean(), F.softplus(h_fake).mean()
    if name == "hinge":
        return F.relu(1.0 - h_real).mean(), F.relu(1.0 + h_fake).mean()
    if name == "least_squares":
        return 0.5 * ((h_real - 1.0) ** 2).mean(), 0.5 * (h_fake**2).mean()
    if name == "wasserstein":
        return -h_real.mean(), h_fake.mean()
    raise ValueError(f"unknown generator loss {name!r}")


def gradient_penalty(
    critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, generator: torch.Generator | None
) -> Tensor:
    """WGAN-GP penalty E[(‖∇ₓ h(x̂)‖ − 1)²] on random interpolates (Gulrajani et al. 2017).

    The interpolation weights are drawn from ``generator`` (the global stream if None).
    """
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    alpha = torch.rand(shape, device=real.device, generator=generator)
    x_hat = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    h = critic(x_hat)
    (grad,) = torch.autograd.grad(h.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def dloss_dh(name: GLoss, h: Tensor) -> Tensor:
    """Per-sample ∂loss/∂h, by autograd through :func:`g_loss_per_sample`.

    Taking it with autograd (not a hand-written formula) keeps one source of
    truth: the reported weights are exactly the derivative of the loss the
    user picked, not a second formula that could drift from it.
    """
    with torch.enable_grad():
        leaf = h.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(g_loss_per_sample(name, leaf).sum(), leaf)
    return grad


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Closed-form KL(N(μ, diag σ²) ‖ N(0, I)) per latent dimension, shape like ``mu``.

    ½ (σ² + μ² − 1 − log σ²): note log σ², not log σ.
    """
    return 0.5 * (logvar.exp() + mu**2 - 1.0 - logvar)


def gaussian_kl_mc(mu: Tensor, logvar: Tensor, z: Tensor) -> Tensor:
    """Monte-Carlo KL estimate log q(z|x) − log p(z) per input, for z drawn from q.

    ``z`` has shape (S, B, k) for S samples; returns shape (S, B).
    """
    log_q = -0.5 * (((z - mu) ** 2) / logvar.exp() + logvar + math.log(2 * math.pi))
    log_p = -0.5 * (z**2 + math.log(2 * math.pi))
    return (log_q - log_p).sum(-1)


def gaussian_kl_mc_from_noise(z: Tensor, eps: Tensor, logvar: Tensor) -> Tensor:
    """:func:`gaussian_kl_mc` for z = μ + σ·ε, from the noise ε the sample was drawn with.

    (z − μ)/σ is ε, so log q(z|x) = −½(ε² + log σ² + log 2π) and the estimate is
    ½ Σ (z² − ε² − log σ²): the same quantity (to float rounding) without the
    subtraction, the division by σ² or the log 2π terms that cancel. The VAE logs it
    every step, so the fewer elementwise ops the better. Shapes as for :func:`gaussian_kl_mc`.
    """
    return 0.5 * (z.square() - eps.square() - logvar).sum(-1)
