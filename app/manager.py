"""The run manager: queue, place, launch, watch and end worker processes.

A run is a row in the store and, while it trains, one worker process. The
manager owns the transitions ``queued → running → completed | stopped |
failed | interrupted``; everything the worker reports arrives through
:meth:`RunManager.attach` (the worker channel) and is accepted strictly in
seq order, stored, and published to the hub.

Placement: each GPU found gets ``gpu_run_limit`` slots, the CPU gets
``cpu_run_limit``; a worker on GPU ``cuda:N`` sees only that GPU (its
``CUDA_VISIBLE_DEVICES`` is the server's own entry for it, see
:mod:`app.placement`), a CPU worker sees none. With ``backend = "ray"`` the
slots are Ray's instead: each run is handed to the cluster at once as an actor
asking for what it needs (:mod:`app.ray_backend`), and stays ``queued`` until
Ray places it; the rest (channel, stop, control, resume, restart) is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.changes import Changes
from app.hub import Hub, close_quietly
from app.placement import CUDA_ENV, server_gpu_ids, worker_cuda_visible_devices
from app.rate import StepRate
from app.ray_backend import RayBackend, RayWorker, WorkerEnd, describe_node, describe_request
from app.settings import Settings
from app.store import TERMINAL_STATUSES, RunRecord, Store
from gradwatch.protocol import ARTIFACT_FRAMES, ProtocolError, artifact_url, decode_chunk, valid_artifact
from trainer.config import ControlRequest, IntervalConfig, RunConfig
from trainer.cost import checkpoint_problem
from trainer.files import is_temp_file, log_tail, rename_into_place, sweep_temp_files, temp_path
from trainer.samples import prune_samples
from trainer.telemetry import frame_to_json

log = logging.getLogger("gradwatch.manager")

STDERR_TAIL_LINES = 20
STOP_GRACE_S = 60.0
#: After a SIGKILL, how long to wait for the kernel to take the process away (it may be inside a write).
KILL_WAIT_S = 10.0
#: How often the end of a run is retried when the database cannot be written (a full disk).
END_RETRY_S = 5.0


class RunError(Exception):
    """A request the current state of a run does not allow; ``status`` is the HTTP code to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(eq=False)
class Active:
    """What the manager knows of a run that has (or had, before a restart) a worker."""

    run_id: str
    device: str
    pid: int | None = None
    process: asyncio.subprocess.Process | None = None  # None for a worker re-attached after a restart
    ws: WebSocket | None = None
    accepted: int = 0  # highest seq accepted (stored or queued for storing)
    committed: int = 0  # highest seq the store has committed: the most a sender may be told it has
    final: str | None = None  # terminal status the worker reported
    stop_requested: bool = False
    attached: asyncio.Event = field(default_factory=asyncio.Event)
    uploads: dict[tuple[str, str], tuple[Path, Any]] = field(default_factory=dict)
    external: bool = False  # a script's run (gradwatch.client): no process of ours, ends by its frames or its silence
    offset: int = 0  # frames the server wrote into the stream: the sender's frame n is stored as n + offset
    grace: asyncio.Task[Any] | None = None  # an external run's countdown to "interrupted" while disconnected
    # The first seq (sender's numbering) the store could not write, until the sender resends from it.
    lost_from: int | None = None
    write_error: str | None = None  # the last reason the server could not write this run's frames or files
    remote: RayWorker | None = None  # a run on a Ray cluster: its actor, instead of a process of ours

    @property
    def waiting_on_ray(self) -> bool:
        """Handed to Ray, which has not found it room yet: still ``queued``."""
        return self.remote is not None and not self.remote.placed

    @property
    def stored(self) -> int:
        """The highest seq stored (or queued for storing), in the stream's own numbering."""
        return self.accepted + self.offset

    def forget_lost(self) -> bool:
        """After a store failure: what was accepted from the first lost frame on is not stored, so the count goes
        back to before it (the sender resends from there). True if there was a failure."""
        if self.lost_from is None:
            return False
        self.accepted = min(self.accepted, self.lost_from - 1)
        self.lost_from = None
        return True


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def pid_alive(pid: int | None, started: float | None) -> bool:
    """True if ``pid`` is the same live process (its start time guards against pid reuse)."""
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 1.0
    except psutil.Error:
        return False


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "worker process disappeared"
    if code < 0:
        try:
            return f"worker killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"worker killed by signal {-code}"
    return f"worker exited with code {code}"


