"""Offline reproduction of Arjovsky & Bottou (2017), fig. 2, on the ring8 data.

The paper freezes a generator, trains a discriminator against it to optimality
and watches the generator gradient of the saturating (minimax) loss vanish by
orders of magnitude. This module does the same with gradwatch's own models and
losses, so the dashboard's headline claim has a reproducible, numbers-only
reference that needs neither the server nor a browser:

    python -m trainer.saturation_study --steps 5000 --every 500

The generator is *freshly initialised* and never trained. That is the cleanest
setting: its samples form a blob that overlaps no mode of the ring, so the
supports are (nearly) disjoint and a discriminator can become as good as it
likes — exactly the hypothesis of the paper's theorem. A briefly trained G only
delays the collapse by making D's job harder; it does not change its nature.

What is recorded, on one fixed noise batch, every ``record_every`` D steps:

* ``fake_prob``: mean D(G(z)) = mean σ(h);
* the global L2 norm of ∇θ of the *mean* generator loss for both losses, at the
  same G parameters and the same batch (what gradwatch calls the applied and
  the shadow gradient);
* ``ratio_max_rel_err``: for every fake sample, (∂L_sat/∂h) / (∂L_ns/∂h) must
  equal σ(h)/(1−σ(h)) = D/(1−D) = exp(h). It is checked in float64 on the
  logits, against ``exp(h)`` (the form that is exact for any h, whereas
  ``1 − D`` cancels catastrophically once D → 1).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.config import DataConfig, ModelConfig
from trainer.data import load_dataset
from trainer.losses import d_loss_terms, dloss_dh, g_loss_per_sample
from trainer.models import build_gan


@dataclass(frozen=True)
class StudyRow:
    """One record of the study, taken after ``d_step`` discriminator updates."""

    d_step: int
    fake_prob: float
    g_norm_saturating: float
    g_norm_non_saturating: float
    ratio_max_rel_err: float

    @property
    def norm_ratio(self) -> float:
        """‖∇θ L_sat‖ / ‖∇θ L_ns‖: ≈ mean D(G(z)) once D wins (see docs/saturation-study.md)."""
        if self.g_norm_non_saturating == 0.0:
            return math.nan
        return self.g_norm_saturating / self.g_norm_non_saturating


def _global_norm(grads: Iterable[Tensor]) -> float:
    # Norm of the concatenation of all parameter gradients: the quantity the dashboard calls grad/g_norm.
    return math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads))


def _g_grad_norm(name: str, h: Tensor, params: Sequence[nn.Parameter]) -> float:
    loss = g_loss_per_sample(name, h).mean()  # type: ignore[arg-type]
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return _global_norm(grads)


def _ratio_max_rel_err(h: Tensor) -> float:
    """Worst relative error of (∂L_sat/∂h) / (∂L_ns/∂h) against exp(h) over the batch, in float64."""
    # Float64 because in float32 the ratio is only good to ~1e-7, too coarse to tell a maths slip from rounding.
    # Caveat: F.softplus is the identity above 20, so for any h < -20 the non-saturating slope is exactly -1 and
    # the error floor rises to e^h < 2e-9 (in the 5000-step study it stays at ~1e-16).
    h64 = h.detach().double()
    ratio = dloss_dh("saturating", h64) / dloss_dh("non_saturating", h64)
    expected = torch.exp(h64)  # = σ(h) / (1 − σ(h)) = D / (1 − D)
    return float(((ratio - expected).abs() / expected).max())


def _record(d_step: int, gen: nn.Module, disc: nn.Module, z_fixed: Tensor, params: Sequence[nn.Parameter]) -> StudyRow:
    with torch.enable_grad():
        h = disc(gen(z_fixed))
        return StudyRow(
            d_step=d_step,
            fake_prob=float(torch.sigmoid(h.detach()).mean()),
            g_norm_saturating=_g_grad_norm("saturating", h, params),
            g_norm_non_saturating=_g_grad_norm("non_saturating", h, params),
            ratio_max_rel_err=_ratio_max_rel_err(h),
        )


def run_study(
    *,
    d_steps: int = 5000,
    record_every: int = 500,
    seed: int = 0,
    width: int = 128,
    depth: int = 4,
    latent_dim: int = 16,
    batch_size: int = 256,
    lr_d: float = 1e-3,
    betas: tuple[float, float] = (0.5, 0.999),
    device: str = "cpu",
    num_threads: int | None = 1,
) -> list[StudyRow]:
    """Train a fresh D against a frozen, freshly initialised G; record both generator gradients.

    Deterministic for a given seed and device: weights are drawn inside a forked
    global RNG (so calling this leaves the caller's random state untouched),
    data and noise from their own seeded generators. Rows are taken at D step 0
    (before any training) and then every ``record_every`` steps, plus the final
    step if it is not a multiple.

    ``num_threads`` (default 1) caps PyTorch's intra-op threads for the
    duration of the call and restores them after: these 128-wide layers are
    too small to gain from threads, and on a shared CPU extra threads spin
    against other processes (measured: 9× slower wall time with 2 threads on
    a busy 2-core machine). ``None`` leaves the setting alone.
    """
    if d_steps < 0 or record_every < 1:
        raise ValueError("d_steps must be >= 0 and record_every >= 1")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run(d_steps, record_every, seed, width, depth, latent_dim, batch_size, lr_d, betas, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    d_steps: int,
    record_every: int,
    seed: int,
    width: int,
    depth: int,
    latent_dim: int,
    batch_size: int,
    lr_d: float,
    betas: tuple[float, float],
    device: str,
) -> list[StudyRow]:
    dev = torch.device(device)
    model_cfg = ModelConfig(arch="mlp", width=width, depth=depth, latent_dim=latent_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # build_gan also makes a D; we use it as the "fresh D": both are at initialisation.
        gen, disc = build_gan(model_cfg, (2,))
    gen.to(dev).eval()
    disc.to(dev).train()

    data = load_dataset(DataConfig.model_validate({"name": "ring8"}), dev)
    data_rng = torch.Generator(device=dev).manual_seed(seed + 1)
    noise_rng = torch.Generator(device=dev).manual_seed(seed + 2)
    # One fixed batch for every record, so the curve shows D changing, not the sample.
    z_fixed = torch.randn(
        batch_size, latent_dim, device=dev, generator=torch.Generator(device=dev).manual_seed(seed + 3)
    )

    g_params = list(gen.parameters())
    opt = torch.optim.Adam(disc.parameters(), lr=lr_d, betas=betas)

    rows = [_record(0, gen, disc, z_fixed, g_params)]
    for step in range(1, d_steps + 1):
        real = data.sample(batch_size, data_rng)
        with torch.no_grad():  # G is frozen: no graph through it for D's update.
            fake = gen(torch.randn(batch_size, latent_dim, device=dev, generator=noise_rng))
        loss_real, loss_fake = d_loss_terms("saturating", disc(real), disc(fake))
        opt.zero_grad(set_to_none=True)
        (loss_real + loss_fake).backward()
        opt.step()
        if step % record_every == 0 or step == d_steps:
            rows.append(_record(step, gen, disc, z_fixed, g_params))
    return rows


def markdown_table(rows: Sequence[StudyRow]) -> str:
    """The rows as a GitHub-flavoured Markdown table (what docs/saturation-study.md embeds)."""
    lines = [
        "| D step | mean D(G(z)) | ‖∇θ L_sat‖ | ‖∇θ L_ns‖ | sat / ns | max rel. err of ratio vs D/(1−D) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.d_step} | {r.fake_prob:.3e} | {r.g_norm_saturating:.3e} | {r.g_norm_non_saturating:.3e} "
            f"| {r.norm_ratio:.3e} | {r.ratio_max_rel_err:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.saturation_study",
        description="Reproduce Arjovsky & Bottou (2017) fig. 2: the saturating generator gradient vanishes "
        "as a discriminator trained against a frozen generator wins.",
    )
    parser.add_argument("--steps", type=int, default=5000, help="discriminator steps (default 5000)")
    parser.add_argument("--every", type=int, default=500, help="record every N D steps (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr-d", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads (default 1; see run_study)")
    args = parser.parse_args(argv)
    rows = run_study(
        d_steps=args.steps,
        record_every=args.every,
        seed=args.seed,
        width=args.width,
        depth=args.depth,
        latent_dim=args.latent_dim,
        batch_size=args.batch_size,
        lr_d=args.lr_d,
        device=args.device,
        num_threads=args.threads,
    )
    sys.stdout.write(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
