"""The demo runs that ship with gradwatch, by name (SPEC §4 ``GET /api/presets``).

Each preset is a complete :class:`~trainer.config.RunConfig`.
``ring8-saturating`` is built to show the saturation: D trains alone for 500
steps so that D(G(z)) → 0, and G uses plain SGD with momentum, so a vanishing
gradient really stalls it. (Adam divides each step by the gradient's running
RMS and would move G at full speed on a gradient of 1e-5: the norm would still
collapse on the chart, but G would escape on its own.) Its non-saturating twin
(same config, ``gan.g_loss`` flipped) recovers within a few dozen steps.

``ring8-non-saturating`` is the configuration that learns the ring well:
Adam for both networks, a 2-D latent, 3000 steps.
"""

from __future__ import annotations

from typing import Any

from trainer.config import RunConfig

_RING: dict[str, Any] = {
    "kind": "gan",
    "data": {"name": "ring8", "scale": 2.0},
    "model": {"arch": "mlp", "width": 128, "depth": 3, "latent_dim": 2},
    "gan": {"lr_g": 1e-3, "lr_d": 1e-3, "beta1": 0.5, "beta2": 0.999},
    "train": {"steps": 3000, "batch_size": 256},
    "intervals": {"hist_every": 25, "sample_every": 250, "eval_every": 500, "checkpoint_every": 1000},
}

_PRESETS: dict[str, dict[str, Any]] = {
    "ring8-saturating": {
        **_RING,
        "name": "Ring of 8, saturating loss after a D head start (G on SGD)",
        "gan": {**_RING["gan"], "g_loss": "saturating", "d_head_start": 500, "g_optimizer": "sgd", "lr_g": 0.01,
                "momentum": 0.9},
    },
    "ring8-non-saturating": {
        **_RING,
        "name": "Ring of 8, non-saturating loss",
        "gan": {**_RING["gan"], "g_loss": "non_saturating"},
    },
    "digits-gan": {
        "name": "Digits GAN (8×8 handwriting, DCGAN)",
        "kind": "gan",
        "data": {"name": "digits"},
        "model": {"arch": "conv", "width": 32, "latent_dim": 32},
        "gan": {"g_loss": "non_saturating", "lr_g": 2e-4, "lr_d": 2e-4, "beta1": 0.5},
        "train": {"steps": 3000, "batch_size": 128},
        "intervals": {"hist_every": 50, "sample_every": 250, "eval_every": 500, "checkpoint_every": 1000},
    },
    "digits-vae": {
        "name": "Digits VAE (8×8 handwriting)",
        "kind": "vae",
        "data": {"name": "digits"},
        "model": {"arch": "mlp", "width": 256, "depth": 2, "latent_dim": 8},
        "vae": {"beta": 1.0, "mc_samples": 1, "lr": 1e-3},
        "train": {"steps": 2000, "batch_size": 128},
        "intervals": {"sample_every": 250, "eval_every": 500, "checkpoint_every": 1000},
    },
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str) -> RunConfig:
    """A fresh, validated config for the named preset (KeyError if unknown)."""
    return RunConfig.model_validate(_PRESETS[name])


def all_presets() -> dict[str, RunConfig]:
    return {name: get_preset(name) for name in _PRESETS}
