"""The built-in VAE run: one ELBO step, its telemetry taken by a :class:`VaeProbe`.

Every SPEC §2 VAE key is measured by the same :class:`~trainer.probes.VaeProbe`
a user's own script gets from ``run.watch_vae``; this module adds the model and
decoder likelihood from the config, the posterior-collapse alert, samples,
evaluations and checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer import samples
from trainer.alerts import VaeAlerts
from trainer.loop import Trainer, TrainingError, evaluating
from trainer.models import build_vae
from trainer.probes import VaeProbe, active_units
from trainer.telemetry import MetricGroup


class VaeTrainer(Trainer):
    def build_models(self) -> None:
        cfg = self.cfg
        self.vae = build_vae(cfg.model, self.data.shape).to(self.device)
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=cfg.vae.lr)
        self.probe = VaeProbe(self.vae.encoder, self.vae.decoder, beta=cfg.vae.beta, opt=self.opt,
                              log_every=cfg.intervals.log_every, telemetry_budget=cfg.intervals.telemetry_budget)
        self.budget = self.probe.budget
        self.alerts = VaeAlerts()

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
        # −ELBO = E_q[−log p(x|z)] + β·KL(q(z|x) ‖ p(z)), back-propagated and measured by the probe.
        self.opt.zero_grad(set_to_none=True)
        self.probe.backward(self._nll(out, x), mu, logvar, z, eps=eps, log=log)
        self.opt.step()
        self.record(step, self.probe.take_row(), None)

    def on_flush(self, group: MetricGroup) -> None:
        alerts, diverged = self.alerts.check(group)
        for alert in alerts:
            self.alert(*alert)
        if diverged is not None:
            raise TrainingError(f"diverged: non-finite ELBO at step {diverged}")

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


