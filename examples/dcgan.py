"""DCGAN on a folder of images — a plain PyTorch script, streamed into gradwatch by the lines marked ``# gradwatch``.

    python examples/dcgan.py --data ~/pictures/faces --steps 5000
    python examples/dcgan.py --data DIR --g-loss saturating --d-head-start 300   # watch G's gradient vanish

The server comes from $GRADWATCH_URL (and $GRADWATCH_TOKEN), else http://127.0.0.1:8000 if one runs there;
with none the run is kept in ./gradwatch-runs/ for ``gradwatch sync``. Remove the marked lines and it is the
DCGAN of Radford et al. (2016) as PyTorch's examples/dcgan writes it, for 32×32 images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import gradwatch  # gradwatch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_folder(root: Path, size: int, channels: int) -> torch.Tensor:
    """Every image under ``root`` (any depth), resized to size×size, as one (N, C, H, W) tensor in [-1, 1]."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images under {root}")
    mode = "L" if channels == 1 else "RGB"
    images = [np.asarray(Image.open(p).convert(mode).resize((size, size), Image.BILINEAR)) for p in paths]
    x = torch.from_numpy(np.stack(images)).float().div(127.5).sub(1.0)
    return x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)


class Generator(nn.Module):
    def __init__(self, nz: int, ngf: int, nc: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),  # 4×4
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),  # 8
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),  # 16
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),  # 32×32
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """DCGAN's D, with batch norm: it couples the samples of a batch, which gradwatch detects."""

    def __init__(self, ndf: int, nc: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),  # 16×16
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False),  # the logit h: no sigmoid, the losses use softplus
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a folder of images (searched recursively)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--nz", type=int, default=64)
    p.add_argument("--width", type=int, default=32, help="ngf = ndf")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--g-loss", default="non_saturating", choices=("saturating", "non_saturating"))
    p.add_argument("--d-head-start", type=int, default=0, help="train D alone this many steps first")
    p.add_argument("--sample-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", default=None)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    data = load_folder(args.data, 32, args.channels).to(device)
    G = Generator(args.nz, args.width, args.channels).to(device)
    D = Discriminator(args.width, args.channels).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    fixed = torch.randn(64, args.nz, device=device)

    with gradwatch.init(name=args.name or f"dcgan on {args.data.name}", config=vars(args)) as run:  # gradwatch
        gan = run.watch_gan(G, D, g_loss=args.g_loss, opt_g=opt_g, opt_d=opt_d)  # gradwatch
        for step in range(1, args.steps + 1):
            real = data[torch.randint(len(data), (args.batch_size,), device=device)]
            fake = G(torch.randn(args.batch_size, args.nz, device=device))

            opt_d.zero_grad()
            # Without gradwatch: (F.softplus(-D(real)) + F.softplus(D(fake.detach()))).mean().backward()
            gan.discriminator_backward(real, fake.detach())  # gradwatch
            opt_d.step()

            opt_g.zero_grad()
            # Without gradwatch: F.softplus(-D(fake)).mean().backward()  (the non-saturating loss)
            gan.generator_backward(fake)  # gradwatch: the loss in force (gan.g_loss), the other one measured
            if step > args.d_head_start:
                opt_g.step()

            if step % args.sample_every == 0 or step == args.steps:
                G.eval()
                with torch.no_grad():
                    run.log_images(G(fixed), step=step)  # gradwatch
                G.train()
                run.save_checkpoint({"G": G.state_dict(), "D": D.state_dict()}, step=step)  # gradwatch
            run.log({"data/real_mean": real.mean()}, step=step)  # gradwatch (any key of your own)
            if run.stop_requested:  # gradwatch: Stop pressed in the dashboard
                break


if __name__ == "__main__":
    main()
