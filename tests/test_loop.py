"""The instrumented training loop: exact telemetry, determinism, resume, control."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.checkpoint import load_checkpoint
from trainer.config import RunConfig
from trainer.gan import GanTrainer
from trainer.gradients import generator_gradients
from trainer.loop import (
    GAN_KEYS,
    VAE_KEYS,
    RunOptions,
    TrainingError,
    active_units,
    lr_scale,
    make_trainer,
    resolve_device,
)
from trainer.losses import g_loss_per_sample
from trainer.models import build_gan

Frames = list[dict[str, Any]]


def tiny_gan(**overrides: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "kind": "gan",
        "data": {"name": "ring8"},
        "model": {"width": 32, "depth": 2, "latent_dim": 4},
        "gan": {"lr_g": 1e-3, "lr_d": 1e-3},
        "train": {"steps": 40, "batch_size": 64, "seed": 0},
        # Every key on every logged step: these tests check the telemetry's values (trainer/budget.py samples
        # some keys by measured cost at the default budget; tests/test_budget.py covers that).
        "intervals": {"hist_every": 10, "sample_every": 20, "eval_every": 20, "checkpoint_every": 20,
                      "telemetry_budget": 1.0},
    }
    cfg = RunConfig.model_validate(raw)
    return cfg.with_overrides(overrides) if overrides else cfg


def train(cfg: RunConfig, out: Path, *, resume: Path | None = None) -> tuple[str, Frames]:
    frames: Frames = []
    # The digits classifier cache is shared by every test of the session, outside any one run folder.
    options = RunOptions(out_dir=out, sink=frames.append, run_id="t", resume_from=resume,
                         cache_dir=out.parent.parent / "classifier-cache")
    status = make_trainer(cfg, options).run()
    return status, frames


def by_step(frames: Frames, key: str) -> dict[int, float | None]:
    out: dict[int, float | None] = {}
    for f in frames:
        if f["type"] == "metrics" and key in f["data"]:
            out.update(zip(f["step"], f["data"][key], strict=True))
    return out


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_generator_gradients_on_one_graph_equal_fresh_autograd_per_loss(arch: str) -> None:
    torch.manual_seed(0)
    cfg = RunConfig.model_validate({"data": {"name": "digits"}, "model": {"arch": arch, "width": 8, "latent_dim": 4}})
    g, d = build_gan(cfg.model, (1, 8, 8))
    params = tuple(g.parameters())
    z = torch.randn(16, 4)
    names = ["saturating", "non_saturating", "hinge", "least_squares"]
    h_shared, together, _ = generator_gradients(g(z), d, params, names)  # type: ignore[arg-type]
    assert not h_shared.requires_grad
    for row, name in enumerate(names):
        h = d(g(z))  # a fresh graph per loss: the reference
        expected = torch.autograd.grad(g_loss_per_sample(name, h).mean(), params)  # type: ignore[arg-type]
        for got, want in zip(together[row], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    if arch == "conv":
        return  # batch norm couples samples (and refuses a batch of one); the ratio below is per sample
    # Per sample, the saturating and non-saturating gradients are σ(h)- and (1 − σ(h))-weighted
    # multiples of the same ∇θ h, so with one sample their ratio is exactly D/(1 − D) = exp(h).
    one, (sat, non_sat), _ = generator_gradients(g(z[:1]), d, params, ["saturating", "non_saturating"])
    ratio = torch.exp(one.double()).item()
    for a, b in zip(sat, non_sat, strict=True):
        torch.testing.assert_close(a.double(), b.double() * ratio, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("g_loss", ["saturating", "non_saturating", "hinge"])
def test_every_frame_is_consistent_with_spec(tmp_path: Path, g_loss: str) -> None:
    status, frames = train(tiny_gan(**{"gan.g_loss": g_loss}), tmp_path)
    assert status == "completed"
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert frames[0]["type"] == "status" and frames[0]["status"] == "running"
    assert frames[-1]["type"] == "status" and frames[-1]["status"] == "completed"

    scalar = [f for f in frames if f["type"] == "metrics" and "loss/d" in f["data"]]
    steps = [s for f in scalar for s in f["step"]]
    assert steps == list(range(1, 41))
    for frame in scalar:
        data = frame["data"]
        assert set(GAN_KEYS) <= set(data)
        assert any(k.startswith("grad/g_layer/") for k in data) and any(k.startswith("grad/d_layer/") for k in data)
        assert len(frame["time"]) == len(frame["step"])
        assert all(len(v) == len(frame["step"]) for v in data.values())
        for i in range(len(frame["step"])):
            p = data["d/fake_prob"][i]
            assert data["dldh/saturating"][i] == pytest.approx(p, rel=1e-5, abs=1e-7)
            assert data["dldh/non_saturating"][i] == pytest.approx(1 - p, rel=1e-5, abs=1e-7)
            if g_loss in ("saturating", "non_saturating"):
                assert data["grad/g_norm"][i] == data[f"grad/g_norm_{g_loss}"][i]
            layers = [v[i] for k, v in data.items() if k.startswith("grad/g_layer/")]
            assert data["grad/g_norm"][i] == pytest.approx(sum(x * x for x in layers) ** 0.5, rel=1e-5)

    hists = [f for f in frames if f["type"] == "hist"]
    assert sorted({(f["step"], f["key"]) for f in hists}) == sorted(
        (s, k) for s in (10, 20, 30, 40) for k in ("hist/fake_logit", "hist/real_logit")
    )
    assert all(sum(f["counts"]) == 64 and len(f["edges"]) == len(f["counts"]) + 1 for f in hists)
    # Each histogram step's two hist frames are followed by its per-sample ∂loss/∂h points.
    dldh = [f for f in frames if f["type"] == "dldh"]
    assert [f["step"] for f in dldh] == [10, 20, 30, 40]
    for frame in dldh:
        at = frames.index(frame)
        assert [(f["type"], f["step"]) for f in frames[at - 2 : at]] == [("hist", frame["step"])] * 2
        assert 0 < len(frame["h"]) == len(frame["saturating"]) == len(frame["non_saturating"]) <= 64
        for h, sat, non_sat in zip(frame["h"], frame["saturating"], frame["non_saturating"], strict=True):
            sigma = 1.0 / (1.0 + math.exp(-h))
            assert sat == pytest.approx(sigma, abs=1e-6)
            assert non_sat == pytest.approx(1.0 - sigma, abs=1e-6)
    evals = by_step(frames, "eval/modes")
    assert set(evals) == {20, 40}
    assert {f["name"] for f in frames if f["type"] == "checkpoint"} == {"step_00000020.pt", "step_00000040.pt"}
    samples = {f["name"] for f in frames if f["type"] == "sample"}
    assert {"step_00000020.png", "step_00000020.json", "step_00000040.png"} <= samples
    assert all((tmp_path / "samples" / name).is_file() for name in samples)


def test_head_start_trains_discriminator_only(tmp_path: Path) -> None:
    cfg = tiny_gan(**{"gan.d_head_start": 40, "intervals.checkpoint_every": 1000})
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=lambda f: None))
    assert isinstance(trainer, GanTrainer)
    g_before = [p.detach().clone() for p in trainer.g.parameters()]
    d_before = [p.detach().clone() for p in trainer.d.parameters()]
    trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(g_before, trainer.g.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(d_before, trainer.d.parameters(), strict=True))


def test_same_seed_gives_bit_identical_losses(tmp_path: Path) -> None:
    cfg = tiny_gan(**{"train.steps": 15})
    _, a = train(cfg, tmp_path / "a")
    _, b = train(cfg, tmp_path / "b")
    _, c = train(cfg.with_overrides({"train.seed": 1}), tmp_path / "c")
    for key in ("loss/d", "loss/g", "grad/g_norm_saturating"):
        assert by_step(a, key) == by_step(b, key)
    assert by_step(a, "loss/d") != by_step(c, "loss/d")


@pytest.mark.parametrize("data", ["ring8", "digits", "ring8 with lr decay"])
def test_stopped_and_resumed_run_reproduces_the_uninterrupted_one(tmp_path: Path, data: str) -> None:
    cfg = tiny_gan(**{"train.steps": 30, "intervals.checkpoint_every": 1000, "intervals.flush_steps": 1})
    if data == "ring8 with lr decay":
        cfg = cfg.with_overrides({"train.lr_decay_fraction": 0.8})  # the schedule depends on the step alone
    if data == "digits":
        # Conv G carries batch-norm buffers, which the checkpoint must restore too.
        cfg = cfg.with_overrides({"data.name": "digits", "model.arch": "conv", "model.width": 8,
                                  "intervals.eval_every": 1000})
    _, whole = train(cfg, tmp_path / "whole")

    frames: Frames = []
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path / "first", sink=frames.append))

    def stop_at_12(frame: dict[str, Any]) -> None:
        frames.append(frame)
        if frame["type"] == "metrics" and frame["step"] and frame["step"][-1] >= 12:
            trainer.request_stop()

    trainer.emitter.sink = stop_at_12
    assert trainer.run() == "stopped"
    stop_step = trainer.step
    assert stop_step < 30
    ckpt = tmp_path / "first" / "checkpoints" / f"step_{stop_step:08d}.pt"
    assert [f["url"] for f in frames if f["type"] == "checkpoint"] == [f"checkpoints/{ckpt.name}"]

    status, resumed = train(cfg, tmp_path / "second", resume=ckpt)
    assert status == "completed"
    for key in ("loss/d", "loss/g", "grad/g_norm", "grad/g_norm_saturating", "d/real_logit"):
        expected = {s: v for s, v in by_step(whole, key).items() if s > stop_step}
        assert by_step(resumed, key) == expected, key


@pytest.mark.parametrize("hurry", [False, True])
def test_a_stop_writes_the_final_checkpoint_first_and_a_hurried_one_nothing_else(tmp_path: Path,
                                                                                 hurry: bool) -> None:
    # A worker whose server is shutting down stops "hurried": the checkpoint a resume needs, not the slow
    # matplotlib sample or the evaluation, so it exits before the server's grace runs out.
    cfg = tiny_gan(**{"train.steps": 1000, "intervals.sample_every": 1000, "intervals.eval_every": 1000,
                      "intervals.checkpoint_every": 1000})
    frames: Frames = []
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=frames.append))

    def stop_at_5(frame: dict[str, Any]) -> None:
        frames.append(frame)
        if frame["type"] == "metrics" and frame["step"] and frame["step"][-1] >= 5:
            trainer.request_stop(hurry=hurry)

    trainer.emitter.sink = stop_at_5
    assert trainer.run() == "stopped"
    after = [f["type"] for f in frames if f["type"] in ("checkpoint", "sample", "metrics", "status")]
    after = after[after.index("checkpoint"):]
    assert after == (["checkpoint", "status"] if hurry else ["checkpoint", "sample", "sample", "metrics", "status"])
    assert (tmp_path / "checkpoints" / f"step_{trainer.step:08d}.pt").is_file()


def test_checkpoint_loads_weights_only_into_fresh_models(tmp_path: Path) -> None:
    cfg = tiny_gan(**{"train.steps": 5})
    train(cfg, tmp_path)
    path = tmp_path / "checkpoints" / "step_00000005.pt"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 5 and state["kind"] == "gan"
    assert RunConfig.model_validate(state["config"]) == cfg
    g, d = build_gan(cfg.model, (2,))
    g.load_state_dict(state["models"]["generator"])
    d.load_state_dict(state["models"]["discriminator"])
    assert load_checkpoint(path)["live"]["g_loss"] == "non_saturating"


def test_live_control_flips_the_loss_between_steps(tmp_path: Path) -> None:
    cfg = tiny_gan(**{"gan.g_loss": "saturating", "train.steps": 30, "intervals.flush_steps": 1})
    frames: Frames = []
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=frames.append))
    sent = False

    def sink(frame: dict[str, Any]) -> None:
        nonlocal sent
        frames.append(frame)
        if not sent and frame["type"] == "metrics" and frame["step"] and frame["step"][-1] >= 10:
            sent = True
            trainer.control({"g_loss": "non_saturating", "lr_g": 5e-4})

    trainer.emitter.sink = sink
    assert trainer.run() == "completed"
    (control,) = [f for f in frames if f["type"] == "control"]
    flip = control["step"]
    assert control["changes"] == {"g_loss": "non_saturating", "lr_g": 5e-4}
    g_norm, sat, non_sat = (by_step(frames, k) for k in
                            ("grad/g_norm", "grad/g_norm_saturating", "grad/g_norm_non_saturating"))
    assert all(g_norm[s] == sat[s] for s in g_norm if s <= flip)
    assert all(g_norm[s] == non_sat[s] for s in g_norm if s > flip)
    assert all(group["lr"] == 5e-4 for group in trainer.opt_g.param_groups)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="lr_g"):
        trainer.control({"lr_g": -1})


def test_a_loss_flip_restarts_the_generators_optimiser_statistics(tmp_path: Path) -> None:
    # Adam's moments after a saturated stretch describe gradients ~1e4 smaller than the new loss's: kept, they
    # would make the first steps after the flip tens of times too large (measured: D thrown off the ring for good).
    cfg = tiny_gan(**{"gan.g_loss": "saturating", "train.steps": 5})
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=lambda frame: None))
    assert isinstance(trainer, GanTrainer)
    trainer.run()
    assert trainer.opt_g.state and trainer.opt_d.state
    trainer.apply_control({"g_loss": "saturating", "lr_g": 5e-4})  # not a flip: statistics kept
    assert trainer.opt_g.state
    trainer.apply_control({"g_loss": "non_saturating"})
    assert not trainer.opt_g.state and trainer.opt_d.state  # D's objective did not change


@pytest.mark.parametrize(("steps", "fraction", "expected"), [
    (10, 0.0, [1.0] * 10),
    (10, 0.5, [1.0] * 5 + [1.0, 0.8, 0.6, 0.4, 0.2]),
    (4, 1.0, [1.0, 0.75, 0.5, 0.25]),
])
def test_lr_scale_falls_linearly_over_the_last_fraction(steps: int, fraction: float, expected: list[float]) -> None:
    assert [lr_scale(step, steps, fraction) for step in range(1, steps + 1)] == pytest.approx(expected)


def test_learning_rates_follow_the_decay_and_a_live_change_rescales_it(tmp_path: Path) -> None:
    cfg = tiny_gan(**{"train.steps": 20, "train.lr_decay_fraction": 0.5, "intervals.flush_steps": 1})
    seen: dict[int, tuple[float, float]] = {}
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=lambda frame: None))
    assert isinstance(trainer, GanTrainer)
    step = trainer.train_step

    def spy(n: int, log: bool) -> None:
        seen[n] = (trainer.opt_g.param_groups[0]["lr"], trainer.opt_d.param_groups[0]["lr"])
        if n == 14:
            trainer.apply_control({"lr_g": 5e-4})  # as a control between steps 14 and 15 would
        step(n, log)

    trainer.train_step = spy  # type: ignore[method-assign]
    assert trainer.run() == "completed"
    assert seen[10] == (1e-3, 1e-3)  # constant for the first half...
    assert seen[12] == pytest.approx((1e-3 * 0.9, 1e-3 * 0.9))  # ...then down by a tenth per step
    assert seen[15] == pytest.approx((5e-4 * 0.6, 1e-3 * 0.6))  # a new base rate decays on the same schedule
    assert seen[20] == pytest.approx((5e-4 * 0.1, 1e-3 * 0.1))


@pytest.mark.parametrize("flush_steps", [1, 40])
def test_non_finite_loss_raises_diverged_alert_then_fails(tmp_path: Path, flush_steps: int) -> None:
    # flush_steps=40 keeps the NaNs on the device past a histogram step (10) before the host sees them.
    cfg = tiny_gan(**{"intervals.flush_steps": flush_steps, "intervals.flush_ms": 60_000})
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=(frames := []).append))
    assert isinstance(trainer, GanTrainer)
    with torch.no_grad():
        next(trainer.d.parameters()).fill_(float("nan"))
    assert trainer.run() == "failed"
    alert = next(f for f in frames if f["type"] == "alert")
    assert alert["kind"] == "diverged" and alert["step"] == 1
    assert frames[-1]["status"] == "failed" and "diverged" in frames[-1]["error"]
    metrics = next(f for f in frames if f["type"] == "metrics")
    assert metrics["data"]["loss/d"][0] is None  # NaN travels as null


def test_vae_reports_every_spec_key(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate({
        "kind": "vae", "data": {"name": "digits"}, "model": {"width": 32, "depth": 1, "latent_dim": 3},
        "vae": {"mc_samples": 2}, "train": {"steps": 20, "batch_size": 32},
        "intervals": {"sample_every": 10, "eval_every": 10, "checkpoint_every": 10, "telemetry_budget": 1.0},
    })
    status, frames = train(cfg, tmp_path)
    assert status == "completed"
    scalar = [f for f in frames if f["type"] == "metrics" and "loss/elbo" in f["data"]]
    for frame in scalar:
        data = frame["data"]
        assert set(VAE_KEYS) | {"kl/dim/0", "kl/dim/1", "kl/dim/2"} == set(data)
        for i in range(len(frame["step"])):
            assert sum(data[f"kl/dim/{j}"][i] for j in range(3)) == pytest.approx(data["loss/kl"][i], rel=1e-5)
            assert data["loss/elbo"][i] == pytest.approx(-(data["loss/recon"][i] + data["loss/kl"][i]), rel=1e-5)
    assert set(by_step(frames, "eval/active_units")) == {10, 20}
    assert not {"hist", "dldh"} & {f["type"] for f in frames}  # no discriminator logits in a VAE
    assert (tmp_path / "samples" / "step_00000020.png").is_file()
    state = torch.load(tmp_path / "checkpoints" / "step_00000020.pt", weights_only=True)
    assert set(state["models"]) == {"encoder", "decoder"}


def test_active_units_counts_dimensions_that_vary_across_inputs() -> None:
    mu = torch.zeros(100, 4)
    mu[:, 0] = torch.linspace(-1, 1, 100)  # variance ≈ 0.34: active
    mu[:, 1] = 0.05 * torch.linspace(-1, 1, 100)  # variance ≈ 0.00085: inactive
    mu[:, 2] = 3.0  # constant: inactive
    mu[:, 3] = torch.linspace(-0.5, 0.5, 100)  # variance ≈ 0.085: active
    assert active_units(mu).item() == 2


def test_resume_refuses_mismatched_or_finished_checkpoints(tmp_path: Path) -> None:
    cfg = tiny_gan(**{"train.steps": 5})
    train(cfg, tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000005.pt"
    status, frames = train(cfg, tmp_path / "b", resume=ckpt)
    assert status == "failed" and "train.steps" in frames[-1]["error"]
    wider = cfg.with_overrides({"model.width": 16, "train.steps": 10})
    status, frames = train(wider, tmp_path / "c", resume=ckpt)
    assert status == "failed" and "does not fit" in frames[-1]["error"]


def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TrainingError, match=r"train\.device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_telemetry_reaches_the_host_in_bulk_not_per_step(tmp_path: Path) -> None:
    cfg = tiny_gan(**{"intervals.flush_steps": 10, "intervals.flush_ms": 60_000})
    _, frames = train(cfg, tmp_path)
    batches = [f["step"] for f in frames if f["type"] == "metrics" and "loss/d" in f["data"]]
    # One metrics frame (one device→host copy) per ten steps; the periodic
    # samples at steps 20 and 40 flush exactly on those boundaries too.
    assert batches == [list(range(s, s + 10)) for s in (1, 11, 21, 31)]
