"""Probes: the SPEC §2 keys of a user's own GAN or VAE, against plain-autograd references; named rows and buffer."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from trainer.gradients import couples_samples
from trainer.losses import d_loss_terms, g_loss_per_sample, gaussian_kl, gradient_penalty
from trainer.probes import GAN_KEYS, VAE_KEYS, GanProbe, VaeProbe, active_units
from trainer.telemetry import MetricBuffer, StepRow

BATCH, LATENT = 32, 3


def as_dict(row: StepRow) -> dict[str, float]:
    return dict(zip(row.keys(), row.values().tolist(), strict=True))


def generator() -> nn.Module:
    return nn.Sequential(nn.Linear(LATENT, 16), nn.ReLU(), nn.Linear(16, 2))


class PerSampleD(nn.Module):
    """Scores each sample on its own (the fast path is exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


class BatchNormD(nn.Module):
    """Batch norm in training mode: each logit depends on the whole batch. Returns (B, 1) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MinibatchD(nn.Module):
    """Minibatch discrimination in its simplest form: every sample also sees the batch's mean feature."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(2, 8), nn.LeakyReLU(0.2))
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        return self.head(torch.cat([f, f.mean(0, keepdim=True).expand_as(f)], dim=1)).squeeze(-1)


def reference_generator_grads(g: nn.Module, d: nn.Module, z: Tensor, name: str) -> tuple[Tensor, ...]:
    """Plain autograd: the loss per sample, its batch mean, its gradient w.r.t. G's parameters."""
    h = d(g(z)).reshape(-1)
    return torch.autograd.grad(g_loss_per_sample(name, h).mean(), tuple(g.parameters()))  # type: ignore[arg-type]


def norm(grads: tuple[Tensor, ...]) -> float:
    return float(torch.cat([t.flatten() for t in grads]).norm())


def run_generator_step(d_cls: type[nn.Module], g_loss: str, **probe_kwargs: Any) -> tuple[
        nn.Module, nn.Module, Tensor, GanProbe, dict[str, float]]:
    torch.manual_seed(0)
    g, d = generator(), d_cls()
    z = torch.randn(BATCH, LATENT)
    probe = GanProbe(g, d, g_loss=g_loss, telemetry_budget=1.0, **probe_kwargs)  # type: ignore[arg-type]
    probe.generator_backward(g(z), log=True, hist=False)
    return g, d, z, probe, as_dict(probe.take_row())


def assert_matches_reference(g: nn.Module, d: nn.Module, z: Tensor, g_loss: str, row: dict[str, float]) -> None:
    refs = {name: reference_generator_grads(g, d, z, name) for name in ("saturating", "non_saturating")}
    applied = refs[g_loss]
    for name, grads in refs.items():
        assert row[f"grad/g_norm_{name}"] == pytest.approx(norm(grads), rel=1e-5)
    assert row["grad/g_norm"] == pytest.approx(norm(applied), rel=1e-5)
    for (pname, param), want in zip(g.named_parameters(), applied, strict=True):
        assert row[f"grad/g_layer/{pname}"] == pytest.approx(float(want.norm()), rel=1e-5)
        assert param.grad is not None
        torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in d.parameters())


@pytest.mark.parametrize("g_loss", ["saturating", "non_saturating"])
def test_batch_norm_discriminator_is_detected_and_its_gradients_are_exact(g_loss: str) -> None:
    g, d, z, probe, row = run_generator_step(BatchNormD, g_loss)
    assert probe.fast_path is False
    assert_matches_reference(g, d, z, g_loss, row)


@pytest.mark.parametrize("g_loss", ["saturating", "non_saturating"])
def test_forcing_the_fast_path_on_a_batch_norm_discriminator_gives_a_wrong_gradient(g_loss: str) -> None:
    # The detection matters: the shared-backward shortcut ignores how each sample moves the batch statistics.
    g, d, z, probe, row = run_generator_step(BatchNormD, g_loss, couples_samples=False)
    assert probe.fast_path is True
    for name in ("saturating", "non_saturating"):
        want = norm(reference_generator_grads(g, d, z, name))
        assert abs(row[f"grad/g_norm_{name}"] - want) > 1e-2 * want


