"""The run configuration: one pydantic model shared by the server and the worker.

Every field has a default and bounds, unknown keys are refused and non-finite
numbers are refused, so that a config that validates can neither crash a worker
nor exhaust the machine. Validation errors name the offending field by its
dotted path (pydantic's ``loc``), which the API passes through as a 422.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from trainer.cost import cost_problems

GLoss = Literal["saturating", "non_saturating", "hinge", "least_squares", "wasserstein"]
DatasetName = Literal["ring8", "grid25", "spiral", "moons", "digits", "mnist_idx", "image_folder"]

#: Datasets whose samples are points in the plane; the rest are images.
TWO_D_DATASETS: frozenset[str] = frozenset({"ring8", "grid25", "spiral", "moons"})
#: Datasets read from a user's local folder (``data.path``).
FOLDER_DATASETS: frozenset[str] = frozenset({"mnist_idx", "image_folder"})

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,2})$")
# One custom cluster resource request, "name=amount": the names Ray nodes declare (`ray start --resources`).
_RESOURCE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]{0,63})=(\d{1,6}(?:\.\d{1,4})?)$")
#: Names Ray gives its own resources: asked for through train.device and the server's settings, never here.
_RAY_OWN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
MAX_RESOURCES = 8

PositiveRate = Annotated[float, Field(gt=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Section(BaseModel):
    """Base for every config section: strict about keys and numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)


class DataConfig(_Section):
    name: DatasetName = Field("ring8", description="Training data.")
    scale: float = Field(
        1.0,
        ge=0.1,
        le=100.0,
        description="Multiplies the 2-D toy data (mode centres and spreads alike).",
    )
    path: str | None = Field(
        None,
        max_length=4096,
        description="Local folder for mnist_idx (standard IDX files) or image_folder.",
    )
    image_size: Literal[8, 28, 32] | None = Field(
        None,
        description="Side of the square images in pixels; defaults to the dataset's own "
        "(digits 8, mnist_idx 28, image_folder 32).",
    )
    channels: Literal[1, 3] = Field(
        1, description="Colour channels for image_folder (1 = greyscale, 3 = RGB)."
    )

    @model_validator(mode="after")
    def _check_path(self) -> DataConfig:
        if self.name in FOLDER_DATASETS and not self.path:
            raise ValueError(f"data.path is required for dataset {self.name!r}")
        if self.name not in FOLDER_DATASETS and self.path:
            raise ValueError(f"data.path only applies to mnist_idx and image_folder, not {self.name!r}")
        if self.name in TWO_D_DATASETS and self.image_size is not None:
            raise ValueError("data.image_size does not apply to 2-D datasets")
        if self.name == "digits" and self.image_size not in (None, 8):
            raise ValueError("data.image_size must be 8 for digits")
        return self

    @property
    def is_2d(self) -> bool:
        return self.name in TWO_D_DATASETS

    @property
    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        return {"digits": 8, "mnist_idx": 28}.get(self.name, 32)

    @property
    def resolved_channels(self) -> int:
        return self.channels if self.name == "image_folder" else 1


class ModelConfig(_Section):
    arch: Literal["mlp", "conv", "pacgan"] = Field(
        "mlp",
        description="Multi-layer perceptron, DCGAN-style convnet, or PacGAN's synthetic-data nets (a batch-norm "
        "MLP generator, a maxout discriminator of width/2 units; GAN only).",
    )
    width: int = Field(128, ge=4, le=1024, description="Hidden units per layer (mlp; pacgan's generator, its "
                       "discriminator width/2) or base channels (conv).")
    depth: int = Field(3, ge=1, le=8, description="Hidden layers (mlp; pacgan's generator, its discriminator "
                       "depth − 1 maxout layers); ignored by conv.")
    latent_dim: int = Field(16, ge=1, le=512, description="Dimension of z.")