class RunManager:
    def __init__(self, settings: Settings, store: Store, hub: Hub, *, server_url: Callable[[], str]) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.server_url = server_url
        self.runs_dir = settings.data_dir / "runs"
        self.cache_dir = settings.data_dir / "cache"
        self.active: dict[str, Active] = {}
        # Runs waiting for a slot, oldest first, each with its device request worked out once at submit: placing
        # them reads no row and validates no config, so a submit costs the same with 1,000 runs queued as with none.
        self.queue: dict[str, str] = {}
        self.gpu_ids: list[str] = []  # the driver's name of each GPU, by local index (app.placement)
        self.ray: RayBackend | None = RayBackend(settings) if settings.backend == "ray" else None
        self.ray_gpus = 0.0  # GPUs in the Ray cluster when last asked
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()
        self._submit_lock = asyncio.Lock()
        self.rates = StepRate()
        # Pushes run-table changes to the runs page (app.changes): the store reports every committed run-row change.
        self.changes = Changes()
        store.on_change = self.changes.notify

    @property
    def gpus(self) -> int:
        return len(self.gpu_ids)

    # -- life cycle -------------------------------------------------------------
    async def start(self) -> None:
        self.changes.start()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        if self.ray is not None:
            with _signal_handlers_kept():
                await asyncio.to_thread(self.ray.connect)
            self.ray_gpus = await asyncio.to_thread(self.ray.gpus)
        else:
            self.gpu_ids = await asyncio.to_thread(server_gpu_ids)
        running = await asyncio.to_thread(self.store.list_runs, ["running"])
        alive = {rec.id for rec in running if pid_alive(rec.pid, rec.pid_started)}
        remote = {rec.id: worker for rec in running if (worker := await self._find_actor(rec)) is not None}
        await asyncio.to_thread(self._sweep_temp_files, alive)
        for rec in running:
            if rec.external:
                # A script's run: the script keeps its frames on its own disk and reconnects when we are back.
                active = self._external_active(rec)
                active.grace = self._spawn(self._client_grace(
                    active, "the script did not reconnect after the server restarted"))
                continue
            if rec.id in alive or rec.id in remote:
                # Its worker outlived the old server: give it a while to reconnect.
                active = Active(rec.id, rec.device or "cpu", pid=None if rec.id in remote else rec.pid,
                                accepted=rec.last_seq, remote=remote.get(rec.id))
                self.active[rec.id] = active
                self._spawn(self._await_reattach(active))
            else:
                await self._end(rec.id, "interrupted", "the server stopped while this run was training",
                                accepted=rec.last_seq)
        queued = await asyncio.to_thread(self.store.list_runs, ["queued"])
        await self._end_stale_workers(queued)
        self.queue = {}
        for rec in sorted(queued, key=lambda r: r.created_at):
            try:  # a GPU this server had before the restart may be gone, or the rules for configs have changed
                self.queue[rec.id] = self._device_request(_stored_config(rec))
            except RunError as exc:
                await self._end(rec.id, "failed", exc.detail, accepted=rec.last_seq)
        await self._schedule()

    async def _end_stale_workers(self, queued: list[RunRecord]) -> None:
        """Kill the workers queued runs still have from before a restart.

        A worker launched just before the server died, that had not yet reported ``running``, leaves its run
        ``queued``: the run is launched again, with a new token, into the same folder. The old worker holds a token
        the server no longer knows, so nothing it does reaches anyone; left alone it would train on at full CPU and
        write where the new worker writes.
        """
        if self.ray is not None:  # a run Ray had not placed yet, or had just placed: its actor has an old token too
            for rec in queued:
                actor = (rec.placement or {}).get("actor")
                if actor and await asyncio.to_thread(self.ray.kill_stale, actor):
                    log.warning("run %s: ended its Ray actor %s, launched before the restart", rec.id, actor)
        stale = [rec for rec in queued if pid_alive(rec.pid, rec.pid_started)]
        for rec in stale:
            log.warning("run %s: killing worker %s, launched before the restart and never reported running",
                        rec.id, rec.pid)
            _signal(rec.pid, signal.SIGKILL)
        for rec in stale:
            await _wait_pid_gone(rec.pid, KILL_WAIT_S)

    async def shutdown(self) -> None:
        """Stop every worker and wait for it: no worker outlives the server.

        Each worker is asked to stop (SIGTERM: final checkpoint, then exit) and
        given ``shutdown_grace_s``; one that has not exited by then is killed,
        and waited for too. Its run becomes ``interrupted`` with an error that
        says whether the final checkpoint was written.
        """
        self.changes.close()  # the runs pages' event streams end (they would hold the server open)
        for task in list(self._tasks):
            task.cancel()
        for run_id, active in list(self.active.items()):
            if active.remote is None:
                continue
            self.active.pop(run_id)
            if active.waiting_on_ray:  # never started: it stays queued, and is handed to Ray again at the next start
                await active.remote.end()
            elif active.ws is not None:
                # A run on the cluster outlives the server, as a script's run does: its worker keeps its frames and
                # reconnects to the next server on this data folder (or stops itself after worker_orphan_timeout_s).
                # Stopping it here would lose its final checkpoint: the server no longer takes uploads by now.
                with contextlib.suppress(Exception):
                    await active.ws.close(code=1012, reason="server restarting")
        workers = [a for a in self.active.values() if a.pid is not None]
        # What checkpoints each run has when its worker is told to stop: any file not among them is its final one.
        before = {a.run_id: await asyncio.to_thread(self._checkpoint_files, a.run_id) for a in workers}
        for active in workers:
            await self._signal_worker(active, signal.SIGTERM)
        grace = self.settings.shutdown_grace_s
        exited = await asyncio.gather(*(_wait_exit(a, grace) for a in workers))
        killed = {a.run_id for a, gone in zip(workers, exited, strict=True) if not gone}
        for active in workers:
            if active.run_id in killed:
                log.warning("run %s: worker still running %.0f s after the shutdown began; killing it",
                            active.run_id, grace)
                await self._signal_worker(active, signal.SIGKILL)
        await asyncio.gather(*(_wait_exit(a, KILL_WAIT_S) for a in workers if a.run_id in killed))
        for run_id, active in list(self.active.items()):
            self.active.pop(run_id, None)
            if active.grace is not None:
                active.grace.cancel()
            if active.external:
                if active.ws is not None:
                    # A script's run outlives the server: the script spools its frames and resends them to the
                    # next server on this data folder. Its run stays "running" until then.
                    with contextlib.suppress(Exception):
                        await active.ws.close(code=1012, reason="server restarting")
                continue
            if active.final is None:
                reason = await asyncio.to_thread(self._shutdown_reason, active, killed=run_id in killed,
                                                 before=before.get(run_id, frozenset()))
                await self._end(run_id, "interrupted", reason, accepted=active.stored)
        if self.ray is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.ray.disconnect)

    def _shutdown_reason(self, active: Active, *, killed: bool, before: frozenset[tuple[str, int]]) -> str:
        """What became of a run the shutdown interrupted: was its final checkpoint written, what to resume from.

        A worker that had to be killed had not finished stopping, and its final checkpoint comes first in stopping.
        For one that exited, the files say (its exit code cannot: it is unknown for a worker re-attached after a
        restart, and 0 for one stopped before its first step): a checkpoint file that was not there (``before``,
        see :meth:`_checkpoint_files`) when it was told to stop is its final one, since it stops at the end of the
        step it is in.
        """
        run_dir = self.run_dir(active.run_id)
        saved = bool(self._checkpoint_files(active.run_id) - before)
        self._salvage(active.run_id)  # the final checkpoint waits in the worker's scratch folder
        newest = _newest_checkpoint(run_dir / "checkpoints")
        resume = f"; resume from {newest}" if newest else "; the run has no checkpoint to resume from"
        if killed:
            what = (f"its worker was killed after {self.settings.shutdown_grace_s:g} s without writing its final "
                    "checkpoint")
        else:
            what = "its worker saved a final checkpoint" if saved else "its worker wrote no final checkpoint"
            if active.process is not None and active.process.returncode:
                what += f" ({_describe_exit(active.process.returncode)})"
        return f"the server was shut down while this run was training; {what}{resume}"

    def _checkpoint_files(self, run_id: str) -> frozenset[tuple[str, int]]:
        """A run's finished checkpoints, each as (path in the run folder, inode).

        Every checkpoint is renamed into place from a new temp file (trainer.files), so one rewritten under the
        same name has a new inode: comparing two of these sets tells what was written in between, without
        trusting file times (coarse, and the kernel's clock may lag the caller's).
        """
        run_dir = self.run_dir(run_id)
        found = set()
        for sub in ("checkpoints", "work/checkpoints"):
            folder = run_dir / sub
            for path in folder.glob("*.pt") if folder.is_dir() else []:
                if not is_temp_file(path):
                    with contextlib.suppress(FileNotFoundError):
                        found.add((f"{sub}/{path.name}", path.stat().st_ino))
        return frozenset(found)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _sweep_temp_files(self, alive: set[str]) -> None:
        """Remove what killed writers left (trainer.files); a live worker's folders are its own business."""
        for run_dir in self.runs_dir.iterdir() if self.runs_dir.is_dir() else []:
            subs = ["samples", "checkpoints"]
            if run_dir.name not in alive:
                subs += ["work", "work/samples", "work/checkpoints"]
            for sub in subs:
                sweep_temp_files(run_dir / sub)
        if not alive:  # the classifier cache is shared by every worker
            sweep_temp_files(self.cache_dir)

    # -- requests -----------------------------------------------------------------
    async def submit(self, cfg: RunConfig, *, sweep_id: str | None = None,
                     resume_from: dict[str, Any] | None = None) -> RunRecord:
        return (await self.submit_many([cfg], sweep_id=sweep_id, resume_from=resume_from))[0]

    async def submit_many(self, cfgs: list[RunConfig], *, sweep_id: str | None = None,
                          resume_from: dict[str, Any] | None = None) -> list[RunRecord]:
        """Queue runs (a sweep's all at once, or none of them) and start what fits in the free slots."""
        if self.ray is not None:
            self.ray_gpus = await asyncio.to_thread(self.ray.gpus)
        requests = [self._device_request(cfg) for cfg in cfgs]  # refuse now what could never be placed
        for cfg in cfgs:  # or whose checkpoints this server would refuse (RunConfig allows the default's 1 GiB)
            problem = checkpoint_problem(cfg, self.settings.max_artifact_bytes, "this server's max_artifact_bytes")
            if problem is not None:
                raise RunError(422, problem)
        async with self._submit_lock:  # the room checked is the room used: no concurrent submit in between
            waiting, limit = len(self.queue) + self._waiting_on_ray(), self.settings.max_queued_runs
            if waiting + len(cfgs) > limit:
                more = f"{len(cfgs)} more runs" if len(cfgs) > 1 else "one more run"
                waits = "1 run is" if waiting == 1 else f"{waiting} runs are"
                raise RunError(429, f"queue: {waits} waiting for a slot and this server queues at most "
                                    f"{limit} (max_queued_runs); {more} would not fit. Stop some queued runs, or "
                                    "wait for them to start")
            runs = []
            for cfg, request in zip(cfgs, requests, strict=True):
                run = RunRecord(
                    id=uuid.uuid4().hex[:12], name=cfg.name or f"{cfg.kind} on {cfg.data.name}", kind=cfg.kind,
                    status="queued", config=cfg.model_dump(mode="json"), created_at=time.time(), sweep_id=sweep_id,
                    resume_from=resume_from,
                )
                run_dir = self.runs_dir / run.id
                await asyncio.to_thread(_write_file, run_dir / "config.json", cfg.model_dump_json(indent=2) + "\n")
                if resume_from is not None:
                    # The new run owns a copy: deleting the source run while this one waits must not break it.
                    source = self.run_dir(resume_from["run"]) / "checkpoints" / resume_from["checkpoint"]
                    await asyncio.to_thread(_link_or_copy, source, run_dir / "resume" / resume_from["checkpoint"])
                await asyncio.to_thread(self.store.insert_run, run)
                self.queue[run.id] = request
                runs.append(run)
        await self._schedule()
        return [await self.get(run.id) for run in runs]

    async def get(self, run_id: str) -> RunRecord:
        rec = await asyncio.to_thread(self.store.get_run, run_id)
        if rec is None:
            raise RunError(404, f"no run {run_id!r}")
        return rec

    async def stop(self, run_id: str) -> RunRecord:
        rec = await self.get(run_id)
        if rec.status == "queued" and run_id in self.queue:
            del self.queue[run_id]
            await self._end(run_id, "stopped", None, accepted=rec.last_seq)
            return await self.get(run_id)
        active = self.active.get(run_id)
        if active is not None and active.waiting_on_ray:
            assert active.remote is not None
            self.active.pop(run_id)
            await active.remote.end()  # withdrawn from Ray's queue
            await self._end(run_id, "stopped", None, accepted=rec.last_seq)
            await self._schedule()
            return await self.get(run_id)
        if rec.status in TERMINAL_STATUSES or active is None:
            raise RunError(409, f"run {run_id} is {rec.status}, not running")
        if active.external:
            if "stop" not in (rec.controls or []):
                raise RunError(409, f"run {run_id}'s script does not check run.stop_requested, so it cannot be "
                                    "stopped from here")
            active.stop_requested = True  # told now, or in the hello when the script reconnects
            await self._tell(active, {"type": "stop"})
            return rec
        active.stop_requested = True
        if not await self._tell(active, {"type": "stop"}):
            # A stop like the button's (SIGTERM would mean "the server is leaving").
            await self._signal_worker(active, signal.SIGINT)
        self._spawn(self._kill_after(active, STOP_GRACE_S))
        return rec

    async def control(self, run_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        rec = await self.get(run_id)
        if rec.kind != "gan":
            raise RunError(409, "control: live changes apply to GAN runs only")
        request = ControlRequest.model_validate(changes)  # ValidationError → 422 naming the field
        if rec.controls is not None:
            missing = [key for key in request.changes() if key not in rec.controls]
            if missing:
                have = ", ".join(c for c in rec.controls if c != "stop") or "none"
                raise RunError(409, f"control: run {run_id}'s script did not register {', '.join(missing)} "
                                    f"(it registered: {have})")
        active = self.active.get(run_id)
        if rec.status != "running" or active is None:
            raise RunError(409, f"run {run_id} is {rec.status}, not running")
        if not await self._tell(active, {"type": "control", "changes": request.changes()}):
            raise RunError(409, f"run {run_id} has no worker connected right now; try again")
        return request.changes()

    async def delete(self, run_id: str) -> None:
        rec = await self.get(run_id)
        if rec.status not in TERMINAL_STATUSES:
            raise RunError(409, f"run {run_id} is {rec.status}: stop it before deleting it")
        active = self.active.pop(run_id, None)
        if active is not None:
            # A run that reported its end may still have its sender connected, uploading what it had: let go of
            # it first, so that nothing it sends lands in a folder about to go, or in rows of a run that is gone.
            if active.grace is not None:
                active.grace.cancel()
            ws, active.ws = active.ws, None
            _discard_uploads(active)
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close(code=1008, reason="run deleted")
        self.hub.forget(run_id)
        self.rates.forget(run_id)
        await asyncio.to_thread(self.store.delete_run, run_id)
        await asyncio.to_thread(shutil.rmtree, self.runs_dir / run_id, True)

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def steps_per_s(self, run_id: str) -> float | None:
        """Recent training speed of a run that is training now; None for any other run."""
        active = self.active.get(run_id)
        if active is None or active.final is not None:
            return None
        return self.rates.rate(run_id)

    async def _tell(self, active: Active, message: dict[str, Any]) -> bool:
        """Send a message to the run's worker; False if none is connected."""
        ws = active.ws
        if ws is None:
            return False
        try:
            await ws.send_text(json.dumps(message))
        except (RuntimeError, WebSocketDisconnect, OSError):
            return False
        return True

    # -- placement ------------------------------------------------------------------
    def _device_request(self, cfg: RunConfig) -> str:
        """``cpu``, ``cuda`` (any GPU) or ``cuda:N``; refuses a GPU this server does not have."""
        spec = cfg.train.device
        if self.ray is not None:
            return self._ray_device_request(spec)
        if cfg.train.resources:
            raise RunError(422, "train.resources: this server runs its runs on this machine (backend 'local'); "
                                "custom resources place runs on a Ray cluster (gradwatch serve --backend ray)")
        if spec == "auto":
            return "cuda" if self.gpus else "cpu"
        if spec.startswith("cuda"):
            index = int(spec.split(":", 1)[1]) if ":" in spec else None
            if self.gpus == 0:
                raise RunError(422, "train.device: this server has no CUDA GPU")
            if index is not None and index >= self.gpus:
                raise RunError(422, f"train.device: this server has {self.gpus} GPU(s), no {spec}")
        return spec

    def _ray_device_request(self, spec: str) -> str:
        """On Ray: ``cpu`` or ``cuda``. Which GPU is Ray's choice, so ``cuda:N`` means nothing there."""
        if spec == "auto":
            return "cuda" if self.ray_gpus else "cpu"
        if spec.startswith("cuda:"):
            raise RunError(422, f"train.device: {spec!r} names a GPU of one machine; on a Ray cluster ask for 'cuda' "
                                "and Ray picks the node and the GPU (train.resources pins a run to nodes)")
        if spec == "cuda" and not self.ray_gpus:
            raise RunError(422, "train.device: the Ray cluster has no GPU")
        return spec

    def _waiting_on_ray(self) -> int:
        return sum(1 for active in self.active.values() if active.waiting_on_ray)

    def _free_slot(self, request: str) -> str | None:
        if self.ray is not None:
            return request  # Ray has the slots: every run goes to its queue at once
        load: dict[str, int] = {}
        for active in self.active.values():
            load[active.device] = load.get(active.device, 0) + 1
        if request == "cpu":
            return "cpu" if load.get("cpu", 0) < self.settings.cpu_run_limit else None
        candidates = [request] if ":" in request else [f"cuda:{i}" for i in range(self.gpus)]
        free = [d for d in candidates if load.get(d, 0) < self.settings.gpu_run_limit]
        return min(free, key=lambda d: load.get(d, 0)) if free else None

    async def _schedule(self) -> None:
        async with self._lock:
            full: set[str] = set()  # requests with no free slot left: the rest of the queue waits without a look
            for run_id, request in list(self.queue.items()):
                if request in full:
                    continue
                device = self._free_slot(request)
                if device is None:
                    full.add(request)
                    continue
                del self.queue[run_id]
                rec = await asyncio.to_thread(self.store.get_run, run_id)
                if rec is None or rec.status != "queued":
                    continue
                try:
                    cfg = _stored_config(rec)
                except RunError as exc:
                    await self._end(rec.id, "failed", exc.detail, accepted=rec.last_seq)
                    continue
                await self._launch(rec, cfg, device)

    async def _launch(self, rec: RunRecord, cfg: RunConfig, device: str) -> None:
        run_dir = self.run_dir(rec.id)
        work = run_dir / "work"
        worker_cfg = cfg.with_overrides({"train.device": "cuda" if device.startswith("cuda") else "cpu"})
        token = secrets.token_urlsafe(32)
        if self.ray is not None:
            await self._launch_on_ray(rec, worker_cfg, device, token)
            return
        await asyncio.to_thread(_write_file, work / "config.json", worker_cfg.model_dump_json())
        # -P: no current folder on sys.path, so a user's own app/ package where the server was started cannot
        # stand in for the worker module (PYTHONPATH below names where ours is).
        args = [sys.executable, "-P",
                *self._worker_args(rec, self.server_url(), (os.cpu_count() or 1) // self.settings.cpu_run_limit),
                "--config", str(work / "config.json"), "--work-dir", str(work), "--cache-dir", str(self.cache_dir)]
        # The worker gets its run token on stdin (app.worker says why not in its environment) and nothing of the
        # server's own secrets: the user's access token (GRADWATCH_TOKEN) would let code in a run act as the user
        # on the whole API.
        env = {**{k: v for k, v in os.environ.items() if k not in WORKER_ENV_SECRETS},
               CUDA_ENV: worker_cuda_visible_devices(device, self.gpu_ids),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH")]))}
        active = Active(rec.id, device, accepted=rec.last_seq)
        self.active[rec.id] = active
        await asyncio.to_thread(self.store.update_run, rec.id, token_hash=token_hash(token), device=device)
        log_file = await asyncio.to_thread(open, run_dir / "worker.log", "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, env=env, stdin=asyncio.subprocess.PIPE, stdout=log_file, stderr=log_file,
                # Its own process group, so the terminal's Ctrl-C reaches the server alone, which decides how its
                # workers end. Not its own session: Linux shares CPU equally between sessions (autogroups), so eight
                # workers in eight sessions would leave the server a ninth of the CPU and the stream seconds late.
                # (preexec_fn, not process_group=0: uvloop's subprocess_exec refuses the latter.)
                preexec_fn=os.setpgrp,
            )
        finally:
            log_file.close()  # the child holds its own copy of the descriptor
        active.process, active.pid = proc, proc.pid
        assert proc.stdin is not None
        # A worker that died at once is reported by _watch. Its stdin is then closed: asyncio raises OSError,
        # uvloop (what `gradwatch serve` runs on) RuntimeError "the handler is closed", once a 500 on the submit.
        with contextlib.suppress(OSError, RuntimeError):
            proc.stdin.write(token.encode() + b"\n")
            await proc.stdin.drain()
        proc.stdin.close()
        started = _create_time(proc.pid)
        await asyncio.to_thread(self.store.update_run, rec.id, pid=proc.pid, pid_started=started)
        self._spawn(self._watch(active))

    def _worker_args(self, rec: RunRecord, server: str, threads: float) -> list[str]:
        """app.worker's arguments, but for the files (the config and the scratch folder are where it runs)."""
        args = ["-m", self.settings.worker_module, "--run-id", rec.id, "--server", server,
                "--orphan-timeout", str(self.settings.worker_orphan_timeout_s), "--threads", str(max(1, int(threads))),
                "--nice", str(self.settings.worker_nice), "--token-stdin"]
        if rec.resume_from:
            args += ["--resume-from-server"]  # fetched over HTTP with the run token, as a remote worker would
        return args

    def _public_server_url(self) -> str:
        """Where a worker on another machine reaches this server: ``public_url`` as a websocket URL, or where local
        workers reach it (enough for a Ray cluster of this machine alone)."""
        public = self.settings.public_url
        if public is None:
            return self.server_url()
        return public.replace("https://", "wss://", 1).replace("http://", "ws://", 1)

    async def _launch_on_ray(self, rec: RunRecord, cfg: RunConfig, device: str, token: str) -> None:
        """Hand the run to Ray: its actor waits in Ray's queue (the run stays ``queued``, its placement saying what
        it waits for), then starts the worker on the node Ray chose and reports where."""
        assert self.ray is not None
        request = self.ray.request(device, cfg.train.resource_request())
        worker = await asyncio.to_thread(self.ray.launch, rec.id, request)
        active = Active(rec.id, device, accepted=rec.last_seq, remote=worker)
        self.active[rec.id] = active
        waiting = describe_request(request)
        missing = await asyncio.to_thread(self.ray.unavailable, request)
        if missing:  # Ray keeps it queued until such a node joins: say so rather than look stuck
            waiting += f" (no node of the cluster has {', '.join(missing)} now)"
        placement = {"backend": "ray", "actor": worker.name, "resources": request, "waiting_for": waiting}
        await asyncio.to_thread(self.store.update_run, rec.id, token_hash=token_hash(token), device=device,
                                placement=placement)
        args = self._worker_args(rec, self._public_server_url(), self.settings.ray_cpus_per_run)
        env = {} if device.startswith("cuda") else {CUDA_ENV: ""}  # Ray sets a GPU run's own
        self._spawn(self._run_on_ray(active, worker, args, token, cfg.model_dump_json(), env, placement))

    async def _run_on_ray(self, active: Active, worker: RayWorker, args: list[str], token: str, config_json: str,
                          env: dict[str, str], placement: dict[str, Any]) -> None:
        try:
            where = await worker.start(args, token, config_json, env)
        except Exception as exc:  # withdrawn (stopped while queued), or its node died before it started
            end = WorkerEnd(None, lost=str(exc).splitlines()[0] if str(exc) else repr(exc))
        else:
            placement = {k: v for k, v in placement.items() if k != "waiting_for"} | where
            log.info("run %s: placed by Ray on %s", active.run_id, describe_node(placement))
            with contextlib.suppress(sqlite3.Error):
                await asyncio.to_thread(self.store.update_run, active.run_id, placement=placement)
            end = await worker.wait()
        await worker.end()
        await self._ray_worker_gone(active, end, placement)

    async def _ray_worker_gone(self, active: Active, end: WorkerEnd, placement: dict[str, Any]) -> None:
        """The end of a worker on Ray: its exit code as for a local worker, or the node (or actor) that was lost."""
        if self.active.get(active.run_id) is not active:
            return
        if end.log_tail or end.kept:
            header = f"--- the worker's log on {describe_node(placement)} ---\n"
            kept = f"\n(its scratch folder is kept there: {end.kept})" if end.kept else ""
            await asyncio.to_thread(_append_text, self.run_dir(active.run_id) / "worker.log",
                                    header + end.log_tail + kept + "\n")
        # Used only if the worker did not report its own end: e.g. "worker killed by SIGKILL on Ray node 10.0.0.7 …"
        lost = end.lost_reason(placement) or f"{_describe_exit(end.code)} on Ray node {describe_node(placement)}"
        if end.code is None:
            newest = await asyncio.to_thread(_newest_checkpoint, self.run_dir(active.run_id) / "checkpoints")
            lost += f"; resume from {newest}" if newest else "; the run has no checkpoint to resume from"
        await self._worker_gone(active, end.code, lost=lost)

    # -- worker exits -------------------------------------------------------------------
    async def _watch(self, active: Active) -> None:
        assert active.process is not None
        code = await active.process.wait()
        await self._worker_gone(active, code)

    async def _await_reattach(self, active: Active) -> None:
        """A worker from before a restart: wait for it to reconnect, watch its pid (or its Ray actor), or end it."""
        try:
            await asyncio.wait_for(active.attached.wait(), self.settings.reattach_grace_s)
        except TimeoutError:
            await self._signal_worker(active, signal.SIGTERM)
            await asyncio.sleep(5.0)
            await self._signal_worker(active, signal.SIGKILL)
            if self.active.get(active.run_id) is active:
                self.active.pop(active.run_id)
                await self._end(active.run_id, "interrupted", "the worker did not reconnect after a server restart",
                                accepted=active.stored)
                await self._schedule()
            return
        if active.remote is not None:
            end = await active.remote.wait()
            await active.remote.end()
            await self._ray_worker_gone(active, end, active.remote.placement or {})
            return
        while pid_alive(active.pid, None):
            await asyncio.sleep(0.5)
        await self._worker_gone(active, None)

    async def _worker_gone(self, active: Active, code: int | None, *, lost: str | None = None) -> None:
        """A run's worker has exited with ``code`` (None: unknown, or ``lost`` says why there is none)."""
        if self.active.get(active.run_id) is not active:
            return
        # Frames the worker sent just before exiting may still be in flight on its socket.
        if active.ws is not None and active.final is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_wait_until(lambda: active.ws is None or active.final is not None), 2.0)
        self.active.pop(active.run_id, None)
        self.rates.forget(active.run_id)
        _discard_uploads(active)
        active.forget_lost()  # frames the store lost are not in the stream: the server's status frame follows the rest
        if active.final is None:
            reason = lost or _describe_exit(code)
            if active.write_error:
                reason = f"{reason}; the server {active.write_error}"
            if active.stop_requested:
                reason = f"a stop was requested, but the {reason} before reporting it"
            await self._end(active.run_id, "failed", self._with_log_tail(active.run_id, reason),
                            accepted=active.stored)
        else:
            await asyncio.to_thread(self._salvage, active.run_id)
            if active.final == "failed":
                # The worker's own one-line reason went out in its status frame; the run keeps the
                # traceback too, for whoever opens it.
                rec = await asyncio.to_thread(self.store.get_run, active.run_id)
                if rec is not None and rec.error:
                    await asyncio.to_thread(self.store.update_run, active.run_id,
                                            error=self._with_log_tail(active.run_id, rec.error))
            self.hub.close_topic(active.run_id)
        if active.ws is not None:
            with contextlib.suppress(Exception):
                await active.ws.close(code=1000)
        await self._schedule()

    def _with_log_tail(self, run_id: str, reason: str) -> str:
        tail = log_tail(self.run_dir(run_id) / "worker.log", STDERR_TAIL_LINES)
        return f"{reason}\n--- last lines of the worker's log ---\n{tail}" if tail else reason

    async def _kill_after(self, active: Active, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self.active.get(active.run_id) is active and (active.remote is not None or pid_alive(active.pid, None)):
            log.warning("run %s did not stop within %.0f s; killing it", active.run_id, seconds)
            await self._signal_worker(active, signal.SIGKILL)

    async def _signal_worker(self, active: Active, sig: signal.Signals) -> None:
        """Signal a run's worker, wherever it runs: a SIGKILL for a worker on Ray ends its actor too."""
        if active.remote is None:
            _signal(active.pid, sig)
        elif sig == signal.SIGKILL:
            await active.remote.end()
        else:
            active.remote.signal(sig)

    async def _find_actor(self, rec: RunRecord) -> RayWorker | None:
        """The live Ray actor of a running run from before a restart, if this server is on Ray and it has one."""
        name = (rec.placement or {}).get("actor")
        if self.ray is None or not name or rec.external:
            return None
        return await asyncio.to_thread(self.ray.find, name, rec.placement)

    async def _end(self, run_id: str, status: str, error: str | None, *, accepted: int) -> None:
        """Record a terminal status the worker could not report itself, as a frame too.

        ``accepted``: the highest seq already stored or queued for the run (the store's own count may lag).
        """
        self.rates.forget(run_id)
        rec = await asyncio.to_thread(self.store.get_run, run_id)
        if rec is None:
            return
        self.store.resume(run_id)  # its sender is done: after a store failure, this frame goes after what was stored
        await asyncio.to_thread(self._salvage, run_id)
        await self._server_frame(rec, {"type": "status", "status": status, "error": error, "step": rec.step},
                                 accepted=accepted)
        ended = {"status": status, "error": error, "ended_at": time.time()}
        try:
            await asyncio.to_thread(self.store.update_run, run_id, **ended)
        except sqlite3.Error as exc:  # the disk is full: keep trying, or the run would say "running" for ever
            log.error("run %s: could not record that it is %s (%s); retrying every %g s", run_id, status, exc,
                      END_RETRY_S)
            self._spawn(self._record_end_later(run_id, ended))
        self.hub.close_topic(run_id)

    async def _record_end_later(self, run_id: str, ended: dict[str, Any]) -> None:
        while True:
            await asyncio.sleep(END_RETRY_S)
            with contextlib.suppress(sqlite3.Error):
                await asyncio.to_thread(self.store.update_run, run_id, **ended)
                log.info("run %s: recorded as %s at last", run_id, ended["status"])
                return

    async def _server_frame(self, rec: RunRecord, fields: dict[str, Any], *, accepted: int) -> int:
        """Write a frame of the server's own into a run's stream, after seq ``accepted``; returns its seq.

        A script's run may come back after this (its frames wait on its disk): its frames then go after the
        server's, so the run's ``seq_offset`` grows by the frames the server wrote.
        """
        seq = max(accepted, rec.last_seq) + 1
        frame = {**fields, "run": rec.id, "seq": seq}
        text = frame_to_json(frame)
        self.hub.publish(rec.id, seq, text)
        self.store.append(rec.id, [(frame, text)])
        if rec.external:
            rec.seq_offset += seq - accepted
            rec.last_seq = seq
            await asyncio.to_thread(self.store.update_run, rec.id, seq_offset=rec.seq_offset)
        return seq

    # -- runs streamed by a script (gradwatch.client) or by `gradwatch sync` -------------------
    async def open_external(self, *, name: str, kind: str, config: dict[str, Any], source: dict[str, Any],
                            uid: str | None) -> tuple[RunRecord, str, bool]:
        """Create a script's run, or find the one its ``uid`` names; either way with a fresh run token.

        Returns (run, token, created). The token is the run's channel credential, as for a launched worker;
        only its hash is kept. A second call with the same uid (a sync resumed, a script restarted) gets the
        same run, so uploading a folder twice makes one run.
        """
        token = secrets.token_urlsafe(32)
        existing = await asyncio.to_thread(self.store.run_by_uid, uid) if uid else None
        if existing is not None:
            if not existing.external:
                raise RunError(409, "uid: names a run the server launched, not a script's run")
            await asyncio.to_thread(self.store.update_run, existing.id, token_hash=token_hash(token))
            return await self.get(existing.id), token, False
        now = time.time()
        label = source.get("script") or "script"
        run = RunRecord(
            id=uuid.uuid4().hex[:12], name=name or f"{label} on {source.get('host') or 'unknown host'}"[:200],
            kind=kind, status="running", config=config, created_at=now, started_at=now, device="script",
            token_hash=token_hash(token), source=source, controls=[], uid=uid,
        )
        try:
            await asyncio.to_thread(self.store.insert_run, run)
        except ValueError as exc:  # the same uid created by a concurrent call a moment ago
            raise RunError(409, f"uid: {exc}") from exc
        active = self._external_active(run)
        active.grace = self._spawn(self._client_grace(active, "the script never connected its channel"))
        return await self.get(run.id), token, True

    def _external_active(self, rec: RunRecord) -> Active:
        active = Active(rec.id, "script", accepted=rec.last_seq - rec.seq_offset, external=True,
                        offset=rec.seq_offset)
        self.active[rec.id] = active
        return active

    async def _reopen(self, rec: RunRecord) -> Active:
        """An interrupted script's run whose script is back: "running" again, after a status frame saying so."""
        await self._server_frame(rec, {"type": "status", "status": "running", "error": None, "step": rec.step},
                                 accepted=rec.last_seq)
        await asyncio.to_thread(self.store.update_run, rec.id, status="running", error=None, ended_at=None)
        self.hub.reopen_topic(rec.id)
        return self._external_active(rec)

    async def _client_grace(self, active: Active, reason: str) -> None:
        """A script's run without its connection for ``client_grace_s`` becomes interrupted (and may come back)."""
        await asyncio.sleep(self.settings.client_grace_s)
        if self.active.get(active.run_id) is not active or active.ws is not None or active.final is not None:
            return
        self._forget_active(active)
        await self._end(active.run_id, "interrupted",
                        f"{reason} (no connection for {self.settings.client_grace_s:g} s); if the script comes back, "
                        "the run continues with everything it kept on its disk", accepted=active.stored)

    def _forget_active(self, active: Active) -> None:
        self.active.pop(active.run_id, None)
        self.rates.forget(active.run_id)
        _discard_uploads(active)

    def _external_disconnected(self, active: Active) -> None:
        """A script's channel closed: the run has ended (its status frame came first) or its grace period starts."""
        if self.active.get(active.run_id) is not active or active.ws is not None:
            return
        if active.final is not None:
            self._forget_active(active)
            self.hub.close_topic(active.run_id)
        elif active.grace is None or active.grace.done():
            active.grace = self._spawn(self._client_grace(active, "the script's connection was lost"))

    # -- the worker channel -------------------------------------------------------------------
    async def worker_run(self, run_id: str, token: str) -> Active | None:
        """The live run this token belongs to, or None: the only credential a worker has.

        A script's run that was interrupted (its script away for longer than ``client_grace_s``) comes back to
        life when its script reconnects: its frames waited on the script's disk.
        """
        rec = await asyncio.to_thread(self.store.get_run, run_id)
        if (rec is None or rec.token_hash is None
                or not hmac.compare_digest(token_hash(token), rec.token_hash)):
            return None
        active = self.active.get(run_id)
        if active is None and rec.external and rec.status == "interrupted":
            active = await self._reopen(rec)
        return active

    def resume_checkpoint(self, run_id: str) -> Path | None:
        """The checkpoint a resumed run starts from (its own copy), if it has one."""
        folder = self.run_dir(run_id) / "resume"
        found = sorted(folder.glob("*.pt")) if folder.is_dir() else []
        return found[0] if found else None

    async def attach(self, ws: WebSocket, run_id: str, token: str) -> None:
        """Serve one worker connection: hello, then frames and artifacts in, acks and controls out."""
        active = await self.worker_run(run_id, token)
        if active is None:
            await ws.close(code=1008, reason="unknown run or wrong token")
            return
        await ws.accept()
        if active.grace is not None:
            active.grace.cancel()
            active.grace = None
        if active.ws is not None:
            with contextlib.suppress(Exception):
                await active.ws.close(code=1012, reason="replaced by a new connection")
        active.ws = ws
        active.attached.set()
        # The hello's ack tells the sender what it may forget: only what is committed. What the previous connection
        # sent is committed or lost once the store has caught up (its failure callbacks run before we go on).
        await asyncio.to_thread(self.store.wait_flushed, 30.0)
        if active.forget_lost():
            self.store.resume(run_id)
        active.committed = active.accepted
        loop = asyncio.get_running_loop()
        acks: asyncio.Queue[int] = asyncio.Queue()

        def on_committed(seq: int) -> None:
            active.committed = max(active.committed, seq)
            acks.put_nowait(seq)

        def committed(seq: int) -> None:  # called on the store's writer thread, with the stored seq
            loop.call_soon_threadsafe(on_committed, seq - active.offset)

        def not_stored(seq: int, reason: str) -> None:  # the store's writer thread: frames from seq on were lost
            loop.call_soon_threadsafe(self._not_stored, active, ws, seq - active.offset, reason)

        # The artifact cap goes in the hello: a sender skips a file over it rather than upload it, be refused and
        # try again forever.
        hello: dict[str, Any] = {"type": "hello", "ack": active.accepted,
                                 "max_artifact_bytes": self.settings.max_artifact_bytes}
        if active.stop_requested:
            hello["stop"] = True  # pressed while the sender was away
        await ws.send_text(json.dumps(hello))
        acker = asyncio.create_task(_send_acks(ws, acks))
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect" or active.ws is not ws:
                    return  # closed by the sender, or let go by the server (replaced, or its run deleted)
                if active.lost_from is not None:
                    continue  # the connection is being closed: the sender resends all this
                if message.get("bytes") is not None:
                    await self._artifact(active, message["bytes"])
                elif message.get("text") is not None:
                    await self._frames(active, json.loads(message["text"]), committed, not_stored)
        except (ProtocolError, ValueError, KeyError, TypeError) as exc:
            log.warning("run %s: bad message from worker: %s", run_id, exc)
            with contextlib.suppress(Exception):
                await ws.close(code=1002, reason=str(exc)[:120])
        except OSError as exc:  # the run's folder cannot be written: disk full, a file-size limit, ...
            self._write_failed(active, f"could not write the run's files: {exc}")
            with contextlib.suppress(Exception):
                await ws.close(code=1011, reason=f"server cannot write: {exc.strerror or exc}"[:120])
        except (WebSocketDisconnect, RuntimeError):
            return
        finally:
            acker.cancel()
            if active.ws is ws:
                active.ws = None
                _discard_uploads(active)  # a sender resends an unacknowledged file from its first chunk
                if active.external:
                    self._external_disconnected(active)

    def _write_failed(self, active: Active, reason: str) -> None:
        """Log a write failure once per reason (a sender retries every few seconds), and keep it for the run's
        error should its worker end without a word."""
        if active.write_error != reason:
            log.error("run %s: %s; the sender will retry", active.run_id, reason)
        active.write_error = reason

    def _not_stored(self, active: Active, ws: WebSocket, first: int, reason: str) -> None:
        """The store lost frames from ``first`` on (and refuses the run's later ones): close the connection, so
        that the sender resends from there when it reconnects, rather than have a later ack cover them."""
        if active.lost_from is None or first < active.lost_from:
            active.lost_from = first
        self._write_failed(active, f"could not store frames: {reason}")
        if active.ws is ws:
            self._spawn(close_quietly(ws, 1011, f"server could not store frames from seq {first}: {reason}"[:120]))

    async def _frames(self, active: Active, message: dict[str, Any],
                      committed: Callable[[int], None], not_stored: Callable[[int, str], None]) -> None:
        if message.get("type") != "frames" or not isinstance(message.get("frames"), list):
            raise ProtocolError("expected a frames message")
        accepted: list[tuple[dict[str, Any], str]] = []
        for frame in message["frames"]:
            seq = frame.get("seq") if isinstance(frame, dict) else None
            if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq < 2**62:
                raise ProtocolError(f"a frame's seq must be a positive integer, got {seq!r}"[:200])
            if seq <= active.accepted:
                continue  # a resend of something already stored
            if seq != active.accepted + 1:
                raise ProtocolError(f"frame seq {seq} after {active.accepted}: gap")
            frame["run"] = active.run_id
            frame["seq"] = seq + active.offset
            kind = ARTIFACT_FRAMES.get(frame["type"])
            if kind is not None:
                name = frame.get("name")
                if not isinstance(name, str) or not valid_artifact(kind, name):
                    raise ProtocolError(f"frame seq {seq}: {kind} name {name!r} is not an allowed name")
                frame["url"] = artifact_url(active.run_id, kind, name)  # the server's URL, whoever wrote the frame
            text = frame_to_json(frame)
            active.accepted = seq
            self.hub.publish(active.run_id, frame["seq"], text)
            accepted.append((frame, text))
            await self._side_effects(active, frame)
        if accepted:
            self.store.append(active.run_id, accepted, on_commit=committed, on_failure=not_stored)
        elif message["frames"] and active.committed:
            # All duplicates: acknowledge again what is committed, so the sender can forget it (what is still on
            # its way to the disk is acknowledged when it gets there, or resent if it never does).
            committed(active.committed + active.offset)

    async def _side_effects(self, active: Active, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "metrics":
            top = _max_step(frame.get("step"))
            if top is not None:
                self.rates.observe(active.run_id, top)
        elif kind == "capabilities" and active.external:
            await asyncio.to_thread(self.store.update_run, active.run_id, **_capabilities(frame))
        elif kind == "config" and active.external:
            config = frame.get("config")
            if not isinstance(config, dict):
                raise ProtocolError("a config frame needs a config object")
            await asyncio.to_thread(self.store.update_run, active.run_id, config=config)
        elif kind == "status":
            status = frame["status"]
            if status == "running" and active.external:
                pass  # a script's run is running from its creation
            elif status == "running":
                await asyncio.to_thread(self.store.update_run, active.run_id, status="running",
                                        started_at=time.time())
            elif status in TERMINAL_STATUSES:
                active.final = status
                self.rates.forget(active.run_id)
                await asyncio.to_thread(self.store.update_run, active.run_id, status=status,
                                        error=frame.get("error"), ended_at=time.time())
        elif kind == "alert":
            alert = {k: frame.get(k) for k in ("step", "kind", "message")}
            await asyncio.to_thread(self.store.update_run, active.run_id, last_alert=alert)
        elif kind == "checkpoint" and not active.external:  # a script keeps the checkpoints it chose to save
            await asyncio.to_thread(self._prune_checkpoints, active.run_id)
        elif kind == "sample" and not active.external:  # and its samples
            await asyncio.to_thread(self._prune_samples, active.run_id)

    def _salvage(self, run_id: str) -> None:
        """Keep what a local worker wrote but never got acknowledged (its final checkpoint, say).

        Acknowledged artifacts were uploaded and removed from the worker's
        scratch folder, so whatever is left there never reached the run's
        folder: move it in, unless an upload of the same name already did.
        """
        run_dir = self.run_dir(run_id)
        for kind in ("samples", "checkpoints"):
            scratch = run_dir / "work" / kind
            if not scratch.is_dir():
                continue
            (run_dir / kind).mkdir(exist_ok=True)
            for path in scratch.iterdir():
                target = run_dir / kind / path.name
                if path.is_file() and not is_temp_file(path) and not target.exists():
                    os.replace(path, target)
            if kind == "samples":
                self._prune_samples(run_id)

    def _prune_checkpoints(self, run_id: str) -> None:
        rec = self.store.get_run(run_id)
        if rec is None:
            return
        keep = int(rec.config.get("intervals", {}).get("keep_checkpoints", 5))
        folder = self.run_dir(run_id) / "checkpoints"
        files = sorted(p for p in folder.glob("*.pt") if not is_temp_file(p))
        for old in files[:-(keep + 1)]:  # the periodic ones the trainer keeps, plus the newest (final)
            old.unlink(missing_ok=True)

    def _prune_samples(self, run_id: str) -> None:
        """Uploads land in the run's folder: keep the trainer's rule there too (the first step, the newest
        ``keep_samples``), or ``sample_every=1`` fills the disk at gigabytes an hour."""
        rec = self.store.get_run(run_id)
        if rec is None:
            return
        keep = rec.config.get("intervals", {}).get("keep_samples", IntervalConfig.model_fields["keep_samples"].default)
        prune_samples(self.run_dir(run_id) / "samples", int(keep))

    async def _artifact(self, active: Active, message: bytes) -> None:
        chunk = decode_chunk(message)
        if chunk.total > self.settings.max_artifact_bytes:
            raise ProtocolError(f"artifact {chunk.name} is larger than max_artifact_bytes")
        key = (chunk.kind, chunk.name)
        folder = self.run_dir(active.run_id) / chunk.kind
        if chunk.offset == 0:
            if key in active.uploads:
                path, fh = active.uploads.pop(key)
                fh.close()
                path.unlink(missing_ok=True)
            elif len(active.uploads) >= MAX_OPEN_UPLOADS:
                # A sender finishes each file before the next: many at once is a run token holding the server's
                # file descriptors, not an upload.
                raise ProtocolError(f"more than {MAX_OPEN_UPLOADS} unfinished uploads")
            tmp = temp_path(folder / chunk.name, uuid.uuid4().hex)
            active.uploads[key] = (tmp, await asyncio.to_thread(_open_new, tmp))
        if key not in active.uploads:
            raise ProtocolError(f"artifact {chunk.name}: chunk at offset {chunk.offset} without a start")
        path, fh = active.uploads[key]
        if fh.tell() != chunk.offset:
            raise ProtocolError(f"artifact {chunk.name}: chunk at {chunk.offset}, expected {fh.tell()}")
        await asyncio.to_thread(fh.write, chunk.payload)
        if chunk.last:
            del active.uploads[key]
            await asyncio.to_thread(_finish_upload, fh, path, folder / chunk.name)


#: Unfinished uploads one run may hold open at once (each is an open file on the server).
MAX_OPEN_UPLOADS = 4
#: Variables of the server's environment that never reach a worker.
WORKER_ENV_SECRETS = frozenset({"GRADWATCH_TOKEN"})

#: What a script may register: the dashboard shows it only those controls.
SCRIPT_CONTROLS = ("stop", "g_loss", "lr_g", "lr_d")


def _capabilities(frame: dict[str, Any]) -> dict[str, Any]:
    """A script's ``capabilities`` frame: its model family and the controls it registered."""
    kind, controls = frame.get("kind"), frame.get("controls")
    if kind not in ("gan", "vae", "custom"):
        raise ProtocolError("capabilities: kind must be gan, vae or custom")
    if not isinstance(controls, list) or not all(c in SCRIPT_CONTROLS for c in controls):
        raise ProtocolError(f"capabilities: controls must be a list drawn from {', '.join(SCRIPT_CONTROLS)}")
    return {"kind": kind, "controls": list(dict.fromkeys(controls))}


def _stored_config(rec: RunRecord) -> RunConfig:
    """A queued run's config, validated again: one stored under older, looser rules is refused with the reasons."""
    try:
        return RunConfig.model_validate(rec.config)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise RunError(422, f"config no longer accepted: {reasons}") from exc


def _discard_uploads(active: Active) -> None:
    """Close and remove the temp files of uploads that never finished."""
    for path, fh in active.uploads.values():
        fh.close()
        path.unlink(missing_ok=True)
    active.uploads.clear()


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Put back the server's SIGTERM and SIGINT handlers after joining Ray.

    Ray's core installs its own C-level handlers when it starts (a SIGTERM then dumps a stack and kills the process
    on the spot), which would make every graceful shutdown an abrupt one: workers not told to stop, runs left
    ``running``. Python still believes its handlers are set, so they are set again (main thread only, where uvicorn
    set them).
    """
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in kept.items():
                if handler is not None:
                    signal.signal(sig, handler)


def _append_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)


def _write_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _open_new(path: Path) -> Any:
    """A temp file for an upload in progress; closed when its last chunk lands."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "wb")


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # checkpoints are never modified in place, so sharing the inode is safe
    except OSError:
        shutil.copy2(source, target)


def _finish_upload(fh: Any, tmp: Path, final: Path) -> None:
    """The discipline of every file a run writes (trainer.files): fsync, then an atomic rename into place."""
    try:
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        rename_into_place(tmp, final)
    except BaseException:
        fh.close()
        tmp.unlink(missing_ok=True)  # no partial file left behind (a full disk fails here)
        raise



async def _send_acks(ws: WebSocket, acks: asyncio.Queue[int]) -> None:
    with contextlib.suppress(Exception):
        while True:
            seq = await acks.get()
            while not acks.empty():
                seq = max(seq, acks.get_nowait())
            await ws.send_text(json.dumps({"type": "ack", "seq": seq}))


async def _wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.05)


def _max_step(steps: Any) -> int | None:
    """The newest step of a metrics frame; None for an empty or malformed list (the frame is stored anyway)."""
    if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        return None
    return max(steps, default=None)


async def _wait_exit(active: Active, timeout: float) -> bool:
    """Wait until the worker has exited (and, if it is our child, been reaped); False if it outlived ``timeout``."""
    try:
        if active.remote is not None:
            await asyncio.wait_for(active.remote.wait(), timeout)
        elif active.process is not None:
            await asyncio.wait_for(asyncio.shield(active.process.wait()), timeout)
        else:  # a worker re-attached after a restart is not our child: watch its pid
            return await _wait_pid_gone(active.pid, timeout)
    except TimeoutError:
        return False
    return True


async def _wait_pid_gone(pid: int | None, timeout: float) -> bool:
    """Wait until a process that is not our child has exited; False if it outlived ``timeout``."""
    try:
        await asyncio.wait_for(_wait_until(lambda: not pid_alive(pid, None)), timeout)
    except TimeoutError:
        return False
    return True


def _newest_checkpoint(folder: Path) -> str | None:
    found = sorted(p.name for p in folder.glob("step_*.pt") if not is_temp_file(p)) if folder.is_dir() else []
    return found[-1] if found else None


def _signal(pid: int | None, sig: signal.Signals) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None