@pytest.mark.parametrize("g_loss", ["saturating", "non_saturating"])
def test_per_sample_discriminator_takes_the_fast_path_with_exact_gradients(g_loss: str) -> None:
    g, d, z, probe, row = run_generator_step(PerSampleD, g_loss)
    assert probe.fast_path is True
    assert_matches_reference(g, d, z, g_loss, row)


def test_minibatch_discrimination_is_detected_as_coupling_and_gets_the_exact_path() -> None:
    torch.manual_seed(0)
    assert couples_samples(MinibatchD(), torch.randn(BATCH, 2)) is True
    assert couples_samples(PerSampleD(), torch.randn(BATCH, 2)) is False
    assert couples_samples(PerSampleD(), torch.randn(1, 2)) is None  # one sample cannot show coupling
    g, d, z, probe, row = run_generator_step(MinibatchD, "non_saturating")
    assert probe.fast_path is False
    assert_matches_reference(g, d, z, "non_saturating", row)


class StatefulD(nn.Module):
    """Per sample, but its forward pass draws random numbers (dropout) and updates a buffer."""

    calls: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x).squeeze(-1)


def test_detection_leaves_no_trace_on_random_streams_or_buffers() -> None:
    torch.manual_seed(0)
    d = StatefulD()
    x = torch.randn(BATCH, 2)
    rng = torch.get_rng_state()
    assert couples_samples(d, x) is False
    assert torch.equal(torch.get_rng_state(), rng)
    assert float(d.calls) == 0
    assert all(p.grad is None for p in d.parameters())
    # Batch norm in training mode is known to couple without a forward pass, even from a batch of one.
    assert couples_samples(BatchNormD(), torch.randn(1, 2)) is True
    assert couples_samples(BatchNormD().eval(), torch.randn(BATCH, 2)) is False  # running statistics: per sample


def test_the_generator_gradient_adds_into_grad_like_backward() -> None:
    torch.manual_seed(0)
    g, d = generator(), PerSampleD()
    z = torch.randn(BATCH, LATENT)
    for p in g.parameters():
        p.grad = torch.ones_like(p)
    GanProbe(g, d).generator_backward(g(z), log=False, hist=False)
    for p, want in zip(g.parameters(), reference_generator_grads(g, d, z, "non_saturating"), strict=True):
        torch.testing.assert_close(p.grad, want + 1.0)


def test_dldh_and_fake_statistics_agree_with_spec() -> None:
    _, d, z, _, row = run_generator_step(PerSampleD, "saturating")
    p = row["d/fake_prob"]
    assert row["dldh/saturating"] == pytest.approx(p, rel=1e-5)
    assert row["dldh/non_saturating"] == pytest.approx(1.0 - p, rel=1e-5)
    torch.manual_seed(0)
    g = generator()  # the same initial weights as the probe's run
    h = d(g(z)).detach()
    assert p == pytest.approx(float(torch.sigmoid(h).mean()), rel=1e-6)
    assert row["d/fake_logit"] == pytest.approx(float(h.mean()), rel=1e-5, abs=1e-7)
    assert row["loss/g"] == pytest.approx(float(g_loss_per_sample("saturating", h).mean()), rel=1e-6)


