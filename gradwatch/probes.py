"""The probes a :class:`~gradwatch.client.Run` hands out: the trainer's own probes, tied to the run.

The maths is :mod:`trainer.probes` — the very code the built-in trainers
use, so a script's run and a launched run report the same keys computed the
same way. What this adds is the run's side: dashboard controls are applied at
the start of a step (never under a running ``optimizer.step()``), a step the
script never logged is still logged, and the models and optimisers the probe
watches are what Stop saves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from trainer.probes import GanProbe, VaeProbe

if TYPE_CHECKING:
    from gradwatch.client import Run


class GanWatch(GanProbe):
    """``run.watch_gan(G, D, g_loss=..., opt_g=..., opt_d=...)``: SPEC §8's GAN probe.

    Per step: ``discriminator_backward(real, fake.detach())`` (D's loss of the loss family in force, into D's
    ``.grad``; then ``opt_d.step()``), ``generator_backward(fake)`` (the applied generator gradient into G's
    ``.grad``, the shadow gradient measured; then ``opt_g.step()``). ``g_loss`` is the loss in force; the
    dashboard's flip changes it between two steps. Options of :class:`~trainer.probes.GanProbe`
    (``couples_samples``, ``gp_weight``, ...) pass through ``watch_gan``'s keyword arguments.
    """

    def __init__(self, run: Run, generator: nn.Module, discriminator: nn.Module, **options: Any) -> None:
        super().__init__(generator, discriminator, **options)
        self._run = run
        self.on_unclaimed_row = run._claim_row

    def discriminator_backward(self, real: Tensor, fake: Tensor, *, log: bool | None = None) -> Tensor:
        self._run._between_steps()
        return super().discriminator_backward(real, fake, log=log)

    def checkpoint(self) -> dict[str, Any]:
        """What Stop saves unless the script registered its own: both models, their optimisers, the loss."""
        state: dict[str, Any] = {"generator": self.generator.state_dict(),
                                 "discriminator": self.discriminator.state_dict(), "g_loss": self.g_loss}
        if self.opt_g is not None:
            state["opt_g"] = self.opt_g.state_dict()
        if self.opt_d is not None:
            state["opt_d"] = self.opt_d.state_dict()
        return state

    def apply_dashboard_control(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Apply the part of a dashboard change this probe registered; returns what it applied."""
        mine = {key: value for key, value in changes.items() if key in self.controls()}
        if mine:
            self.apply_control(mine)
        return mine


class VaeWatch(VaeProbe):
    """``run.watch_vae(encoder, decoder, beta=..., opt=...)``: SPEC §8's VAE probe.

    Per step: ``vae.backward(nll, mu, logvar, z)`` in place of ``loss.backward()`` (it forms mean ``nll`` +
    β·KL), then ``opt.step()``.
    """

    def __init__(self, run: Run, encoder: nn.Module, decoder: nn.Module, **options: Any) -> None:
        super().__init__(encoder, decoder, **options)
        self._run = run
        self.on_unclaimed_row = run._claim_row

    def backward(self, nll: Tensor, mu: Tensor, logvar: Tensor, z: Tensor | None = None, *,
                 eps: Tensor | None = None, log: bool | None = None) -> Tensor:
        self._run._between_steps()
        return super().backward(nll, mu, logvar, z, eps=eps, log=log)

    def checkpoint(self) -> dict[str, Any]:
        state: dict[str, Any] = {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict()}
        if self.opt is not None:
            state["opt"] = self.opt.state_dict()
        return state

    def apply_dashboard_control(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        return {}


__all__ = ["GanWatch", "VaeWatch"]
