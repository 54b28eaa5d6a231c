"""Freshness: how old a metric is when a dashboard client gets it, against TensorBoard and Trackio.

gradwatch: a real ``gradwatch serve`` launches real workers training a small
ring8 MLP GAN (:data:`CONFIG`); websocket clients follow ``/ws/runs/{id}``. Each
metrics frame carries, per step, the wall-clock ``time`` at which the worker
computed that step; a client stamps ``time.time()`` on receipt (same machine,
same clock). Two latencies per frame:

- **per step**: receipt − ``time`` of every step in the frame. It includes the
  worker's buffering: a step waits on the device until the worker's channel
  has nothing in flight, or at most ``flush_ms`` (25 ms here, the default),
  so that a step costs no device→host copy of its own (trainer/telemetry.py).
- **per frame**: receipt − ``time`` of the frame's newest step: mostly the
  transport (channel thread, websocket, server accept + publish, fan-out).

Where the time goes: every worker records, per frame, when it was flushed
(handed to its channel), sent (written to its websocket) and acknowledged (the
server acknowledges after its database commit) — ``GRADWATCH_TRACE_FRAMES``,
:class:`gradwatch.channel.FrameTrace` — and each cell reports a step's age at
each of these stages and on receipt (:data:`STAGES`), per step and per frame.

The matrix is 1 and 8 concurrent runs × 1 and 20 clients (round-robin over
the runs; with one client it follows the first run). Each run count gets one
server per variant; both client counts are measured on the same runs, one
window after the other. The runs' steps/s over each window are reported
beside the latencies: eight training processes on a 2-core machine are
CPU-starved, and so is everything else on it.

Variants (``--variants``), each on a fresh server: "as launched", the app as it
is; "flush floor", its workers with the flush policy before issue 15 (a flush
every ``flush_ms`` since the last, by the training thread alone), restored by
:data:`FLUSH_FLOOR_SHIM`; and, with several runs, "before fix", the workers
launched as before the autogroup fix (:data:`BEFORE_FIX_SHIM`: each worker in a
session of its own, training at normal priority). The benchmark checks that
each variant's workers run as named and refuses to report one that does not.

Clients offer permessage-deflate, as browsers do; the server declines it
(compressing every frame once per client cost more than it saved, see
docs/benchmarks.md). ``--compression none,deflate`` measures both offers.

TensorBoard: a ``tensorboard --logdir D --reload_interval 1`` process (1 s is
the smallest its fast loader takes; the default is 5 s), a writer process
logging the same keys every step with ``SummaryWriter.add_scalar`` at the
speed the one-run gradwatch case trained, with ``flush()`` after every step
(the most favourable setting), and a poller asking TensorBoard's HTTP API
(``/data/plugin/scalars/scalars``) for one tag every 20 ms. A step's latency is
the end of the first poll whose answer holds it − the step's ``walltime``.

Trackio: its dashboard server (``trackio.show``) and a writer process logging
the same keys every step with ``trackio.log`` in its local mode (SQLite, the
default) at the same speed, and a reader asking the dashboard's HTTP API
(``POST /api/get_metric_values``) for the steps after the newest it has seen,
one metric, every 20 ms (:func:`trackio_cell`).

    python -m bench.freshness                  # the full matrix, flush-floor variant, TensorBoard, Trackio, ~3 min
    python -m bench.freshness --seconds 5      # shorter windows (make bench)

Writes ``bench/results/freshness.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench._common import RESULTS_DIR, machine_info, render_table, write_json
from bench.server import NO_PROXY, ROOT, Server, thread_nice
from bench.throughput import _start_profiler, profile_summary
from gradwatch.channel import TRACE_ENV
from trainer.config import RunConfig

#: Issue 15: p99 per step ≤ 50 ms at 8 runs × 20 clients on the 2-core machine (issue 5 asked ≤ 100 ms).
TARGET_P99_MS = 50.0
#: A small real run: every SPEC §2 key every step, histograms every 50 steps as by default, and the
#: periodic artifacts (samples, evaluations, checkpoints) moved out of the window: they are not telemetry.
CONFIG: dict[str, Any] = {
    "kind": "gan",
    "name": "freshness",
    "data": {"name": "ring8"},
    "model": {"arch": "mlp", "width": 32, "depth": 2, "latent_dim": 2},
    "train": {"steps": 10_000_000, "batch_size": 64, "seed": 0, "device": "cpu"},
    "intervals": {"log_every": 1, "hist_every": 50, "sample_every": 1_000_000, "eval_every": 10_000_000,
                  "checkpoint_every": 10_000_000, "flush_ms": RunConfig().intervals.flush_ms, "flush_steps": 256},
}


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/max in milliseconds (nearest rank), and the count."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"n": len(ordered), "p50": round(1000 * rank(0.50), 1), "p95": round(1000 * rank(0.95), 1),
            "p99": round(1000 * rank(0.99), 1), "max": round(1000 * ordered[-1], 1)}


@dataclass
class Recorder:
    """Latencies of frames whose newest step was computed inside the window [start, end)."""

    start: float = math.inf
    end: float = math.inf
    per_step: list[float] = field(default_factory=list)
    per_frame: list[float] = field(default_factory=list)
    #: (newest step's time, latency) per frame: shows whether latency holds or a backlog grows.
    timeline: list[tuple[float, float]] = field(default_factory=list)
    #: (run, seq, receipt, the frame's step times) per frame received: joined with the workers' traces.
    receipts: list[tuple[str, int, float, list[float]]] = field(default_factory=list)
    frames: int = 0
    keys: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def window(self, start: float, end: float) -> None:
        with self.lock:
            self.start, self.end = start, end
            self.per_step, self.per_frame, self.timeline, self.receipts, self.frames = [], [], [], [], 0

    def record(self, received: float, times: list[float], keys: list[str], run: str = "", seq: int = 0) -> None:
        newest = max(times)
        with self.lock:
            if not self.keys:
                self.keys = keys
            if not self.start <= newest < self.end:
                return
            self.frames += 1
            self.per_frame.append(received - newest)
            self.timeline.append((newest, received - newest))
            self.per_step.extend(received - t for t in times)
            self.receipts.append((run, seq, received, times))


#: The stages of a frame's way, in order: flushed (handed to the worker's channel), sent (written to its
#: websocket), acked (the server's acknowledgement, sent after its database commit, read by the worker) and
#: received (by a client). The first three come from the workers' traces (gradwatch.channel.FrameTrace).
STAGES = ("flushed", "sent", "acked", "received")


def read_traces(folder: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Every traced frame by (run, seq): the JSON lines the workers' channels wrote under ``folder``."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                out[(str(record["run"]), int(record["seq"]))] = record
    return out


def stage_latencies(receipts: list[tuple[str, int, float, list[float]]],
                    traces: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """A step's age at each stage, per step and per frame (its newest step), in percentiles.

    Worker-side stages count each frame once, ``received`` once per client that got it. A frame missing
    from the traces (its ack not read before the worker ended) leaves the worker-side stages.
    """
    ages: dict[str, dict[str, list[float]]] = {kind: {stage: [] for stage in STAGES} for kind in ("step", "frame")}
    seen: set[tuple[str, int]] = set()
    traced = 0
    for run, seq, received, times in receipts:
        newest = max(times)
        at = {"received": received}
        record = traces.get((run, seq))
        if record is not None:
            traced += 1
            if (run, seq) not in seen:
                seen.add((run, seq))
                at |= {"flushed": record["queued"], "sent": record["sent"], "acked": record["acked"]}
        for stage, moment in at.items():
            if moment is None:
                continue
            ages["frame"][stage].append(moment - newest)
            ages["step"][stage].extend(moment - t for t in times)
    return {"traced_share": round(traced / len(receipts), 3) if receipts else None,
            **{f"per_{kind}_ms": {stage: percentiles(v) for stage, v in by.items()} for kind, by in ages.items()}}


class StreamClients:
    """Websocket clients on one asyncio loop in a background thread; each metrics frame is timed on receipt."""

    def __init__(self, ws_url: str, recorder: Recorder) -> None:
        self.ws_url = ws_url
        self.recorder = recorder
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-freshness-clients", daemon=True)
        self.thread.start()
        self.tasks: list[asyncio.Task[None]] = []

    def open(self, run_ids: list[str], since: dict[str, int], compression: str) -> None:
        """Connect one client per entry of ``run_ids`` (offering ``compression``); returns once all are connected."""
        ready = [threading.Event() for _ in run_ids]

        async def start() -> None:
            for run_id, event in zip(run_ids, ready, strict=True):
                self.tasks.append(asyncio.create_task(self._client(run_id, since[run_id], event, compression)))

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        for event in ready:
            if not event.wait(30):
                raise RuntimeError("a websocket client could not connect")

    async def _client(self, run_id: str, since: int, ready: threading.Event, compression: str) -> None:
        url = f"{self.ws_url}/ws/runs/{run_id}?since={since}"
        async with connect(url, proxy=None, max_size=None, open_timeout=20,
                           compression=None if compression == "none" else "deflate") as ws:
            ready.set()
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    received = time.time()  # first thing: the parse below is the client's cost, not the server's
                    frame = json.loads(message)
                    if frame.get("type") == "metrics" and frame.get("time"):
                        self.recorder.record(received, frame["time"], list(frame["data"]), run_id, frame["seq"])

    def close_all(self) -> None:
        """Cancel every client and wait until each has closed its websocket."""

        async def cancel() -> None:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel(), self.loop).result(15)
        self.tasks = []

    def shutdown(self) -> None:
        self.close_all()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _steps(server: Server, ids: list[str]) -> dict[str, int]:
    runs = {r["id"]: r for r in server.request("GET", "/api/runs")}
    return {i: int(runs[i]["step"]) for i in ids}


#: The launch gradwatch used before its freshness fix, restored for the "before fix" variant so that the
#: fix is measured side by side with it: each worker in a session of its own (on Linux its own scheduling
#: autogroup, the CPU then shared per group, so the server gets 1/(runs + 1) of it however little it needs)
#: and, with GRADWATCH_WORKER_NICE=0 beside it, no lower priority for training. Written as
#: ``sitecustomize.py`` into a folder put first on the server's PYTHONPATH, so Python runs it at the server's start.
BEFORE_FIX_SHIM = """\
import os
import sys

