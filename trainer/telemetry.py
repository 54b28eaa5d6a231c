"""Telemetry: keep per-step values on the device, move them to the host in bulk.

A ``.item()`` per metric per step would force a GPU→CPU sync every step and
stall the training pipeline. Instead each logged step contributes one small
device tensor (all its scalars stacked) to a buffer, and the buffer reaches the
host with a single ``torch.stack(...).cpu()`` when it is due: every
``flush_steps`` buffered steps or every ``flush_ms`` milliseconds, whichever
comes first. Checks that need host values (non-finite losses, gradient
collapse) run at flush time on the copied numbers.

Frames follow SPEC §4: JSON objects with ``type``, ``run`` and a per-run
``seq`` that increases by one with every frame emitted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainer.losses import dloss_dh

Frame = dict[str, Any]
FrameSink = Callable[[Frame], None]

HIST_BINS = 40
#: Fake samples per ``dldh`` frame: enough points to trace both curves, few enough to send every hist step.
DLDH_SAMPLES = 64


def frame_to_json(frame: Frame) -> str:
    """Strict JSON: a NaN that slipped through raises here instead of reaching a client."""
    return json.dumps(frame, allow_nan=False, separators=(",", ":"))


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: non-finite values travel as ``null``."""
    return value if math.isfinite(value) else None


def grad_norms(grads: Sequence[Tensor]) -> Tensor:
    """Per-tensor L2 norms, stacked, without leaving the device.

    ``torch._foreach_norm`` is what ``clip_grad_norm_`` uses: one fused kernel
    for all tensors instead of one launch per parameter.
    """
    return torch.stack(torch._foreach_norm(list(grads)))


def total_norm(layer_norms: Tensor) -> Tensor:
    """Global L2 norm from per-tensor norms: sqrt(Σ ‖g_i‖²)."""
    return torch.linalg.vector_norm(layer_norms)


def logit_histogram(real: Tensor, fake: Tensor, bins: int = HIST_BINS) -> Tensor:
    """Counts of real and fake logits over shared edges, as one device tensor.

    Layout: ``[lo, hi, counts_real (bins), counts_fake (bins)]``. Built with
    ``scatter_add_`` into a fixed-size buffer because ``torch.histc`` needs the
    range as Python floats and ``bincount`` sizes its output from the data:
    either would force a device sync.
    """
    real = real.detach().float().flatten()
    fake = fake.detach().float().flatten()
    both = torch.cat([real, fake])
    # A diverging run has NaN or infinite logits: they are left out of the
    # counts (a NaN index would be out of bounds, a device-side assert on CUDA).
    finite = torch.isfinite(both)
    lo = torch.where(finite, both, torch.inf).min()
    hi = torch.where(finite, both, -torch.inf).max()
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.maximum(torch.where(torch.isfinite(hi), hi, lo), lo + 1e-6)

    def counts(x: Tensor) -> Tensor:
        idx = ((x - lo) / (hi - lo) * bins).nan_to_num(0.0).floor().clamp(0, bins - 1).long()
        out = torch.zeros(bins, device=x.device)
        return out.scatter_add_(0, idx, torch.isfinite(x).float())

    return torch.cat([lo.view(1), hi.view(1), counts(real), counts(fake)])


def dldh_samples(fake: Tensor, limit: int = DLDH_SAMPLES) -> Tensor:
    """The first ``limit`` fake logits and their |∂loss/∂h| under both losses, as one device tensor.

    Layout: ``[h (n), saturating (n), non_saturating (n)]`` with n = min(limit, batch), sorted by h.
    The weights come from :func:`~trainer.losses.dloss_dh`, the same autograd derivative the
    generator gradient uses, so a dashboard that draws σ(h) and 1 − σ(h) over these points checks
    the implementation rather than restating the formula. The first samples (not a random draw)
    keep runs reproducible and the noise stream untouched; sorting on the device needs no sync.
    """
    h = fake.detach().float().flatten()[:limit].sort().values
    return torch.cat([h, dloss_dh("saturating", h).abs(), dloss_dh("non_saturating", h).abs()])


def logit_packet(real: Tensor, fake: Tensor) -> Tensor:
    """What a histogram step sends: :func:`logit_histogram` then :func:`dldh_samples`, one tensor.

    One tensor so that the step still costs the buffer a single entry and the flush a single copy.
    """
    return torch.cat([logit_histogram(real, fake), dldh_samples(fake)])


@dataclass
class FrameEmitter:
    """Stamps frames with the run id and a gapless per-run sequence number."""

    run: str
    sink: FrameSink
    seq: int = 0

    def emit(self, frame_type: str, **fields: Any) -> Frame:
        self.seq += 1
        frame: Frame = {"type": frame_type, "run": self.run, "seq": self.seq, **fields}
        self.sink(frame)
        return frame