@pytest.mark.parametrize("g_loss", ["non_saturating", "wasserstein"])
def test_discriminator_backward_leaves_the_d_loss_gradient_in_d_and_none_in_g(g_loss: str) -> None:
    torch.manual_seed(0)
    g, d = generator(), PerSampleD()
    real, z = torch.randn(BATCH, 2), torch.randn(BATCH, LATENT)
    rng = torch.Generator().manual_seed(7)
    probe = GanProbe(g, d, g_loss=g_loss, generator_rng=rng, telemetry_budget=1.0)  # type: ignore[arg-type]
    fake = g(z)  # still attached: the probe must not let D's loss reach G
    loss = probe.discriminator_backward(real, fake, log=True)
    assert all(p.grad is None for p in g.parameters())

    h_real, h_fake = d(real), d(fake.detach())
    terms = d_loss_terms(g_loss, h_real, h_fake)  # type: ignore[arg-type]
    want = terms[0] + terms[1]
    if g_loss == "wasserstein":  # the penalty's interpolation weights come from generator_rng
        want = want + 10.0 * gradient_penalty(d, real, fake.detach(), torch.Generator().manual_seed(7))
    expected = torch.autograd.grad(want, tuple(d.parameters()))
    for p, e in zip(d.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-6)

    row = as_dict(probe.take_row())
    assert row["loss/d"] == pytest.approx(float(want.detach()), rel=1e-6)
    assert row["loss/d_real"] == pytest.approx(float(terms[0]), rel=1e-6)
    assert row["loss/d_fake"] == pytest.approx(float(terms[1]), rel=1e-6)
    assert row["d/real_prob"] == pytest.approx(float(torch.sigmoid(h_real).mean()), rel=1e-6)
    assert row["d/real_logit"] == pytest.approx(float(h_real.mean()), rel=1e-5, abs=1e-7)
    assert row["grad/d_norm"] == pytest.approx(norm(expected), rel=1e-5)
    for (name, _), e in zip(d.named_parameters(), expected, strict=True):
        assert row[f"grad/d_layer/{name}"] == pytest.approx(float(e.norm()), rel=1e-5)

    for p in d.parameters():
        p.grad = None
    probe.generator_backward(g(z), log=True, hist=False)
    assert all(p.grad is None for p in d.parameters())
    assert set(probe.take_row().keys()) == set(probe.keys) - set(row)  # the G step records exactly the rest


def test_a_full_step_reports_every_spec_key_once() -> None:
    torch.manual_seed(0)
    g, d = generator(), PerSampleD()
    probe = GanProbe(g, d, telemetry_budget=1.0)
    fake = g(torch.randn(BATCH, LATENT))
    probe.discriminator_backward(torch.randn(BATCH, 2), fake)
    probe.generator_backward(fake)
    keys = probe.take_row().keys()
    layers = {f"grad/g_layer/{n}" for n, _ in g.named_parameters()} | {f"grad/d_layer/{n}" for n, _ in
                                                                       d.named_parameters()}
    assert len(keys) == len(set(keys)) and set(keys) == set(GAN_KEYS) | layers


def test_apply_control_flips_the_loss_and_sets_learning_rates() -> None:
    torch.manual_seed(0)
    g, d = generator(), PerSampleD()
    params = list(g.parameters())
    opt_g = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-3)
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-3)
    probe = GanProbe(g, d, g_loss="saturating", opt_g=opt_g, opt_d=opt_d, telemetry_budget=1.0)
    assert probe.controls() == ["g_loss", "lr_g", "lr_d"]
    fake = g(torch.randn(BATCH, LATENT))
    probe.discriminator_backward(torch.randn(BATCH, 2), fake)
    opt_d.step()
    probe.generator_backward(fake)
    opt_g.step()
    assert opt_g.state and opt_d.state
    probe.apply_control({"g_loss": "saturating"})  # not a flip: statistics kept
    assert opt_g.state
    probe.apply_control({"g_loss": "non_saturating", "lr_g": 5e-4, "lr_d": 2e-4})
    assert probe.g_loss == "non_saturating"
    assert not opt_g.state and opt_d.state  # D's objective did not change
    assert [group["lr"] for group in opt_g.param_groups] == [5e-4, 5e-4]
    assert [group["lr"] for group in opt_d.param_groups] == [2e-4]
    with pytest.raises(ValueError, match="lr_g"):
        probe.apply_control({"g_loss": "saturating", "lr_g": -1.0})
    assert probe.g_loss == "non_saturating"  # a refused change applies nothing
    with pytest.raises(ValueError, match="g_loss"):
        probe.apply_control({"g_loss": "bogus"})
    with pytest.raises(ValueError, match="momentum"):
        probe.apply_control({"momentum": 0.9})


