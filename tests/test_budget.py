"""The telemetry budget (trainer/budget.py): sampled pieces, never a different training result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.budget import MAX_INTERVAL_STEPS, TelemetryBudget
from trainer.config import RunConfig
from trainer.loop import RunOptions, make_trainer

Frames = list[dict[str, Any]]


def config(kind: str, budget: float, **intervals: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "kind": kind,
        "data": {"name": "ring8" if kind == "gan" else "digits"},
        "model": {"width": 32, "depth": 2, "latent_dim": 4},
        "train": {"steps": 120, "batch_size": 64, "seed": 3},
        "intervals": {"hist_every": 10, "sample_every": 10_000, "eval_every": 10_000, "checkpoint_every": 10_000,
                      "telemetry_budget": budget, **intervals},
    }
    return RunConfig.model_validate(raw)


def train(cfg: RunConfig, out: Path) -> tuple[dict[str, torch.Tensor], Frames]:
    frames: Frames = []
    trainer = make_trainer(cfg, RunOptions(out_dir=out, sink=frames.append, run_id="t",
                                           cache_dir=out.parent / "classifier-cache"))
    assert trainer.run() == "completed"
    return {k: v.clone() for k, v in trainer.model_state()["models"].items() for k, v in v.items()}, frames


def steps_of(frames: Frames, key: str) -> list[int]:
    return sorted(s for f in frames if f["type"] == "metrics" and key in f["data"] for s in f["step"])


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_training_is_the_same_whatever_the_budget(kind: str, tmp_path: Path) -> None:
    """A sampled piece only measures: the parameters after N steps are bit for bit those of every-step telemetry."""
    every, _ = train(config(kind, 1.0), tmp_path / "every")
    sampled, frames = train(config(kind, 0.001), tmp_path / "sampled")
    assert every.keys() == sampled.keys()
    for name in every:
        assert torch.equal(every[name], sampled[name]), name
    if kind == "gan":
        assert len(steps_of(frames, "grad/g_norm_saturating")) < 120  # the budget did sample something


def test_a_tight_budget_samples_the_expensive_pieces_and_keeps_the_cheap_keys_on_every_step(tmp_path: Path) -> None:
    """0.1 % of a step: the always-on telemetry alone costs more, so every piece runs at its longest interval."""
    _, frames = train(config("gan", 0.001, **{"hist_every": 5}), tmp_path)
    every_step = list(range(1, 121))
    for key in ("loss/d", "loss/g", "d/real_prob", "d/fake_prob", "grad/g_norm", "grad/d_norm",
                "grad/g_norm_non_saturating", "dldh/non_saturating"):
        assert steps_of(frames, key) == every_step, key  # cheap, and the applied loss's own norm
    shadow = steps_of(frames, "grad/g_norm_saturating")
    layers = steps_of(frames, "grad/g_layer/net.0.weight")
    # Measured first (two runs: the first pays one-off costs), then at the longest interval.
    assert shadow[:2] == [1, 2] and len(shadow) <= 2 + 120 // MAX_INTERVAL_STEPS + 1
    assert shadow == steps_of(frames, "dldh/saturating")
    assert layers == steps_of(frames, "grad/d_layer/net.0.weight")
    hists = sorted({f["step"] for f in frames if f["type"] == "hist"})
    assert hists and all(s % 5 == 0 for s in hists) and len(hists) < 120 // 5
    notes = [f for f in frames if f["type"] == "metrics" and "telemetry/shadow_every" in f["data"]]
    assert notes, "the schedule is reported for the dashboard"
    last = notes[-1]["data"]
    assert last["telemetry/shadow_every"][-1] == MAX_INTERVAL_STEPS
    assert last["telemetry/budget"][-1] == pytest.approx(0.001)
    assert last["telemetry/share"][-1] > 0.001  # measured over budget: why everything is at its longest interval


def test_every_step_reports_every_key_every_step_and_no_schedule(tmp_path: Path) -> None:
    _, frames = train(config("gan", 1.0), tmp_path)
    every_step = list(range(1, 121))
    for key in ("grad/g_norm_saturating", "dldh/saturating", "grad/g_layer/net.0.weight"):
        assert steps_of(frames, key) == every_step, key
    assert sorted({f["step"] for f in frames if f["type"] == "hist"}) == list(range(10, 121, 10))
    assert not any(k.startswith("telemetry/") for f in frames if f["type"] == "metrics" for k in f["data"])


def test_the_vae_samples_its_latent_diagnostics_and_keeps_the_alert_inputs(tmp_path: Path) -> None:
    _, frames = train(config("vae", 0.001), tmp_path)
    every_step = list(range(1, 121))
    for key in ("loss/elbo", "loss/kl", "vae/active_units", "grad/enc_norm", "grad/dec_norm"):
        assert steps_of(frames, key) == every_step, key
    latent = steps_of(frames, "kl/dim/0")
    assert latent[:2] == [1, 2] and len(latent) < 10
    assert latent == steps_of(frames, "kl/mc")


def test_intervals_follow_the_measured_costs() -> None:
    """The plan's arithmetic: what the always-on part leaves of the budget, split evenly, over each piece's cost."""
    budget = TelemetryBudget(0.05, {"shadow": 1, "layers": 1, "hist": 50})
    budget.step_s, budget.core_s = 10e-3, 0.1e-3  # spare: 0.05 × 10 ms − 0.1 ms = 0.4 ms a step, 0.133 ms a piece
    costs = {"shadow": 1.0e-3, "layers": 0.1e-3, "hist": 20e-3}
    for name, cost in costs.items():
        budget.pieces[name].cost_s = cost
    budget._replan()
    assert budget.intervals() == {"shadow": 8, "layers": 1, "hist": 2}  # ⌈1/0.133⌉, ⌈0.1/0.133⌉, ⌈20/(0.133·50)⌉
    assert budget.every("hist") == 100
    assert budget.spent() == pytest.approx((0.1 + 1.0 / 8 + 0.1 + 20 / 100) * 1e-3 / 10e-3)
    budget.core_s = 1e-3  # the always-on part alone is over budget: every piece at its longest interval
    budget._replan()
    assert budget.intervals() == {"shadow": MAX_INTERVAL_STEPS, "layers": MAX_INTERVAL_STEPS,
                                  "hist": MAX_INTERVAL_STEPS // 50}


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5, float("nan")])
def test_a_budget_outside_its_range_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="telemetry_budget"):
        TelemetryBudget(share, {"shadow": 1})
    with pytest.raises(ValueError, match=r"intervals\.telemetry_budget"):
        RunConfig.model_validate({"intervals": {"telemetry_budget": share}})
