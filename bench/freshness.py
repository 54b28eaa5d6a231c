"""Freshness: how old a metric is when a dashboard client gets it, against TensorBoard measured the same way.

gradwatch: a real ``gradwatch serve`` launches real workers training a small
ring8 MLP GAN (:data:`CONFIG`); websocket clients follow ``/ws/runs/{id}``. Each
metrics frame carries, per step, the wall-clock ``time`` at which the worker
computed that step; a client stamps ``time.time()`` on receipt (same machine,
same clock). Two latencies per frame:

- **per step**: receipt − ``time`` of every step in the frame. It includes the
  worker's buffering: a frame carries up to ``flush_ms`` (50 ms by default) of
  steps, so its oldest step has waited up to that long in the worker before it
  left. ``flush_ms`` is a floor the server cannot beat, chosen so that a step
  costs no device→host copy of its own (docs/telemetry.md).
- **per frame**: receipt − ``time`` of the frame's newest step: the transport
  alone (channel thread, websocket, server accept + publish, fan-out).

The matrix is 1 and 8 concurrent runs × 1 and 20 clients (round-robin over
the runs; with one client it follows the first run). Each run count gets one
server; both client counts are measured on the same runs, one window after the
other. The runs' steps/s over each window are reported beside the latencies:
eight training processes on a 2-core machine are CPU-starved, and so is
everything else on it.

With several runs the cells are measured a second time, on a fresh server
that launches its workers as gradwatch did before its freshness fix
(:data:`BEFORE_FIX_SHIM`): each worker in a session of its own (on Linux each
session is a scheduling autogroup, and the CPU is shared per group) and its
training thread at normal priority. The app now keeps workers in its session
and runs their training threads at nice 10 (``GRADWATCH_WORKER_NICE``), their
channel threads at normal priority. ``--no-before`` skips the comparison.

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

    python -m bench.freshness                  # the full matrix, before-fix variant and TensorBoard, ~2 minutes
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

TARGET_P99_MS = 100.0
#: A small real run: every SPEC §2 key every step, histograms every 50 steps as by default, and the
#: periodic artifacts (samples, evaluations, checkpoints) moved out of the window: they are not telemetry.
CONFIG: dict[str, Any] = {
    "kind": "gan",
    "name": "freshness",
    "data": {"name": "ring8"},
    "model": {"arch": "mlp", "width": 32, "depth": 2, "latent_dim": 2},
    "train": {"steps": 10_000_000, "batch_size": 64, "seed": 0, "device": "cpu"},
    "intervals": {"log_every": 1, "hist_every": 50, "sample_every": 1_000_000, "eval_every": 10_000_000,
                  "checkpoint_every": 10_000_000, "flush_ms": 50, "flush_steps": 256},
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
    frames: int = 0
    keys: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def window(self, start: float, end: float) -> None:
        with self.lock:
            self.start, self.end = start, end
            self.per_step, self.per_frame, self.timeline, self.frames = [], [], [], 0

    def record(self, received: float, times: list[float], keys: list[str]) -> None:
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
                        self.recorder.record(received, frame["time"], list(frame["data"]))

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
VARIANTS = ("as launched", "before fix")


def launch_is(server: Server, variant: str) -> bool:
    """Whether the workers run as ``variant`` says: in the server's session with a niced training thread
    ("as launched"), or in sessions of their own at normal priority ("before fix")."""
    assert server.proc is not None
    try:
        workers = server.workers()
        same_session = [os.getsid(w.pid) == os.getsid(server.proc.pid) for w in workers]
        niced = [10 in thread_nice(w.pid).values() for w in workers]
    except (OSError, ValueError, IndexError):
        return False
    if variant == "as launched":
        return all(same_session) and all(niced)
    return not any(same_session) and not any(niced)


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
    }
    print(f"  {len(ids)} run(s) × {n_clients} client(s), {workers}, clients offer {compression}: per step p99 "
          f"{cell['per_step_ms']['p99']} ms, per frame p99 {cell['per_frame_ms']['p99']} ms, "
          f"{cell['steps_per_s_per_run']} steps/s per run, server CPU {cell['server_cpu_pct']} %", flush=True)
    return cell


def gradwatch_cells(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Every (runs, clients) cell of the matrix; also the metric keys a run sends (for TensorBoard's writer).

    With several runs (and unless ``--no-before``), the cells are measured twice, each time on a fresh
    server: the app as it is ("as launched"), then as it launched workers before the fix ("before fix").
    """
    cells: list[dict[str, Any]] = []
    keys: list[str] = []
    for n_runs in args.runs:
        for variant in VARIANTS[: 1 if n_runs == 1 or args.no_before else 2]:
            with tempfile.TemporaryDirectory(prefix="gradwatch-freshness-") as tmp:
                # The same limit for every run count, so that every worker gets the same single torch thread
                # (the manager gives each cpu_count // cpu_run_limit threads).
                limit = str(max(max(args.runs), 2))
                env = {"GRADWATCH_CPU_RUN_LIMIT": limit, "GRADWATCH_GPU_RUN_LIMIT": limit, "OMP_NUM_THREADS": "1"}
                if variant == "before fix":
                    shim = Path(tmp) / "shim"
                    shim.mkdir()
                    (shim / "sitecustomize.py").write_text(BEFORE_FIX_SHIM)
                    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), str(ROOT),
                                                                      os.environ.get("PYTHONPATH")]))
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
        if not launch_is(server, variant):
            raise RuntimeError(f"the workers do not run as {variant!r} says (for 'before fix': sitecustomize not "
                               "loaded?)")
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
    return cells


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
                                       "--tb-rate", str(rate), "--tb-seconds", str(seconds), "--tb-keys",
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
            tb.terminate()
            try:
                tb.wait(10)
            except subprocess.TimeoutExpired:
                tb.kill()
                tb.wait(5)
    return {"available": True, "reason": None, "reload_interval_s": args.tb_reload, "poll_ms": args.tb_poll_ms,
            "steps_per_s": rate, "keys": len(keys), "polls": polls, "tag": tag,
            "per_step_ms": percentiles(per_step), "per_poll_ms": percentiles(per_poll)}