def test_a_detached_fake_batch_is_a_clear_error() -> None:
    g = generator()
    with pytest.raises(ValueError, match="attached"):
        GanProbe(g, PerSampleD()).generator_backward(g(torch.randn(BATCH, LATENT)).detach())


def test_a_probe_without_optimisers_offers_only_the_loss_flip() -> None:
    probe = GanProbe(generator(), PerSampleD(), g_loss="hinge", telemetry_budget=1.0)
    assert probe.controls() == ["g_loss"]
    with pytest.raises(ValueError, match="lr_g"):
        probe.apply_control({"lr_g": 1e-3})
    with pytest.raises(ValueError, match="lr_d"):
        probe.apply_control({"lr_d": 1e-3})
    probe.apply_control({"g_loss": "saturating"})
    assert probe.g_loss == "saturating"


def test_an_untaken_completed_step_goes_to_on_unclaimed_row_or_is_dropped() -> None:
    torch.manual_seed(0)
    g, d = generator(), PerSampleD()
    real, z = torch.randn(BATCH, 2), torch.randn(BATCH, LATENT)
    probe = GanProbe(g, d, log_every=2, hist_every=2, telemetry_budget=1.0)
    unclaimed: list[tuple[StepRow, Tensor | None]] = []
    probe.on_unclaimed_row = lambda row: unclaimed.append((row, probe.take_hist()))

    def step() -> tuple[Tensor, Tensor]:
        fake = g(z)
        return probe.discriminator_backward(real, fake), probe.generator_backward(fake)

    step()  # step 1: not logged (log_every=2), so nothing to claim
    step()
    assert not unclaimed
    step()  # step 3 begins while logged step 2 is untaken: the hook gets step 2 and its histogram
    ((row, hist),) = unclaimed
    values = as_dict(row)
    assert set(GAN_KEYS) <= set(values)
    assert hist is not None and hist.numel() > 0
    assert probe.calls == 3
    assert probe.take_row().empty  # step 3 was not logged

    probe.on_unclaimed_row = None
    step()  # step 4: logged, left untaken, dropped when step 5 begins
    step()
    _, loss_g = step()  # step 6: logged
    assert as_dict(probe.take_row())["loss/g"] == pytest.approx(float(loss_g), rel=1e-6)
    assert len(unclaimed) == 1


def test_an_unclaimed_row_is_dropped_without_a_hook() -> None:
    torch.manual_seed(0)
    g, d = generator(), PerSampleD()
    probe = GanProbe(g, d, telemetry_budget=1.0)
    losses = []
    for _ in range(2):
        fake = g(torch.randn(BATCH, LATENT))
        probe.discriminator_backward(torch.randn(BATCH, 2), fake)
        losses.append(float(probe.generator_backward(fake)))
    row = as_dict(probe.take_row())
    assert row["loss/g"] == pytest.approx(losses[1], rel=1e-6)  # the second step's row only


def test_the_probes_own_counters_decide_logging_and_histograms() -> None:
    torch.manual_seed(0)
    g, d = generator(), PerSampleD()
    probe = GanProbe(g, d, log_every=3, hist_every=2, telemetry_budget=1.0)
    logged, hists = [], []
    for _ in range(6):
        fake = g(torch.randn(BATCH, LATENT))
        probe.discriminator_backward(torch.randn(BATCH, 2), fake)
        probe.generator_backward(fake)
        logged.append(not probe.take_row().empty)
        hists.append(probe.take_hist() is not None)
    assert logged == [False, False, True, False, False, True]
    assert hists == [False, True, False, True, False, True]


# -- VAE ----------------------------------------------------------------------------------------------


