"""The generator gradient under several losses at once, at the same parameters and batch.

Every generator loss of SPEC §1 is a per-sample function of the logit h, so
∇θ L = (1/B) Σ_i ∂loss/∂h_i · ∇θ h_i: the losses differ only in the per-sample
weight ∂loss/∂h_i. Two ways to take them:

* the fast path (:class:`LossGradients` with ``per_sample``): one backward
  pass through D for ∂h_i/∂x_i, shared by every loss, then one pass through G
  alone per loss. Exact only when D scores each sample on its own.
* the exact path: h = D(fake) with fake attached, and a full ``autograd.grad``
  of each loss's batch mean. Needed when D couples the samples of a batch
  (batch norm in training mode, minibatch discrimination, a minibatch
  standard-deviation feature): then h_i depends on every x_j and the weighted
  input gradient of the fast path is wrong.

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


class LossGradients:
    """The generator gradient under one loss after another, at the same parameters and batch, each when asked.

    Built on ``fake`` (still attached to G's graph): the fast path (``per_sample``, for a D that scores each
    sample on its own) takes ∇ₓh(x_i) with one backward pass through D now, shared by every loss, and each
    :meth:`take` then costs one backward pass through G alone, its per-sample weight scaling that input
    gradient. (One batched VJP with ``is_grads_batched=True`` gives the same numbers but measured ~25 %
    slower on CPU for layers this small.) The exact path (any D) runs D forward on the attached batch once
    and each :meth:`take` back-propagates that loss's batch mean through D and G. D's parameters get no
    ``.grad`` either way; on the exact path D's running statistics update from the forward pass as they
    would in the user's own G step.

    Taking the losses one at a time is what lets the telemetry budget (trainer/budget.py) time the shadow
    loss on its own and skip it on the steps it does not fit, while the applied gradient is computed exactly
    as it would be with the shadow taken: the same graph, the same ops, the same numbers.
    """

    def __init__(self, fake: Tensor, critic: Critic, params: Sequence[Tensor], *, per_sample: bool = True) -> None:
        self._fake = fake
        self._params = tuple(params)
        self.per_sample = per_sample
        if per_sample:
            x = fake.detach().requires_grad_(True)
            h = as_logits(critic(x))
            (self._dh_dx,) = torch.autograd.grad(h.sum(), x)
            self._h_graph = None
            self.h = h.detach()
        else:
            self._h_graph = as_logits(critic(fake))
            self.h = self._h_graph.detach()

    def take(self, name: GLoss, *, last: bool) -> tuple[tuple[Tensor, ...], Tensor]:
        """``name``'s gradient w.r.t. G's parameters and its per-sample ∂loss/∂h; ``last`` frees the graph."""
        weight = dloss_dh(name, self.h)
        if self._h_graph is None:
            per_sample = (-1,) + (1,) * (self._dh_dx.dim() - 1)
            grad_outputs = (weight / self.h.shape[0]).view(per_sample) * self._dh_dx
            grads = torch.autograd.grad(self._fake, self._params, grad_outputs=grad_outputs, retain_graph=not last,
                                        allow_unused=True, materialize_grads=True)
        else:
            grads = torch.autograd.grad(g_loss_per_sample(name, self._h_graph).mean(), self._params,
                                        retain_graph=not last, allow_unused=True, materialize_grads=True)
        return grads, weight


def generator_gradients(
    fake: Tensor, critic: Critic, params: Sequence[Tensor], losses: Sequence[GLoss], *, per_sample: bool = True
) -> GeneratorGradients:
    """Every loss's gradient in one go (see :class:`LossGradients`): the fast path when ``per_sample``, else exact."""
    taker = LossGradients(fake, critic, params, per_sample=per_sample)
    last = len(losses) - 1
    taken = [taker.take(name, last=i == last) for i, name in enumerate(losses)]
    return GeneratorGradients(taker.h, [g for g, _ in taken], [w for _, w in taken])


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
