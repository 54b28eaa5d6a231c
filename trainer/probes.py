"""Probes: the SPEC §2 telemetry of a GAN or VAE step, for any user's modules.

A probe owns the maths of one model family's telemetry and nothing else: it
takes the step's backward pass in the user's place (so it can see the
gradients as they are made), leaves ``.grad`` exactly where ``backward()``
would, and records every SPEC §2 key of the step into a named
:class:`~trainer.telemetry.StepRow`. The built-in trainers (trainer/gan.py,
trainer/vae.py) and a user's own script (``run.watch_gan`` / ``run.watch_vae``
of the client) use the same probes, so there is one implementation of the
maths, and a user's run reports the same keys, computed the same way, as a
built-in one.

Nothing here waits for the device: every recorded value is a device tensor
(or a reduction of one) that reaches the host in bulk through
:class:`~trainer.telemetry.MetricBuffer`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_args

import torch
from torch import Tensor, nn

from trainer.budget import MAX_INTERVAL_STEPS, TelemetryBudget
from trainer.config import GLoss
from trainer.gradients import LossGradients, as_logits, couples_samples
from trainer.losses import (
    SHADOW_PAIR,
    d_loss_terms,
    g_loss_per_sample,
    gaussian_kl,
    gaussian_kl_mc,
    gaussian_kl_mc_from_noise,
    gradient_penalty,
)
from trainer.telemetry import Reducer, StepRow, grad_norms, logit_packet, total_norm

#: The share of step time telemetry may take unless a run says otherwise (``intervals.telemetry_budget``).
DEFAULT_TELEMETRY_BUDGET = 0.03
#: What a discriminator_backward records on every logged step, in row order.
D_STEP_KEYS = ("loss/d", "loss/d_real", "loss/d_fake", "grad/d_norm", "d/real_prob", "d/real_logit")
#: What a generator_backward records on every logged step, in row order, before ``grad/g_norm_<applied loss>``
#: and ``dldh/<applied loss>`` (when the applied loss is one of the pair).
G_STEP_KEYS = ("loss/g", "d/fake_prob", "d/fake_logit", "grad/g_norm")
#: Every key of a logged GAN step that the telemetry budget may sample: the shadow gradient's norm and
#: ∂loss/∂h of the loss not training, and the per-tensor norms ``grad/{g,d}_layer/<param>``.
SAMPLED_PIECES = ("shadow", "layers", "hist")
#: Every fixed SPEC §2 GAN key (a run adds one ``grad/g_layer/*`` and ``grad/d_layer/*`` per parameter tensor).
GAN_KEYS = [
    "loss/d",
    "loss/d_real",
    "loss/d_fake",
    "loss/g",
    "d/real_prob",
    "d/fake_prob",
    "d/real_logit",
    "d/fake_logit",
    "grad/d_norm",
    "grad/g_norm",
    "grad/g_norm_saturating",
    "grad/g_norm_non_saturating",
    "dldh/saturating",
    "dldh/non_saturating",
]
#: Every fixed SPEC §2 VAE key (a run adds one ``kl/dim/<i>`` per latent dimension).
VAE_KEYS = ["loss/elbo", "loss/recon", "loss/kl", "kl/mc", "vae/active_units", "grad/enc_norm", "grad/dec_norm"]
#: What a VAE step records on every logged step, in row order (``kl/mc`` and ``kl/dim/*`` are sampled).
VAE_STEP_KEYS = ("loss/elbo", "loss/recon", "loss/kl", "vae/active_units", "grad/enc_norm", "grad/dec_norm")
#: Burda et al. 2016: a latent unit is active when Cov_x(E_q[z_i]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01

G_LOSSES: tuple[GLoss, ...] = get_args(GLoss)
UnclaimedRowHook = Callable[[StepRow], None]


def active_units(mu: Tensor) -> Tensor:
    """Latent dimensions whose encoder mean varies across inputs (Burda et al. 2016), as a device scalar."""
    return (mu.var(0) > ACTIVE_UNIT_THRESHOLD).sum().float()


def _trainable(module: nn.Module) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """Names and tensors of the parameters a step trains (``requires_grad``), in ``named_parameters()`` order."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    return tuple(n for n, _ in named), tuple(p for _, p in named)


def _current_grads(params: Sequence[Tensor]) -> list[Tensor]:
    """Each parameter's ``.grad`` as it stands; a parameter the loss did not reach counts as a zero gradient."""
    return [p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in params]