class TinyVae(nn.Module):
    def __init__(self, data: int = 6, latent: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(data, 16), nn.Tanh(), nn.Linear(16, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, 16), nn.Tanh(), nn.Linear(16, data))


def vae_step(vae: TinyVae, x: Tensor, eps: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    mu, logvar = vae.encoder(x).chunk(2, dim=-1)
    z = mu + eps * (0.5 * logvar).exp()
    out = vae.decoder(z)
    nll = 0.5 * ((out - x) ** 2).sum(-1)  # (mc, B)
    return nll, mu, logvar, z, out


@pytest.mark.parametrize("with_eps", [False, True])
def test_vae_probe_reports_every_key_against_a_manual_computation(with_eps: bool) -> None:
    torch.manual_seed(0)
    vae, beta = TinyVae(), 0.5
    x, eps = torch.randn(16, 6), torch.randn(2, 16, 3)
    probe = VaeProbe(vae.encoder, vae.decoder, beta=beta, telemetry_budget=1.0)
    nll, mu, logvar, z, _ = vae_step(vae, x, eps, beta)
    loss = probe.backward(nll, mu, logvar, z, eps=eps if with_eps else None)
    row = as_dict(probe.take_row())
    assert set(row) == set(VAE_KEYS) | {"kl/dim/0", "kl/dim/1", "kl/dim/2"}

    mu, logvar = mu.detach(), logvar.detach()
    kl_dims = (0.5 * (logvar.exp() + mu**2 - 1.0 - logvar)).mean(0)
    recon = float(nll.mean())
    kl = float(kl_dims.sum())
    assert float(loss) == pytest.approx(recon + beta * kl, rel=1e-6)
    assert row["loss/elbo"] == pytest.approx(-(recon + beta * kl), rel=1e-6)
    assert row["loss/recon"] == pytest.approx(recon, rel=1e-6)
    assert row["loss/kl"] == pytest.approx(kl, rel=1e-6)
    for i in range(3):
        assert row[f"kl/dim/{i}"] == pytest.approx(float(kl_dims[i]), rel=1e-5)
    log_q = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z.detach()).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z.detach()).sum(-1)
    assert row["kl/mc"] == pytest.approx(float((log_q - log_p).mean()), rel=1e-4, abs=1e-5)
    assert row["vae/active_units"] == float(active_units(mu))

    torch.manual_seed(0)
    ref = TinyVae()
    nll_r, mu_r, logvar_r, _, _ = vae_step(ref, x, eps, beta)
    want = nll_r.mean() + beta * gaussian_kl(mu_r, logvar_r).mean(0).sum()
    enc = torch.autograd.grad(want, tuple(ref.encoder.parameters()), retain_graph=True)
    dec = torch.autograd.grad(want, tuple(ref.decoder.parameters()))
    assert row["grad/enc_norm"] == pytest.approx(norm(enc), rel=1e-5)
    assert row["grad/dec_norm"] == pytest.approx(norm(dec), rel=1e-5)
    for p, e in zip(vae.encoder.parameters(), enc, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


def test_vae_monte_carlo_kl_approaches_the_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=gen)
    logvar = 0.5 * torch.randn(4, 3, generator=gen)
    mu.requires_grad_(True)
    z = mu.detach() + torch.randn(20_000, 4, 3, generator=gen) * (0.5 * logvar).exp()
    probe = VaeProbe(nn.Linear(1, 1), nn.Linear(1, 1))
    nll = (mu**2).sum(-1)  # any differentiable term: the encoder and decoder receive no gradient here
    probe.backward(nll, mu, logvar, z)
    row = as_dict(probe.take_row())
    assert row["kl/mc"] == pytest.approx(row["loss/kl"], rel=0.02)


