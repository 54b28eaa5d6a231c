"""What a run config will cost before it runs: memory of the model and batch, size of its files, disk it writes.

Every config field has bounds, but bounds on single fields do not bound their
product: ``model.width=1024`` with ``model.latent_dim=512`` makes a 1.5 GiB
checkpoint that the server (``max_artifact_bytes``, 1 GiB by default) then
refuses to take, and ``train.batch_size=4096`` at that width asks for tens of
GiB of activations. Such a config used to be accepted and fail later, or wedge
its run. :func:`cost_problems` lets the config refuse it at submit instead, with
a message naming the fields and what they would cost against which limit.

The estimates are arithmetic on the config, not a model built and measured, so
that validating a config stays cheap (the server validates stored configs on
every scheduling pass) and needs no torch import. They are kept honest by
tests that build the real models and compare: the parameter counts are exact
(``tests/test_cost.py`` checks them against ``trainer.models`` for every
architecture), checkpoint sizes within a few per cent of real files, and the
training memory is an upper-end estimate checked against measured peaks.

Disk is bounded by the retention fields, not by time: a run keeps at most
``intervals.keep_checkpoints`` periodic checkpoints plus its final one, and at
most ``intervals.keep_samples`` sample steps plus its first, so its footprint
is a fixed number of files of known size whatever its speed. What it writes
per 1,000 steps (files written and later pruned) is reported per 1,000 steps
rather than per hour, because steps per second depend on the machine; a
limit on it bounds the write and upload traffic a config can cause.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports this module to validate itself
    from trainer.config import RunConfig

GiB = 1 << 30
MiB = 1 << 20

#: Largest checkpoint a config may produce: the server's default ``max_artifact_bytes``, so a run's checkpoints
#: can always be uploaded to a server with default settings.
MAX_CHECKPOINT_BYTES = 1 * GiB
#: Largest estimated training memory (parameters, gradients, optimiser state, activations of one step). Well
#: above anything the shipped presets need (they use a few MiB), well below a machine's memory.
MAX_TRAINING_MEMORY_BYTES = 16 * GiB
#: Largest disk footprint of a run's retained files (kept checkpoints + final one + kept samples).
MAX_RETAINED_DISK_BYTES = 20 * GiB
#: Largest volume of files written (and uploaded) per 1,000 steps, pruned ones included.
MAX_WRITTEN_PER_1000_STEPS = 20 * GiB

_FLOAT = 4  # every parameter, buffer and activation is float32
#: Autograd keeps roughly the output of every op for the backward pass, and the backward pass holds a gradient of
#: the same size while it runs: measured peaks sit near 1.5× the forward activations counted below (see tests).
_ACTIVATION_FACTOR = 2.0
#: Framework overhead of a worker with a model and its optimiser (allocator slack, small tensors, probes).
_BASE_MEMORY_BYTES = 64 * MiB
#: torch.save's zip container: a record per tensor (header, alignment) plus the pickled structure around it.
_CHECKPOINT_PER_TENSOR = 512
#: What a checkpoint holds besides the models: RNG states, config, live values, alert state.
_CHECKPOINT_BASE = 16 * 1024
#: A 2-D GAN sample step writes the field plot PNG (matplotlib, two panels) and its JSON (~80–150 kB).
_FIELD_SAMPLE_BYTES = 600 * 1024
#: Tiles per image grid (trainer.loop.SAMPLE_GRID) and the grid geometry of trainer.samples.
_SAMPLE_GRID = 64
_MIN_TILE_PX = 32
_GRID_PAD_PX = 2


@dataclass(frozen=True)
class Tensors:
    """Element counts of a network: parameters (and how many tensors), buffers, activations per sample."""

    params: int = 0
    param_tensors: int = 0
    buffers: int = 0
    buffer_tensors: int = 0
    activations: int = 0  # forward outputs per sample, every op counted

    def __add__(self, other: Tensors) -> Tensors:
        return Tensors(self.params + other.params, self.param_tensors + other.param_tensors,
                       self.buffers + other.buffers, self.buffer_tensors + other.buffer_tensors,
                       self.activations + other.activations)


def _linear(fan_in: int, fan_out: int, bias: bool = True) -> Tensors:
    return Tensors(fan_in * fan_out + (fan_out if bias else 0), 2 if bias else 1, activations=fan_out)


def _conv(c_in: int, c_out: int, out_side: int, bias: bool = True) -> Tensors:
    """A 4×4 convolution (or transposed one) producing ``c_out`` maps of ``out_side``²."""
    return Tensors(c_in * c_out * 16 + (c_out if bias else 0), 2 if bias else 1, activations=c_out * out_side**2)


def _batch_norm(features: int, per_sample: int) -> Tensors:
    """Weight and bias; running mean, variance and a step counter as buffers; its output."""
    return Tensors(2 * features, 2, 2 * features + 1, 3, activations=per_sample)


def _act(elements: int) -> Tensors:
    return Tensors(activations=elements)


def _mlp(sizes: list[int]) -> Tensors:
    total = Tensors()
    for i in range(len(sizes) - 1):
        total += _linear(sizes[i], sizes[i + 1])
        if i < len(sizes) - 2:
            total += _act(sizes[i + 1])
    return total


def _conv_generator(latent: int, width: int, channels: int, side: int) -> Tensors:
    start = side // 4
    projected = 2 * width * start * start
    return (_linear(latent, projected, bias=False) + _batch_norm(projected, projected) + _act(projected)
            + _conv(2 * width, width, 2 * start, bias=False) + _batch_norm(width, width * (2 * start) ** 2)
            + _act(width * (2 * start) ** 2) + _conv(width, channels, side) + _act(channels * side**2))


def _conv_discriminator(width: int, channels: int, side: int, out: int) -> Tensors:
    start = side // 4
    return (_conv(channels, width, 2 * start) + _act(width * (2 * start) ** 2)
            + _conv(width, 2 * width, start) + _act(2 * width * start**2)
            + _linear(2 * width * start * start, out))


def _pacgan_generator(latent: int, width: int, depth: int, flat: int, squash: bool) -> Tensors:
    total = Tensors()
    fan_in = latent
    for _ in range(depth):
        total += _linear(fan_in, width, bias=False) + _batch_norm(width, width) + _act(width)
        fan_in = width
    return total + _linear(fan_in, flat) + (_act(flat) if squash else Tensors())


def _pacgan_discriminator(width: int, depth: int, flat: int, out: int, pieces: int = 5) -> Tensors:
    """Maxout layers (trainer.models.Maxout, ``PACGAN_MAXOUT_PIECES`` = 5): a linear map to units × pieces, then the
    max over the pieces."""
    units = max(1, width // 2)
    total = Tensors()
    fan_in = flat
    for _ in range(max(1, depth - 1)):
        total += _linear(fan_in, units * pieces) + _act(units)
        fan_in = units
    return total + _linear(fan_in, out)


def data_shape(cfg: RunConfig) -> tuple[int, ...]:
    """Per-sample shape of the training data: (2,) for points, (C, S, S) for images."""
    if cfg.data.is_2d:
        return (2,)
    side = cfg.data.resolved_image_size
    return (cfg.data.resolved_channels, side, side)


def networks(cfg: RunConfig) -> dict[str, Tensors]:
    """The networks the config builds (``trainer.models``), by their checkpoint names."""
    m = cfg.model
    shape = data_shape(cfg)
    flat = math.prod(shape)
    squash = len(shape) > 1
    if cfg.kind == "gan":
        out = 1
        if m.arch == "conv":
            g = _conv_generator(m.latent_dim, m.width, shape[0], shape[-1])
            d = _conv_discriminator(m.width, shape[0], shape[-1], out)
        elif m.arch == "pacgan":
            g = _pacgan_generator(m.latent_dim, m.width, m.depth, flat, squash)
            d = _pacgan_discriminator(m.width, m.depth, flat, out)
        else:
            g = _mlp([m.latent_dim] + [m.width] * m.depth + [flat]) + (_act(flat) if squash else Tensors())
            d = _mlp([flat] + [m.width] * m.depth + [out])
        return {"generator": g, "discriminator": d}
    out = 2 * m.latent_dim
    if m.arch == "conv":
        enc = _conv_discriminator(m.width, shape[0], shape[-1], out)
        dec = _conv_generator(m.latent_dim, m.width, shape[0], shape[-1])
        dec = Tensors(dec.params, dec.param_tensors, dec.buffers, dec.buffer_tensors,
                      dec.activations - shape[0] * shape[-1] ** 2)  # no tanh on a decoder
    else:
        enc = _mlp([flat] + [m.width] * m.depth + [out])
        dec = _mlp([m.latent_dim] + [m.width] * m.depth + [flat])
    return {"encoder": enc, "decoder": dec}


def _optimiser_slots(cfg: RunConfig, network: str) -> int:
    """Tensors per parameter an optimiser keeps: Adam two (m, v), SGD with momentum one."""
    if cfg.kind == "vae":
        return 2
    choice = cfg.gan.g_optimizer if network == "generator" else cfg.gan.d_optimizer
    return 2 if choice == "adam" else (1 if cfg.gan.momentum > 0 else 0)


@dataclass(frozen=True)
class CostEstimate:
    """What one run of a config costs, in bytes."""

    parameters: int  # parameter count of all networks
    checkpoint_bytes: int
    training_memory_bytes: int
    sample_bytes: int  # one sample step's files
    retained_disk_bytes: int
    written_per_1000_steps: int


def checkpoint_bytes(cfg: RunConfig) -> int:
    """Size of one checkpoint: weights and buffers, optimiser state, and the container around them."""
    total = _CHECKPOINT_BASE
    for name, net in networks(cfg).items():
        slots = _optimiser_slots(cfg, name)
        total += _FLOAT * (net.params * (1 + slots) + net.buffers)
        # Adam also keeps a scalar step per parameter tensor.
        tensors = net.param_tensors * (1 + slots + (1 if slots == 2 else 0)) + net.buffer_tensors
        total += _CHECKPOINT_PER_TENSOR * tensors
    return total


def training_memory_bytes(cfg: RunConfig) -> int:
    """Peak memory of one training step: parameters, gradients, optimiser state and the batch's activations.

    A GAN step keeps G's graph (its fake batch is reused for the generator step), runs D on the real and the
    fake batch for each D step, then on the fake batch again for G; the generator's logged steps also take the
    shadow gradient, one more copy of G's gradients. WGAN-GP adds a double-backward pass through D on the
    interpolates. A VAE step runs the encoder once and the decoder on ``mc_samples`` × the batch.
    """
    nets = networks(cfg)
    batch = cfg.train.batch_size
    state = 0
    for name, net in nets.items():
        copies = 2 + _optimiser_slots(cfg, name)  # the weights, their gradient, the optimiser's slots
        if name == "generator":
            copies += 2  # the shadow gradients of the other losses, held alongside the applied one
        state += _FLOAT * (net.params * copies + net.buffers)
    flat = math.prod(data_shape(cfg))
    if cfg.kind == "gan":
        d_passes = 3 + (3 if cfg.gan.g_loss == "wasserstein" else 0)
        per_sample = nets["generator"].activations + d_passes * nets["discriminator"].activations + 3 * flat
    else:
        mc = cfg.vae.mc_samples
        per_sample = nets["encoder"].activations + mc * (nets["decoder"].activations + 4 * flat)
    activations = int(_ACTIVATION_FACTOR * _FLOAT * batch * per_sample)
    return _BASE_MEMORY_BYTES + state + activations


def sample_bytes(cfg: RunConfig) -> int:
    """Upper end of one sample step's files: the PNG grid uncompressed, or the 2-D field plot and its JSON."""
    if cfg.data.is_2d:
        return _FIELD_SAMPLE_BYTES if cfg.kind == "gan" else 0  # a 2-D VAE writes no samples
    channels, side = cfg.data.resolved_channels, cfg.data.resolved_image_size
    cols = math.ceil(math.sqrt(_SAMPLE_GRID))
    rows = math.ceil(_SAMPLE_GRID / cols)
    tile = side * max(1, math.ceil(_MIN_TILE_PX / side))
    width, height = cols * tile + (cols + 1) * _GRID_PAD_PX, rows * tile + (rows + 1) * _GRID_PAD_PX
    # PNG stores each row with a filter byte; noise-like samples do not compress below the raw size.
    return (width * channels + 1) * height + 1024