def _learning_rate(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}: a learning rate must be a finite number above 0, got {value!r}")
    return float(value)


def _g_loss(value: Any) -> GLoss:
    if value not in G_LOSSES:
        raise ValueError(f"g_loss: must be one of {', '.join(G_LOSSES)}, got {value!r}")
    return value


def _every(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer of at least 1, got {value!r}")
    return value


# -- the always-on statistics, reduced at the flush over every buffered step (StepRow.add_batched) -------------
def d_step_stats(loss_d: Tensor, loss_real: Tensor, loss_fake: Tensor, h_real: Tensor, layers: Tensor) -> Tensor:
    """(N,) losses, (N, B) real logits and (N, L) per-tensor norms → :data:`D_STEP_KEYS`."""
    norm = torch.linalg.vector_norm(layers, dim=1)
    return torch.stack([loss_d, loss_real, loss_fake, norm, torch.sigmoid(h_real).mean(1), h_real.mean(1)], 1)


@functools.cache
def g_step_stats(width: int) -> Reducer:
    """The reduction of a generator step's (N,) loss, (N, B) fake logits, (N, B) applied weights ∂loss/∂h and
    (N, L) norms.

    → :data:`G_STEP_KEYS` (``loss/g``, ``d/fake_prob``, ``d/fake_logit``, ``grad/g_norm``), then, when the
    applied loss is one of the pair (``width`` 6), its own ``dldh/<loss>`` and ``grad/g_norm_<loss>`` (the
    same norm). One function per width, the same object every step, so that rows of one layout share one plan.
    """
    def reduce(loss: Tensor, h: Tensor, weight: Tensor, layers: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(layers, dim=1)
        columns = [loss, torch.sigmoid(h).mean(1), h.mean(1), norm]
        if width == 6:
            columns += [weight.abs().mean(1), norm]
        return torch.stack(columns, 1)

    return reduce


def vae_step_stats(n_enc: int) -> Reducer:
    """(N, 3) ``[−ELBO, recon, KL]``, (N, B, latent) μ and (N, P) per-tensor norms → :data:`VAE_STEP_KEYS`."""
    return _vae_step_stats(n_enc)


@functools.cache
def _vae_step_stats(n_enc: int) -> Reducer:
    def reduce(terms: Tensor, mu: Tensor, layers: Tensor) -> Tensor:
        # μ's variance over the batch, two-pass: torch.var along a batch axis measured ~4× slower on CPU.
        centred = mu - mu.mean(1, keepdim=True)
        variance = centred.square().sum(1) / (mu.shape[1] - 1)
        active = (variance > ACTIVE_UNIT_THRESHOLD).sum(1).float()
        enc = torch.linalg.vector_norm(layers[:, :n_enc], dim=1)
        dec = torch.linalg.vector_norm(layers[:, n_enc:], dim=1)
        return torch.stack([-terms[:, 0], terms[:, 1], terms[:, 2], active, enc, dec], 1)

    return reduce


def schedule_values(budget: TelemetryBudget) -> dict[str, float]:
    """The ``telemetry/*`` keys of a budget: each piece's interval in steps, and the measured share when known.

    Rounded (the share to 0.1 %), so that measurement noise alone does not make them change every step.
    """
    values = {f"telemetry/{name}_every": float(budget.every(name)) for name in budget.pieces}
    values["telemetry/budget"] = budget.share
    spent = budget.spent()
    if spent is not None:
        values["telemetry/share"] = round(spent, 3)
    return values


class _Steps:
    """A probe's step bookkeeping: the row being recorded, the histogram packet, and unclaimed completed steps.

    A step is complete once its last backward call is done; its row then waits for ``take_row``.
    Should the next step begin first, the completed step is handed to ``on_unclaimed_row`` (a client
    commits it as a step the user never logged) or dropped: a row never mixes two steps.
    """

    #: Called with a completed step's row when the next step begins before anyone took it; None drops it.
    on_unclaimed_row: UnclaimedRowHook | None = None

    def __init__(self) -> None:
        self._row = StepRow()
        self._hist: Tensor | None = None
        self._complete = False
        #: Completed steps (calls of the step's last backward), counting from 1.
        self.calls = 0
        #: What decides which expensive pieces a step runs; each probe makes its own with its pieces.
        self.budget: TelemetryBudget
        self._last_schedule: dict[str, float] = {}
        self._schedule_at = 0

    def take_row(self) -> StepRow:
        """Everything recorded since the last take; the probe starts a fresh row."""
        row, self._row = self._row, StepRow()
        self._complete = False
        return row

    def take_hist(self) -> Tensor | None:
        """The last histogram step's packet (:func:`~trainer.telemetry.logit_packet`) if not yet taken."""
        packet, self._hist = self._hist, None
        return packet

    def _record_schedule(self) -> None:
        """``telemetry/*``: how often each sampled piece runs and the share of step time telemetry takes.

        Host floats on a shadow step, when they changed or every :data:`~trainer.budget.MAX_INTERVAL_STEPS`
        steps: what the dashboard reads to say which keys are sampled and how often.
        """
        if self.budget.every_step:
            return  # nothing is sampled: no keys to explain it
        schedule = schedule_values(self.budget)
        if schedule != self._last_schedule or self.calls - self._schedule_at >= MAX_INTERVAL_STEPS:
            self._last_schedule, self._schedule_at = schedule, self.calls
            for key, value in schedule.items():
                self._row.add_scalar(key, value)

    def _begin(self) -> None:
        """Settle a completed step nobody took before recording into a new one."""
        if not self._complete:
            return
        if self.on_unclaimed_row is not None and (not self._row.empty or self._hist is not None):
            # The hook may still take_hist() for that step; whatever it leaves is dropped with the step.
            self.on_unclaimed_row(self.take_row())
        else:
            self.take_row()
        self._hist = None


class GanProbe(_Steps):
    """SPEC §2 GAN telemetry for a user's generator and discriminator.

    ``discriminator_backward`` and ``generator_backward`` each replace one
    ``loss.backward()`` of a GAN step; the user keeps calling ``zero_grad`` and
    ``step`` on the optimisers. The generator step takes the applied gradient
    (``g_loss``) and, on logged steps, the *shadow* gradient of the other of
    saturating / non-saturating at the same parameters and batch, which is what
    lets one run show what the other loss would do right now.

    Two ways to take the generator gradients (trainer/gradients.py): the fast
    path shares one backward pass through D between both losses and is exact
    for a D that scores each sample on its own; the exact path differentiates
    each loss's batch mean in full and is needed when D couples the samples of
    a batch (batch norm in training mode, minibatch discrimination, ...).
    ``couples_samples=None`` detects coupling once, on the first generator
    step; ``True``/``False`` says it up front. :attr:`fast_path` tells which
    path is in use.

    ``log=None`` / ``hist=None`` let the probe decide by its own counters:
    every ``log_every``-th / ``hist_every``-th generator step (counting from 1)
    is logged / sends a logit histogram. A caller with its own schedule (the
    built-in trainer) passes explicit flags.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        *,
        g_loss: GLoss = "non_saturating",
        opt_g: torch.optim.Optimizer | None = None,
        opt_d: torch.optim.Optimizer | None = None,
        gp_weight: float = 10.0,
        couples_samples: bool | None = None,
        log_every: int = 1,
        hist_every: int = 50,
        generator_rng: torch.Generator | None = None,
        telemetry_budget: float = DEFAULT_TELEMETRY_BUDGET,
    ) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self._g_loss = _g_loss(g_loss)
        self.opt_g = opt_g
        self.opt_d = opt_d
        self.gp_weight = float(gp_weight)
        self.log_every = _every("log_every", log_every)
        self.hist_every = _every("hist_every", hist_every)
        self.generator_rng = generator_rng
        self._couples = couples_samples
        g_names, self._g_params = _trainable(generator)
        d_names, self._d_params = _trainable(discriminator)
        self._g_layer_keys = tuple(f"grad/g_layer/{n}" for n in g_names)
        self._d_layer_keys = tuple(f"grad/d_layer/{n}" for n in d_names)
        self._h_real: Tensor | None = None
        device = self._g_params[0].device if self._g_params else None
        #: Which of the expensive pieces (:data:`SAMPLED_PIECES`) run on a step; see trainer/budget.py.
        self.budget = TelemetryBudget(telemetry_budget, {"shadow": self.log_every, "layers": self.log_every,
                                                         "hist": self.hist_every}, device)
        self._in_step = False  # a step has begun (its first backward call) and not yet completed
        self._g_stat_keys: dict[str, tuple[str, ...]] = {}
        self._layers_now: bool | None = None  # whether this step records the layer norms; None: not asked yet

    @property
    def g_loss(self) -> GLoss:
        """The generator loss in force (the dashboard's flip changes it between steps)."""
        return self._g_loss

    @g_loss.setter
    def g_loss(self, value: GLoss) -> None:
        self._g_loss = _g_loss(value)

    @property
    def fast_path(self) -> bool | None:
        """True: the shared-backward fast path; False: the exact path for a coupling D; None: not detected yet."""
        return None if self._couples is None else not self._couples

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key a logged step may record (D part, then G part); the budget samples some of them."""
        applied = (f"grad/g_norm_{self._g_loss}", f"dldh/{self._g_loss}") if self._g_loss in SHADOW_PAIR else ()
        shadow = tuple(k for name in SHADOW_PAIR if name != self._g_loss
                       for k in (f"grad/g_norm_{name}", f"dldh/{name}"))
        return (D_STEP_KEYS + self._d_layer_keys + G_STEP_KEYS + applied + shadow + self._g_layer_keys)

    def _open_step(self) -> None:
        """The first backward call of a step: the budget starts timing it, the layer decision is still open."""
        if not self._in_step:
            self._in_step = True
            self._layers_now = None
            self.budget.begin_step()

    def _layers(self) -> bool:
        """Whether this logged step records the per-tensor norms (asked once per step, for D and G alike)."""
        if self._layers_now is None:
            self._layers_now = self.budget.wants("layers")
        return self._layers_now

    # -- the two backward passes of a GAN step ----------------------------------------------------
    def discriminator_backward(self, real: Tensor, fake: Tensor, *, log: bool | None = None) -> Tensor:
        """D's loss under the current loss family, back-propagated into D's ``.grad``; returns it detached.

        ``fake`` is detached here, so G never receives a gradient from D's loss. For ``wasserstein``
        the gradient penalty (``gp_weight`` > 0) draws its interpolation weights from
        ``generator_rng``. Gradients accumulate as with ``backward()``. Called ``d_steps`` times per
        step, the last call's values are the step's; its real logits feed the step's histogram.
        """
        self._begin()
        self._open_step()
        if log is None:
            log = (self.calls + 1) % self.log_every == 0
        d = self.discriminator
        fake = fake.detach()
        h_real, h_fake = as_logits(d(real)), as_logits(d(fake))
        loss_real, loss_fake = d_loss_terms(self._g_loss, h_real, h_fake)
        loss_d = loss_real + loss_fake
        if self._g_loss == "wasserstein" and self.gp_weight > 0:
            loss_d = loss_d + self.gp_weight * gradient_penalty(d, real, fake, self.generator_rng)
        loss_d.backward()
        self._h_real = h_real = h_real.detach()
        if log:
            with torch.no_grad(), self.budget.timed("core"):
                # One fused norm call over D's gradient as it now stands (what opt_d.step() applies); the losses
                # are stacked, and the global norm and the real batch's statistics taken, at the flush, for all
                # buffered steps at once.
                layers = grad_norms(_current_grads(self._d_params))
                self._row.add_batched(D_STEP_KEYS, d_step_stats, loss_d, loss_real, loss_fake, h_real, layers)
            if self._layers():
                with self.budget.timed("layers"):
                    self._row.add(self._d_layer_keys, layers)
        return loss_d.detach()

    def generator_backward(self, fake: Tensor, *, log: bool | None = None, hist: bool | None = None) -> Tensor:
        """The applied generator gradient (under :attr:`g_loss`) added into G's ``.grad``; returns the loss, detached.

        ``fake`` must still be attached to G's graph. On logged steps the shadow gradient(s) are
        taken too and every generator key is recorded; on histogram steps a logit packet is kept
        for :meth:`take_hist`. D's parameters receive no ``.grad``. This completes the step.
        """
        if not fake.requires_grad:
            raise ValueError("generator_backward: fake must still be attached to G's graph (G(z), not G(z).detach())")
        self._begin()
        self._open_step()
        self.calls += 1
        if log is None:
            log = self.calls % self.log_every == 0
        if hist is None:
            hist = self.calls % self.hist_every == 0
        if self._couples is None:
            self._couples = couples_samples(self.discriminator, fake)
        budget = self.budget
        shadows = [name for name in SHADOW_PAIR if name != self._g_loss] if log and budget.wants("shadow") else []
        # The applied gradient, taken the same way whether or not a shadow follows: the budget never changes
        # what training does.
        taker = LossGradients(fake, self.discriminator, self._g_params, per_sample=not self._couples)
        grads, weight = taker.take(self._g_loss, last=not shadows)
        for param, grad in zip(self._g_params, grads, strict=True):
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)
        h = taker.h
        if log:
            with torch.no_grad(), budget.timed("core"):
                loss, layers = self._record_generator(h, grads, weight)
            if self._layers():
                with budget.timed("layers"):
                    self._row.add(self._g_layer_keys, layers)
            if shadows:
                with budget.timed("shadow"):
                    self._record_shadows(taker, shadows)
        else:
            with torch.no_grad():
                loss = g_loss_per_sample(self._g_loss, h).mean()
        if hist and budget.wants("hist"):
            with torch.no_grad(), budget.timed("hist"):
                # Histograms and the saturation panel's per-sample points share one buffered tensor.
                real = self._h_real if self._h_real is not None else h.new_zeros(0)
                self._hist = logit_packet(real, h)
        self._h_real = None  # the next step's histogram takes the next step's real logits, or none
        self._complete = True
        self._in_step = False
        return loss

    def _record_generator(self, h: Tensor, grads: tuple[Tensor, ...], weight: Tensor) -> tuple[Tensor, Tensor]:
        """The always-on generator part of a logged row, in as few kernels as possible; returns the loss and norms.

        This runs on every logged step (every step by default), so each op counts: on a CPU a small op
        costs a few microseconds of dispatch whatever its size. Here: one fused norm call and the loss (the
        caller's return value); the losses' stacking, the fake batch's statistics, the global norm and
        ``dldh/<applied loss>`` (the weight the gradient was scaled by: the autograd derivative of the loss
        itself, SPEC's σ(h) or 1 − σ(h)) happen at the flush for every buffered step at once
        (:func:`g_step_stats`).
        """
        layers = grad_norms(grads)
        loss = g_loss_per_sample(self._g_loss, h).mean()
        keys = self._g_stat_keys.get(self._g_loss)
        if keys is None:
            own = (f"dldh/{self._g_loss}", f"grad/g_norm_{self._g_loss}") if self._g_loss in SHADOW_PAIR else ()
            keys = self._g_stat_keys[self._g_loss] = (*G_STEP_KEYS, *own)
        self._row.add_batched(keys, g_step_stats(len(keys)), loss, h, weight, layers)
        return loss, layers

    def _record_shadows(self, taker: LossGradients, shadows: list[GLoss]) -> None:
        """The shadow piece: each other loss's gradient norm and mean |∂loss/∂h| at the same parameters and batch."""
        values = []
        for i, name in enumerate(shadows):
            grads, weight = taker.take(name, last=i == len(shadows) - 1)
            with torch.no_grad():
                values += [total_norm(grad_norms(grads)), weight.abs().mean()]
        keys = tuple(k for name in shadows for k in (f"grad/g_norm_{name}", f"dldh/{name}"))
        self._row.add(keys, torch.stack(values))
        self._record_schedule()

    # -- live controls ------------------------------------------------------------------------------
    def controls(self) -> list[str]:
        """The live changes this probe can apply: ``g_loss`` always, a learning rate per optimiser it was given."""
        names = ["g_loss"]
        if self.opt_g is not None:
            names.append("lr_g")
        if self.opt_d is not None:
            names.append("lr_d")
        return names

    def apply_control(self, changes: Mapping[str, Any]) -> None:
        """Apply a live change between two steps; ValueError naming the key if any part cannot apply (then none does).

        A flip of ``g_loss`` clears the generator optimiser's state: its statistics (Adam's moments,
        SGD's momentum) describe the old loss's gradients, which after a saturated run are ~10⁴
        smaller; kept, they would turn the new loss's first gradients into steps tens of times too
        large, throw G far off and D with it. They start afresh. ``lr_g`` / ``lr_d`` set every
        parameter group's learning rate.
        """
        allowed = self.controls()
        for key in changes:
            if key not in allowed:
                why = "no optimiser was given for it" if key in ("lr_g", "lr_d") else "not a live control"
                raise ValueError(f"{key}: cannot change it on this run ({why}; controls: {', '.join(allowed)})")
        g_loss = _g_loss(changes["g_loss"]) if "g_loss" in changes else self._g_loss
        rates = {key: _learning_rate(key, changes[key]) for key in ("lr_g", "lr_d") if key in changes}
        if g_loss != self._g_loss:
            self._g_loss = g_loss
            if self.opt_g is not None:
                self.opt_g.state.clear()
        for key, opt in (("lr_g", self.opt_g), ("lr_d", self.opt_d)):
            if key in rates and opt is not None:
                for group in opt.param_groups:
                    group["lr"] = rates[key]


class VaeProbe(_Steps):
    """SPEC §2 VAE telemetry for a user's encoder and decoder.

    :meth:`backward` replaces the ELBO's ``loss.backward()``: the user passes the
    reconstruction term and the posterior's parameters, the probe forms the
    loss (mean −log p(x|z) + β·KL, the KL in closed form), back-propagates it
    and records the ELBO terms, the per-dimension KL, the Monte-Carlo KL as a
    live check of the closed form, the active units and the encoder's and
    decoder's gradient norms.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        beta: float = 1.0,
        opt: torch.optim.Optimizer | None = None,
        log_every: int = 1,
        telemetry_budget: float = DEFAULT_TELEMETRY_BUDGET,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.beta = float(beta)
        self.opt = opt
        self.log_every = _every("log_every", log_every)
        _, enc_params = _trainable(encoder)
        _, dec_params = _trainable(decoder)
        self._params = enc_params + dec_params
        self._n_enc = len(enc_params)
        self._kl_dim_keys: dict[int, tuple[str, ...]] = {}
        device = self._params[0].device if self._params else None
        #: The VAE's sampled piece, ``latent``: ``kl/mc`` and the per-dimension ``kl/dim/<i>``.
        self.budget = TelemetryBudget(telemetry_budget, {"latent": self.log_every}, device)

    def backward(
        self,
        nll: Tensor,
        mu: Tensor,
        logvar: Tensor,
        z: Tensor | None = None,
        *,
        eps: Tensor | None = None,
        log: bool | None = None,
    ) -> Tensor:
        """Back-propagate mean ``nll`` + β·KL(q(z|x) ‖ N(0, I)); returns that loss (the negative ELBO), detached.

        ``nll``: −log p(x|z), per sample ((B,) or (mc, B): any shape whose mean is the batch mean) or
        already the batch mean. ``mu``, ``logvar``: (B, latent). ``z``, if given ((B, latent) or
        (mc, B, latent), drawn from q), adds ``kl/mc``; ``eps``, the standard normal noise z was drawn
        with (z = μ + σ·ε), computes it in a form with fewer operations and no cancellation.
        """
        self._begin()
        self.budget.begin_step()
        self.calls += 1
        if log is None:
            log = self.calls % self.log_every == 0
        recon = nll.mean()
        kl_dims = gaussian_kl(mu, logvar).mean(0)
        kl = kl_dims.sum()
        loss = recon + self.beta * kl
        loss.backward()
        if log:
            with torch.no_grad():
                self._record(loss, recon, kl, kl_dims, mu, logvar, z, eps)
        self._complete = True
        return loss.detach()

    def _record(self, loss: Tensor, recon: Tensor, kl: Tensor, kl_dims: Tensor, mu: Tensor, logvar: Tensor,
                z: Tensor | None, eps: Tensor | None) -> None:
        """Every logged step: the ELBO's terms, the active units (the posterior-collapse alert reads them) and
        the applied gradient's norms; the ``latent`` piece, when the budget has room: ``kl/mc`` and ``kl/dim/*``."""
        with self.budget.timed("core"):
            # Encoder then decoder tensors, one norm call; the two totals, the active units and the ELBO's sign
            # are taken at the flush, for every buffered step at once.
            layers = grad_norms(_current_grads(self._params))
            self._row.add_batched(VAE_STEP_KEYS, vae_step_stats(self._n_enc), torch.stack([loss, recon, kl]),
                                  mu, layers)
        if self.budget.wants("latent"):
            with self.budget.timed("latent"):
                keys = self._kl_dim_keys.get(kl_dims.shape[0])
                if keys is None:
                    keys = self._kl_dim_keys[kl_dims.shape[0]] = tuple(f"kl/dim/{i}" for i in range(kl_dims.shape[0]))
                if z is not None:
                    kl_mc = (gaussian_kl_mc_from_noise(z, eps, logvar) if eps is not None
                             else gaussian_kl_mc(mu, logvar, z))
                    self._row.add(("kl/mc", *keys), torch.cat([kl_mc.mean().view(1), kl_dims]))
                else:
                    self._row.add(keys, kl_dims)
                self._record_schedule()

    def controls(self) -> list[str]:
        """None: SPEC §4's live controls (``g_loss``, ``lr_g``, ``lr_d``) are GAN settings."""
        return []

    def apply_control(self, changes: Mapping[str, Any]) -> None:
        """Refuse every change, naming the first key: a VAE run has no live controls."""
        for key in changes:
            raise ValueError(f"{key}: a VAE run has no live controls")
