"""``gradwatch.init(...)`` → :class:`Run`: a user's own training script streaming into the dashboard.

What a script pays per step is what the built-in trainer pays: values stay on
their device in a :class:`~trainer.telemetry.MetricBuffer` and reach the host
in one copy per flush (every ``flush_steps`` steps or ``flush_ms``
milliseconds); the flush writes frames to the run's folder
(:mod:`gradwatch.folder`), and a background thread uploads them. Nothing the
script calls waits on the network.

Controls go the other way: the channel thread queues what the dashboard sends,
and the script's own thread applies it between two steps (at the start of a
watched model's step, or at ``run.log``), so an optimiser is never changed
under a running ``step()``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from gradwatch import server as srv
from gradwatch.config import Config, plain
from gradwatch.folder import RunFolder, Uploader
from gradwatch.images import Image, file_name, write_grid
from gradwatch.probes import GanWatch, VaeWatch
from gradwatch.source import script_source
from trainer.alerts import Alert, GanAlerts, VaeAlerts
from trainer.config import ControlRequest, GanConfig
from trainer.files import atomic_write
from trainer.probes import DEFAULT_TELEMETRY_BUDGET
from trainer.telemetry import MetricBuffer, MetricGroup, StepRow, flush_to_frames, flush_when_due

log = logging.getLogger("gradwatch")

Mode = Literal["auto", "online", "offline"]
DEFAULT_OUT = Path("gradwatch-runs")
#: How long ``finish`` waits for the server to acknowledge the last frames while it is connected...
FINISH_DRAIN_S = 30.0
#: ...and while it is not (the frames wait in the folder for a reconnect or ``gradwatch sync``).
FINISH_DRAIN_AWAY_S = 3.0
MAX_ERROR_CHARS = 20_000


def _check_plain(obj: Any, where: str = "obj", depth: int = 0) -> None:
    """A checkpoint holds tensors and plain data only (SPEC §7), so ``torch.load(weights_only=True)`` opens it."""
    if depth > 64:
        raise ValueError(f"save_checkpoint: {where} is nested too deeply")
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, Tensor, torch.dtype, torch.device, torch.Size)):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ValueError(f"save_checkpoint: {where} has a key of type {type(key).__name__}")
            _check_plain(value, f"{where}[{key!r}]", depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]", depth + 1)
        return
    raise ValueError(f"save_checkpoint: {where} is a {type(obj).__name__}; a checkpoint holds tensors and plain "
                     "data only (state_dict()s, numbers, strings, lists, dicts), so that it loads with "
                     "torch.load(weights_only=True)")


class Run:
    """One run of a user's script. Make it with :func:`gradwatch.init`; use it as a context manager.

    ``id``: the server's run id (a local id while offline); ``url``: the run's page, once the server has it;
    ``folder``: where its frames and artifacts are kept; ``config``: its free-form config.
    """

    def __init__(self, name: str | None = None, config: Any = None, *, project: str | None = None,
                 server: str | None = None, token: str | None = None, mode: Mode = "auto",
                 out: str | Path | None = None, log_every: int = 1, hist_every: int = 50, flush_steps: int = 50,
                 flush_ms: int = 250, telemetry_budget: float = DEFAULT_TELEMETRY_BUDGET, quiet: bool = False) -> None:
        if mode not in ("auto", "online", "offline"):
            raise ValueError(f"gradwatch.init: mode must be auto, online or offline, not {mode!r}")
        for label, value in (("log_every", log_every), ("hist_every", hist_every), ("flush_steps", flush_steps),
                             ("flush_ms", flush_ms)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"gradwatch.init: {label} must be a positive integer, not {value!r}")
        if (isinstance(telemetry_budget, bool) or not isinstance(telemetry_budget, int | float)
                or not 0 < telemetry_budget <= 1):
            raise ValueError(f"gradwatch.init: telemetry_budget must be a number above 0 and at most 1 (the share "
                             f"of step time telemetry may take; 1: everything every step), not {telemetry_budget!r}")
        self.telemetry_budget = float(telemetry_budget)
        self.uid = uuid.uuid4().hex
        self.local_id = time.strftime("%Y%m%d-%H%M%S-") + self.uid[:6]
        self.name = name or ""
        self.project = project
        self.log_every, self.hist_every = log_every, hist_every
        self.quiet = quiet
        data = plain(config) if config is not None else {}
        if not isinstance(data, dict):
            raise TypeError(f"gradwatch.init: config must be a dict or an argparse Namespace, not "
                            f"{type(config).__name__}")
        self.folder_path = Path(out) if out is not None else DEFAULT_OUT / self.local_id
        self.folder = RunFolder(self.folder_path, self.local_id)
        self.config = Config(data, on_change=self._config_changed)
        self.kind = "custom"
        self.step = 0
        self.status = "running"
        self.buffer = MetricBuffer(flush_steps, flush_ms)
        self._watches: list[GanWatch | VaeWatch] = []
        self._controls: list[str] = []
        self._pending_controls: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._checkpoint_fn: Callable[[], dict[str, Any]] | None = None
        self._stop_checkpoint_saved = False
        self._alert_checks: list[Callable[[MetricGroup], tuple[list[Alert], int | None]]] = []
        self._finished = False
        self._reported_drops = 0
        self._lock = threading.RLock()  # log() may be called from a DataLoader callback thread; keep rows whole
        source = script_source(origin="script", project=project, folder=self.folder_path.resolve())
        self._meta = {"uid": self.uid, "name": self.name, "kind": self.kind, "config": self.config.as_dict(),
                      "source": source, "created_at": time.time(), "status": "running"}
        self.folder.write_meta(self._meta)
        self.uploader = self._connect(server, token, mode, source)
        self.folder.emit("status", status="running", error=None, step=0)
        atexit.register(self._at_exit)
        self._announce()

    # -- where the run goes ---------------------------------------------------------------------
    def _connect(self, server: str | None, token: str | None, mode: Mode, source: dict[str, Any]) -> Uploader | None:
        if mode == "offline":
            return None
        base = srv.configured_server(server)
        if base is None:
            if not srv.answers(srv.DEFAULT_SERVER):
                if mode == "online":
                    base = srv.DEFAULT_SERVER  # keep trying: the server may start after the script
                else:
                    return None
            else:
                base = srv.DEFAULT_SERVER
        body = {"name": self.name or None, "kind": self.kind, "config": self.config.as_dict(), "source": source,
                "uid": self.uid}
        uploader = Uploader(self.folder, base, srv.configured_token(token), body)
        uploader.on_created.append(lambda created: self._created(base, created))
        try:
            uploader.create()
        except srv.ServerError as exc:
            self.folder.close()
            raise RuntimeError(f"gradwatch.init: {exc.detail}") from None
        except OSError as exc:
            if not self.quiet:
                sys.stderr.write(f"gradwatch: the server at {base} does not answer ({exc}); the run is kept in "
                                 f"{self.folder_path} and uploaded when it does\n")
        channel = uploader.channel
        channel.on_control = self._on_control
        channel.on_stop = self._stop.set
        channel.on_refused = self._refused
        # As a built-in run's worker does (app/worker.py), the channel thread keeps flush_ms: logged steps leave
        # no later than that after the oldest, even while the script's thread is inside a long step. (No early
        # flush when the channel is idle: a script's frames go to its folder first, cut the same way online and
        # offline, so that a run synced later is the same run.) The alert checks of what it sends wait for the
        # script's next log() (MetricBuffer.due asks for it), on the script's thread.
        channel.on_wake = lambda: flush_when_due(self.buffer, self.folder.emit)
        uploader.start()
        return uploader

    def _created(self, base: str, created: dict[str, Any]) -> None:
        """The server has the run: its folder says where, for whoever looks at it later."""
        self._meta["server"] = {"url": base, "run": created["run"]["id"]}
        with contextlib.suppress(OSError):
            self.folder.write_meta(self._meta)

    def _refused(self, status: int) -> None:
        sys.stderr.write(f"gradwatch: the server no longer accepts run {self.id} (HTTP {status}: deleted?); "
                         f"the run goes on in {self.folder_path}\n")

    def _announce(self) -> None:
        if self.quiet:
            return
        label = f" {self.name!r}" if self.name else ""
        if self.url:
            sys.stderr.write(f"gradwatch: run{label} streaming to {self.url}\n")
        elif self.uploader is None:
            sys.stderr.write(f"gradwatch: no server; run{label} kept offline in {self.folder_path} "
                             f"(upload it with: gradwatch sync {self.folder_path})\n")
        sys.stderr.flush()

    @property
    def id(self) -> str:
        if self.uploader is not None and self.uploader.created is not None:
            return str(self.uploader.created["run"]["id"])
        return self.local_id

    @property
    def url(self) -> str | None:
        return self.uploader.run_url if self.uploader is not None else None

    @property
    def online(self) -> bool:
        return self.uploader is not None

    # -- what the script calls ----------------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int | None = None, *, commit: bool | None = None) -> None:
        """Record ``metrics`` (numbers, or one-element tensors left on their device) at ``step``.

        ``step`` defaults to one after the last. What watched models measured since the last call is logged at
        the same step. A :class:`~gradwatch.images.Image` value is written as a sample grid under its key.
        """
        del commit  # accepted for wandb's signature: every call is committed at once here
        self._check_open()
        if not isinstance(metrics, Mapping):
            raise TypeError(f"log: metrics must be a dict of name → value, not {type(metrics).__name__}")
        with self._lock:
            self._between_steps()
            if step is None:
                step = self.step + 1
            elif not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"log: step must be a non-negative integer, not {step!r}")
            images = {k: v for k, v in metrics.items() if isinstance(v, Image)}
            row = self._probe_rows(step)
            for key, value in metrics.items():
                if key in images:
                    continue
                _check_key(key)
                row.add_scalar(key, _scalar(key, value))
            self.buffer.append(step, row)
            self.step = max(self.step, step)
            for key, image in images.items():
                self._write_images(image, step, key)
            self._maybe_flush()

    def log_images(self, images: Any, step: int | None = None, name: str = "samples") -> str:
        """Write ``images`` (N, C, H, W) as one PNG grid like a built-in run's samples; returns its file name."""
        self._check_open()
        with self._lock:
            return self._write_images(images, self.step if step is None else step, name)

    def save_checkpoint(self, obj: Mapping[str, Any], step: int | None = None, name: str | None = None) -> Path:
        """Save ``obj`` (tensors and plain data: state_dicts, numbers...) atomically; it uploads to the run.

        It loads with ``torch.load(path, weights_only=True)``, as every gradwatch checkpoint does.
        """
        self._check_open()
        _check_plain(obj)
        step = self.step if step is None else step
        file = file_name(step, name or "", ".pt")
        path = self.folder_path / "checkpoints" / file
        atomic_write(path, lambda fh: torch.save(obj, fh))
        with self._lock:
            self._flush()  # the checkpoint's frame after the metrics of the steps before it
            self.folder.emit("checkpoint", step=step, name=file, url=f"checkpoints/{file}")
        return path

    def register_checkpoint(self, make: Callable[[], dict[str, Any]]) -> None:
        """What to save when Stop is pressed in the dashboard (``make()`` is called between two steps)."""
        self._checkpoint_fn = make

    @property
    def stop_requested(self) -> bool:
        """True once Stop was pressed in the dashboard; checking it is what makes the Stop button appear.

        When it turns true the registered checkpoint (see :meth:`register_checkpoint`; :meth:`watch_gan` registers
        the models and optimisers it watches) is saved, once.
        """
        if "stop" not in self._controls and not self._finished:
            self._register_controls(["stop"])
        if not self._stop.is_set():
            return False
        self._save_stop_checkpoint()
        return True

    def watch_gan(self, generator: nn.Module, discriminator: nn.Module, g_loss: str = "non_saturating",
                  opt_g: torch.optim.Optimizer | None = None, opt_d: torch.optim.Optimizer | None = None,
                  **options: Any) -> GanWatch:
        """A probe that reports every SPEC §2 GAN key for these two modules; see :class:`~gradwatch.probes.GanWatch`."""
        self._check_open()
        options = {"log_every": self.log_every, "hist_every": self.hist_every,
                   "telemetry_budget": self.telemetry_budget, **options}
        watch = GanWatch(self, generator, discriminator, g_loss=g_loss, opt_g=opt_g, opt_d=opt_d, **options)
        self._watches.append(watch)
        self.kind = "gan"
        defaults = GanConfig()
        alerts = GanAlerts(defaults.collapse_ratio, defaults.collapse_patience)
        self._alert_checks.append(lambda group: alerts.check(group, watch.g_loss))
        if self._checkpoint_fn is None:
            self._checkpoint_fn = watch.checkpoint
        self._register_controls(watch.controls())
        return watch

    def watch_vae(self, encoder: nn.Module, decoder: nn.Module, *, beta: float = 1.0,
                  opt: torch.optim.Optimizer | None = None) -> VaeWatch:
        """A probe that reports every SPEC §2 VAE key; see :class:`~gradwatch.probes.VaeWatch`."""
        self._check_open()
        watch = VaeWatch(self, encoder, decoder, beta=beta, opt=opt, log_every=self.log_every,
                         telemetry_budget=self.telemetry_budget)
        self._watches.append(watch)
        self.kind = "vae"
        self._alert_checks.append(VaeAlerts().check)
        if self._checkpoint_fn is None:
            self._checkpoint_fn = watch.checkpoint
        self._register_controls([])
        return watch

    def finish(self, status: str | None = None, error: str | None = None) -> None:
        """End the run: last values flushed, final status sent, and the upload drained (bounded wait)."""
        if self._finished:
            return
        if self.uploader is not None:
            self.uploader.channel.on_wake = None  # from here the script's thread sends the rest, then the status
        with self._lock:
            self._commit_unclaimed_rows()
            if status is None:
                status = "stopped" if self._stop.is_set() else "completed"
            if status not in ("completed", "stopped", "failed"):
                raise ValueError(f"finish: status must be completed, stopped or failed, not {status!r}")
            if status == "stopped":
                self._save_stop_checkpoint()
            self._flush()
            self._report_drops()
            self.folder.emit("status", status=status, error=error, step=self.step)
            self._finished = True
            self.status = status
        atexit.unregister(self._at_exit)
        self._meta["status"] = status
        with contextlib.suppress(OSError):
            self.folder.write_meta(self._meta)
        self._drain()
        self.folder.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.finish()
            return
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        if len(text) > MAX_ERROR_CHARS:
            text = "…" + text[-MAX_ERROR_CHARS:]
        self.finish("failed", text.strip())

    # -- between steps (the script's thread) -------------------------------------------------------
    def _between_steps(self) -> None:
        """Apply what the dashboard asked for since the last step."""
        while True:
            try:
                changes = self._pending_controls.get_nowait()
            except queue.Empty:
                return
            applied: dict[str, Any] = {}
            for watch in self._watches:
                applied.update(watch.apply_dashboard_control(changes))
            if applied:
                self._flush()
                self.folder.emit("control", step=self.step, changes=applied)

    def _on_control(self, changes: dict[str, Any]) -> None:
        """Channel thread: validate now, apply between two steps."""
        try:
            request = ControlRequest.model_validate(changes)
        except ValidationError as exc:
            raise ValueError(str(exc)) from exc
        self._pending_controls.put(request.changes())

    def _register_controls(self, controls: list[str]) -> None:
        merged = list(dict.fromkeys([*self._controls, *controls]))
        if merged == self._controls and self.kind == self._meta.get("kind"):
            return
        self._controls = merged
        self._meta["kind"] = self.kind
        self.folder.emit("capabilities", kind=self.kind, controls=merged)

    def _save_stop_checkpoint(self) -> None:
        if self._stop_checkpoint_saved or self._checkpoint_fn is None:
            return
        self._stop_checkpoint_saved = True
        self.save_checkpoint(self._checkpoint_fn(), step=self.step)

    # -- telemetry -----------------------------------------------------------------------------------
    def _probe_rows(self, step: int) -> StepRow:
        """What watched models recorded since the last step, as the row of ``step`` (extra probes: own rows)."""
        rows = [row for row in (watch.take_row() for watch in self._watches) if not row.empty]
        for extra in rows[1:]:
            self.buffer.append(step, extra)
        self._take_hists(step)
        return rows[0] if rows else StepRow()

    def _take_hists(self, step: int) -> None:
        for watch in self._watches:
            packet = watch.take_hist()
            if packet is not None:
                self.buffer.append_hist(step, packet)

    def _claim_row(self, row: StepRow) -> None:
        """A watched model began a new step while the last one was never logged: log it under the next step."""
        with self._lock:
            step = self.step + 1
            self.buffer.append(step, row)
            self._take_hists(step)
            self.step = step
            self._maybe_flush()

    def _commit_unclaimed_rows(self) -> None:
        rows = [row for row in (watch.take_row() for watch in self._watches) if not row.empty]
        if rows:
            step = self.step + 1
            for row in rows:
                self.buffer.append(step, row)
            self._take_hists(step)
            self.step = step

    def _maybe_flush(self) -> None:
        if self.buffer.due():
            self._flush()

    def _flush(self) -> None:
        start = time.perf_counter()
        groups = flush_to_frames(self.buffer, self.folder.emit)
        spent = time.perf_counter() - start
        for watch in self._watches:  # the flush is telemetry every watch's budget pays for
            watch.budget.charge(spent / len(self._watches))
        for group in groups:
            for check in self._alert_checks:
                # A script's run reports a divergence and lets the script decide; a built-in run would fail.
                for alert in check(group)[0]:
                    self.folder.emit("alert", step=alert.step, kind=alert.kind, message=alert.message)
        self._report_drops()

    def _report_drops(self) -> None:
        dropped = self.folder.dropped
        if dropped > self._reported_drops and self.folder.outbox.has_room():
            self.folder.emit("alert", step=self.step, kind="spool_full",
                             message=f"{dropped - self._reported_drops} frames were dropped while the server was "
                                     "away: more was waiting for it than the spool may hold")
            self._reported_drops = dropped

    def _write_images(self, images: Any, step: int, label: str) -> str:
        file = file_name(step, label, ".png")
        write_grid(images, self.folder_path / "samples" / file)
        self._flush()
        self.folder.emit("sample", step=step, name=file, url=f"samples/{file}", label=label)
        return file

    def _config_changed(self) -> None:
        if self._finished:
            return
        self._meta["config"] = self.config.as_dict()
        self.folder.emit("config", config=plain(self.config.as_dict()))

    # -- ending -----------------------------------------------------------------------------------
    def _drain(self) -> None:
        if self.uploader is None:
            return
        channel = self.uploader.channel
        wait = FINISH_DRAIN_S if channel.connected else FINISH_DRAIN_AWAY_S
        if not channel.close(drain_timeout_s=wait) and not self.quiet:
            sys.stderr.write(f"gradwatch: {channel.pending()} frames of run {self.id} are not on the server yet; "
                             f"they wait in {self.folder_path}: upload them with gradwatch sync {self.folder_path}\n")

    def _at_exit(self) -> None:
        """The script ended without finish(): send what was logged, but no final status (the run becomes
        interrupted after the server's grace period, which is what happened)."""
        if self._finished:
            return
        with contextlib.suppress(Exception):
            with self._lock:
                self._commit_unclaimed_rows()
                self._flush()
            self._drain()

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"run {self.id} has finished; start another with gradwatch.init()")


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not key or len(key) > 200 or not key.isprintable():
        raise ValueError(f"log: {key!r} is not a metric name (a printable string of 1 to 200 characters)")


def _scalar(key: str, value: Any) -> Tensor | float:
    """A value to log, without a device sync: a tensor stays where it is, a number becomes a float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"log: {key!r} is a tensor of {value.numel()} elements; log one number per key")
        return value.detach()
    if isinstance(value, np.ndarray) and value.size == 1:
        return float(value.reshape(()))
    if isinstance(value, (bool, int, float, np.number)):
        return float(value)
    raise TypeError(f"log: {key!r} is a {type(value).__name__}; log numbers, one-element tensors or gradwatch.Image")
