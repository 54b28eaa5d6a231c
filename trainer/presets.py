"""The demo runs that ship with gradwatch, by name (SPEC §4 ``GET /api/presets``).

Each preset is a complete :class:`~trainer.config.RunConfig`.

``ring8-saturating`` is the saturation twin's config (the dashboard launches it
under both generator losses, same seed). D trains alone for 500 steps, so D
wins (D(G(z)) ≈ 3e-5). G's optimiser must let a vanishing gradient stall G,
as the theory says: plain Adam would not, because it divides each step by the
gradient's running RMS and moves G at full speed on a gradient of 1e-5. So G
uses Adam with ε = 0.01: gradient components far below ε step in proportion to
their size, as with SGD (learning rate lr/ε = 0.3), while the non-saturating
loss's gradients, near ε and above, keep Adam's per-parameter scaling, which
plain SGD lacks: measured, an SGD generator never spread its samples and
ended as one clump off the ring under either loss. Both networks use Adam
without momentum (β1 = 0), and both learning rates fall linearly to zero
over the last 30 % of the 8,000 steps, which lets the non-saturating run
settle on the modes instead of ending mid-oscillation.

Measured on CPU (``tests/test_presets_quality.py``, seeds 0–4, evaluation at
the last step; docs/maths.md has the table): the saturating run captures 0 of
8 modes, its ``gradient_collapse`` alert fires during the head start, and its
applied gradient stays ~10⁴ below the non-saturating shadow; the
non-saturating run captures 7–8 modes with ≥ 90 % high-quality samples; the
saturating run flipped to non-saturating at step 4,000 recovers 7–8 modes by
the end. One run takes about 30 s headless on one CPU core (``gradwatch train``); the twin
in the dashboard, both runs at once on 2 cores, about two minutes.

``ring8-non-saturating`` is the configuration that learns the ring well:
Adam for both networks, a 2-D latent, 3000 steps.

``grid25-saturating`` is the grid twin: the same recipe on PacGAN's 5×5 grid
at its own scale. There D wins its head start less completely (mean D(G(z))
0.002–0.02) because an untrained G's samples sit on the centre mode among
real data, and the saturating gradient does not collapse; both halves learn
18–25 of 25 modes by step 8,000 (seeds 0–2, docs/maths.md "When the supports
overlap"). ``grid25-non-saturating`` learns the grid with Adam (β1 0.5) for
both networks and decaying learning rates: 20–25 modes, about 90 % high
quality, at step 8,000.
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

_GRID: dict[str, Any] = {
    "kind": "gan",
    # PacGAN's grid at its own scale: 5×5 modes at spacing 2 (−4 … 4), std 0.05.
    "data": {"name": "grid25", "scale": 1.0},
    "model": {"arch": "mlp", "width": 128, "depth": 3, "latent_dim": 2},
    "gan": {"lr_g": 1e-3, "lr_d": 1e-3, "beta1": 0.5, "beta2": 0.999},
    "train": {"steps": 8000, "batch_size": 256, "lr_decay_fraction": 0.3},
    "intervals": {"hist_every": 25, "sample_every": 500, "eval_every": 500, "checkpoint_every": 2000},
}

_PRESETS: dict[str, dict[str, Any]] = {
    "ring8-saturating": {
        **_RING,
        "name": "Ring of 8, saturating loss after a D head start",
        "gan": {**_RING["gan"], "g_loss": "saturating", "d_head_start": 500, "lr_g": 3e-3, "g_adam_eps": 1e-2,
                "beta1": 0.0},
        "train": {"steps": 8000, "batch_size": 256, "lr_decay_fraction": 0.3},
        "intervals": {**_RING["intervals"], "sample_every": 500},
    },
    "ring8-non-saturating": {
        **_RING,
        "name": "Ring of 8, non-saturating loss",
        "gan": {**_RING["gan"], "g_loss": "non_saturating"},
    },
    "grid25-saturating": {
        **_GRID,
        "name": "Grid of 25, saturating loss after a D head start",
        # The ring twin's recipe (ring8-saturating) on the grid.
        "gan": {**_GRID["gan"], "g_loss": "saturating", "d_head_start": 500, "lr_g": 3e-3, "g_adam_eps": 1e-2,
                "beta1": 0.0},
    },
    "grid25-non-saturating": {
        **_GRID,
        "name": "Grid of 25, non-saturating loss",
        "gan": {**_GRID["gan"], "g_loss": "non_saturating"},
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
