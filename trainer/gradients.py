"""The generator gradient under several losses at once, at the same parameters and batch.

Every generator loss of SPEC §1 is a per-sample function of the logit h, so
∇θ L = (1/B) Σ_i ∂loss/∂h_i · ∇θ h_i: the losses differ only in the per-sample
weight ∂loss/∂h_i. Two ways to take them:

* :func:`per_sample_generator_gradients`, the fast path: one backward pass
  through D for ∂h_i/∂x_i, shared by every loss, then one pass through G alone
  per loss. Exact only when D scores each sample on its own.
* :func:`coupled_generator_gradients`, the exact path: h = D(fake) with fake
  attached, and a full ``autograd.grad`` of each loss's batch mean. Needed when
  D couples the samples of a batch (batch norm in training mode, minibatch
  discrimination, a minibatch standard-deviation feature): then h_i depends on
  every x_j and the weighted input gradient of the fast path is wrong.

:func:`couples_samples` tells them apart by measuring whether ∂h_0/∂x_j is
non-zero for some j ≠ 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainer.config import GLoss
from trainer.losses import dloss_dh, g_loss_per_sample

Critic = Callable[[Tensor], Tensor]


class GeneratorGradients(NamedTuple):
    """The logits h = D(fake) (detached), and per loss (in the order asked) its gradient and its ∂loss/∂h."""

    h: Tensor
    grads: list[tuple[Tensor, ...]]
    weights: list[Tensor]


def as_logits(h: Tensor) -> Tensor:
    """A discriminator's output as one logit per sample, shape (B,): (B,) as is, (B, 1) flattened."""
    if h.dim() == 1:
        return h
    if h.dim() == 0 or h[0].numel() != 1:
        raise ValueError(f"the discriminator must return one logit per sample, got shape {tuple(h.shape)}")
    return h.reshape(h.shape[0])


def per_sample_generator_gradients(
    fake: Tensor, critic: Critic, params: Sequence[Tensor], losses: Sequence[GLoss]
) -> GeneratorGradients:
    """The fast path, for a D that scores each sample on its own.

    ∇θ L = (1/B) Σ_i ∂loss/∂h_i · J_G(z_i)ᵀ ∇ₓh(x_i): ∇ₓh(x_i) comes from one
    backward pass through D shared by all losses; each loss then costs one
    backward pass through G alone, its per-sample weight scaling that input
    gradient. (One batched VJP with ``is_grads_batched=True`` gives the same
    numbers but measured ~25 % slower on CPU for layers this small.) D's
    parameters get no ``.grad``: only the input gradient is taken.
    """
    x = fake.detach().requires_grad_(True)
    h = as_logits(critic(x))
    (dh_dx,) = torch.autograd.grad(h.sum(), x)
    h = h.detach()
    per_sample = (-1,) + (1,) * (x.dim() - 1)
    last = len(losses) - 1
    weights = [dloss_dh(name, h) for name in losses]
    grads = [
        torch.autograd.grad(fake, params, grad_outputs=(weight / h.shape[0]).view(per_sample) * dh_dx,
                            retain_graph=i < last, allow_unused=True, materialize_grads=True)
        for i, weight in enumerate(weights)
    ]
    return GeneratorGradients(h, grads, weights)


def coupled_generator_gradients(
    fake: Tensor, critic: Critic, params: Sequence[Tensor], losses: Sequence[GLoss]
) -> GeneratorGradients:
    """The exact path, for any D: a full ``autograd.grad`` of each loss's batch mean w.r.t. G's parameters.

    One forward pass through D on the attached batch, then one backward pass
    through D and G per loss (the graph retained between them). D's parameters
    are not differentiated, so they get no ``.grad``; D's running statistics
    update from this forward pass as they would in the user's own G step.
    """
    h = as_logits(critic(fake))
    last = len(losses) - 1
    grads = [
        torch.autograd.grad(g_loss_per_sample(name, h).mean(), params, retain_graph=i < last,
                            allow_unused=True, materialize_grads=True)
        for i, name in enumerate(losses)
    ]
    h = h.detach()
    return GeneratorGradients(h, grads, [dloss_dh(name, h) for name in losses])


def generator_gradients(
    fake: Tensor, critic: Critic, params: Sequence[Tensor], losses: Sequence[GLoss], *, per_sample: bool = True
) -> GeneratorGradients:
    """:func:`per_sample_generator_gradients` when ``per_sample``, else :func:`coupled_generator_gradients`."""
    path = per_sample_generator_gradients if per_sample else coupled_generator_gradients
    return path(fake, critic, params, losses)


def couples_samples(critic: nn.Module, x: Tensor) -> bool | None:
    """Whether ``critic`` lets one sample's input change another sample's logit; None if ``x`` cannot tell.

    A batch-norm layer in training mode is a known coupler (no forward pass
    needed). Otherwise one forward and one backward pass on ``x`` measure
    ∂h_0/∂x_j: for a per-sample D those are exact zeros for every j ≠ 0. The
    measurement leaves no trace: the random number generators and D's buffers
    (running statistics, spectral-norm vectors) are restored, and D's parameters
    get no ``.grad``. A batch of one cannot show coupling: None, ask again later.
    """
    if any(isinstance(m, _BatchNorm) and m.training for m in critic.modules()):
        return True
    if x.shape[0] < 2:
        return None
    with _no_trace(critic, x.device), torch.enable_grad():
        probe = x.detach().requires_grad_(True)
        h = as_logits(critic(probe))
        (grad,) = torch.autograd.grad(h[0], probe, allow_unused=True)
    return grad is not None and bool(grad[1:].ne(0).any())


@contextmanager
def _no_trace(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``module`` without moving any random stream or buffer it touches."""
    saved = [b.detach().clone() for b in module.buffers()]
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:
        index = device.index if device.index is not None else torch.accelerator.current_device_index()
        fork = torch.random.fork_rng(devices=[index], device_type=device.type)
    try:
        with fork:
            yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved, strict=True):
                buffer.copy_(value)