if "app.cli" in getattr(sys, "orig_argv", []):
    import asyncio

    _exec = asyncio.create_subprocess_exec

    async def _create_subprocess_exec(*args, **kwargs):
        if kwargs.pop("preexec_fn", None) is os.setpgrp:
            kwargs["start_new_session"] = True
        return await _exec(*args, **kwargs)

    asyncio.create_subprocess_exec = _create_subprocess_exec
"""
#: The flush policy of the workers before issue 15, restored for the "flush floor" variant: a flush every
#: ``flush_ms`` since the last one (or after ``flush_steps`` steps), whatever the channel is doing, checked after
#: each step by the training thread alone. Run by every worker at its start (``sitecustomize.py`` as above); each
#: leaves a marker file in the trace folder so that the benchmark can check that all of them run it.
FLUSH_FLOOR_SHIM = """\
import os
import sys

if "app.worker" in getattr(sys, "orig_argv", []):
    import math
    import time

    from trainer import telemetry

    def due(self):
        if self._oldest is None:
            return False
        if self._rows >= self.flush_steps:
            return True
        return (time.monotonic() - self._last_flush) * 1000.0 >= self.flush_ms

    telemetry.MetricBuffer.due = due
    telemetry.MetricBuffer.due_in = lambda self: math.inf  # nor does the channel thread flush
    folder = os.environ.get("GRADWATCH_TRACE_FRAMES")
    if folder:
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f"flush-floor-{os.getpid()}"), "w").close()
"""
#: What each variant restores, if anything: "as launched" is the app as it is; "flush floor" its workers with
#: the flush policy before issue 15; "before fix" the launch before the fix of the autogroups (several runs only).
VARIANTS = {"as launched": None, "flush floor": FLUSH_FLOOR_SHIM, "before fix": BEFORE_FIX_SHIM}


def launch_is(server: Server, variant: str, trace_dir: Path | None = None) -> bool:
    """Whether the workers run as ``variant`` says: in the server's session with a niced training thread
    ("as launched", and "flush floor" with each worker's marker in ``trace_dir``), or in sessions of their own
    at normal priority ("before fix")."""
    assert server.proc is not None
    try:
        workers = server.workers()
        same_session = [os.getsid(w.pid) == os.getsid(server.proc.pid) for w in workers]
        niced = [10 in thread_nice(w.pid).values() for w in workers]
    except (OSError, ValueError, IndexError):
        return False
    if variant == "before fix":
        return not any(same_session) and not any(niced)
    floor = [trace_dir is not None and (trace_dir / f"flush-floor-{w.pid}").exists() for w in workers]
    return all(same_session) and all(niced) and (all(floor) if variant == "flush floor" else not any(floor))


def measure_cell(args: argparse.Namespace, server: Server, ids: list[str], clients: StreamClients,
                 recorder: Recorder, n_clients: int, workers: str, compression: str) -> dict[str, Any]:
    """Connect ``n_clients`` at the runs' current heads, measure one window, disconnect them."""
    heads = {r["id"]: int(r["last_seq"]) for r in server.request("GET", "/api/runs")}
    # From the head: no backfill in the window.
    clients.open([ids[i % len(ids)] for i in range(n_clients)], heads, compression)
    time.sleep(args.settle)
    assert server.proc is not None
    spy = None
    if (args.profile is not None and len(ids) == max(args.runs) and n_clients == max(args.clients)
            and compression == args.compression[0] and workers == "as launched"):
        spy = _start_profiler(args.profile, server.proc.pid, args.seconds)
    srv, me = psutil.Process(server.proc.pid), psutil.Process()
    srv_cpu0, me_cpu0 = srv.cpu_times(), me.cpu_times()
    start = time.time()
    recorder.window(start, start + args.seconds)
    steps0, t0 = _steps(server, ids), time.monotonic()
    time.sleep(args.seconds)
    steps1, t1 = _steps(server, ids), time.monotonic()
    srv_cpu1, me_cpu1 = srv.cpu_times(), me.cpu_times()
    time.sleep(0.5)  # frames computed at the end of the window are still on their way
    with recorder.lock:
        per_step, per_frame, frames = list(recorder.per_step), list(recorder.per_frame), recorder.frames
        receipts = list(recorder.receipts)
        mid = start + args.seconds / 2
        halves = ([lat for t, lat in recorder.timeline if t < mid], [lat for t, lat in recorder.timeline if t >= mid])
    clients.close_all()
    if spy is not None:
        spy.wait(30)
        for name, share in profile_summary(args.profile):
            print(f"    {100 * share:5.1f} %  {name}")
    rates = [(steps1[i] - steps0[i]) / (t1 - t0) for i in ids]
    cell = {
        "runs": len(ids), "clients": n_clients, "workers": workers, "compression": compression,
        "window_s": args.seconds, "frames": frames,
        "steps_per_s_per_run": round(statistics.mean(rates), 1),
        "steps_per_s_total": round(sum(rates), 1),
        "per_step_ms": percentiles(per_step),
        "per_frame_ms": percentiles(per_frame),
        # A backlog that grows shows as a second half slower than the first.
        "per_frame_p50_ms_by_half": [percentiles(h)["p50"] for h in halves],
        "server_cpu_pct": round(100 * (sum(srv_cpu1[:2]) - sum(srv_cpu0[:2])) / (t1 - t0), 1),
        "clients_cpu_pct": round(100 * (sum(me_cpu1[:2]) - sum(me_cpu0[:2])) / (t1 - t0), 1),
        "receipts": receipts,  # replaced by the stages once the workers' traces are in (_cells_on_one_server)
    }
    print(f"  {len(ids)} run(s) × {n_clients} client(s), {workers}, clients offer {compression}: per step p99 "
          f"{cell['per_step_ms']['p99']} ms, per frame p99 {cell['per_frame_ms']['p99']} ms, "
          f"{cell['steps_per_s_per_run']} steps/s per run, server CPU {cell['server_cpu_pct']} %", flush=True)
    return cell


def gradwatch_cells(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Every (runs, clients) cell of the matrix; also the metric keys a run sends (for the peers' writers).

    Each of ``args.variants`` is measured on a fresh server per run count, one after the other: the app as
    it is ("as launched"), its workers with the flush policy before issue 15 ("flush floor"), and, with
    several runs, the launch before the autogroup fix ("before fix").
    """
    cells: list[dict[str, Any]] = []
    keys: list[str] = []
    for n_runs in args.runs:
        for variant in args.variants:
            if variant == "before fix" and n_runs == 1:
                continue  # one worker: the autogroups made no difference
            with tempfile.TemporaryDirectory(prefix="gradwatch-freshness-") as tmp:
                # The same limit for every run count, so that every worker gets the same single torch thread
                # (the manager gives each cpu_count // cpu_run_limit threads).
                limit = str(max(max(args.runs), 2))
                env = {"GRADWATCH_CPU_RUN_LIMIT": limit, "GRADWATCH_GPU_RUN_LIMIT": limit, "OMP_NUM_THREADS": "1",
                       TRACE_ENV: str(Path(tmp) / "trace")}
                shim_text = VARIANTS[variant]
                if shim_text is not None:
                    shim = Path(tmp) / "shim"
                    shim.mkdir()
                    (shim / "sitecustomize.py").write_text(shim_text)
                    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), str(ROOT),
                                                                      os.environ.get("PYTHONPATH")]))
                if variant == "before fix":
                    env["GRADWATCH_WORKER_NICE"] = "0"
                cells += _cells_on_one_server(args, Path(tmp) / "data", env, n_runs, variant, keys)
    return cells, keys


def _cells_on_one_server(args: argparse.Namespace, data_dir: Path, env: dict[str, str], n_runs: int,
                         variant: str, keys: list[str]) -> list[dict[str, Any]]:
    """Start ``n_runs`` real runs on a fresh server, measure every client count on them; fills ``keys``."""
    cells = []
    with Server(data_dir, env=env) as server:
        config = json.loads(json.dumps(CONFIG))
        config["intervals"]["flush_ms"] = args.flush_ms
        config["train"]["device"] = args.device
        ids = [server.request("POST", "/api/runs", {**config, "name": f"freshness {i}"})["id"] for i in range(n_runs)]
        deadline = time.monotonic() + 120
        while min(_steps(server, ids).values()) < 1:  # every worker has started training
            if time.monotonic() > deadline:
                raise RuntimeError("the runs did not start:\n" + "".join(server.log))
            time.sleep(0.2)
        if not launch_is(server, variant, Path(env[TRACE_ENV])):
            raise RuntimeError(f"the workers do not run as {variant!r} says (for 'before fix' and 'flush floor': "
                               "sitecustomize not loaded?)")
        recorder = Recorder()
        clients = StreamClients(server.url.replace("http://", "ws://", 1), recorder)
        try:
            for compression in args.compression:
                for n_clients in args.clients:
                    cells.append(measure_cell(args, server, ids, clients, recorder, n_clients, variant, compression))
        finally:
            if not keys:
                keys.extend(recorder.keys)
            clients.shutdown()
            for run_id in ids:
                with contextlib.suppress(Exception):
                    server.request("POST", f"/api/runs/{run_id}/stop")
            server.wait_workers_gone(30)
    traces = read_traces(Path(env[TRACE_ENV]))  # complete now: a worker closes its trace when it ends
    for cell in cells:
        cell["stages"] = stage_latencies(cell.pop("receipts"), traces)
        _print_stages(cell)
    return cells


def _print_stages(cell: dict[str, Any]) -> None:
    stages = cell["stages"]
    parts = []
    for kind in ("step", "frame"):
        by = stages[f"per_{kind}_ms"]
        parts.append(f"per {kind} p50/p99 " + ", ".join(f"{stage} {by[stage]['p50']}/{by[stage]['p99']}"
                                                        for stage in STAGES))
    print(f"    stages, {cell['runs']} run(s) × {cell['clients']} client(s), {cell['workers']}: " + "; ".join(parts)
          + f" ms (traced {stages['traced_share']})", flush=True)


# ---------------------------------------------------------------------------- TensorBoard


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tb_writer(log_dir: Path, keys: list[str], rate: float, seconds: float) -> int:
    """The writer process: every key every step at ``rate`` steps/s, stamped and flushed as it is written."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir), flush_secs=1)
    start = time.monotonic()
    step = 0
    while time.monotonic() - start < seconds:
        step += 1
        now = time.time()
        for i, key in enumerate(keys):
            writer.add_scalar(key, math.sin(step / 100 + i), step, walltime=now)
        writer.flush()
        pause = start + step / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    writer.close()
    return 0


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Stop a peer's dashboard process: politely, then for good."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def tensorboard_cell(args: argparse.Namespace, keys: list[str], rate: float) -> dict[str, Any]:
    """TensorBoard serving what a writer process logs, polled over HTTP; latencies as for gradwatch."""
    exe = Path(sys.executable).parent / "tensorboard"
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return {"available": False, "reason": "tensorboard is not installed (pip install -e '.[bench]')"}
    with tempfile.TemporaryDirectory(prefix="gradwatch-tb-") as tmp:
        log_dir = Path(tmp) / "logs"
        run_dir = log_dir / "run"
        run_dir.mkdir(parents=True)
        port = _free_port()
        tb = subprocess.Popen([str(exe), "--logdir", str(log_dir), "--port", str(port), "--host", "127.0.0.1",
                               "--reload_interval", str(args.tb_reload)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        tag = keys[0]
        writer: subprocess.Popen[bytes] | None = None
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError):
                    NO_PROXY.open(f"{base}/data/runs", timeout=2).read()
                    break
                if tb.poll() is not None or time.monotonic() > deadline:
                    return {"available": False, "reason": "tensorboard did not start"}
                time.sleep(0.2)
            seconds = args.settle + args.seconds + 2 * args.tb_reload + 2
            writer = subprocess.Popen([sys.executable, "-m", "bench.freshness", "--tb-writer", str(run_dir),
                                       "--writer-rate", str(rate), "--writer-seconds", str(seconds), "--writer-keys",
                                       ",".join(keys)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            query = urllib.parse.urlencode({"run": "run", "tag": tag})
            seen = 0
            per_step: list[float] = []
            per_poll: list[float] = []
            polls = 0
            # The window opens `settle` after the first point is served, not after the writer was launched:
            # its start (importing torch) takes seconds on a loaded machine and would eat the window.
            window_start, window_end = math.inf, math.inf
            stop_at = time.monotonic() + 60
            while time.monotonic() < stop_at:
                t_poll = time.monotonic()
                try:
                    points = json.loads(NO_PROXY.open(f"{base}/data/plugin/scalars/scalars?{query}", timeout=5).read())
                except (OSError, ValueError):
                    points = []  # the run or tag is not loaded yet: TensorBoard answers 400/404
                received = time.time()
                polls += 1
                fresh = [(wall, step) for wall, step, _ in points if step > seen]
                if fresh:
                    seen = max(step for _, step in fresh)
                    newest = max(wall for wall, _ in fresh)
                    if window_start == math.inf:
                        window_start = newest + args.settle
                        window_end = window_start + args.seconds
                        stop_at = time.monotonic() + args.settle + args.seconds + 2 * args.tb_reload + 1
                    if window_start <= newest < window_end:
                        per_poll.append(received - newest)
                        per_step.extend(received - wall for wall, _ in fresh if wall >= window_start)
                time.sleep(max(0.0, args.tb_poll_ms / 1000 - (time.monotonic() - t_poll)))
        finally:
            if writer is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    writer.wait(30)
                if writer.poll() is None:
                    writer.kill()
            _end(tb)
    return {"available": True, "reason": None, "reload_interval_s": args.tb_reload, "poll_ms": args.tb_poll_ms,
            "steps_per_s": rate, "keys": len(keys), "polls": polls, "tag": tag,
            "per_step_ms": percentiles(per_step), "per_poll_ms": percentiles(per_poll)}


# ---------------------------------------------------------------------------- Trackio

#: The project and run names the Trackio writer logs under (a fresh TRACKIO_DIR each time).
TRACKIO_PROJECT, TRACKIO_RUN = "freshness", "run"


def trackio_writer(times_path: Path, keys: list[str], rate: float, seconds: float) -> int:
    """The writer process: ``trackio.log`` of every key every step at ``rate`` steps/s, in Trackio's local mode.

    Trackio stamps a row when its background thread writes the batch to SQLite, not when it was logged, so the
    writer keeps each step's ``time.time()`` itself and leaves them in ``times_path`` (JSON, by step) at the end.
    """
    import trackio

    trackio.init(project=TRACKIO_PROJECT, name=TRACKIO_RUN)
    times: dict[int, float] = {}
    start = time.monotonic()
    step = 0
    while time.monotonic() - start < seconds:
        step += 1
        times[step] = time.time()
        trackio.log({key: math.sin(step / 100 + i) for i, key in enumerate(keys)}, step=step)
        pause = start + step / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    trackio.finish()
    times_path.write_text(json.dumps(times))
    return 0


TRACKIO_DASHBOARD = """\
import sys

import trackio

trackio.show(project=sys.argv[1], open_browser=False, block_thread=True, server_port=int(sys.argv[2]))
"""


def trackio_cell(args: argparse.Namespace, keys: list[str], rate: float) -> dict[str, Any]:
    """Trackio's dashboard server and a writer process, read as for TensorBoard; latencies as for gradwatch.

    The reader asks the dashboard's HTTP API (``POST /api/get_metric_values``, what its CLI and agents use)
    for the steps after the newest it has seen, one metric, every ``--trackio-poll-ms``: the cheapest read of
    new points Trackio offers. (Its web page asks ``/api/get_logs_batch`` for the whole run once a second.)
    """
    try:
        import trackio  # noqa: F401
    except ImportError:
        return {"available": False, "reason": "trackio is not installed (pip install -e '.[bench]')"}
    with tempfile.TemporaryDirectory(prefix="gradwatch-trackio-") as tmp:
        env = {**os.environ, "TRACKIO_DIR": str(Path(tmp) / "data"), "OMP_NUM_THREADS": "1"}
        port = _free_port()
        dashboard = subprocess.Popen([sys.executable, "-c", TRACKIO_DASHBOARD, TRACKIO_PROJECT, str(port)],
                                     env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        tag = keys[0]
        times_path = Path(tmp) / "times.json"
        writer: subprocess.Popen[bytes] | None = None

        def read(after: int) -> list[dict[str, Any]]:
            # around_step ± window: the steps after ``after`` (a window wider than any run here).
            body = json.dumps({"project": TRACKIO_PROJECT, "run": TRACKIO_RUN, "metric_name": tag,
                               "around_step": after + 1 + 10**9, "window": 10**9}).encode()
            request = urllib.request.Request(f"{base}/api/get_metric_values", data=body,
                                             headers={"Content-Type": "application/json"})
            data = json.loads(NO_PROXY.open(request, timeout=5).read()).get("data")
            return data if isinstance(data, list) else []

        seen_at: dict[int, float] = {}  # step → the end of the first poll whose answer held it
        polls: list[tuple[float, list[int]]] = []  # (end of poll, new steps) per poll that brought any
        n_polls = 0
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError, ValueError):
                    read(0)
                    break
                if dashboard.poll() is not None or time.monotonic() > deadline:
                    return {"available": False, "reason": "the trackio dashboard did not start"}
                time.sleep(0.2)
            seconds = args.settle + args.seconds + 3
            writer = subprocess.Popen([sys.executable, "-m", "bench.freshness", "--trackio-writer", str(times_path),
                                       "--writer-rate", str(rate), "--writer-seconds", str(seconds),
                                       "--writer-keys", ",".join(keys)], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seen = 0
            stop_at = time.monotonic() + 90
            while time.monotonic() < stop_at and writer.poll() is None:
                t_poll = time.monotonic()
                try:
                    points = read(seen)
                except (OSError, ValueError):
                    points = []
                received = time.time()
                n_polls += 1
                fresh = sorted({int(p["step"]) for p in points if int(p["step"]) > seen})
                if fresh:
                    seen = fresh[-1]
                    polls.append((received, fresh))
                    for step in fresh:
                        seen_at[step] = received
                time.sleep(max(0.0, args.trackio_poll_ms / 1000 - (time.monotonic() - t_poll)))
            with contextlib.suppress(subprocess.TimeoutExpired):
                writer.wait(30)
        finally:
            if writer is not None and writer.poll() is None:
                writer.kill()
            _end(dashboard)
        if not times_path.exists():
            return {"available": False, "reason": "the trackio writer did not finish"}
        written = {int(step): t for step, t in json.loads(times_path.read_text()).items()}
    # The window opens `settle` after the first step was written, as for gradwatch's clients.
    window_start = min(written.values()) + args.settle
    window_end = window_start + args.seconds
    per_step = [seen_at[s] - written[s] for s in sorted(seen_at) if s in written
                and window_start <= written[s] < window_end]
    per_poll = [received - written[new[-1]] for received, new in polls if new[-1] in written
                and window_start <= written[new[-1]] < window_end]
    in_window = [s for s, t in written.items() if window_start <= t < window_end]
    return {"available": True, "reason": None, "read": "POST /api/get_metric_values (steps after the last seen)",
            "poll_ms": args.trackio_poll_ms, "steps_per_s": rate, "keys": len(keys), "polls": n_polls,
            "tag": tag, "steps_written_in_window": len(in_window),
            "steps_seen_in_window": sum(1 for s in in_window if s in seen_at),
            "per_step_ms": percentiles(per_step), "per_poll_ms": percentiles(per_poll)}


def worst_by_setup(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Worst per-step p99 for each (variant, compression) setup. "before fix" is measured with several runs
    only (one worker launches the same either way): the one-run "as launched" cells count for it too."""
    out = []
    for workers in dict.fromkeys(c["workers"] for c in cells):
        for compression in dict.fromkeys(c["compression"] for c in cells):
            group = [c for c in cells if c["compression"] == compression
                     and (c["workers"] == workers
                          or (workers == "before fix" and c["runs"] == 1 and c["workers"] == "as launched"))]
            if not group:
                continue
            worst = max((c["per_step_ms"]["p99"] or math.inf) for c in group)
            out.append({"workers": workers, "compression": compression, "worst_p99_ms": worst,
                        "met": worst <= TARGET_P99_MS})
    return out


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=_int_list, default=[1, 8], help="concurrent run counts, comma-separated")
    parser.add_argument("--clients", type=_int_list, default=[1, 20], help="client counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per cell")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between connecting and measuring")
    parser.add_argument("--device", default="cpu", help="the runs' train.device: cpu, cuda or cuda:N (every run on "
                        "that one GPU, GRADWATCH_GPU_RUN_LIMIT raised to fit them)")
    parser.add_argument("--flush-ms", type=int, default=CONFIG["intervals"]["flush_ms"],
                        help="the runs' intervals.flush_ms")
    parser.add_argument("--tb-reload", type=float, default=1.0, help="tensorboard --reload_interval")
    parser.add_argument("--tb-poll-ms", type=float, default=20.0, help="how often the poller asks TensorBoard")
    parser.add_argument("--compression", type=lambda s: s.split(","), default=["deflate"],
                        help="what the clients offer, each measured: deflate (permessage-deflate, as browsers "
                             "do; the server then compresses every frame once per client) and/or none")
    parser.add_argument("--variants", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                        default=["as launched", "flush floor"],
                        help=f"comma-separated, from {list(VARIANTS)}: the app as it is, its workers flushing "
                             "as before issue 15, its workers launched as before the autogroup fix")
    parser.add_argument("--no-before", action="store_true", help="the app as it is only (--variants 'as launched')")
    parser.add_argument("--trackio-poll-ms", type=float, default=20.0, help="how often the reader asks Trackio")
    parser.add_argument("--no-tensorboard", action="store_true")
    parser.add_argument("--no-trackio", action="store_true")
    parser.add_argument("--no-peers", action="store_true", help="neither TensorBoard nor Trackio")
    parser.add_argument("--profile", type=Path, help="py-spy the server during the largest cell into this raw file")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "freshness.json")
    parser.add_argument("--tb-writer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trackio-writer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--writer-rate", type=float, default=100.0, help=argparse.SUPPRESS)
    parser.add_argument("--writer-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--writer-keys", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tb_writer is not None:
        return tb_writer(args.tb_writer, args.writer_keys.split(","), args.writer_rate, args.writer_seconds)
    if args.trackio_writer is not None:
        return trackio_writer(args.trackio_writer, args.writer_keys.split(","), args.writer_rate,
                              args.writer_seconds)
    if not args.compression or any(c not in ("deflate", "none") for c in args.compression):
        parser.error("--compression takes deflate, none or both, comma-separated")
    if args.no_before:
        args.variants = ["as launched"]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        parser.error(f"--variants takes names from {list(VARIANTS)}, comma-separated")

    cells, keys = gradwatch_cells(args)
    as_launched = [c for c in cells if c["workers"] == "as launched"] or cells
    single = next((c for c in as_launched if c["runs"] == 1 and c["clients"] == 1), as_launched[0])
    # The peers' writers log the same keys at the speed the one-run gradwatch case trained.
    rate = max(1.0, float(single["steps_per_s_per_run"]))
    tb: dict[str, Any] = {"available": False, "reason": "--no-peers" if args.no_peers else "--no-tensorboard"}
    if not (args.no_tensorboard or args.no_peers):
        tb = tensorboard_cell(args, keys or ["loss/d"], rate)
    tk: dict[str, Any] = {"available": False, "reason": "--no-peers" if args.no_peers else "--no-trackio"}
    if not (args.no_trackio or args.no_peers):
        tk = trackio_cell(args, keys or ["loss/d"], rate)

    headers = ["case", "steps/s per run", "frames", "per step p50", "p95", "p99", "max",
               "per frame p50", "p95", "p99", "max"]

    def ms(v: Any) -> str:
        return "—" if v is None else f"{v:.0f}"

    rows = []
    for c in cells:
        s, f = c["per_step_ms"], c["per_frame_ms"]
        label = f"{c['runs']} run(s) × {c['clients']} client(s), {c['compression']}"
        if c["workers"] != "as launched":
            label += f", {c['workers']}"
        rows.append([label, f"{c['steps_per_s_per_run']}",
                     str(c["frames"]), ms(s["p50"]), ms(s["p95"]), ms(s["p99"]), ms(s["max"]),
                     ms(f["p50"]), ms(f["p95"]), ms(f["p99"]), ms(f["max"])])
    if tb["available"]:
        s, f = tb["per_step_ms"], tb["per_poll_ms"]
        rows.append([f"TensorBoard (reload {tb['reload_interval_s']:g} s, poll {tb['poll_ms']:g} ms)",
                     f"{tb['steps_per_s']}", str(tb["polls"]), ms(s["p50"]), ms(s["p95"]), ms(s["p99"]),
                     ms(s["max"]), ms(f["p50"]), ms(f["p95"]), ms(f["p99"]), ms(f["max"])])
    if tk["available"]:
        s, f = tk["per_step_ms"], tk["per_poll_ms"]
        rows.append([f"Trackio (local, poll {tk['poll_ms']:g} ms)", f"{tk['steps_per_s']}", str(tk["polls"]),
                     ms(s["p50"]), ms(s["p95"]), ms(s["p99"]), ms(s["max"]), ms(f["p50"]), ms(f["p95"]),
                     ms(f["p99"]), ms(f["max"])])
    print(render_table(headers, rows))
    print("latencies in ms; per step: receipt − each step's time (includes the worker's buffering); per frame: "
          "receipt − the frame's newest step (TensorBoard, Trackio: per poll, its newest new step)")
    ratios: dict[str, float | None] = {}
    for name, peer in (("TensorBoard", tb), ("Trackio", tk)):
        ratios[name] = None
        if peer["available"] and peer["per_step_ms"]["p99"] and single["per_step_ms"]["p99"]:
            ratios[name] = round(peer["per_step_ms"]["p99"] / single["per_step_ms"]["p99"], 1)
            print(f"{name} p99 / gradwatch p99 (1 run, 1 client, {single['compression']}, per step): "
                  f"{ratios[name]}×")
    verdicts = worst_by_setup(cells)
    for v in verdicts:
        print(f"worst per-step p99, workers {v['workers']}, clients offer {v['compression']}: {v['worst_p99_ms']} ms "
              f"(target ≤ {TARGET_P99_MS:.0f} ms: {'met' if v['met'] else 'MISSED'})")
    worst = max((c["per_step_ms"]["p99"] or math.inf) for c in as_launched)
    write_json(args.json, {
        "meta": {**machine_info(args.device), "config": CONFIG | {"intervals": {**CONFIG["intervals"],
                                                                             "flush_ms": args.flush_ms}},
                 "window_s": args.seconds, "settle_s": args.settle, "client_compression": args.compression},
        "target_p99_ms": TARGET_P99_MS,
        "gradwatch": cells,
        "tensorboard": tb,
        "tensorboard_over_gradwatch_p99": ratios["TensorBoard"],
        "trackio": tk,
        "trackio_over_gradwatch_p99": ratios["Trackio"],
        "worst_per_step_p99_ms": worst,  # the app as it is, whatever the clients offer
        "met": worst <= TARGET_P99_MS,
        "worst_by_setup": verdicts,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
