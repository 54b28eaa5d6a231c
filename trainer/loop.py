"""The generic training loop: a run's schedule, artifacts and telemetry, whatever the model family.

:class:`Trainer` owns what every run does around its steps: the step counter,
learning-rate decay, live controls, periodic samples, evaluations and
checkpoints, resume, and the flush of buffered telemetry into SPEC §4 frames.
A model family supplies the step itself: ``GanTrainer`` (trainer/gan.py) and
``VaeTrainer`` (trainer/vae.py), each reading like the algorithm box of a
paper, with the telemetry maths delegated to the probes of trainer/probes.py,
the same ones a user's own script uses.

Everything random is drawn from two generators owned by the trainer (data and
noise) whose states go into every checkpoint, so a resumed run continues the
exact stream of the uninterrupted one. Samples and evaluations draw from their
own generators and never perturb that stream.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainer.budget import TelemetryBudget
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import ControlRequest, RunConfig
from trainer.data import Dataset, load_dataset
from trainer.files import WriteError, sweep_temp_files
from trainer.probes import GAN_KEYS, VAE_KEYS, active_units
from trainer.samples import prune_samples
from trainer.telemetry import (
    HIST_KEYS,
    FrameEmitter,
    FrameSink,
    MetricBuffer,
    MetricGroup,
    StepRow,
    flush_to_frames,
    metrics_frame_fields,
)

# GAN_KEYS, VAE_KEYS and active_units live with the probes that compute them; importers of trainer.loop keep them.
__all__ = [
    "GAN_KEYS",
    "HIST_KEYS",
    "VAE_KEYS",
    "RunOptions",
    "Trainer",
    "TrainingError",
    "active_units",
    "evaluating",
    "is_out_of_memory",
    "lr_scale",
    "make_trainer",
    "resolve_device",
]

SAMPLE_GRID = 64


class TrainingError(RuntimeError):
    """A run cannot go on (non-finite loss, unusable resume checkpoint, ...)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failed: CUDA's (``torch.OutOfMemoryError``, alias ``torch.cuda.OutOfMemoryError``), the CPU
    allocator's (a plain RuntimeError, recognised by its message) or Python's own ``MemoryError``."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("train.device: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainingError(f"train.device: there is no {spec} (found {torch.cuda.device_count()} GPUs)")
    return device


def lr_scale(step: int, steps: int, decay_fraction: float) -> float:
    """1 until the last ``decay_fraction`` of ``steps``, then linearly down to 1/n on the last of those n steps.

    Depends on the step alone, so a run stopped and resumed follows the same schedule as one that never stopped.
    """
    decay_steps = round(steps * decay_fraction)
    left = steps - step + 1  # steps still to take, this one included
    return 1.0 if left > decay_steps else left / decay_steps


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for samples and evaluations, then back to where it was.

    Batch norm must use its running statistics here (not update them from a
    sample batch), or samples would perturb the training state.
    """
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _relative_url(kind: str, name: str) -> str:
    return f"{kind}/{name}"


@dataclass
class RunOptions:
    """Where a run writes and whom it tells; not part of the run's config."""

    out_dir: Path
    sink: FrameSink
    run_id: str = "local"
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "gradwatch")
    resume_from: Path | None = None
    artifact_url: Callable[[str, str], str] = _relative_url