class GanConfig(_Section):
    g_loss: GLoss = Field(
        "non_saturating",
        description="Generator loss. saturating/non_saturating share the standard "
        "discriminator loss; hinge, least_squares and wasserstein bring their own.",
    )
    d_steps: int = Field(1, ge=1, le=20, description="Discriminator steps per generator step.")
    lr_g: PositiveRate = Field(2e-4, description="Generator learning rate (Adam).")
    lr_d: PositiveRate = Field(2e-4, description="Discriminator learning rate (Adam).")
    beta1: Beta = Field(0.5, description="Adam beta1 for both networks.")
    beta2: Beta = Field(0.999, description="Adam beta2 for both networks.")
    g_optimizer: Literal["adam", "sgd"] = Field(
        "adam",
        description="Generator optimiser. Adam divides each step by the gradient's running RMS, so even a "
        "vanishing gradient moves G at full speed; with SGD a vanishing gradient stalls G, as the theory says.",
    )
    g_adam_eps: float = Field(
        1e-8,
        gt=0.0,
        le=1.0,
        description="ε of the generator's Adam, which steps by m/(√v + ε). Gradient components far below ε move G "
        "in proportion to their size, as SGD would, so a vanishing gradient stalls G; components far above ε get "
        "Adam's usual per-parameter scaling. The default 1e-8 rescales even a vanishing gradient to full speed.",
    )
    d_optimizer: Literal["adam", "sgd"] = Field("adam", description="Discriminator optimiser.")
    momentum: Beta = Field(0.9, description="SGD momentum (for a network whose optimiser is 'sgd').")
    d_head_start: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Steps that train D alone before G moves: the way to provoke saturation.",
    )
    gp_weight: float = Field(10.0, ge=0.0, le=1000.0, description="Gradient-penalty weight (wasserstein).")
    collapse_ratio: float = Field(
        1e-2,
        gt=0.0,
        lt=1.0,
        description="gradient_collapse fires when grad/g_norm stays below this fraction of its early value.",
    )
    collapse_patience: int = Field(
        20, ge=1, le=100_000, description="Logged steps the norm must stay low before the alert fires."
    )


class VaeConfig(_Section):
    beta: float = Field(1.0, ge=0.0, le=100.0, description="Weight of the KL term (β-VAE).")
    mc_samples: int = Field(
        1, ge=1, le=64, description="Monte-Carlo samples of z per input (reconstruction and kl/mc)."
    )
    lr: PositiveRate = Field(1e-3, description="Learning rate (Adam).")


class TrainConfig(_Section):
    steps: int = Field(3000, ge=1, le=10_000_000, description="Generator (or VAE) optimiser steps.")
    batch_size: int = Field(256, ge=2, le=4096, description="Samples per batch.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds weights, data and noise.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    resources: str = Field(
        "", max_length=600,
        description="Custom resources of a Ray cluster this run needs, as 'name=amount, …' (e.g. 'big_gpu=1' to run "
        "only on nodes started with --resources '{\"big_gpu\": 1}'). Ray backend only.",
    )
    lr_decay_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of the run, at its end, over which every learning rate falls linearly towards zero "
        "(0: constant). Annealing lets a GAN settle on the modes instead of ending mid-oscillation.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @field_validator("resources")
    @classmethod
    def _check_resources(cls, value: str) -> str:
        return ", ".join(f"{name}={amount:g}" for name, amount in parse_resources(value).items())  # one spelling

    def resource_request(self) -> dict[str, float]:
        """``resources`` as ``{name: amount}``."""
        return parse_resources(self.resources)


