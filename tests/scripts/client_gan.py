"""A user's own GAN script, written against gradwatch's public API only (SPEC §8), for the live client tests.

It also computes, with plain autograd, the reference norms the tests hold gradwatch's to: the generator gradient
of both losses at the same parameters and batch, just before the probe takes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bn", action="store_true", help="batch norm in D: it couples the samples of a batch")
    p.add_argument("--g-loss", default="non_saturating")
    p.add_argument("--pace", type=float, default=0.0, help="seconds to sleep per step")
    p.add_argument("--ref", help="write the reference norms here (JSON)")
    p.add_argument("--trace", help="append one JSON line per step: g_loss in force, learning rates, time")
    p.add_argument("--raise-at", type=int, default=0)
    p.add_argument("--no-finish", action="store_true", help="exit without finish (no with block)")
    p.add_argument("--mode", default="auto")
    p.add_argument("--out")
    p.add_argument("--name", default="client-gan")
    p.add_argument("--every", type=int, default=20, help="images and checkpoints every N steps")
    p.add_argument("--flush-ms", type=int, default=50, help="huge: frames cut by step count alone (reproducible)")
    p.add_argument("--telemetry-budget", type=float, default=1.0,
                   help="share of step time for telemetry; 1 (here the default): every key every step, as the tests "
                        "compare every step against plain autograd")
    p.add_argument("--no-opt-d", action="store_true", help="do not hand D's optimiser to the probe (no lr_d control)")
    return p.parse_args()


def reference_norms(G: nn.Module, D: nn.Module, fake: torch.Tensor) -> dict[str, float]:
    h = D(fake)
    out = {}
    for name, per_sample in (("saturating", lambda h: -F.softplus(h)), ("non_saturating", lambda h: F.softplus(-h))):
        grads = torch.autograd.grad(per_sample(h).mean(), list(G.parameters()), retain_graph=True)
        out[name] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    return out


def main() -> int:
    args = parse()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    G = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    layers: list[nn.Module] = [nn.Linear(2, 32)]
    if args.bn:
        layers.append(nn.BatchNorm1d(32))
    D = nn.Sequential(*layers, nn.LeakyReLU(0.2), nn.Linear(32, 1))
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(args.seed + 1)
    refs: dict[int, dict[str, float]] = {}
    run = gradwatch.init(name=args.name, config=vars(args), mode=args.mode, out=args.out, flush_ms=args.flush_ms,
                         flush_steps=8, hist_every=10, telemetry_budget=args.telemetry_budget)
    gan = run.watch_gan(G, D, g_loss=args.g_loss, opt_g=opt_g, opt_d=None if args.no_opt_d else opt_d)
    try:
        for step in range(1, args.steps + 1):
            real = torch.randn(64, 2, generator=data) * 0.1 + 1.0
            fake = G(torch.randn(64, 4, generator=data))
            opt_d.zero_grad()
            gan.discriminator_backward(real, fake.detach())
            opt_d.step()
            refs[step] = reference_norms(G, D, fake)
            opt_g.zero_grad()
            gan.generator_backward(fake)
            opt_g.step()
            run.log({"my/metric": fake.mean(), "my/step_squared": float(step * step)}, step=step)
            if args.trace:
                with open(args.trace, "a") as fh:
                    fh.write(json.dumps({"step": step, "time": time.time(), "g_loss": gan.g_loss,
                                         "lr_g": opt_g.param_groups[0]["lr"],
                                         "lr_d": opt_d.param_groups[0]["lr"]}) + "\n")
            if step % args.every == 0:
                run.log_images(fake.detach()[:16].view(16, 1, 1, 2).expand(16, 1, 4, 2), step=step)
                run.save_checkpoint({"G": G.state_dict(), "D": D.state_dict()}, step=step)
            if step == args.raise_at:
                raise RuntimeError(f"the user's script broke at step {step}")
            if run.stop_requested:
                break
            if args.pace:
                time.sleep(args.pace)
    except BaseException:
        if args.ref:
            _write(args.ref, refs, run, gan)
        run.__exit__(*sys.exc_info())
        raise
    if args.ref:
        _write(args.ref, refs, run, gan)
    if args.no_finish:
        return 0  # what was logged still goes up (at exit), but no final status: the run ends interrupted
    run.finish()
    return 0


def _write(path: str, refs: dict[int, dict[str, float]], run: gradwatch.Run, gan: object) -> None:
    with open(path, "w") as fh:
        json.dump({"run": run.id, "url": run.url, "folder": str(run.folder_path),
                   "fast_path": getattr(gan, "fast_path", None), "refs": refs}, fh)


if __name__ == "__main__":
    sys.exit(main())
