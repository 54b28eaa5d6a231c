"""SPEC §2's alert events, judged on the host values a flush has just copied: one implementation for every run.

The built-in trainers and a user's script (the Python client) feed each
flushed :class:`~trainer.telemetry.MetricGroup` to the same watcher: a GAN
run's to :class:`GanAlerts` (``diverged`` on a non-finite loss,
``gradient_collapse`` when the applied generator gradient stays far below its
early value), a VAE run's to :class:`VaeAlerts` (``diverged`` on a non-finite
ELBO, ``posterior_collapse`` when the active latent units fall to half their
peak). What to do about a divergence is the caller's: a built-in run fails, a
script's run reports it and lets the script decide.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from trainer.telemetry import CollapseDetector, DropDetector, MetricGroup


class Alert(NamedTuple):
    step: int
    kind: str
    message: str


def first_non_finite(group: MetricGroup, keys: tuple[str, ...]) -> int | None:
    """The first step at which any of ``keys`` (those present) is NaN or infinite."""
    columns = [group.keys.index(k) for k in keys if k in group.keys]
    if not columns:
        return None
    bad = ~np.isfinite(group.table[:, columns]).all(axis=1)
    return group.steps[int(np.argmax(bad))] if bad.any() else None


class GanAlerts:
    def __init__(self, collapse_ratio: float, collapse_patience: int) -> None:
        self.collapse = CollapseDetector(collapse_ratio, collapse_patience)

    def check(self, group: MetricGroup, g_loss: str) -> tuple[list[Alert], int | None]:
        """The alerts this group raises, and the step it diverged at (None if it did not)."""
        diverged = first_non_finite(group, ("loss/d", "loss/g"))
        if diverged is not None:
            return [Alert(diverged, "diverged", f"non-finite loss at step {diverged}")], diverged
        if "grad/g_norm" not in group.keys:
            return [], None
        alerts = []
        for step, value in zip(group.steps, group.table[:, group.keys.index("grad/g_norm")], strict=True):
            if self.collapse.update(float(value)):
                ref = self.collapse.reference or 0.0
                alerts.append(Alert(step, "gradient_collapse",
                                    f"generator gradient norm {value:.2e} has stayed below "
                                    f"{self.collapse.ratio:g} × its early value {ref:.2e} "
                                    f"for {self.collapse.patience} logged steps ({g_loss} loss)"))
        return alerts, None

    def state_dict(self) -> dict[str, Any]:
        return {"collapse": self.collapse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.collapse.load_state_dict(state["collapse"])


class VaeAlerts:
    def __init__(self) -> None:
        self.posterior = DropDetector()

    def check(self, group: MetricGroup) -> tuple[list[Alert], int | None]:
        diverged = first_non_finite(group, ("loss/elbo",))
        if diverged is not None:
            return [Alert(diverged, "diverged", f"non-finite ELBO at step {diverged}")], diverged
        if "vae/active_units" not in group.keys:
            return [], None
        alerts = []
        for step, active in zip(group.steps, group.table[:, group.keys.index("vae/active_units")], strict=True):
            if self.posterior.update(float(active)):
                alerts.append(Alert(step, "posterior_collapse",
                                    f"active latent units have stayed at or below half their peak of "
                                    f"{int(self.posterior.peak)} for {self.posterior.patience} logged steps "
                                    f"(now {int(active)})"))
        return alerts, None
