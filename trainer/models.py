"""Networks: MLP, DCGAN-style conv and PacGAN generators and discriminators, and VAEs.

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


class _ShapedGenerator(nn.Module):
    """A generator whose ``net`` maps z to a flat sample: tanh-squashed for images (they live in [-1, 1]), left
    unbounded for 2-D points, then shaped like the data."""

    net: nn.Module

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape
        self.squash = len(shape) > 1

    def forward(self, z: Tensor) -> Tensor:
        x = self.net(z)
        if self.squash:
            x = torch.tanh(x)
        return x.view(z.shape[0], *self.shape)


class MLPGenerator(_ShapedGenerator):
    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...]) -> None:
        super().__init__(shape)
        self.net = _mlp([cfg.latent_dim] + [cfg.width] * cfg.depth + [math.prod(shape)], nn.ReLU)


class MLPDiscriminator(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...], out: int = 1) -> None:
        super().__init__()
        self.net = _mlp([math.prod(shape)] + [cfg.width] * cfg.depth + [out], nn.LeakyReLU, negative_slope=0.2)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).squeeze(-1)


#: PacGAN's (Lin et al. 2018, after ALI) batch-norm momentum: the weight of each batch in the running statistics.
PACGAN_BN_MOMENTUM = 0.05
#: Affine pieces per maxout unit in PacGAN's discriminator.
PACGAN_MAXOUT_PIECES = 5
#: Std of the normal initialisation of PacGAN's weights (biases start at 0).
PACGAN_INIT_STD = 0.02


def _pacgan_init(module: nn.Module) -> None:
    """PacGAN's initialisation (from ALI): linear weights ~ N(0, 0.02²), biases 0; batch norm keeps PyTorch's."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=PACGAN_INIT_STD)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class Maxout(nn.Module):
    """A maxout layer (Goodfellow et al. 2013): each of ``units`` outputs is the largest of ``pieces`` affine maps."""

    def __init__(self, fan_in: int, units: int, pieces: int = PACGAN_MAXOUT_PIECES) -> None:
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(fan_in, units * pieces)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).view(x.shape[0], self.units, self.pieces).amax(-1)


class PacGanGenerator(_ShapedGenerator):
    """PacGAN's synthetic-data generator: ``depth`` hidden layers of ``width`` units, each linear (no bias, batch norm
    follows) → batch norm → ReLU, then a linear output. 2,400,400,400,400,2 in the paper (width 400, depth 4).

    Batch norm makes a sample depend on its batch while training; samples and evaluations run in eval mode
    (trainer/loop.py ``evaluating``), on the running statistics, as PacGAN's own evaluation does.
    """

    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...]) -> None:
        super().__init__(shape)
        layers: list[nn.Module] = []
        fan_in = cfg.latent_dim
        for _ in range(cfg.depth):
            layers += [nn.Linear(fan_in, cfg.width, bias=False), nn.BatchNorm1d(cfg.width, momentum=PACGAN_BN_MOMENTUM),
                       nn.ReLU()]
            fan_in = cfg.width
        layers.append(nn.Linear(fan_in, math.prod(shape)))
        self.net = nn.Sequential(*layers)
        _pacgan_init(self)


class PacGanDiscriminator(nn.Module):
    """PacGAN's synthetic-data discriminator (packing degree 1, the plain GAN's): ``depth − 1`` maxout layers (at
    least one) of ``width // 2`` units × 5 pieces, then a linear logit; three of 200 in the paper. No batch norm
    (the module docstring says why)."""

    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...], out: int = 1) -> None:
        super().__init__()
        units = max(1, cfg.width // 2)
        layers: list[nn.Module] = []
        fan_in = math.prod(shape)
        for _ in range(max(1, cfg.depth - 1)):
            layers.append(Maxout(fan_in, units))
            fan_in = units
        layers.append(nn.Linear(fan_in, out))
        self.net = nn.Sequential(*layers)
        _pacgan_init(self)

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
    if cfg.arch == "pacgan":
        return PacGanGenerator(cfg, shape), PacGanDiscriminator(cfg, shape)
    return MLPGenerator(cfg, shape), MLPDiscriminator(cfg, shape)


def build_vae(cfg: ModelConfig, shape: tuple[int, ...]) -> VAE:
    return VAE(cfg, shape)
