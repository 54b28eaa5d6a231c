"""Telemetry: keep per-step values on the device, move them to the host in bulk.

A ``.item()`` per metric per step would force a GPU→CPU sync every step and
stall the training pipeline. Instead each logged step contributes a
:class:`StepRow` (named segments of small device tensors, plus any Python
floats kept on the host) to a :class:`MetricBuffer`, which reaches the host
with a single ``torch.cat(...).cpu()`` when it is due (:meth:`MetricBuffer.due`):
at once when whoever takes the frames is idle (a worker's channel with nothing
unacknowledged), else when its oldest step would otherwise wait more than
``flush_ms``, or after ``flush_steps`` buffered steps. Rows may name different
keys from step to step; the flush returns one group per key tuple, each one
``metrics`` frame. Checks that need host values (non-finite losses, gradient
collapse) run at flush time on the copied numbers.

Frames follow SPEC §4: JSON objects with ``type``, ``run`` and a per-run
``seq`` that increases by one with every frame emitted.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from trainer.losses import dloss_dh

Frame = dict[str, Any]
FrameSink = Callable[[Frame], None]

HIST_BINS = 40
#: Values per ``metrics`` frame at most (steps × keys): ~1 MB of JSON, a quarter of the channel's message cap.
MAX_FRAME_VALUES = 50_000
#: The histogram keys of a GAN run (SPEC §2), in the order a logit packet holds them.
HIST_KEYS = ("hist/real_logit", "hist/fake_logit")
#: Fake samples per ``dldh`` frame: enough points to trace both curves, few enough to send every hist step.
DLDH_SAMPLES = 64
#: A flush made early, because the channel was idle, must follow the previous one by at least what a flush costs
#: per buffered entry (the price of one more frame, measured) divided by this: the frames early flushes add take
#: about this share of the training thread at most. A flush on the deadline is never held back.
IDLE_FLUSH_SHARE = 0.002
#: Early flushes only while the training thread gets at least this share of the wall time on a CPU: below it the
#: machine is oversubscribed (eight runs on two cores), a frame's cost (mostly the server's: storing it, fanning
#: it out) comes out of training, and steps wait for the deadline instead.
UNCONTENDED_CPU_SHARE = 0.8


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
    """Stamps frames with the run id and a gapless per-run sequence number.

    Thread-safe: a worker's channel thread may flush metrics (:func:`flush_when_due`) while the training
    thread emits a status or a sample; each frame reaches the sink in the order of its seq.
    """

    run: str
    sink: FrameSink
    seq: int = 0
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def emit(self, frame_type: str, **fields: Any) -> Frame:
        with self._lock:
            self.seq += 1
            frame: Frame = {"type": frame_type, "run": self.run, "seq": self.seq, **fields}
            self.sink(frame)
        return frame


#: A batched segment's reduction: the segment's inputs of N steps, each stacked on a new first dimension, to an
#: (N, names) tensor. Called once per flush for all buffered steps, or on one step's inputs (N = 1).
Reducer = Callable[..., Tensor]

#: Segment kinds of a :class:`RowPlan`: device values, a host float, device inputs reduced at the flush.
DEVICE, HOST, BATCHED = 0, 1, 2


class Batched(NamedTuple):
    """A segment whose values are computed at the flush: ``reduce`` of ``inputs`` stacked over the buffered steps."""

    reduce: Reducer
    inputs: tuple[Tensor, ...]


class RowPlan:
    """How the raw values of a row with one segment layout become its named columns.

    Built once per layout (the names of its segments, their kinds — device, host float, batched — and the
    batched segments' reductions) and cached: every logged step of a run has the same layout, so the
    per-step cost of naming is a dict lookup. ``keys`` keeps each name once, at the place of the last
    segment that holds it ("the later one wins"); ``device_src``/``device_dst`` and
    ``host_src``/``host_dst`` map raw columns onto ``keys``: the device segments concatenated, then the
    batched segments' reduced columns, and the host floats in order. ``identity`` marks a layout whose
    raw device values already are the row.
    """

    __slots__ = ("device_dst", "device_src", "host_dst", "host_src", "identity", "keys", "n_batched", "n_device",
                 "n_host", "n_plain", "pieces", "reducers")

    def __init__(self, layout: tuple[tuple[str, ...], ...], kinds: tuple[int, ...],
                 reducers: tuple[Reducer | None, ...] | None = None) -> None:
        reducers = reducers if reducers is not None else (None,) * len(layout)
        #: The batched segments' reductions, in segment order.
        self.reducers: tuple[Reducer, ...] = tuple(r for r, kind in zip(reducers, kinds, strict=True)
                                                   if kind == BATCHED and r is not None)
        n_plain = sum(len(names) for names, kind in zip(layout, kinds, strict=True) if kind == DEVICE)
        last: dict[str, tuple[int, int]] = {}
        for i, names in enumerate(layout):
            for j, name in enumerate(names):
                last[name] = (i, j)
        keys: list[str] = []
        device_src: list[int] = []
        device_dst: list[int] = []
        host_src: list[int] = []
        host_dst: list[int] = []
        #: Per segment, the (start, stop) runs of its entries that survive, for :meth:`StepRow.values`.
        pieces: list[list[tuple[int, int]]] = []
        n_plain_seen = n_batched = n_host = 0
        for i, (names, kind) in enumerate(zip(layout, kinds, strict=True)):
            host = kind == HOST
            start = n_host if host else (n_plain_seen if kind == DEVICE else n_plain + n_batched)
            kept = [j for j, name in enumerate(names) if last[name] == (i, j)]
            for j in kept:
                (host_dst if host else device_dst).append(len(keys))
                (host_src if host else device_src).append(start + j)
                keys.append(names[j])
            runs: list[tuple[int, int]] = []
            for j in kept:
                if runs and runs[-1][1] == j:
                    runs[-1] = (runs[-1][0], j + 1)
                else:
                    runs.append((j, j + 1))
            pieces.append(runs)
            if host:
                n_host += len(names)
            elif kind == DEVICE:
                n_plain_seen += len(names)
            else:
                n_batched += len(names)
        self.keys = tuple(keys)
        self.n_plain, self.n_batched, self.n_host = n_plain, n_batched, n_host
        self.n_device = n_plain + n_batched
        self.device_src, self.device_dst = np.array(device_src, dtype=np.intp), np.array(device_dst, dtype=np.intp)
        self.host_src, self.host_dst = np.array(host_src, dtype=np.intp), np.array(host_dst, dtype=np.intp)
        in_order = np.arange(len(keys))
        self.identity = (n_host == 0 and len(keys) == self.n_device and np.array_equal(self.device_src, in_order)
                         and np.array_equal(self.device_dst, in_order))
        self.pieces = pieces

    def assemble(self, device: np.ndarray, host: np.ndarray) -> np.ndarray:
        """The named table (rows × ``keys``) from the raw device and host tables of rows of this layout."""
        if self.identity:
            return device
        table = np.empty((max(device.shape[0], host.shape[0]), len(self.keys)), dtype=np.float64)
        if self.n_device:
            table[:, self.device_dst] = device[:, self.device_src]
        if self.n_host:
            table[:, self.host_dst] = host[:, self.host_src]
        return table


@functools.lru_cache(maxsize=1024)
def _row_plan(layout: tuple[tuple[str, ...], ...], kinds: tuple[int, ...],
              reducers: tuple[Reducer | None, ...]) -> RowPlan:
    return RowPlan(layout, kinds, reducers)


def _kind(segment: Tensor | float | Batched) -> int:
    if type(segment) is float:
        return HOST
    return BATCHED if isinstance(segment, Batched) else DEVICE


def reduce_batched(segment: Batched, steps: list[tuple[Tensor, ...]] | None = None) -> Tensor:
    """A batched segment's values for ``steps`` (each one step's inputs; default: the segment's own), (N, names).

    Inputs of the same shape at every step are stacked and reduced in one go (a handful of kernels for the
    whole buffer); a step whose inputs differ in shape (a script's last, smaller batch) is reduced on its own.
    """
    rows = steps if steps is not None else [segment.inputs]
    first = rows[0]
    if all(all(a.shape == b.shape for a, b in zip(row, first, strict=True)) for row in rows):
        stacked = [torch.stack([row[i] for row in rows]) for i in range(len(first))]
        return segment.reduce(*stacked).float()
    return torch.cat([segment.reduce(*(t.unsqueeze(0) for t in row)).float() for row in rows])


class StepRow:
    """One step's scalars, every value named, each left where it was computed until the flush.

    Producers add *segments*: a 1-D device tensor together with the names of its entries (one
    segment per producer: a probe's discriminator part, its generator part, a user's own
    ``run.log``). Naming the values where they are made, instead of by their position in one
    stacked tensor, lets independent producers build a row without agreeing on a column order, and
    lets rows of different steps carry different keys. A Python float stays on the host (a
    segment of its own) and joins the device values only on the host at the flush, so logging one
    never launches a kernel or waits for the device. Adding the same names again replaces the
    earlier segment; a name present in two segments takes the later one's value.

    A *batched* segment (:meth:`add_batched`) keeps the step's inputs (say a batch's logits) and a
    reduction (their mean sigmoid, ...), and the buffer reduces the inputs of every buffered step
    together at the flush: a probe's always-on statistics then cost a few kernels per flush instead of
    a few per step. Its inputs are kept by reference until then, so they must not be changed in place.
    """

    __slots__ = ("_plan", "_segments")

    def __init__(self) -> None:
        self._segments: dict[tuple[str, ...], Tensor | float | Batched] = {}
        self._plan: RowPlan | None = None

    def add(self, names: Sequence[str], values: Tensor) -> None:
        """A segment: ``values`` (1-D, one entry per name) under ``names``."""
        names = tuple(names)
        if values.dim() != 1 or values.shape[0] != len(names):
            raise ValueError(f"{len(names)} names for values of shape {tuple(values.shape)}")
        self._put(names, values.detach() if values.requires_grad else values)

    def add_scalar(self, name: str, value: Tensor | float) -> None:
        """One value: a tensor with one element (it stays on its device) or a Python number (on the host)."""
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name}: a scalar must have one element, got shape {tuple(value.shape)}")
            self._put((name,), value.detach().reshape(1))
        else:
            self._put((name,), float(value))

    def add_batched(self, names: Sequence[str], reduce: Reducer, *inputs: Tensor) -> None:
        """A segment computed at the flush: ``reduce`` of the inputs of all buffered steps, stacked (see
        :data:`Reducer`); ``reduce`` must be the same object at every step (it names the layout)."""
        self._put(tuple(names), Batched(reduce, tuple(t.detach() for t in inputs)))

    def _put(self, names: tuple[str, ...], segment: Tensor | float | Batched) -> None:
        segments = self._segments
        if names in segments:
            del segments[names]  # re-inserted last: it is now the later segment
        segments[names] = segment
        self._plan = None

    @property
    def empty(self) -> bool:
        return not self._segments

    def plan(self) -> RowPlan:
        """The cached :class:`RowPlan` of this row's layout (the same object for every row laid out alike)."""
        if self._plan is None:
            segments = self._segments
            self._plan = _row_plan(tuple(segments), tuple(_kind(v) for v in segments.values()),
                                   tuple(v.reduce if isinstance(v, Batched) else None for v in segments.values()))
        return self._plan

    def keys(self) -> tuple[str, ...]:
        return self.plan().keys

    def values(self) -> Tensor:
        """The row as one 1-D float32 tensor aligned with :meth:`keys`, with a single ``torch.cat``.

        Host floats become one-element tensors made by ``torch.full`` on the row's device: the value
        travels as a kernel argument, never as a host→device copy, so this does not synchronise.
        """
        plan = self.plan()
        segments = [reduce_batched(v)[0] if isinstance(v, Batched) else v for v in self._segments.values()]
        tensors = [v for v in segments if isinstance(v, Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
        parts: list[Tensor] = []
        for segment, runs in zip(segments, plan.pieces, strict=True):
            if not isinstance(segment, Tensor):
                if runs:
                    parts.append(torch.full((1,), segment, dtype=torch.float32, device=device))
            elif len(runs) == 1 and runs[0] == (0, segment.shape[0]):
                parts.append(segment)
            else:
                parts.extend(segment[a:b] for a, b in runs)
        if not parts:
            return torch.zeros(0)
        return torch.cat(parts).float()

    def device_values(self) -> Tensor | None:
        """The raw device segments, concatenated (names repeated across segments included): what a buffer keeps.

        Always a new tensor (``torch.cat`` copies even one segment), so a producer that later updates a
        logged tensor in place does not change the value buffered for this step.
        """
        tensors = [v for v in self._segments.values() if isinstance(v, Tensor)]
        if not tensors:
            return None
        return torch.cat(tensors).float()

    def batched_inputs(self) -> tuple[tuple[Tensor, ...], ...]:
        """Each batched segment's inputs, in segment order."""
        return tuple(v.inputs for v in self._segments.values() if isinstance(v, Batched))

    def host_values(self) -> tuple[float, ...]:
        """The raw host floats, in segment order."""
        return tuple(v for v in self._segments.values() if type(v) is float)


class MetricGroup(NamedTuple):
    """Buffered rows that share one key tuple: the content of one SPEC §4 ``metrics`` frame."""

    keys: tuple[str, ...]
    steps: list[int]
    times: list[float]
    table: np.ndarray


class _Pending:
    """The rows of one layout waiting for a flush."""

    __slots__ = ("batched", "device", "host", "order", "plan", "steps", "times")

    def __init__(self, plan: RowPlan) -> None:
        self.plan = plan
        self.steps: list[int] = []
        self.times: list[float] = []
        self.order: list[int] = []
        self.device: list[Tensor] = []
        self.batched: list[tuple[tuple[Tensor, ...], ...]] = []
        self.host: list[tuple[float, ...]] = []

    def device_table(self) -> Tensor:
        """The rows' raw device values as one flat row-major (rows × ``n_device``) tensor: the device segments,
        then every batched segment reduced over all the rows at once."""
        n = len(self.steps)
        columns: list[Tensor] = []
        if self.plan.n_plain:
            columns.append(torch.stack(self.device))
        for i, reduce in enumerate(self.plan.reducers):
            columns.append(reduce_batched(Batched(reduce, ()), [row[i] for row in self.batched]).reshape(n, -1))
        if len(columns) > 1:
            device = columns[-1].device
            columns = [c.to(device) for c in columns]
        return torch.cat(columns, dim=1).reshape(-1)


class MetricBuffer:
    """Buffered telemetry: named rows of any key sets, and histogram packets, off the device in one copy.

    Rows are grouped by layout as they arrive (a dict lookup on a cached plan), so a run that logs
    ``val/acc`` every hundred steps beside its per-step keys costs nothing extra on the other
    steps. :meth:`flush` moves every buffered device value, histogram packets included, to the host
    with a single ``torch.cat(...).cpu()`` and returns one :class:`MetricGroup` per key tuple, in
    the order of each group's first row.

    When to flush is :meth:`due`'s answer, asked by the training thread once per step. ``idle``
    (optional) says whether the frames' consumer has nothing in flight: a worker's channel with every
    frame acknowledged. Then a buffered step goes at once; while a frame is in flight, steps are batched
    (Nagle's rule), until the oldest would wait more than ``flush_ms``: a deadline counted from the oldest
    buffered step, not a period. The producer pays for a flush (a device→host copy, a GPU sync on CUDA,
    and the frames' encoding), so an early flush must also follow the previous one by at least what a
    flush costs per entry over :data:`IDLE_FLUSH_SHARE`, and only while the training thread has a CPU when it
    wants one (:data:`UNCONTENDED_CPU_SHARE`, its CPU time over the wall time between two flushes, read at
    the flush): on an oversubscribed machine a frame's cost comes out of training, and the deadline rules.

    A training thread starved of CPU (eight runs on two cores, at nice 10) checks after each of its
    steps only, and a step can then take tens of milliseconds: another thread may keep the deadline and
    take the acknowledgement's cue for it, through :func:`flush_when_due` (a worker's channel thread does).
    Appends and flushes are therefore thread-safe, and the groups such a flush sends are handed back to
    the training thread's next :func:`flush_to_frames` for their host-side checks (:meth:`due` says so).
    """

    def __init__(self, flush_steps: int, flush_ms: int, *, idle: Callable[[], bool] | None = None) -> None:
        self.flush_steps = flush_steps
        self.flush_ms = flush_ms
        #: Whether the frames' consumer has nothing in flight (None: never; flush on the deadline alone).
        self.idle = idle
        self._lock = threading.Lock()  # the buffered entries, between append and the swap in flush()
        self._flush_lock = threading.RLock()  # one flush at a time: frames leave in the order of their steps
        self._groups: dict[RowPlan, _Pending] = {}
        self._hists: list[tuple[int, Tensor]] = []
        self._rows = 0
        #: ``time.monotonic()`` when the oldest buffered entry came (None: nothing buffered).
        self._oldest: float | None = None
        #: Groups another thread flushed and sent, whose host-side checks are still to run.
        self._unchecked: list[MetricGroup] = []
        self._last_flush = time.monotonic()  # when the last flush that took something ended
        self._last_check = self._last_flush  # when due() was last asked: the gap is one step
        self._step_s = 0.0  # the last gap between two due() calls, the length of the step to come
        self._flushed = 0  # entries (rows and histograms) the last flush took
        self._producer: int | None = None  # the thread that appends (threading.get_ident()), found at its first
        self._cpu_at: tuple[float, float] | None = None  # its CPU time and the wall time at the last flush
        self._contended = False  # whether it got under UNCONTENDED_CPU_SHARE of a CPU between the last two flushes
        self._on_cuda = False  # whether they were on a CUDA device (the copy then waits for it)
        self._cost_s = 0.0  # what the last flush cost its thread per entry, the frames' encoding included

    def append(self, step: int, row: StepRow) -> None:
        """Buffer one step's row (an empty row is nothing to report and is ignored)."""
        if row.empty:
            return
        plan = row.plan()
        device = row.device_values() if plan.n_plain else None
        batched = row.batched_inputs() if plan.n_batched else None
        host = row.host_values() if plan.n_host else None
        now = time.time()
        if self._producer is None:
            self._producer = threading.get_ident()
        with self._lock:
            pending = self._groups.get(plan)
            if pending is None:
                pending = self._groups[plan] = _Pending(plan)
            if self._oldest is None:
                self._oldest = time.monotonic()
            pending.steps.append(step)
            pending.times.append(now)
            pending.order.append(self._rows)
            if device is not None:
                pending.device.append(device)
            if batched is not None:
                pending.batched.append(batched)
            if host is not None:
                pending.host.append(host)
            self._rows += 1

    def append_hist(self, step: int, packed: Tensor) -> None:
        packed = packed.detach()
        with self._lock:
            if self._oldest is None:
                self._oldest = time.monotonic()
            self._hists.append((step, packed))

    def due(self) -> bool:
        """Whether the training thread should flush now; asked once per step, after the step's row is appended.

        - when another thread's flush left groups to check;
        - after ``flush_steps`` buffered steps;
        - when the oldest buffered entry would pass ``flush_ms`` before the next call (one more step as long
          as the last one): the deadline counts from that entry, not from the last flush;
        - when ``idle()`` says nothing is in flight, unless the last flush ended too recently for what it cost.
        """
        now = time.monotonic()
        step_s, self._step_s, self._last_check = self._step_s, now - self._last_check, now
        if self._unchecked:
            return True
        oldest = self._oldest
        if oldest is None:
            return False
        if self._rows >= self.flush_steps:
            return True
        if (now - oldest + max(step_s, self._step_s)) * 1000.0 >= self.flush_ms:
            return True
        return self._early(now) == 0.0

    def due_in(self) -> float:
        """For a thread other than the training thread: seconds until a flush is due (0: now; inf: nothing buffered).

        Due when the deadline has come, after ``flush_steps`` steps, or early as :meth:`due` says; else when the
        deadline will come (an acknowledgement in the meantime is the caller's cue to ask again).
        """
        oldest = self._oldest
        if oldest is None:
            return math.inf
        now = time.monotonic()
        left = oldest + self.flush_ms / 1000.0 - now
        if left <= 0 or self._rows >= self.flush_steps:
            return 0.0
        return min(left, self._early(now))

    def _early(self, now: float) -> float:
        """Seconds until an early flush may go: 0 when the consumer is idle, the CPU not contended and the last
        flush's cost allows one."""
        idle = self.idle
        if idle is None or self._contended or not idle():
            return math.inf
        return max(0.0, self._last_flush + self._cost_s / IDLE_FLUSH_SHARE - now)

    def _measure_contention(self) -> None:
        """The producer's CPU time over the wall time since the last flush: under UNCONTENDED_CPU_SHARE, contended.

        Read at a flush, on whichever thread makes it (Linux and most Unixes: ``pthread_getcpuclockid``); where a
        thread's CPU clock cannot be read, the CPU counts as free.
        """
        producer = self._producer
        if producer is None or not hasattr(time, "pthread_getcpuclockid"):
            return
        try:
            cpu = time.clock_gettime(time.pthread_getcpuclockid(producer))
        except (OSError, OverflowError):  # the thread has ended
            self._contended, self._cpu_at = False, None
            return
        wall = time.perf_counter()
        if self._cpu_at is not None and wall > self._cpu_at[1]:
            self._contended = (cpu - self._cpu_at[0]) / (wall - self._cpu_at[1]) < UNCONTENDED_CPU_SHARE
        self._cpu_at = (cpu, wall)

    def cost(self, seconds: float) -> None:
        """What the flush that just ended cost its thread, the frames' encoding included (:func:`flush_to_frames`).

        Kept per entry: most of a large flush's cost is its values' encoding, which batching does not save, while
        an early flush (a few entries) costs about one frame's worth, what flushing early adds.
        """
        self._cost_s = seconds / max(1, self._flushed)
        self._last_flush = time.monotonic()
        if self.idle is not None:
            self._measure_contention()

    def take_unchecked(self) -> list[MetricGroup]:
        """The groups another thread flushed since the last call, for the host-side checks."""
        with self._lock:
            groups, self._unchecked = self._unchecked, []
        return groups

    def flush(self) -> tuple[list[MetricGroup], list[tuple[int, np.ndarray]]]:
        """Everything buffered, on the host, with one device→host copy: the groups, then the histogram packets."""
        with self._lock:
            pending, hists = list(self._groups.values()), self._hists
            self._flushed = self._rows + len(hists)
            self._groups, self._hists, self._rows, self._oldest = {}, [], 0, None
        if not pending and not hists:
            return [], []
        tensors = [t for p in pending for t in (p.device if not p.plan.n_batched else [p.device_table()])]
        tensors += [h for _, h in hists]
        self._on_cuda = any(t.is_cuda for t in tensors)
        flat = _to_host(tensors)
        offset = 0
        tables: list[tuple[_Pending, np.ndarray]] = []
        for p in pending:
            n, width = len(p.steps), p.plan.n_device
            device = flat[offset : offset + n * width].reshape(n, width)
            offset += n * width
            host = np.array(p.host, dtype=np.float64).reshape(len(p.host), p.plan.n_host)
            tables.append((p, p.plan.assemble(device, host)))
        out_hists = []
        for step, packed in hists:
            out_hists.append((step, flat[offset : offset + packed.numel()]))
            offset += packed.numel()
        return _merge(tables), out_hists


def _to_host(tensors: list[Tensor]) -> np.ndarray:
    """Concatenate 1-D tensors on the host, with one copy per device they live on (in practice one)."""
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    device = tensors[0].device
    if all(t.device == device for t in tensors):
        return torch.cat(tensors).cpu().numpy()
    # A row mixing devices (a user's CPU metric beside a CUDA model): one copy per device, order restored.
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    arrays: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(tensors)
    for idx in by_device.values():
        flat = torch.cat([tensors[i].float() for i in idx]).cpu().numpy()
        sizes = np.cumsum([tensors[i].numel() for i in idx])[:-1]
        for i, part in zip(idx, np.split(flat, sizes), strict=True):
            arrays[i] = part
    return np.concatenate(arrays)


def _merge(tables: list[tuple[_Pending, np.ndarray]]) -> list[MetricGroup]:
    """One group per key tuple, rows in arrival order; layouts that name the same keys are merged.

    Unless two key tuples share a key and their rows interleave in time (a sampled piece every few steps
    beside the always-on keys): one group per tuple would then send that key's steps out of order across
    frames (steps 1–14 and 16–20 in one frame, 15 in the next), and a consumer that appends a key's points
    in step order would drop the late ones. The rows are then cut into runs of consecutive rows with one key
    tuple, so every key's steps go out in increasing order.
    """
    by_keys: dict[tuple[str, ...], list[int]] = {}
    for k, (p, _) in enumerate(tables):
        by_keys.setdefault(p.plan.keys, []).append(k)
    spans = {keys: (min(tables[k][0].order[0] for k in ks), max(tables[k][0].order[-1] for k in ks))
             for keys, ks in by_keys.items()}
    listed = list(spans)
    interleaved = any(set(a) & set(b) and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
                      for i, a in enumerate(listed) for b in listed[i + 1:])
    rows = sorted((order, k, i) for k, (p, _) in enumerate(tables) for i, order in enumerate(p.order))
    runs: list[list[tuple[int, int]]] = []
    if interleaved:
        for _, k, i in rows:
            if not runs or tables[runs[-1][-1][0]][0].plan.keys != tables[k][0].plan.keys:
                runs.append([])
            runs[-1].append((k, i))
    else:
        first: dict[tuple[str, ...], list[tuple[int, int]]] = {}
        for _, k, i in rows:
            first.setdefault(tables[k][0].plan.keys, []).append((k, i))
        runs = list(first.values())
    if len(runs) == 1 and len(tables) == 1:
        p, table = tables[0]
        return [MetricGroup(p.plan.keys, p.steps, p.times, table)]
    return [_group(tables, run) for run in runs]


def _group(tables: list[tuple[_Pending, np.ndarray]], run: list[tuple[int, int]]) -> MetricGroup:
    keys = tables[run[0][0]][0].plan.keys
    steps = [tables[k][0].steps[i] for k, i in run]
    times = [tables[k][0].times[i] for k, i in run]
    table = np.stack([tables[k][1][i].astype(np.float64) for k, i in run])
    return MetricGroup(keys, steps, times, table)


def flush_to_frames(buffer: MetricBuffer, emit: Callable[..., object], *,
                    defer_checks: bool = False) -> list[MetricGroup]:
    """Flush ``buffer`` (one device→host copy) into SPEC §4 frames through ``emit(type, **fields)``.

    One ``metrics`` frame per key group, then each histogram step's ``hist`` and ``dldh`` frames; returns
    the groups for the host-side checks (alerts) that follow, those of earlier flushes made by another
    thread first. With ``defer_checks`` (that other thread) the groups are kept for the next call instead.
    Built-in runs and scripts flush alike. What it took, the sink's encoding of the frames included, is the
    buffer's measure of a flush's cost (see :meth:`MetricBuffer.due`).
    """
    with buffer._flush_lock:
        began, began_cpu = time.perf_counter(), time.thread_time()
        groups, hists = buffer.flush()
        for group in groups:
            # A long buffer (flush_steps up to 10,000) of many keys is cut into frames of bounded size: one frame
            # must fit a websocket message of the channel (MAX_FRAME_VALUES values ≈ 1 MB of JSON at most).
            rows = max(1, MAX_FRAME_VALUES // max(1, len(group.keys)))
            for start in range(0, len(group.steps), rows):
                end = start + rows
                emit("metrics", **metrics_frame_fields(group.keys, group.steps[start:end], group.times[start:end],
                                                       group.table[start:end]))
        for step, packed in hists:
            for kind, fields in logit_frames_fields(step, packed, HIST_KEYS):
                emit(kind, **fields)
        if groups or hists:
            # On a CPU, the thread's CPU time: a thread preempted mid-flush (a loaded machine) paid nothing for that.
            # On CUDA, the wall time: the copy waits for the device, a stall whether or not the thread spins.
            buffer.cost(time.perf_counter() - began if buffer._on_cuda else time.thread_time() - began_cpu)
        if defer_checks:
            with buffer._lock:
                buffer._unchecked.extend(groups)
            return []
    return buffer.take_unchecked() + groups


def flush_when_due(buffer: MetricBuffer, emit: Callable[..., object]) -> float:
    """Flush ``buffer`` from a thread other than the training thread if a flush is due (:meth:`MetricBuffer.due_in`).

    Returns the seconds after which to ask again if nothing else happens: until the deadline of what is buffered,
    or, with nothing buffered, half of ``flush_ms`` (a step appended meanwhile does not call this thread, so it is
    found with at least half its time left, and the next answer is its exact deadline). The groups' host-side
    checks wait for the training thread's next flush, which :meth:`MetricBuffer.due` asks for.
    """
    wait = buffer.due_in()
    if wait > 0:
        return min(wait, buffer.flush_ms / 2000.0)
    flush_to_frames(buffer, emit, defer_checks=True)
    return buffer.flush_ms / 2000.0


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