def worst_by_setup(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Worst per-step p99 for each (workers, compression) setup; one-run cells count for both worker setups."""
    out = []
    for workers in dict.fromkeys(c["workers"] for c in cells):
        for compression in dict.fromkeys(c["compression"] for c in cells):
            group = [c for c in cells if c["compression"] == compression
                     and (c["workers"] == workers or c["runs"] == 1)]
            if not group or (all(c["runs"] == 1 for c in group) and workers != "as launched"):
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
    parser.add_argument("--no-before", action="store_true",
                        help="with several runs, do not measure again with workers launched as before the fix")
    parser.add_argument("--no-tensorboard", action="store_true")
    parser.add_argument("--profile", type=Path, help="py-spy the server during the largest cell into this raw file")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "freshness.json")
    parser.add_argument("--tb-writer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tb-rate", type=float, default=100.0, help=argparse.SUPPRESS)
    parser.add_argument("--tb-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--tb-keys", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tb_writer is not None:
        return tb_writer(args.tb_writer, args.tb_keys.split(","), args.tb_rate, args.tb_seconds)
    if not args.compression or any(c not in ("deflate", "none") for c in args.compression):
        parser.error("--compression takes deflate, none or both, comma-separated")

    cells, keys = gradwatch_cells(args)
    single = next((c for c in cells if c["runs"] == 1 and c["clients"] == 1), cells[0])  # deflate if measured
    as_launched = [c for c in cells if c["workers"] == "as launched"]
    tb: dict[str, Any] = {"available": False, "reason": "--no-tensorboard"}
    if not args.no_tensorboard:
        rate = max(1.0, float(single["steps_per_s_per_run"]))
        tb = tensorboard_cell(args, keys or ["loss/d"], rate)

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
    print(render_table(headers, rows))
    print("latencies in ms; per step: receipt − each step's time (includes the worker's flush_ms buffering); "
          "per frame: receipt − the frame's newest step (TensorBoard: per poll, its newest new step)")
    ratio = None
    if tb["available"] and tb["per_step_ms"]["p99"] and single["per_step_ms"]["p99"]:
        ratio = round(tb["per_step_ms"]["p99"] / single["per_step_ms"]["p99"], 1)
        print(f"TensorBoard p99 / gradwatch p99 (1 run, 1 client, {single['compression']}, per step): {ratio}×")
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
        "tensorboard_over_gradwatch_p99": ratio,
        "worst_per_step_p99_ms": worst,  # the app as it is, whatever the clients offer
        "met": worst <= TARGET_P99_MS,
        "worst_by_setup": verdicts,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
