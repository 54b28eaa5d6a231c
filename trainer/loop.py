"""The training loops: one GAN step and one VAE step, instrumented.

Read :meth:`GanTrainer.train_step` like the algorithm box of a paper: the
discriminator steps, then the generator step. The only extra work telemetry
adds on a logged step is a second backward pass on the generator step's graph
(the shadow gradient under the loss that is not training) and a handful of
reductions that stay on the device; values reach the host in bulk through
:class:`~trainer.telemetry.ScalarBuffer`.

Everything random is drawn from two generators owned by the trainer (data and
noise) whose states go into every checkpoint, so a resumed run continues the
exact stream of the uninterrupted one. Samples and evaluations draw from their
own generators and never perturb that stream.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer import evaluation, samples
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import ControlRequest, GanConfig, GLoss, RunConfig
from trainer.data import Dataset, load_dataset
from trainer.files import sweep_temp_files
from trainer.losses import (
    SHADOW_PAIR,
    d_loss_terms,
    dloss_dh,
    g_loss_per_sample,
    gaussian_kl,
    gaussian_kl_mc_from_noise,
    gradient_penalty,
)
from trainer.models import build_gan, build_vae
from trainer.telemetry import (
    CollapseDetector,
    DropDetector,
    FrameEmitter,
    FrameSink,
    ScalarBuffer,
    grad_norms,
    logit_frames_fields,
    logit_packet,
    metrics_frame_fields,
    total_norm,
)

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
VAE_KEYS = [
    "loss/elbo",
    "loss/recon",
    "loss/kl",
    "kl/mc",
    "vae/active_units",
    "grad/enc_norm",
    "grad/dec_norm",
]
HIST_KEYS = ("hist/real_logit", "hist/fake_logit")
#: Burda et al. 2016: a latent unit is active when Cov_x(E_q[z_i]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01
SAMPLE_GRID = 64
FIELD_POINTS = 512
IMAGE_EVAL_SAMPLES = 1000


class TrainingError(RuntimeError):
    """A run cannot go on (non-finite loss, unusable resume checkpoint, ...)."""


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("train.device: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingError(f"train.device: there is no {spec} (found {torch.cuda.device_count()} GPUs)")
    return device


def generator_gradients(
    fake: Tensor, critic: Callable[[Tensor], Tensor], params: tuple[Tensor, ...], losses: list[GLoss]
) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
    """The logits h = D(fake) and each loss's generator gradient, at the same parameters and batch.

    See :func:`weighted_generator_gradients`, which also returns each loss's ∂loss/∂h.
    """
    h, grads, _ = weighted_generator_gradients(fake, critic, params, losses)
    return h, grads


def weighted_generator_gradients(
    fake: Tensor, critic: Callable[[Tensor], Tensor], params: tuple[Tensor, ...], losses: list[GLoss]
) -> tuple[Tensor, list[tuple[Tensor, ...]], list[Tensor]]:
    """h = D(fake), each loss's generator gradient, and each loss's per-sample weight ∂loss/∂h.

    ∇θ L = (1/B) Σ_i ∂loss/∂h_i · J_G(z_i)ᵀ ∇ₓh(x_i). The discriminator scores
    every sample on its own (it has no batch norm), so ∇ₓh(x_i) comes from one
    backward pass through D shared by all losses; each loss then costs one
    backward pass through G alone, its per-sample weight ∂loss/∂h_i scaling
    that input gradient. (One batched VJP with ``is_grads_batched=True`` gives
    the same numbers but measured ~25 % slower on CPU for layers this small.)
    The weights are returned because the ``dldh/*`` keys report exactly them:
    taking them again would cost one more autograd call per loss per step.
    """
    x = fake.detach().requires_grad_(True)
    h = critic(x)
    (dh_dx,) = torch.autograd.grad(h.sum(), x)
    h = h.detach()
    per_sample = (-1,) + (1,) * (x.dim() - 1)
    last = len(losses) - 1
    weights = [dloss_dh(name, h) for name in losses]
    grads = [
        torch.autograd.grad(fake, params, grad_outputs=(weight / h.shape[0]).view(per_sample) * dh_dx,
                            retain_graph=i < last)
        for i, weight in enumerate(weights)
    ]
    return h, grads, weights


def make_optimizer(gan: GanConfig, kind: str, params: Iterable[Tensor], lr: float,
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam with the config's betas and ``eps``, or SGD with momentum."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=gan.momentum)
    return torch.optim.Adam(params, lr=lr, betas=(gan.beta1, gan.beta2), eps=eps)


def lr_scale(step: int, steps: int, decay_fraction: float) -> float:
    """1 until the last ``decay_fraction`` of ``steps``, then linearly down to 1/n on the last of those n steps.

    Depends on the step alone, so a run stopped and resumed follows the same schedule as one that never stopped.
    """
    decay_steps = round(steps * decay_fraction)
    left = steps - step + 1  # steps still to take, this one included
    return 1.0 if left > decay_steps else left / decay_steps


def active_units(mu: Tensor) -> Tensor:
    """Latent dimensions whose encoder mean varies across inputs (Burda et al. 2016)."""
    return (mu.var(0) > ACTIVE_UNIT_THRESHOLD).sum().float()


def _grads(params: Iterable[Tensor]) -> list[Tensor]:
    """Gradients just computed by backward(); a parameter without one is a wiring bug."""
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        raise RuntimeError("a parameter received no gradient")
    return grads  # type: ignore[return-value]


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for samples and evaluations, then back to where it was.

    Batch norm must use its running statistics here (not update them from a
    sample batch), or samples would perturb the training state.
    """
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _relative_url(kind: str, name: str) -> str:
    return f"{kind}/{name}"


@dataclass
class RunOptions:
    """Where a run writes and whom it tells; not part of the run's config."""

    out_dir: Path
    sink: FrameSink
    run_id: str = "local"
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "gradwatch")
    resume_from: Path | None = None
    artifact_url: Callable[[str, str], str] = _relative_url


class Trainer(ABC):
    """The parts of a run that do not depend on the model family."""

    keys: list[str]

    def __init__(self, cfg: RunConfig, options: RunOptions) -> None:
        self.cfg = cfg
        self.options = options
        self.device = resolve_device(cfg.train.device)
        self.data: Dataset = load_dataset(cfg.data, self.device)
        self.emitter = FrameEmitter(options.run_id, options.sink)
        self.samples_dir = options.out_dir / "samples"
        self.checkpoints_dir = options.out_dir / "checkpoints"
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        sweep_temp_files(self.checkpoints_dir)
        sweep_temp_files(self.samples_dir)
        self.step = 0
        self._stop = threading.Event()
        self._hurry = False
        self._controls: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        seed = cfg.train.seed
        self.data_gen = self._generator(seed)
        self.noise_gen = self._generator(seed + 1)
        # Same seed ⇒ same initial weights, without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.build_models()
        self.fixed_noise = torch.randn(SAMPLE_GRID, cfg.model.latent_dim, device=self.device,
                                       generator=self._generator(seed + 2))
        self.buffer = ScalarBuffer(self.keys, cfg.intervals.flush_steps, cfg.intervals.flush_ms)
        self._kept_checkpoints: list[Path] = []

    def _generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    # -- family-specific parts ------------------------------------------------
    @abstractmethod
    def build_models(self) -> None: ...

    @abstractmethod
    def train_step(self, step: int, log: bool) -> None: ...

    @abstractmethod
    def model_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_model_state(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def write_sample(self, step: int) -> list[str]: ...

    @abstractmethod
    def evaluate(self, step: int) -> dict[str, float]: ...

    @abstractmethod
    def apply_control(self, changes: dict[str, Any]) -> None: ...

    @abstractmethod
    def scale_learning_rates(self, scale: float) -> None:
        """Set every optimiser's learning rate to its current base value times ``scale``."""

    @abstractmethod
    def on_flush(self, steps: list[int], table: np.ndarray) -> None:
        """Host-side checks on freshly copied values; raise TrainingError to fail the run."""

    # -- requests from outside (thread-safe) ----------------------------------
    def request_stop(self, *, hurry: bool = False) -> None:
        """Finish the current step, write a final checkpoint, end as ``stopped``.

        ``hurry``: the process is being shut down (its server is going away) and may be killed if it dawdles,
        so the final checkpoint is all it writes: no final sample or evaluation.
        """
        self._hurry = self._hurry or hurry
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def control(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Validate a live change now (raising ValueError); apply it between two steps."""
        if self.cfg.kind != "gan":
            raise ValueError("control: live changes apply to GAN runs only")
        request = ControlRequest.model_validate(changes)
        self._controls.put(request.changes())
        return request.changes()

    # -- the loop -------------------------------------------------------------
    def run(self) -> str:
        """Train to the end (or a stop request); returns the final status."""
        iv = self.cfg.intervals
        try:
            if self.options.resume_from is not None:
                self._resume(self.options.resume_from)
            self.emitter.emit("status", status="running", error=None, step=self.step)
            decaying = self.cfg.train.lr_decay_fraction > 0
            while self.step < self.cfg.train.steps and not self._stop.is_set():
                self._drain_controls()
                self.step += 1
                step = self.step
                if decaying:
                    self.scale_learning_rates(lr_scale(step, self.cfg.train.steps, self.cfg.train.lr_decay_fraction))
                self.train_step(step, log=step % iv.log_every == 0)
                if self.buffer.due():
                    self.flush()
                periodic = (
                    step % iv.sample_every == 0,
                    step % iv.eval_every == 0,
                    step % iv.checkpoint_every == 0,
                )
                if any(periodic):
                    self.flush()
                    if periodic[0]:
                        self._sample(step)
                    if periodic[1]:
                        self._evaluate(step)
                    if periodic[2]:
                        self._checkpoint(step, keep=True)
            self.flush()
            status = "stopped" if self._stop.is_set() and self.step < self.cfg.train.steps else "completed"
            self._finish_artifacts()
            self.emitter.emit("status", status=status, error=None, step=self.step)
            return status
        except TrainingError as exc:
            self.emitter.emit("status", status="failed", error=str(exc), step=self.step)
            return "failed"
        except Exception as exc:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self.emitter.emit("status", status="failed", error=detail, step=self.step)
            raise

    def _finish_artifacts(self) -> None:
        """Every run ends with a checkpoint of its final state, then (unless hurried) a sample and an evaluation.

        The checkpoint comes first: it is what a resume needs, and the sample (matplotlib) is the slow part.
        """
        iv = self.cfg.intervals
        if self.step == 0:
            return
        self._checkpoint(self.step, keep=False)
        if self._hurry:
            return
        if self.step % iv.sample_every:
            self._sample(self.step)
        if self.step % iv.eval_every:
            self._evaluate(self.step)

    def flush(self) -> None:
        steps, times, table, hists = self.buffer.flush()
        if steps:
            self.emitter.emit("metrics", **metrics_frame_fields(self.keys, steps, times, table))
        for step, packed in hists:
            for kind, fields in logit_frames_fields(step, packed, HIST_KEYS):
                self.emitter.emit(kind, **fields)
        if steps:
            self.on_flush(steps, table)

    def alert(self, step: int, kind: str, message: str) -> None:
        self.emitter.emit("alert", step=step, kind=kind, message=message)

    def _drain_controls(self) -> None:
        while True:
            try:
                changes = self._controls.get_nowait()
            except queue.Empty:
                return
            self.apply_control(changes)
            self.emitter.emit("control", step=self.step, changes=changes)

    # -- artifacts ------------------------------------------------------------
    def _sample(self, step: int) -> None:
        for name in self.write_sample(step):
            self.emitter.emit("sample", step=step, name=name, url=self.options.artifact_url("samples", name))

    def _evaluate(self, step: int) -> None:
        results = self.evaluate(step)
        if results:
            # Evaluation is rare and already synchronous, so it goes out as its own frame.
            table = np.array([[results[k] for k in results]], dtype=np.float64)
            self.emitter.emit("metrics", **metrics_frame_fields(list(results), [step], [time.time()], table))

    def _checkpoint(self, step: int, keep: bool) -> None:
        name = f"step_{step:08d}.pt"
        path = self.checkpoints_dir / name
        state = {
            "kind": self.cfg.kind,
            "step": step,
            "config": self.cfg.model_dump(mode="json"),
            "rng": {"data": self.data_gen.get_state(), "noise": self.noise_gen.get_state()},
            **self.model_state(),
        }
        save_checkpoint(state, path)
        if keep and path not in self._kept_checkpoints:
            self._kept_checkpoints.append(path)
            while len(self._kept_checkpoints) > self.cfg.intervals.keep_checkpoints:
                self._kept_checkpoints.pop(0).unlink(missing_ok=True)
        self.emitter.emit("checkpoint", step=step, name=name, url=self.options.artifact_url("checkpoints", name))

    def _resume(self, path: Path) -> None:
        try:
            state = load_checkpoint(path, map_location=self.device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise TrainingError(f"resume_from: cannot load checkpoint: {exc}") from exc
        if state.get("kind") != self.cfg.kind:
            raise TrainingError(f"resume_from: checkpoint is a {state.get('kind')} run, config is {self.cfg.kind}")
        if int(state["step"]) >= self.cfg.train.steps:
            raise TrainingError(f"train.steps: must exceed the checkpoint's step {int(state['step'])}")
        try:
            self.load_model_state(state)
        except (KeyError, RuntimeError) as exc:
            raise TrainingError(f"resume_from: checkpoint does not fit this model config: {exc}") from exc
        self.data_gen.set_state(state["rng"]["data"].cpu())
        self.noise_gen.set_state(state["rng"]["noise"].cpu())
        self.step = int(state["step"])


@dataclass
class GanLive:
    """Settings a user may change while the run goes on."""

    g_loss: GLoss
    lr_g: float
    lr_d: float


class GanTrainer(Trainer):
    def build_models(self) -> None:
        cfg = self.cfg
        self.g, self.d = build_gan(cfg.model, self.data.shape)
        self.g.to(self.device)
        self.d.to(self.device)
        gan = cfg.gan
        self.live = GanLive(gan.g_loss, gan.lr_g, gan.lr_d)
        self.opt_g = make_optimizer(gan, gan.g_optimizer, self.g.parameters(), gan.lr_g, gan.g_adam_eps)
        self.opt_d = make_optimizer(gan, gan.d_optimizer, self.d.parameters(), gan.lr_d)
        self.g_names, self.g_params = zip(*[(n, p) for n, p in self.g.named_parameters()], strict=True)
        self.d_names, self.d_params = zip(*[(n, p) for n, p in self.d.named_parameters()], strict=True)
        self.keys = (
            GAN_KEYS
            + [f"grad/g_layer/{n}" for n in self.g_names]
            + [f"grad/d_layer/{n}" for n in self.d_names]
        )
        self.collapse = CollapseDetector(gan.collapse_ratio, gan.collapse_patience)

    def train_step(self, step: int, log: bool) -> None:
        cfg, live = self.cfg, self.live
        batch, latent = cfg.train.batch_size, cfg.model.latent_dim
        g, d = self.g, self.d

        # 1. Discriminator: d_steps updates on fresh real and fake batches.
        for _ in range(cfg.gan.d_steps):
            real = self.data.sample(batch, self.data_gen)
            z = torch.randn(batch, latent, device=self.device, generator=self.noise_gen)
            fake = g(z)
            h_real, h_fake_d = d(real), d(fake.detach())
            loss_real, loss_fake = d_loss_terms(live.g_loss, h_real, h_fake_d)
            loss_d = loss_real + loss_fake
            if live.g_loss == "wasserstein" and cfg.gan.gp_weight > 0:
                loss_d = loss_d + cfg.gan.gp_weight * gradient_penalty(d, real, fake.detach(), self.noise_gen)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            # Per-tensor norms of the gradient D is about to apply, left unstacked: _log_gan
            # stacks them with the generator's in one go.
            d_layers = torch._foreach_norm(_grads(self.d_params)) if log else None
            self.opt_d.step()

        # 2. Generator: one step on the last fake batch, against the updated D.
        #    The first gradient is applied; on logged steps the shadow
        #    gradient(s) of the other loss(es) are taken on the same graph.
        losses: list[GLoss] = [live.g_loss]
        if log:
            losses += [name for name in SHADOW_PAIR if name != live.g_loss]
        h, grads, weights = weighted_generator_gradients(fake, d, self.g_params, losses)
        if step > cfg.gan.d_head_start:
            for param, grad in zip(self.g_params, grads[0], strict=True):
                param.grad = grad
            self.opt_g.step()

        if log:
            assert d_layers is not None
            self._log_gan(step, losses, grads, weights, h, h_real.detach(), d_layers,
                          (loss_d.detach(), loss_real.detach(), loss_fake.detach()))
        if step % cfg.intervals.hist_every == 0:
            # Histograms and the saturation panel's per-sample points share one buffered tensor.
            self.buffer.append_hist(step, logit_packet(h_real, h))

    def _log_gan(
        self,
        step: int,
        losses: list[GLoss],
        grads: list[tuple[Tensor, ...]],
        weights: list[Tensor],
        h: Tensor,
        h_real: Tensor,
        d_layers: Sequence[Tensor],
        d_losses: tuple[Tensor, Tensor, Tensor],
    ) -> None:
        """Stack one logged step's scalars into one device row, in as few kernels as possible.

        This runs on every logged step (every step by default), so each op counts: on a CPU a
        small op costs a few microseconds of dispatch whatever its size. All per-tensor norms
        (applied G gradient, D gradient, then the shadow gradients) go into one stacked vector
        whose slices give the global norms; ``dldh/*`` reuse the weights the gradients were
        scaled by instead of taking them again.
        """
        n_g, n_d = len(self.g_names), len(self.d_names)
        g_layers = torch._foreach_norm([t for g in grads for t in g])  # every loss's gradient, one call
        layers = torch.stack([*g_layers[:n_g], *d_layers, *g_layers[n_g:]])
        norm_of = {losses[0]: total_norm(layers[:n_g]), **{
            name: total_norm(layers[n_g + n_d + i * n_g : n_g + n_d + (i + 1) * n_g])
            for i, name in enumerate(losses[1:])
        }}
        # Seven per-sample quantities, one mean over the batch. Mean |∂loss/∂h| per fake sample
        # comes from autograd through the loss itself (SPEC: σ(h) and 1 − σ(h)).
        weight_of = dict(zip(losses, weights, strict=True))
        means = torch.stack([
            g_loss_per_sample(losses[0], h),
            torch.sigmoid(h_real),
            torch.sigmoid(h),
            h_real,
            h,
            weight_of["saturating"].abs(),
            weight_of["non_saturating"].abs(),
        ]).flatten(1).mean(1)
        norms = torch.stack([
            total_norm(layers[n_g : n_g + n_d]),
            norm_of[losses[0]],
            norm_of["saturating"],
            norm_of["non_saturating"],
        ])
        # The row in GAN_KEYS order, then the applied G gradient's and D's per-tensor norms.
        row = torch.cat([torch.stack(d_losses), means[:5], norms, means[5:], layers[: n_g + n_d]])
        self.buffer.append(step, row)

    def on_flush(self, steps: list[int], table: np.ndarray) -> None:
        losses = table[:, [self.keys.index("loss/d"), self.keys.index("loss/g")]]
        bad = ~np.isfinite(losses).all(axis=1)
        if bad.any():
            step = steps[int(np.argmax(bad))]
            self.alert(step, "diverged", f"non-finite loss at step {step}")
            raise TrainingError(f"diverged: non-finite loss at step {step}")
        g_norm = table[:, self.keys.index("grad/g_norm")]
        for step, value in zip(steps, g_norm, strict=True):
            if self.collapse.update(float(value)):
                ref = self.collapse.reference or 0.0
                self.alert(
                    step,
                    "gradient_collapse",
                    f"generator gradient norm {value:.2e} has stayed below "
                    f"{self.cfg.gan.collapse_ratio:g} × its early value {ref:.2e} "
                    f"for {self.collapse.patience} logged steps ({self.live.g_loss} loss)",
                )

    def scale_learning_rates(self, scale: float) -> None:
        for opt, base in ((self.opt_g, self.live.lr_g), (self.opt_d, self.live.lr_d)):
            for group in opt.param_groups:
                group["lr"] = base * scale

    def apply_control(self, changes: dict[str, Any]) -> None:
        if "g_loss" in changes and changes["g_loss"] != self.live.g_loss:
            self.live.g_loss = changes["g_loss"]
            # The generator's optimiser statistics (Adam's moments, SGD's momentum) describe the old loss's
            # gradients, which after a saturated run are ~10⁴ smaller: kept, they would turn the new loss's first
            # gradients into steps tens of times too large, throw G far off and D with it. They start afresh.
            self.opt_g.state.clear()
        for key, opt in (("lr_g", self.opt_g), ("lr_d", self.opt_d)):
            if key in changes:
                setattr(self.live, key, float(changes[key]))
                for group in opt.param_groups:
                    group["lr"] = float(changes[key])

    def model_state(self) -> dict[str, Any]:
        return {
            "models": {"generator": self.g.state_dict(), "discriminator": self.d.state_dict()},
            "optimizers": {"generator": self.opt_g.state_dict(), "discriminator": self.opt_d.state_dict()},
            "live": asdict(self.live),
            "alerts": {"collapse": self.collapse.state_dict()},
        }

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.g.load_state_dict(state["models"]["generator"])
        self.d.load_state_dict(state["models"]["discriminator"])
        self.opt_g.load_state_dict(state["optimizers"]["generator"])
        self.opt_d.load_state_dict(state["optimizers"]["discriminator"])
        self.live = GanLive(**state["live"])
        self.collapse.load_state_dict(state["alerts"]["collapse"])

    def _generate(self, z: Tensor) -> Tensor:
        with evaluating(self.g):
            return self.g(z)

    def write_sample(self, step: int) -> list[str]:
        base = f"step_{step:08d}"
        if self.data.is_2d:
            gen = self._generator(self.cfg.train.seed + 3)
            real = self.data.sample(FIELD_POINTS, gen)
            z = torch.randn(FIELD_POINTS, self.cfg.model.latent_dim, device=self.device, generator=gen)
            snapshot = samples.field_snapshot(self.d, real, self._generate(z))
            snapshot["step"] = step
            snapshot["g_loss"] = self.live.g_loss
            samples.save_field_plot(snapshot, self.samples_dir / f"{base}.png", self.samples_dir / f"{base}.json",
                                    title=f"step {step} · training loss: {self.live.g_loss}")
            return [f"{base}.png", f"{base}.json"]
        samples.save_image_grid(self._generate(self.fixed_noise), self.samples_dir / f"{base}.png")
        return [f"{base}.png"]

    def evaluate(self, step: int) -> dict[str, float]:
        gen = self._generator(self.cfg.train.seed + 4)
        latent = self.cfg.model.latent_dim
        if self.data.modes is not None:
            z = torch.randn(evaluation.MODE_EVAL_SAMPLES, latent, device=self.device, generator=gen)
            return evaluation.mode_metrics(self._generate(z), self.data.modes)
        if self.data.points is None or self.data.labels is None:
            return {}
        classifier = self._classifier()
        n = min(IMAGE_EVAL_SAMPLES, self.data.points.shape[0])
        z = torch.randn(n, latent, device=self.device, generator=gen)
        idx = torch.randperm(self.data.points.shape[0], device=self.device, generator=gen)[:n]
        return evaluation.image_metrics(self._generate(z), self.data.points[idx], classifier)

    def _classifier(self) -> evaluation.FeatureClassifier:
        if not hasattr(self, "_cached_classifier"):
            assert self.data.points is not None and self.data.labels is not None
            clf = evaluation.load_or_train_classifier(self.data.points.cpu(), self.data.labels.cpu(),
                                                      self.options.cache_dir)
            self._cached_classifier = clf.to(self.device)
        return self._cached_classifier


class VaeTrainer(Trainer):
    def build_models(self) -> None:
        cfg = self.cfg
        self.vae = build_vae(cfg.model, self.data.shape).to(self.device)
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=cfg.vae.lr)
        self.enc_params = list(self.vae.encoder.parameters())
        self.dec_params = list(self.vae.decoder.parameters())
        self.keys = VAE_KEYS + [f"kl/dim/{i}" for i in range(cfg.model.latent_dim)]
        self.posterior = DropDetector()

    def _nll(self, out: Tensor, x: Tensor) -> Tensor:
        """−log p(x|z) per (sample, input), summed over data dimensions."""
        target = x.unsqueeze(0).expand_as(out)
        if self.data.is_2d:
            # Gaussian decoder with a fixed spread proportional to the data's scale.
            sigma = 0.1 * self.data.scale
            per = 0.5 * ((target - out) / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)
        else:
            # Bernoulli decoder on grey levels in [0, 1] (the data lives in [-1, 1]).
            per = F.binary_cross_entropy_with_logits(out, (target + 1.0) / 2.0, reduction="none")
        return per.flatten(2).sum(-1)

    def train_step(self, step: int, log: bool) -> None:
        cfg = self.cfg
        batch, latent, mc = cfg.train.batch_size, cfg.model.latent_dim, cfg.vae.mc_samples
        x = self.data.sample(batch, self.data_gen)
        mu, logvar = self.vae.encode(x)
        eps = torch.randn(mc, batch, latent, device=self.device, generator=self.noise_gen)
        z = mu + eps * (0.5 * logvar).exp()  # reparameterisation: z ~ q(z|x), differentiable in μ, σ
        out = self.vae.decode(z.reshape(mc * batch, latent)).view(mc, batch, *self.data.shape)
        recon = self._nll(out, x).mean()
        kl_dims = gaussian_kl(mu, logvar).mean(0)
        kl = kl_dims.sum()
        loss = recon + cfg.vae.beta * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if log:
            # Encoder then decoder tensors, one norm call and one stack; slices give the two totals.
            layers = grad_norms(_grads(self.enc_params + self.dec_params))
            n_enc = len(self.enc_params)
            enc, dec = total_norm(layers[:n_enc]), total_norm(layers[n_enc:])
        self.opt.step()
        if log:
            kl_mc = gaussian_kl_mc_from_noise(z.detach(), eps, logvar.detach()).mean()
            active = active_units(mu.detach())
            values = torch.stack([-loss.detach(), recon.detach(), kl.detach(), kl_mc, active, enc, dec])
            self.buffer.append(step, torch.cat([values, kl_dims.detach()]))

    def on_flush(self, steps: list[int], table: np.ndarray) -> None:
        elbo = table[:, self.keys.index("loss/elbo")]
        bad = ~np.isfinite(elbo)
        if bad.any():
            step = steps[int(np.argmax(bad))]
            self.alert(step, "diverged", f"non-finite ELBO at step {step}")
            raise TrainingError(f"diverged: non-finite ELBO at step {step}")
        for step, active in zip(steps, table[:, self.keys.index("vae/active_units")], strict=True):
            if self.posterior.update(float(active)):
                self.alert(step, "posterior_collapse",
                           f"active latent units have stayed at or below half their peak of "
                           f"{int(self.posterior.peak)} for {self.posterior.patience} logged steps (now {int(active)})")

    def scale_learning_rates(self, scale: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.vae.lr * scale

    def apply_control(self, changes: dict[str, Any]) -> None:
        raise AssertionError("Trainer.control refuses changes for VAE runs before they are queued")

    def model_state(self) -> dict[str, Any]:
        return {
            "models": {"encoder": self.vae.encoder.state_dict(), "decoder": self.vae.decoder.state_dict()},
            "optimizers": {"vae": self.opt.state_dict()},
        }

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.vae.encoder.load_state_dict(state["models"]["encoder"])
        self.vae.decoder.load_state_dict(state["models"]["decoder"])
        self.opt.load_state_dict(state["optimizers"]["vae"])

    def _decode(self, z: Tensor) -> Tensor:
        with evaluating(self.vae):
            return self.vae.decode(z)

    def write_sample(self, step: int) -> list[str]:
        if self.data.is_2d:
            return []
        base = f"step_{step:08d}"
        images = torch.sigmoid(self._decode(self.fixed_noise)) * 2.0 - 1.0
        samples.save_image_grid(images, self.samples_dir / f"{base}.png")
        return [f"{base}.png"]

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Active units over up to 2,000 inputs: the dataset-level form of Burda et al.'s statistic."""
        if self.data.points is None:
            gen = self._generator(self.cfg.train.seed + 4)
            x = self.data.sample(2000, gen)
        else:
            x = self.data.points[:2000]
        with evaluating(self.vae):
            mu, _ = self.vae.encode(x)
        return {"eval/active_units": float(active_units(mu))}


def make_trainer(cfg: RunConfig, options: RunOptions) -> Trainer:
    """The trainer for a config's model family."""
    trainer_cls: type[Trainer] = GanTrainer if cfg.kind == "gan" else VaeTrainer
    return trainer_cls(cfg, options)
