"""The built-in GAN run: one step of SPEC §1's training, its telemetry taken by a :class:`GanProbe`.

Read :meth:`GanTrainer.train_step` like the algorithm box of a paper: the
discriminator steps, then the generator step. Every SPEC §2 key is measured
by the same :class:`~trainer.probes.GanProbe` a user's own script gets from
``run.watch_gan``; this module adds only what a launched run needs around it
(models and optimisers from the config, a D head start, learning-rate decay,
alerts, samples, evaluations, checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trainer import evaluation, samples
from trainer.alerts import GanAlerts
from trainer.config import GanConfig
from trainer.loop import Trainer, TrainingError, evaluating
from trainer.models import build_gan
from trainer.probes import GanProbe
from trainer.telemetry import MetricGroup

FIELD_POINTS = 512
IMAGE_EVAL_SAMPLES = 1000


def make_optimizer(gan: GanConfig, kind: str, params: Iterable[Tensor], lr: float,
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam with the config's betas and ``eps``, or SGD with momentum."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=gan.momentum)
    return torch.optim.Adam(params, lr=lr, betas=(gan.beta1, gan.beta2), eps=eps)


@dataclass
class BaseRates:
    """The learning rates a user set (config or live control); the decay schedule scales these."""

    lr_g: float
    lr_d: float


class GanTrainer(Trainer):
    def build_models(self) -> None:
        cfg = self.cfg
        gan = cfg.gan
        self.g, self.d = build_gan(cfg.model, self.data.shape)
        self.g.to(self.device)
        self.d.to(self.device)
        self.rates = BaseRates(gan.lr_g, gan.lr_d)
        self.opt_g = make_optimizer(gan, gan.g_optimizer, self.g.parameters(), gan.lr_g, gan.g_adam_eps)
        self.opt_d = make_optimizer(gan, gan.d_optimizer, self.d.parameters(), gan.lr_d)
        # The loop decides when to log and when to send histograms, so the probe's own counters are unused;
        # the probe's budget reads the intervals to know what a sampled piece costs per step.
        iv = cfg.intervals
        self.probe = GanProbe(self.g, self.d, g_loss=gan.g_loss, opt_g=self.opt_g, opt_d=self.opt_d,
                              gp_weight=gan.gp_weight, generator_rng=self.noise_gen, log_every=iv.log_every,
                              hist_every=iv.hist_every, telemetry_budget=iv.telemetry_budget)
        self.budget = self.probe.budget
        self.alerts = GanAlerts(gan.collapse_ratio, gan.collapse_patience)

    def train_step(self, step: int, log: bool) -> None:
        cfg, probe = self.cfg, self.probe
        batch, latent = cfg.train.batch_size, cfg.model.latent_dim

        # 1. Discriminator: d_steps updates on fresh real and fake batches.
        for _ in range(cfg.gan.d_steps):
            real = self.data.sample(batch, self.data_gen)
            z = torch.randn(batch, latent, device=self.device, generator=self.noise_gen)
            fake = self.g(z)
            self.opt_d.zero_grad(set_to_none=True)
            probe.discriminator_backward(real, fake.detach(), log=log)
            self.opt_d.step()

        # 2. Generator: one step on the last fake batch, against the updated D. On logged steps the
        #    probe also takes the shadow gradient of the other loss on the same batch. During the
        #    D head start the gradient is taken (and reported) but not applied.
        self.opt_g.zero_grad(set_to_none=True)
        probe.generator_backward(fake, log=log, hist=step % cfg.intervals.hist_every == 0)
        if step > cfg.gan.d_head_start:
            self.opt_g.step()

        self.record(step, probe.take_row(), probe.take_hist())

    def on_flush(self, group: MetricGroup) -> None:
        alerts, diverged = self.alerts.check(group, self.probe.g_loss)
        for alert in alerts:
            self.alert(*alert)
        if diverged is not None:
            raise TrainingError(f"diverged: non-finite loss at step {diverged}")

    def scale_learning_rates(self, scale: float) -> None:
        for opt, base in ((self.opt_g, self.rates.lr_g), (self.opt_d, self.rates.lr_d)):
            for group in opt.param_groups:
                group["lr"] = base * scale

    def apply_control(self, changes: dict[str, Any]) -> None:
        """The probe applies the change (a loss flip restarts G's optimiser statistics); the decay follows new rates."""
        self.probe.apply_control(changes)
        for key in ("lr_g", "lr_d"):
            if key in changes:
                setattr(self.rates, key, float(changes[key]))

    def model_state(self) -> dict[str, Any]:
        return {
            "models": {"generator": self.g.state_dict(), "discriminator": self.d.state_dict()},
            "optimizers": {"generator": self.opt_g.state_dict(), "discriminator": self.opt_d.state_dict()},
            "live": {"g_loss": self.probe.g_loss, "lr_g": self.rates.lr_g, "lr_d": self.rates.lr_d},
            "alerts": self.alerts.state_dict(),
        }

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.g.load_state_dict(state["models"]["generator"])
        self.d.load_state_dict(state["models"]["discriminator"])
        self.opt_g.load_state_dict(state["optimizers"]["generator"])
        self.opt_d.load_state_dict(state["optimizers"]["discriminator"])
        live = state["live"]
        self.probe.g_loss = live["g_loss"]
        self.rates = BaseRates(float(live["lr_g"]), float(live["lr_d"]))
        self.alerts.load_state_dict(state["alerts"])

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
            snapshot["g_loss"] = self.probe.g_loss
            samples.save_field_plot(snapshot, self.samples_dir / f"{base}.png", self.samples_dir / f"{base}.json",
                                    title=f"step {step} · training loss: {self.probe.g_loss}")
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
