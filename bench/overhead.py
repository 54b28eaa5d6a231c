"""Steps/s of a bare PyTorch loop vs gradwatch's instrumented loop, interleaved.

Both loops train the same models on the same data with the same batch size and
seed. Rounds alternate A, B, A, B, ... so that noise from a shared machine hits
both alike; the figure reported is the ratio of median steps/s.

    python -m bench.overhead [--rounds 5] [--steps 200] [--device cpu]

The instrumented loop logs every SPEC §2 key every step (``log_every=1``) and
writes each frame as a JSON line, as ``gradwatch train`` does.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import torch.nn.functional as F

from trainer.config import RunConfig
from trainer.data import load_dataset
from trainer.loop import RunOptions, Trainer, make_trainer, resolve_device
from trainer.models import build_gan, build_vae
from trainer.presets import get_preset
from trainer.telemetry import frame_to_json

CASES = {
    "ring8 MLP GAN": "ring8-non-saturating",
    "digits conv GAN": "digits-gan",
    "digits MLP VAE": "digits-vae",
}


def _quiet(cfg: RunConfig, device: str) -> RunConfig:
    """Telemetry every step; no samples, evaluations or checkpoints inside the timed window."""
    return cfg.with_overrides({
        "train.device": device, "train.steps": 10_000_000, "intervals.log_every": 1,
        "intervals.sample_every": 1_000_000, "intervals.eval_every": 1_000_000,
        "intervals.checkpoint_every": 10_000_000,
    })


def bare_loop(cfg: RunConfig) -> Callable[[int], None]:
    """A plain PyTorch loop, as a user would write it without any tracker."""
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.data, device)
    data_gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
    torch.manual_seed(cfg.train.seed)
    batch, latent = cfg.train.batch_size, cfg.model.latent_dim
    if cfg.kind == "vae":
        vae = build_vae(cfg.model, data.shape).to(device)
        opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae.lr)

        def vae_steps(n: int) -> None:
            for _ in range(n):
                x = data.sample(batch, data_gen)
                mu, logvar = vae.encode(x)
                z = mu + torch.randn(mu.shape, device=device, generator=noise_gen) * (0.5 * logvar).exp()
                logits = vae.decode(z)
                recon = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="none").flatten(1).sum(1)
                kl = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum(1)
                loss = (recon + cfg.vae.beta * kl).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return vae_steps

    g, d = build_gan(cfg.model, data.shape)
    g.to(device)
    d.to(device)
    betas = (cfg.gan.beta1, cfg.gan.beta2)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.gan.lr_g, betas=betas)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.gan.lr_d, betas=betas)

    def gan_steps(n: int) -> None:
        for _ in range(n):
            real = data.sample(batch, data_gen)
            fake = g(torch.randn(batch, latent, device=device, generator=noise_gen))
            loss_d = F.softplus(-d(real)).mean() + F.softplus(d(fake.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            loss_g = F.softplus(-d(fake)).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()

    return gan_steps


def instrumented_loop(cfg: RunConfig, out_dir: Path) -> Callable[[int], None]:
    """gradwatch's hot path: ``train_step`` with every key logged, flushed as the run loop does."""
    sink = io.StringIO()

    def write(frame: dict) -> None:
        sink.write(frame_to_json(frame) + "\n")
        if sink.tell() > 1 << 24:  # keep memory flat over long benchmarks
            sink.seek(0)
            sink.truncate()

    trainer: Trainer = make_trainer(cfg, RunOptions(out_dir=out_dir, sink=write))

    def steps(n: int) -> None:
        for _ in range(n):
            trainer.step += 1
            trainer.train_step(trainer.step, log=True)
            if trainer.buffer.due():
                trainer.flush()
        trainer.flush()

    return steps


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(case: str, preset: str, *, rounds: int, steps: int, device: str, out_dir: Path) -> dict[str, object]:
    cfg = _quiet(get_preset(preset), device)
    loops = {"bare": bare_loop(cfg), "gradwatch": instrumented_loop(cfg, out_dir / preset)}
    for run in loops.values():  # warm-up: allocator, kernels, first Adam state
        run(20)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, run in loops.items():
            _sync(device)
            start = time.perf_counter()
            run(steps)
            _sync(device)
            rates[name].append(steps / (time.perf_counter() - start))
    bare, ours = statistics.median(rates["bare"]), statistics.median(rates["gradwatch"])
    return {"case": case, "bare_steps_per_s": bare, "gradwatch_steps_per_s": ours, "ratio": ours / bare,
            "rounds": rates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/overhead.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    with TemporaryDirectory() as tmp:
        for case, preset in CASES.items():
            results.append(measure(case, preset, rounds=args.rounds, steps=args.steps, device=args.device,
                                   out_dir=Path(tmp)))
            r = results[-1]
            sys.stdout.write(f"{case:18s} bare {r['bare_steps_per_s']:8.1f} steps/s   "
                             f"gradwatch {r['gradwatch_steps_per_s']:8.1f} steps/s   ratio {r['ratio']:.3f}\n")
            sys.stdout.flush()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "torch": torch.__version__, "threads": args.threads, "steps": args.steps,
            "rounds": args.rounds}
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
