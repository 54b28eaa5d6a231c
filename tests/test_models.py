"""Network shapes for every data shape the datasets produce."""

from __future__ import annotations

import pytest
import torch

from trainer.config import ModelConfig
from trainer.models import build_gan, build_vae


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_gan_maps_noise_to_images_and_images_to_one_logit(arch: str, shape: tuple[int, ...]) -> None:
    cfg = ModelConfig(arch=arch, width=8, depth=2, latent_dim=5)
    g, d = build_gan(cfg, shape)
    x = g(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (4, *shape)
    assert x.abs().max() <= 1.0  # tanh: the range of the data
    assert d(x).shape == (4,)


def test_two_d_generator_is_unbounded_and_discriminator_has_no_batch_norm() -> None:
    torch.manual_seed(0)
    g, d = build_gan(ModelConfig(width=16, depth=3, latent_dim=2), (2,))
    # Unbounded for any weights: no squashing module, only ReLU between the linear layers...
    assert not g.squash and not any(isinstance(m, torch.nn.Tanh | torch.nn.Sigmoid) for m in g.modules())
    # ...so a ReLU net grows linearly along any ray on which some unit is active (here, the seeded weights).
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    assert g(z * 1000).abs().max() > 10 * g(z).abs().max()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in d.modules())
    linear = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [16, 16, 16, 2]


@pytest.mark.parametrize(
    ("arch", "shape"), [("mlp", (2,)), ("mlp", (1, 8, 8)), ("conv", (1, 8, 8)), ("conv", (1, 28, 28))]
)
def test_vae_encodes_to_mean_and_log_variance_and_decodes_back(arch: str, shape: tuple[int, ...]) -> None:
    vae = build_vae(ModelConfig(arch=arch, width=8, depth=2, latent_dim=3), shape)
    mu, logvar = vae.encode(torch.randn(4, *shape, generator=torch.Generator().manual_seed(0)))
    assert mu.shape == logvar.shape == (4, 3)
    assert vae.decode(mu).shape == (4, *shape)


def test_conv_needs_a_side_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        build_gan(ModelConfig(arch="conv"), (1, 10, 10))