def estimate(cfg: RunConfig) -> CostEstimate:
    """Every cost :func:`cost_problems` checks, for reports and tests."""
    iv = cfg.intervals
    ckpt = checkpoint_bytes(cfg)
    sample = sample_bytes(cfg)
    # Kept periodic checkpoints, the final one, and one being written beside them (atomic write: temp, then rename).
    retained = (iv.keep_checkpoints + 2) * ckpt + (iv.keep_samples + 1) * sample
    steps = min(1000, cfg.train.steps)
    written = (steps // iv.checkpoint_every) * ckpt + (steps // iv.sample_every) * sample
    return CostEstimate(
        parameters=sum(net.params for net in networks(cfg).values()),
        checkpoint_bytes=ckpt,
        training_memory_bytes=training_memory_bytes(cfg),
        sample_bytes=sample,
        retained_disk_bytes=retained,
        written_per_1000_steps=written,
    )


def _size(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.1f} MiB"


def _model_fields(cfg: RunConfig) -> str:
    m = cfg.model
    parts = [f"kind={cfg.kind}", f"model.arch={m.arch}", f"model.width={m.width}"]
    if m.arch == "mlp":
        parts.append(f"model.depth={m.depth}")
    parts.append(f"model.latent_dim={m.latent_dim}")
    if not cfg.data.is_2d:
        parts.append(f"data image size {cfg.data.resolved_image_size}×{cfg.data.resolved_image_size}"
                     f"×{cfg.data.resolved_channels}")
    if cfg.kind == "gan":
        parts.append(f"optimisers G {cfg.gan.g_optimizer}, D {cfg.gan.d_optimizer}")
    else:
        parts.append("optimiser adam")
    return ", ".join(parts)


def checkpoint_problem(cfg: RunConfig, limit: int, what: str) -> str | None:
    """The sentence refusing ``cfg`` if its checkpoint would be over ``limit`` bytes (``what`` names the limit)."""
    est = estimate(cfg)
    if est.checkpoint_bytes <= limit:
        return None
    return (f"{_model_fields(cfg)}: {est.parameters:,} parameters, a checkpoint of ≈ {_size(est.checkpoint_bytes)} "
            f"with optimiser state, over the {_size(limit)} limit ({what}); lower model.width or model.latent_dim")


def cost_problems(cfg: RunConfig) -> list[str]:
    """One sentence per limit the config would exceed, naming the fields and the estimated cost; empty if none."""
    est = estimate(cfg)
    iv = cfg.intervals
    problems = []
    checkpoint = checkpoint_problem(cfg, MAX_CHECKPOINT_BYTES, "the server's default max_artifact_bytes")
    if checkpoint is not None:
        problems.append(checkpoint)
    if est.training_memory_bytes > MAX_TRAINING_MEMORY_BYTES:
        extra = f", vae.mc_samples={cfg.vae.mc_samples}" if cfg.kind == "vae" else ""
        problems.append(
            f"{_model_fields(cfg)}, train.batch_size={cfg.train.batch_size}{extra}: a training step needs "
            f"≈ {_size(est.training_memory_bytes)} of memory, over the {_size(MAX_TRAINING_MEMORY_BYTES)} limit; "
            f"lower train.batch_size or model.width")
    if est.retained_disk_bytes > MAX_RETAINED_DISK_BYTES:
        problems.append(
            f"intervals.keep_checkpoints={iv.keep_checkpoints} checkpoints of ≈ {_size(est.checkpoint_bytes)} "
            f"and intervals.keep_samples={iv.keep_samples} samples of ≈ {_size(est.sample_bytes)} keep "
            f"≈ {_size(est.retained_disk_bytes)} on disk, over the {_size(MAX_RETAINED_DISK_BYTES)} limit; "
            f"keep fewer or make the model smaller")
    if est.written_per_1000_steps > MAX_WRITTEN_PER_1000_STEPS:
        problems.append(
            f"intervals.checkpoint_every={iv.checkpoint_every} (checkpoints of ≈ {_size(est.checkpoint_bytes)}) "
            f"and intervals.sample_every={iv.sample_every} (samples of ≈ {_size(est.sample_bytes)}) write "
            f"≈ {_size(est.written_per_1000_steps)} per 1,000 steps, over the "
            f"{_size(MAX_WRITTEN_PER_1000_STEPS)} limit; write them less often")
    return problems