def test_vae_probe_without_z_leaves_out_kl_mc_and_refuses_controls() -> None:
    torch.manual_seed(0)
    vae = TinyVae()
    probe = VaeProbe(vae.encoder, vae.decoder, log_every=2, telemetry_budget=1.0)
    for step in (1, 2):
        nll, mu, logvar, _, _ = vae_step(vae, torch.randn(8, 6), torch.randn(8, 3), 1.0)
        probe.backward(nll, mu, logvar)
        row = probe.take_row()
        if step == 1:
            assert row.empty
    keys = row.keys()
    assert "kl/mc" not in keys and "loss/elbo" in keys
    assert probe.controls() == []
    probe.apply_control({})
    with pytest.raises(ValueError, match="lr"):
        probe.apply_control({"lr": 1e-3})


# -- named rows and the buffer --------------------------------------------------------------------------


def test_step_row_names_values_and_the_later_segment_wins() -> None:
    row = StepRow()
    row.add(("x", "y"), torch.tensor([1.0, 2.0]))
    row.add(("y", "z"), torch.tensor([3.0, 4.0]))
    row.add_scalar("lr", 0.5)
    row.add_scalar("t", torch.tensor(7.0))
    assert row.keys() == ("x", "y", "z", "lr", "t")
    assert row.values().tolist() == [1.0, 3.0, 4.0, 0.5, 7.0]
    row.add(("x", "y"), torch.tensor([5.0, 6.0]))  # the same names again: replaces, and is now the later segment
    assert row.keys() == ("z", "lr", "t", "x", "y")
    assert row.values().tolist() == [4.0, 0.5, 7.0, 5.0, 6.0]
    with pytest.raises(ValueError):
        row.add(("a",), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        row.add_scalar("a", torch.tensor([1.0, 2.0]))


def test_rows_with_different_keys_flush_into_groups_in_order_with_one_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = MetricBuffer(flush_steps=100, flush_ms=60_000)
    for step in range(1, 6):
        row = StepRow()
        if step == 2:
            row.add_scalar("a", float(step))  # a host float this time: a different layout, the same keys
            row.add_scalar("b", torch.tensor(-float(step)))
        else:
            row.add(("a", "b"), torch.tensor([float(step), -float(step)]))
        if step == 3:
            row.add_scalar("val/acc", 0.1 + step)  # logged now and then by a user
            row.add_scalar("val/loss", torch.tensor(0.25))
        buf.append(step, row)
    buf.append(6, StepRow())  # an unlogged step's empty row is nothing to report
    buf.append_hist(4, torch.arange(5.0))
    copies = 0
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        nonlocal copies
        copies += 1
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    groups, hists = buf.flush()
    assert copies == 1
    # The two key sets share "a" and "b" and interleave: cut into runs, every key's steps go out in order.
    assert [g.keys for g in groups] == [("a", "b"), ("a", "b", "val/acc", "val/loss"), ("a", "b")]
    first, second, third = groups
    assert first.steps == [1, 2] and third.steps == [4, 5]
    np.testing.assert_array_equal(np.concatenate([first.table, third.table]), [[1, -1], [2, -2], [4, -4], [5, -5]])
    assert second.steps == [3]
    assert second.table.tolist() == [[3.0, -3.0, 3.1, 0.25]]  # the host float keeps its full precision
    times = first.times + second.times + third.times
    assert len(times) == 5 and times == sorted(times)
    ((step, packed),) = hists
    assert step == 4 and packed.tolist() == [0, 1, 2, 3, 4]
    assert buf.flush() == ([], []) and not buf.due()


def test_a_buffered_row_keeps_its_values_when_the_logged_tensor_changes_later() -> None:
    total = torch.zeros(())
    buf = MetricBuffer(flush_steps=100, flush_ms=60_000)
    for step in (1, 2):
        total += 1.0  # a running tensor a user logs and then updates in place
        row = StepRow()
        row.add_scalar("total", total)
        row.add_scalar("pi", math.pi)
        assert row.values().dtype == torch.float32 and row.values().tolist() == pytest.approx([step, math.pi])
        buf.append(step, row)
    ((_, _, _, table),), _ = buf.flush()
    assert table.tolist() == [[1.0, math.pi], [2.0, math.pi]]
