"""Networks: MLP and DCGAN-style conv generators, discriminators and VAEs.

Shapes are uniform so the loop needs no special cases: a generator maps
z (B, k) → x (B, *data_shape); a discriminator maps x → logits h (B,); a VAE
encodes x → (μ, log σ²), each (B, k), and decodes z → per-pixel logits (images)
or means (2-D points).

Discriminators carry no batch norm: the WGAN-GP penalty is per sample, and
per-sample logits keep ∂loss/∂h a per-sample quantity, which is what the
saturation telemetry measures.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from trainer.config import ModelConfig


def _mlp(sizes: list[int], act: type[nn.Module], **act_kwargs: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(act(**act_kwargs))
    return nn.Sequential(*layers)


def _start_side(side: int) -> int:
    """Spatial side before the two stride-2 up-samplings (8 → 2, 28 → 7, 32 → 8)."""
    if side % 4:
        raise ValueError(f"conv models need an image side divisible by 4, got {side}")
    return side // 4


class MLPGenerator(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        out = math.prod(shape)
        self.net = _mlp([cfg.latent_dim] + [cfg.width] * cfg.depth + [out], nn.ReLU)
        # Images live in [-1, 1]; 2-D points are unbounded.
        self.squash = len(shape) > 1

    def forward(self, z: Tensor) -> Tensor:
        x = self.net(z)
        if self.squash:
            x = torch.tanh(x)
        return x.view(z.shape[0], *self.shape)


class MLPDiscriminator(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...], out: int = 1) -> None:
        super().__init__()
        self.net = _mlp([math.prod(shape)] + [cfg.width] * cfg.depth + [out], nn.LeakyReLU, negative_slope=0.2)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).squeeze(-1)


class ConvGenerator(nn.Module):
    """DCGAN generator: project z, then two stride-2 transposed convolutions."""

    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...], squash: bool = True) -> None:
        super().__init__()
        channels, side = shape[0], shape[-1]
        self.start = _start_side(side)
        w = cfg.width
        self.project = nn.Sequential(
            nn.Linear(cfg.latent_dim, 2 * w * self.start * self.start, bias=False),
            nn.BatchNorm1d(2 * w * self.start * self.start),
            nn.ReLU(),
        )
        self.body = nn.Sequential(
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.ConvTranspose2d(w, channels, 4, 2, 1),
        )
        self.squash = squash
        self.width = w

    def forward(self, z: Tensor) -> Tensor:
        x = self.project(z).view(z.shape[0], 2 * self.width, self.start, self.start)
        x = self.body(x)
        return torch.tanh(x) if self.squash else x


class ConvDiscriminator(nn.Module):
    """DCGAN discriminator without batch norm: two stride-2 convolutions, then a linear head."""

    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...], out: int = 1) -> None:
        super().__init__()
        channels, side = shape[0], shape[-1]
        start = _start_side(side)
        w = cfg.width
        self.net = nn.Sequential(
            nn.Conv2d(channels, w, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * w * start * start, out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


class VAE(nn.Module):
    """Gaussian encoder q(z|x) = N(μ, diag σ²) and a decoder giving logits or means."""

    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.latent_dim = cfg.latent_dim
        if cfg.arch == "conv":
            self.encoder: nn.Module = ConvDiscriminator(cfg, shape, out=2 * cfg.latent_dim)
            self.decoder: nn.Module = ConvGenerator(cfg, shape, squash=False)
        else:
            self.encoder = MLPDiscriminator(cfg, shape, out=2 * cfg.latent_dim)
            self.decoder = _FlatDecoder(cfg, shape)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)


class _FlatDecoder(MLPGenerator):
    """MLP decoder: like the generator, but never squashed (it outputs logits or means)."""

    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...]) -> None:
        super().__init__(cfg, shape)
        self.squash = False


def build_gan(cfg: ModelConfig, shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """Generator and discriminator for data of the given per-sample shape."""
    if cfg.arch == "conv":
        return ConvGenerator(cfg, shape), ConvDiscriminator(cfg, shape)
    return MLPGenerator(cfg, shape), MLPDiscriminator(cfg, shape)


def build_vae(cfg: ModelConfig, shape: tuple[int, ...]) -> VAE:
    return VAE(cfg, shape)
