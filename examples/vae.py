"""A VAE on scikit-learn's 8×8 digits — plain PyTorch, streamed into gradwatch by the lines marked ``# gradwatch``.

    python examples/vae.py --steps 3000
    python examples/vae.py --beta 8 --latent 8      # watch posterior collapse: active units drop

The ELBO's terms, the KL per latent dimension, a Monte-Carlo check of the closed-form KL, the active units
(Burda et al. 2016) and the encoder's and decoder's gradient norms all arrive under SPEC §2's names.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import gradwatch  # gradwatch


class Encoder(nn.Module):
    def __init__(self, latent: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.mu = nn.Linear(width, latent)
        self.logvar = nn.Linear(width, latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mu(h), self.logvar(h)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--latent", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sample-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default=None)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    x_all = torch.tensor(load_digits().data, dtype=torch.float32, device=device) / 16.0  # grey levels in [0, 1]
    encoder = Encoder(args.latent, args.width).to(device)
    decoder = nn.Sequential(nn.Linear(args.latent, args.width), nn.ReLU(), nn.Linear(args.width, args.width),
                            nn.ReLU(), nn.Linear(args.width, 64)).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=args.lr)
    fixed = torch.randn(64, args.latent, device=device)

    with gradwatch.init(name=args.name or f"vae on digits, beta={args.beta:g}", config=vars(args)) as run:  # gradwatch
        vae = run.watch_vae(encoder, decoder, beta=args.beta, opt=opt)  # gradwatch
        for step in range(1, args.steps + 1):
            x = x_all[torch.randint(len(x_all), (args.batch_size,), device=device)]
            mu, logvar = encoder(x)
            eps = torch.randn_like(mu)
            z = mu + eps * (0.5 * logvar).exp()  # the reparameterisation trick
            nll = F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(1)  # −log p(x|z)

            opt.zero_grad()
            # Without gradwatch: (nll.mean() + args.beta * kl).backward(), kl = ½ Σ (σ² + μ² − 1 − log σ²)
            vae.backward(nll, mu, logvar, z, eps=eps)  # gradwatch
            opt.step()

            if step % args.sample_every == 0 or step == args.steps:
                with torch.no_grad():
                    run.log_images(torch.sigmoid(decoder(fixed)).view(-1, 1, 8, 8), step=step)  # gradwatch
                run.save_checkpoint({"encoder": encoder.state_dict(), "decoder": decoder.state_dict()},  # gradwatch
                                    step=step)
            if run.stop_requested:  # gradwatch
                break


if __name__ == "__main__":
    main()