class Trainer(ABC):
    """The parts of a run that do not depend on the model family."""

    #: The probe's telemetry budget (trainer/budget.py); a family's ``build_models`` sets its probe's.
    budget: TelemetryBudget

    def __init__(self, cfg: RunConfig, options: RunOptions) -> None:
        self.cfg = cfg
        self.options = options
        self.device = resolve_device(cfg.train.device)
        self.emitter = FrameEmitter(options.run_id, options.sink)
        self.samples_dir = options.out_dir / "samples"
        self.checkpoints_dir = options.out_dir / "checkpoints"
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        sweep_temp_files(self.checkpoints_dir)
        sweep_temp_files(self.samples_dir)
        self.step = 0
        self._stop = threading.Event()
        self._hurry = False
        self._stop_error: str | None = None  # a stop that ends the run as failed, with this reason
        self._controls: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.buffer = MetricBuffer(cfg.intervals.flush_steps, cfg.intervals.flush_ms)
        self._kept_checkpoints: list[Path] = []
        #: Set when the data or the models did not fit on the device: :meth:`run` then fails at once with it.
        self._setup_oom: str | None = None
        # Everything that takes device memory before the first step: the data, the generators, the models.
        # Written out here rather than in a helper, so a start-up error's traceback stays as short as it was
        # (the server keeps the last lines of a worker's log with the run's error).
        try:
            self.data: Dataset = load_dataset(cfg.data, self.device)
            seed = cfg.train.seed
            self.data_gen = self._generator(seed)
            self.noise_gen = self._generator(seed + 1)
            # Same seed ⇒ same initial weights, without touching the caller's global RNG.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.build_models()
            self.fixed_noise = torch.randn(SAMPLE_GRID, cfg.model.latent_dim, device=self.device,
                                           generator=self._generator(seed + 2))
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # Reported by run(), as every other way a run ends, so a worker says "oom: ..." and not a traceback.
            self._setup_oom = self._oom_reason("while putting the data and models on the device, before step 1")

    def _generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    # -- family-specific parts ------------------------------------------------
    @abstractmethod
    def build_models(self) -> None: ...

    @abstractmethod
    def train_step(self, step: int, log: bool) -> None: ...

    @abstractmethod
    def model_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_model_state(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def write_sample(self, step: int) -> list[str]: ...

    @abstractmethod
    def evaluate(self, step: int) -> dict[str, float]: ...

    @abstractmethod
    def apply_control(self, changes: dict[str, Any]) -> None: ...

    @abstractmethod
    def scale_learning_rates(self, scale: float) -> None:
        """Set every optimiser's learning rate to its current base value times ``scale``."""

    @abstractmethod
    def on_flush(self, group: MetricGroup) -> None:
        """Host-side checks on freshly copied values (one call per key group); raise TrainingError to fail the run."""

    # -- requests from outside (thread-safe) ----------------------------------
    def request_stop(self, *, hurry: bool = False, error: str | None = None) -> None:
        """Finish the current step, write a final checkpoint, end as ``stopped``.

        ``hurry``: the process is being shut down (its server is going away) and may be killed if it dawdles,
        so the final checkpoint is all it writes: no final sample or evaluation. ``error``: the run cannot go on
        (its frames have nowhere to go, say): it ends as ``failed`` with this reason, its checkpoint written.
        """
        self._hurry = self._hurry or hurry
        if error is not None and self._stop_error is None:
            self._stop_error = error
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def control(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Validate a live change now (raising ValueError); apply it between two steps."""
        if self.cfg.kind != "gan":
            raise ValueError("control: live changes apply to GAN runs only")
        request = ControlRequest.model_validate(changes)
        self._controls.put(request.changes())
        return request.changes()

    # -- the loop -------------------------------------------------------------
    def run(self) -> str:
        """Train to the end (or a stop request); returns the final status."""
        iv = self.cfg.intervals
        if self._setup_oom is not None:
            self.emitter.emit("status", status="failed", error=self._setup_oom, step=self.step)
            return "failed"
        try:
            if self.options.resume_from is not None:
                self._resume(self.options.resume_from)
            self.emitter.emit("status", status="running", error=None, step=self.step)
            decaying = self.cfg.train.lr_decay_fraction > 0
            while self.step < self.cfg.train.steps and not self._stop.is_set():
                self._drain_controls()
                self.step += 1
                step = self.step
                if decaying:
                    self.scale_learning_rates(lr_scale(step, self.cfg.train.steps, self.cfg.train.lr_decay_fraction))
                self.train_step(step, log=step % iv.log_every == 0)
                if self.buffer.due():
                    self.flush()
                periodic = (
                    step % iv.sample_every == 0,
                    step % iv.eval_every == 0,
                    step % iv.checkpoint_every == 0,
                )
                if any(periodic):
                    self.flush()
                    if periodic[0]:
                        self._sample(step)
                    if periodic[1]:
                        self._evaluate(step)
                    if periodic[2]:
                        self._checkpoint(step, keep=True)
            self.flush()
            status = "stopped" if self._stop.is_set() and self.step < self.cfg.train.steps else "completed"
            self._finish_artifacts()
            if self._stop_error is not None:
                status = "failed"
            self.emitter.emit("status", status=status, error=self._stop_error, step=self.step)
            return status
        except (TrainingError, WriteError) as exc:  # a full disk is a reason to say, not a bug to trace
            reason = exc.strerror if isinstance(exc, WriteError) else str(exc)
            self.emitter.emit("status", status="failed", error=reason, step=self.step)
            return "failed"
        except Exception as exc:
            if not is_out_of_memory(exc):
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                self.emitter.emit("status", status="failed", error=detail, step=self.step)
                raise
        # Out of memory, the one exception that gets here: an expected way for a run to end, not a bug, so a clear
        # reason instead of a traceback, and the process ends normally, freeing its device slot at once. Out of the
        # except block, the failed step's tensors (held by the traceback) are freed, so what was buffered before
        # it can still be sent; if even that fails, the reason still goes out.
        with contextlib.suppress(Exception):
            self.flush()
        self.emitter.emit("status", status="failed", error=self._oom_reason(f"at step {self.step}"), step=self.step)
        return "failed"

    def _oom_reason(self, when: str) -> str:
        """``oom: ...`` with where and when, and what to change: the run's ``error`` and the dashboard's message."""
        from trainer.cost import training_memory_bytes

        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            where = f"CUDA out of memory on cuda:{index}"
        else:
            where = f"out of memory on {self.device.type}"
        need = training_memory_bytes(self.cfg) / 2**30
        return (f"oom: {where} {when} — lower train.batch_size (now {self.cfg.train.batch_size}) "
                f"or model.width (now {self.cfg.model.width}); a training step of this config is estimated at "
                f"≈ {need:.2f} GiB")

    def _finish_artifacts(self) -> None:
        """Every run ends with a checkpoint of its final state, then (unless hurried) a sample and an evaluation.

        The checkpoint comes first: it is what a resume needs, and the sample (matplotlib) is the slow part.
        """
        iv = self.cfg.intervals
        if self.step == 0:
            return
        self._checkpoint(self.step, keep=False)
        if self._hurry:
            return
        if self.step % iv.sample_every:
            self._sample(self.step)
        if self.step % iv.eval_every:
            self._evaluate(self.step)

    def record(self, step: int, row: StepRow, hist: Tensor | None) -> None:
        """Buffer what a step's probe recorded: its row (nothing on a step that was not logged) and histogram."""
        with self.budget.timed("core"):
            self.buffer.append(step, row)
            if hist is not None:
                self.buffer.append_hist(step, hist)

    def flush(self) -> None:
        """Everything buffered to the host in one copy: a ``metrics`` frame per key group, then the histograms.

        Its time counts against the telemetry budget, as part of the always-on telemetry.
        """
        start = time.perf_counter()
        groups = flush_to_frames(self.buffer, self.emitter.emit)
        self.budget.charge(time.perf_counter() - start)
        for group in groups:
            self.on_flush(group)

    def alert(self, step: int, kind: str, message: str) -> None:
        self.emitter.emit("alert", step=step, kind=kind, message=message)

    def _drain_controls(self) -> None:
        while True:
            try:
                changes = self._controls.get_nowait()
            except queue.Empty:
                return
            self.apply_control(changes)
            self.emitter.emit("control", step=self.step, changes=changes)

    # -- artifacts ------------------------------------------------------------
    def _sample(self, step: int) -> None:
        names = self.write_sample(step)
        # The folder never holds more than keep_samples + 1 steps. An earlier frame may name a file pruned here
        # before a worker's channel uploaded it: the channel sends that frame anyway, and listings show what is on
        # disk. This step is the newest, so its own files always stay.
        prune_samples(self.samples_dir, self.cfg.intervals.keep_samples)
        for name in names:
            self.emitter.emit("sample", step=step, name=name, url=self.options.artifact_url("samples", name))

    def _evaluate(self, step: int) -> None:
        results = self.evaluate(step)
        if results:
            # Evaluation is rare and already synchronous, so it goes out as its own frame.
            table = np.array([[results[k] for k in results]], dtype=np.float64)
            self.emitter.emit("metrics", **metrics_frame_fields(list(results), [step], [time.time()], table))

    def _checkpoint(self, step: int, keep: bool) -> None:
        name = f"step_{step:08d}.pt"
        path = self.checkpoints_dir / name
        state = {
            "kind": self.cfg.kind,
            "step": step,
            "config": self.cfg.model_dump(mode="json"),
            "rng": {"data": self.data_gen.get_state(), "noise": self.noise_gen.get_state()},
            **self.model_state(),
        }
        save_checkpoint(state, path)
        if keep and path not in self._kept_checkpoints:
            self._kept_checkpoints.append(path)
            while len(self._kept_checkpoints) > self.cfg.intervals.keep_checkpoints:
                self._kept_checkpoints.pop(0).unlink(missing_ok=True)
        self.emitter.emit("checkpoint", step=step, name=name, url=self.options.artifact_url("checkpoints", name))

    def _resume(self, path: Path) -> None:
        try:
            state = load_checkpoint(path, map_location=self.device)
        except (OSError, ValueError, RuntimeError) as exc:
            raise TrainingError(f"resume_from: cannot load checkpoint: {exc}") from exc
        if state.get("kind") != self.cfg.kind:
            raise TrainingError(f"resume_from: checkpoint is a {state.get('kind')} run, config is {self.cfg.kind}")
        if int(state["step"]) >= self.cfg.train.steps:
            raise TrainingError(f"train.steps: must exceed the checkpoint's step {int(state['step'])}")
        try:
            self.load_model_state(state)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise TrainingError(f"resume_from: checkpoint does not fit this model config: {exc}") from exc
        self.data_gen.set_state(state["rng"]["data"].cpu())
        self.noise_gen.set_state(state["rng"]["noise"].cpu())
        self.step = int(state["step"])


def make_trainer(cfg: RunConfig, options: RunOptions) -> Trainer:
    """The trainer for a config's model family."""
    # Imported here: each family's module builds on this one.
    from trainer.gan import GanTrainer
    from trainer.vae import VaeTrainer

    trainer_cls: type[Trainer] = GanTrainer if cfg.kind == "gan" else VaeTrainer
    return trainer_cls(cfg, options)