def parse_resources(text: str) -> dict[str, float]:
    """``"big_gpu=1, ssd=0.5"`` as ``{"big_gpu": 1.0, "ssd": 0.5}``; ValueError naming the part that is wrong."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = _RESOURCE_RE.match(part.replace(" ", ""))
        if match is None:
            raise ValueError(f"{part!r} is not 'name=amount' (a name of letters, digits, '_', '.', '-', and an "
                             "amount such as 1 or 0.5)")
        name, amount = match.group(1), float(match.group(2))
        if name in _RAY_OWN_RESOURCES:
            raise ValueError(f"{name!r} is set by train.device and the server's settings, not here")
        if amount <= 0:
            raise ValueError(f"{part!r}: the amount must be more than 0")
        if name in out:
            raise ValueError(f"{name!r} is given twice")
        out[name] = amount
    if len(out) > MAX_RESOURCES:
        raise ValueError(f"at most {MAX_RESOURCES} resources")
    return out


class IntervalConfig(_Section):
    log_every: int = Field(1, ge=1, le=100_000, description="Steps between scalar reports.")
    hist_every: int = Field(50, ge=1, le=1_000_000, description="Steps between logit histograms.")
    sample_every: int = Field(500, ge=1, le=1_000_000, description="Steps between sample images.")
    checkpoint_every: int = Field(1000, ge=1, le=10_000_000, description="Steps between checkpoints.")
    eval_every: int = Field(1000, ge=1, le=10_000_000, description="Steps between evaluations.")
    flush_ms: int = Field(
        25, ge=1, le=60_000,
        description="The longest a logged step waits on the device before its values are sent (one copy per "
        "flush); sooner when nothing is in flight. 25 ms keeps a step's p99 age in the browser under 50 ms with "
        "8 runs on 2 cores (docs/benchmarks.md §2).",
    )
    flush_steps: int = Field(256, ge=1, le=100_000, description="...or after this many buffered steps.")
    telemetry_budget: float = Field(
        0.03, gt=0, le=1,
        description="Share of a step's time telemetry may take (0.03: 3 %). The expensive pieces (the shadow "
        "gradient, per-layer norms, histograms) are measured on the run's device and sampled to fit; the losses, "
        "the applied gradient norms and the collapse alert stay on every logged step. 1: every piece on every "
        "logged step.",
    )
    keep_checkpoints: int = Field(
        5, ge=1, le=50,
        description="Periodic checkpoints kept (oldest removed), besides the final one. At most 50: with the "
        "checkpoint size bounded too (trainer/cost.py), a run's checkpoints cannot fill a disk.",
    )
    keep_samples: int = Field(
        200, ge=1, le=1000,
        description="Sample steps kept (oldest removed), besides the run's first one, so that sample_every=1 "
        "cannot fill a disk: the newest show where the run is, the first where it started.",
    )


class RunConfig(_Section):
    """A complete, self-contained description of one training run."""

    name: str = Field("", max_length=200, description="Free text shown in the dashboard.")
    kind: Literal["gan", "vae"] = Field("gan", description="Generative adversarial network or variational autoencoder.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    gan: GanConfig = Field(default_factory=GanConfig)
    vae: VaeConfig = Field(default_factory=VaeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    intervals: IntervalConfig = Field(default_factory=IntervalConfig)

    @model_validator(mode="after")
    def _check_combination(self) -> RunConfig:
        if self.model.arch == "conv" and self.data.is_2d:
            raise ValueError("model.arch 'conv' needs image data; use 'mlp' for 2-D datasets")
        if self.model.arch == "pacgan" and self.kind != "gan":
            raise ValueError("model.arch 'pacgan' is PacGAN's generator and discriminator: kind must be 'gan'")
        return self

    @model_validator(mode="after")
    def _check_cost(self) -> RunConfig:
        """Refuse a combination of bounded fields whose product is not bounded (memory, checkpoint size, disk).

        Each field alone is within its bounds, but e.g. a wide conv model with a large latent makes a checkpoint
        the server cannot take, and a large batch at that width more memory than a machine has: refused here,
        at submit, naming the fields and the estimated cost, rather than failing (or wedging) the run later.
        """
        problems = cost_problems(self)
        if problems:
            raise PydanticCustomError("config_cost", "{problems}", {"problems": "; ".join(problems)})
        return self

    def with_overrides(self, dotted: dict[str, Any]) -> RunConfig:
        """Copy with ``{"gan.g_loss": "saturating", ...}`` applied, validated again."""
        raw = self.model_dump(mode="json")
        for key, value in dotted.items():
            node = raw
            parts = key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise KeyError(key)
                node = node[part]
            if parts[-1] not in node:
                raise KeyError(key)
            node[parts[-1]] = value
        return RunConfig.model_validate(raw)


class ControlRequest(_Section):
    """A live change to a running GAN: applied between two steps."""

    g_loss: GLoss | None = Field(None, description="Switch the generator loss.")
    lr_g: PositiveRate | None = Field(None, description="New generator learning rate.")
    lr_d: PositiveRate | None = Field(None, description="New discriminator learning rate.")

    @model_validator(mode="after")
    def _not_empty(self) -> ControlRequest:
        if self.g_loss is None and self.lr_g is None and self.lr_d is None:
            raise ValueError("give at least one of g_loss, lr_g, lr_d")
        return self

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)