@dataclass
class ScalarBuffer:
    """Buffered scalar telemetry for one fixed, ordered set of keys."""

    keys: list[str]
    flush_steps: int
    flush_ms: int
    _steps: list[int] = field(default_factory=list)
    _times: list[float] = field(default_factory=list)
    _rows: list[Tensor] = field(default_factory=list)
    _hists: list[tuple[int, Tensor]] = field(default_factory=list)
    _last_flush: float = field(default_factory=time.monotonic)

    def append(self, step: int, values: Tensor) -> None:
        """Buffer one step's scalars (a 1-D device tensor aligned with ``keys``)."""
        self._steps.append(step)
        self._times.append(time.time())
        self._rows.append(values.detach().float())

    def append_hist(self, step: int, packed: Tensor) -> None:
        self._hists.append((step, packed.detach()))

    def due(self) -> bool:
        if not self._rows and not self._hists:
            return False
        if len(self._rows) >= self.flush_steps:
            return True
        return (time.monotonic() - self._last_flush) * 1000.0 >= self.flush_ms

    def flush(self) -> tuple[list[int], list[float], np.ndarray, list[tuple[int, np.ndarray]]]:
        """Everything buffered, on the host, with one device→host copy."""
        self._last_flush = time.monotonic()
        steps, times, rows, hists = self._steps, self._times, self._rows, self._hists
        self._steps, self._times, self._rows, self._hists = [], [], [], []
        if not rows and not hists:
            return [], [], np.zeros((0, len(self.keys)), dtype=np.float32), []
        # One copy for scalars and histograms alike: pad into a single flat tensor.
        parts = ([torch.stack(rows).flatten()] if rows else []) + [h for _, h in hists]
        flat = torch.cat(parts).cpu().numpy()
        n_scalar = len(rows) * len(self.keys)
        table = flat[:n_scalar].reshape(len(rows), len(self.keys))
        out_hists = []
        offset = n_scalar
        for step, packed in hists:
            out_hists.append((step, flat[offset : offset + packed.numel()]))
            offset += packed.numel()
        return steps, times, table, out_hists


def metrics_frame_fields(
    keys: Sequence[str], steps: list[int], times: list[float], table: np.ndarray
) -> dict[str, Any]:
    """Columnar ``metrics`` payload with non-finite values as ``None``.

    Runs once per flush on every buffered value, so the common case (all finite) converts whole
    columns at C speed; only a table holding a NaN or infinity is walked value by value.
    """
    columns = table.T.astype(np.float64).tolist()
    if not np.isfinite(table).all():
        columns = [[finite_or_none(v) for v in column] for column in columns]
    return {"step": steps, "time": [round(t, 6) for t in times], "data": dict(zip(keys, columns, strict=True))}


def hist_frames_fields(step: int, packed: np.ndarray, keys: Iterable[str]) -> list[dict[str, Any]]:
    """Unpack :func:`logit_histogram` into one ``hist`` payload per key."""
    lo, hi = float(packed[0]), float(packed[1])
    bins = (packed.size - 2) // 2
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    out = []
    for i, key in enumerate(keys):
        counts = packed[2 + i * bins : 2 + (i + 1) * bins]
        out.append({"step": step, "key": key, "edges": edges, "counts": [int(c) for c in counts]})
    return out


def dldh_frame_fields(step: int, packed: np.ndarray) -> dict[str, Any]:
    """Unpack :func:`dldh_samples` into a ``dldh`` payload: three aligned lists, non-finite as ``None``."""
    n = packed.size // 3
    h, sat, non_sat = (packed[i * n : (i + 1) * n] for i in range(3))
    return {
        "step": step,
        "h": [finite_or_none(float(v)) for v in h],
        "saturating": [finite_or_none(float(v)) for v in sat],
        "non_saturating": [finite_or_none(float(v)) for v in non_sat],
    }


def logit_frames_fields(
    step: int, packed: np.ndarray, keys: Sequence[str], bins: int = HIST_BINS
) -> list[tuple[str, dict[str, Any]]]:
    """``(type, payload)`` of every frame a :func:`logit_packet` becomes: one ``hist`` per key, then ``dldh``.

    A packet holding only a histogram (no samples after it) gives the ``hist`` frames alone.
    """
    size = 2 + len(keys) * bins
    out: list[tuple[str, dict[str, Any]]] = [("hist", f) for f in hist_frames_fields(step, packed[:size], keys)]
    if packed.size > size:
        out.append(("dldh", dldh_frame_fields(step, packed[size:])))
    return out


@dataclass
class CollapseDetector:
    """Flags a generator gradient that stays far below its early value.

    The reference is the mean of the first ``ref_steps`` finite norms seen;
    the alert fires once ``patience`` consecutive values fall below
    ``ratio × reference`` and re-arms when the norm climbs back above it.
    """

    ratio: float
    patience: int
    ref_steps: int = 10
    reference: float | None = None
    _early: list[float] = field(default_factory=list)
    _low_run: int = 0
    _fired: bool = False

    def update(self, value: float) -> bool:
        """Feed one logged norm; True exactly when the alert should fire."""
        if not math.isfinite(value):
            return False
        if self.reference is None:
            self._early.append(value)
            if len(self._early) >= self.ref_steps:
                self.reference = float(np.mean(self._early))
            return False
        if value < self.ratio * self.reference:
            self._low_run += 1
            if self._low_run >= self.patience and not self._fired:
                self._fired = True
                return True
        else:
            self._low_run = 0
            self._fired = False
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "early": list(self._early), "low_run": self._low_run, "fired": self._fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state["reference"]
        self._early = list(state["early"])
        self._low_run = int(state["low_run"])
        self._fired = bool(state["fired"])


@dataclass
class DropDetector:
    """Flags a count (active latent units) that falls to ``fraction`` of its peak and stays there.

    Batch estimates jitter by a unit or two, so the alert needs ``patience``
    consecutive low values and re-arms only once the count is back above
    ``rearm`` × peak: one alert per episode, not one per flicker.
    """

    fraction: float = 0.5
    rearm: float = 0.75
    patience: int = 50
    min_peak: float = 2.0
    peak: float = 0.0
    _low_run: int = 0
    _fired: bool = False

    def update(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        self.peak = max(self.peak, value)
        if self.peak < self.min_peak:
            return False
        if value <= self.fraction * self.peak:
            self._low_run += 1
            if self._low_run >= self.patience and not self._fired:
                self._fired = True
                return True
        else:
            self._low_run = 0
            if value > self.rearm * self.peak:
                self._fired = False
        return False
