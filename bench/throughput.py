"""Server throughput: metric points per second ingested, committed and fanned out, up to saturation, and its memory.

The workers are :mod:`bench.synthetic_worker` processes (the server is started
with ``GRADWATCH_WORKER_MODULE=bench.synthetic_worker``): the real worker
protocol with the trainer replaced by a loop that sends a 64-step × 60-key
metrics frame whenever the server's acks leave room, so the server, not
PyTorch, is what runs out of CPU. ``--clients`` websocket clients (20 by
default, spread round-robin over the runs) follow ``/ws/runs/{id}`` as
dashboard tabs do. Clients that offer permessage-deflate (as every browser
does) and clients that offer no compression are measured side by side at each
step (``--compression``): the server compresses every frame once per client
that negotiated it, and that is most of its fan-out cost.

1. **Saturation sweep**: for each N in ``--runs`` (1, 2, 4, 8) a fresh server
   with N synthetic runs and the clients, ``--warmup`` seconds, then a window
   of ``--sweep-seconds``. Points/s *committed* come from the runs' committed
   step (``GET /api/runs``, updated in the same SQLite transaction as the
   points) × keys; points/s *fanned out* are the points the clients received.
   The sweep stops once one more doubling gains less than 5 %.
2. **Long run**: the saturating N for ``--duration`` seconds (120 for the
   documented figure), once per client kind, the server's RSS sampled every
   second. Flat means the
   final RSS is within ``--rss-margin`` (10 %) of the RSS after the first
   quarter of the run (the warm-up: SQLite's page cache, the hub's rings and
   client queues fill to their bounds there).

Every figure is from one run on one machine, client processes included: on
the 2-core machine the clients and the synthetic workers take CPU from the
server, which is reported beside the figures (CPU % per process group).

    python -m bench.throughput                      # sweep + two 120 s long runs, about 7 minutes
    python -m bench.throughput --runs 1,2 --sweep-seconds 5 --duration 20   # what `make bench` runs
    python -m bench.throughput --runs 1 --sweep-seconds 3 --duration 5 --clients 2   # smoke test

Writes ``bench/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench._common import RESULTS_DIR, machine_info, render_table, write_json
from bench.server import Server
from bench.synthetic_worker import synthetic_keys

TARGET_POINTS_PER_S = 250_000
STEPS_PER_FRAME = 64
KEYS = 60
_SEQ = re.compile(r'"seq":(\d+)')


@dataclass
class ClientCounts:
    """What one client received; updated by its task, read by the sampler (ints: no lock needed)."""

    run_id: str
    frames: int = 0
    metrics_frames: int = 0
    bytes: int = 0
    gaps: int = 0
    last_seq: int = 0
    close_code: int | None = None


class Clients:
    """``n`` websocket clients on one asyncio loop in a background thread, counting what arrives.

    A client does not parse the frames (a 75 kB JSON text 20 × 60 times a second would cost the
    machine more CPU than the server spends): it reads the seq from the text's head, checks that seqs
    have no gap, and counts metrics frames, whose size in points the synthetic workers fix.
    """

    def __init__(self, ws_url: str, run_ids: list[str], n: int, compression: str | None) -> None:
        self.ws_url = ws_url
        self.counts = [ClientCounts(run_ids[i % len(run_ids)]) for i in range(n)]
        self.compression = compression
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="bench-clients", daemon=True)
        self.connected = threading.Event()
        self._n_connected = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        if not self.connected.wait(timeout):
            raise RuntimeError(f"only {self._n_connected} of {len(self.counts)} clients connected")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._tasks = [self.loop.create_task(self._client(c)) for c in self.counts]
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        self.loop.close()

    async def _client(self, counts: ClientCounts) -> None:
        url = f"{self.ws_url}/ws/runs/{counts.run_id}?since=0"
        async with connect(url, proxy=None, max_size=None, open_timeout=20,
                           compression=self.compression) as ws:
            self._n_connected += 1
            if self._n_connected == len(self.counts):
                self.connected.set()
            try:
                async for message in ws:
                    text = message if isinstance(message, str) else message.decode()
                    counts.frames += 1
                    counts.bytes += len(text)
                    head = text[:80]
                    match = _SEQ.search(head)
                    if match:
                        seq = int(match.group(1))
                        if seq != counts.last_seq + 1:
                            counts.gaps += 1
                        counts.last_seq = seq
                    if head.startswith('{"type":"metrics"'):
                        counts.metrics_frames += 1
            except ConnectionClosed:
                pass
            counts.close_code = ws.close_code

    def stop(self) -> None:
        """Close every client now: a client still far behind would otherwise read its backlog for minutes."""
        if not self.thread.is_alive():
            return  # every stream already ended (and the loop is closed)
        for task in self._tasks:
            self.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(10.0)


@dataclass
class Sample:
    t: float  # seconds since the clients connected
    committed_points: int
    fanout_points: int
    server_rss_mb: float
    server_cpu_pct: float  # since the previous sample
    workers_cpu_pct: float


@dataclass
class Phase:
    """One server, ``runs`` synthetic runs, the clients, sampled every second."""

    runs: int
    clients: int
    compression: str
    seconds: float
    warmup: float
    samples: list[Sample] = field(default_factory=list)
    client_counts: list[ClientCounts] = field(default_factory=list)
    bench_cpu_pct: float = 0.0

    def rate(self, attr: str) -> float:
        """Points/s of ``attr`` over the window after the warm-up."""
        window = [s for s in self.samples if s.t >= self.warmup]
        if len(window) < 2:
            return 0.0
        return (getattr(window[-1], attr) - getattr(window[0], attr)) / (window[-1].t - window[0].t)

    def summary(self, keys: int, steps_per_frame: int) -> dict[str, Any]:
        window = [s for s in self.samples if s.t >= self.warmup] or self.samples
        ingest = self.rate("committed_points")
        fanout = self.rate("fanout_points")
        watchers = self.clients / max(self.runs, 1)
        return {
            "runs": self.runs,
            "clients": self.clients,
            "compression": self.compression,
            "window_s": round(self.seconds, 1),
            "ingest_points_per_s": round(ingest),
            "fanout_points_per_s": round(fanout),
            # Each point goes to every client of its run: fan-out / (ingest × clients per run) is 1 when
            # every client keeps up with the live tail.
            "fanout_share": round(fanout / (ingest * watchers), 3) if ingest else None,
            "server_cpu_pct": round(statistics.mean(s.server_cpu_pct for s in window), 1),
            "workers_cpu_pct": round(statistics.mean(s.workers_cpu_pct for s in window), 1),
            "clients_cpu_pct": round(self.bench_cpu_pct, 1),
            "client_gaps": sum(c.gaps for c in self.client_counts),
            "client_bytes_per_s": round(sum(c.bytes for c in self.client_counts) / max(self.samples[-1].t, 1e-9))
            if self.samples else 0,
        }


def _committed_points(server: Server, keys: int) -> int:
    # Steps are 1..N per run, so the committed step is the number of committed steps.
    return sum(int(r["step"]) for r in server.request("GET", "/api/runs")) * keys


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.cpu_percent(None)
    return total


def _start_profiler(out: Path, pid: int, seconds: float) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the server (every thread, idle ones left out) into a collapsed-stack file, if installed."""
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if exe is None:
        print("  (py-spy not installed: pip install py-spy; no profile)", flush=True)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--format", "raw", "--nolineno", "--rate", "50", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_summary(raw: Path, top: int = 15) -> list[tuple[str, float]]:
    """Share of samples per leaf function (self time) from py-spy's collapsed stacks."""
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        counts[leaf] = counts.get(leaf, 0) + int(n)
        total += int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return [(name, n / total) for name, n in ranked] if total else []


def run_phase(args: argparse.Namespace, runs: int, compression: str, seconds: float, keys: int,
              profile: Path | None = None) -> Phase:
    """Start a fresh server with ``runs`` synthetic runs and the clients; sample until the window ends."""
    phase = Phase(runs, args.clients, compression, seconds, args.warmup)
    env = {
        "GRADWATCH_WORKER_MODULE": "bench.synthetic_worker",
        "GRADWATCH_CPU_RUN_LIMIT": "64",
        # A safety net only: the runs are stopped through the API when the window ends.
        "GRADWATCH_SYNTH_SECONDS": str(seconds + args.warmup + 120),
        "GRADWATCH_SYNTH_STEPS": str(args.steps_per_frame),
        "GRADWATCH_SYNTH_KEYS": str(keys),
        "GRADWATCH_SYNTH_WINDOW": str(args.window),
    }
    with tempfile.TemporaryDirectory(prefix="gradwatch-throughput-") as tmp, Server(Path(tmp), env=env) as server:
        config = {"kind": "gan", "name": "synthetic", "train": {"steps": 10_000_000, "device": "cpu"}}
        ids = [server.request("POST", "/api/runs", config)["id"] for _ in range(runs)]
        deadline = time.monotonic() + 60
        while any(r["status"] != "running" for r in server.request("GET", "/api/runs")):
            if time.monotonic() > deadline:
                raise RuntimeError("the synthetic runs did not start:\n" + "".join(server.log))
            time.sleep(0.1)
        clients = Clients(server.url.replace("http://", "ws://", 1), ids, args.clients,
                          None if compression == "none" else "deflate")
        clients.start()
        assert server.proc is not None
        srv = psutil.Process(server.proc.pid)
        workers = server.workers()
        me = psutil.Process()
        for proc in [srv, *workers]:
            with contextlib.suppress(psutil.Error):
                proc.cpu_percent(None)
        me_cpu0 = me.cpu_times()
        spy = _start_profiler(profile, srv.pid, args.warmup + seconds) if profile is not None else None
        t0 = time.monotonic()
        points_per_frame = args.steps_per_frame * keys
        end = t0 + args.warmup + seconds
        while True:
            now = time.monotonic()
            phase.samples.append(Sample(
                t=now - t0,
                committed_points=_committed_points(server, keys),
                fanout_points=sum(c.metrics_frames for c in clients.counts) * points_per_frame,
                server_rss_mb=srv.memory_info().rss / 2**20,
                server_cpu_pct=srv.cpu_percent(None),
                workers_cpu_pct=_cpu(workers),
            ))
            if now >= end:
                break
            time.sleep(max(0.0, min(args.interval, end - time.monotonic())))
        me_cpu1 = me.cpu_times()
        phase.bench_cpu_pct = 100 * ((me_cpu1.user + me_cpu1.system) - (me_cpu0.user + me_cpu0.system)) / (
            time.monotonic() - t0)
        clients.stop()
        phase.client_counts = clients.counts
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        for run_id in ids:
            with contextlib.suppress(Exception):
                server.request("POST", f"/api/runs/{run_id}/stop")
        server.wait_workers_gone(30)
    return phase


def rss_verdict(phase: Phase, margin: float) -> dict[str, Any]:
    """RSS after the warm-up quarter against the final RSS: flat when within ``margin``."""
    samples = phase.samples
    warm = [s for s in samples if s.t >= samples[-1].t / 4]
    after_warmup = warm[0].server_rss_mb
    final = samples[-1].server_rss_mb
    growth = final / after_warmup - 1
    middle = next(s for s in samples if s.t >= samples[-1].t / 2).server_rss_mb
    return {
        # A step that then holds (a one-time refill) and a steady climb read the same above; this tells them apart.
        "rss_growth_second_half": round(final / middle - 1, 3),
        "rss_after_warmup_mb": round(after_warmup, 1),
        "rss_final_mb": round(final, 1),
        "rss_max_mb": round(max(s.server_rss_mb for s in samples), 1),
        "rss_growth": round(growth, 3),
        "rss_margin": margin,
        "flat": growth <= margin,
    }


def _row(label: str, r: dict[str, Any]) -> list[str]:
    return [label, str(r["runs"]), r["compression"], f"{r['ingest_points_per_s']:,}", f"{r['fanout_points_per_s']:,}",
            f"{r['fanout_share']}", f"{r['server_cpu_pct']:.0f}", f"{r['workers_cpu_pct']:.0f}",
            f"{r['clients_cpu_pct']:.0f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="1,2,4", help="synthetic run counts for the saturation sweep")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--sweep-seconds", type=float, default=10.0, help="measured window per sweep step")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after the clients connect, not measured")
    parser.add_argument("--duration", type=float, default=120.0, help="the long run's length (RSS flatness)")
    parser.add_argument("--long-runs", type=int, help="runs in the long run (default: the sweep's best)")
    parser.add_argument("--steps-per-frame", type=int, default=STEPS_PER_FRAME)
    parser.add_argument("--keys", type=int, default=KEYS)
    parser.add_argument("--window", type=int, default=16, help="unacknowledged frames a synthetic worker may have")
    parser.add_argument("--compression", default="deflate,none",
                        help="what the clients offer, each measured at every sweep step and in a long run: deflate "
                             "(permessage-deflate, as browsers offer it) and/or none")
    parser.add_argument("--rss-margin", type=float, default=0.10)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples (RSS, progress)")
    parser.add_argument("--profile", type=Path, help="py-spy the server during the long run into this raw file")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "throughput.json")
    args = parser.parse_args(argv)
    run_counts = [int(x) for x in args.runs.split(",") if x.strip()]
    compressions = [c.strip() for c in args.compression.split(",") if c.strip()]
    if not compressions or any(c not in ("deflate", "none") for c in compressions):
        parser.error("--compression takes deflate, none or both, comma-separated")
    keys = len(synthetic_keys(args.keys))

    sweep: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}
    for runs in run_counts:
        gained = False
        for compression in compressions:  # side by side at each step, so load changes hit both alike
            result = run_phase(args, runs, compression, args.sweep_seconds, keys).summary(keys, args.steps_per_frame)
            sweep.append(result)
            print(f"  {runs} run(s), clients {compression}: {result['ingest_points_per_s']:,} points/s committed, "
                  f"{result['fanout_points_per_s']:,} fanned out (share {result['fanout_share']})", flush=True)
            previous = best.get(compression)
            if previous is None or result["ingest_points_per_s"] >= 1.05 * previous["ingest_points_per_s"]:
                gained = True
            if previous is None or result["ingest_points_per_s"] > previous["ingest_points_per_s"]:
                best[compression] = result
        if not gained:
            break  # saturated: one more step gained less than 5 % for every client kind
    longs: list[dict[str, Any]] = []
    long_clients: dict[str, list[dict[str, Any]]] = {}
    for compression in compressions:  # the long run once per client kind, in the same order
        runs = args.long_runs or best[compression]["runs"]
        phase = run_phase(args, runs, compression, args.duration, keys,
                          args.profile if compression == compressions[0] else None)
        result = {**phase.summary(keys, args.steps_per_frame), **rss_verdict(phase, args.rss_margin)}
        result["rss_series_mb"] = [round(s.server_rss_mb, 1) for s in phase.samples]
        longs.append(result)
        long_clients[compression] = [asdict(c) for c in phase.client_counts]

    headers = ["phase", "runs", "clients offer", "committed pts/s", "fanned out pts/s", "share", "server CPU %",
               "workers CPU %", "clients CPU %"]
    rows = [_row(f"sweep {r['window_s']:.0f} s", r) for r in sweep]
    rows += [_row(f"long {r['window_s']:.0f} s", r) for r in longs]
    print(render_table(headers, rows))
    peak = {c: max([b["ingest_points_per_s"], *(r["ingest_points_per_s"] for r in longs if r["compression"] == c)])
            for c, b in best.items()}
    for compression, value in peak.items():
        print(f"peak committed, clients {compression}: {value:,} points/s (target ≥ {TARGET_POINTS_PER_S:,}: "
              f"{'met' if value >= TARGET_POINTS_PER_S else 'MISSED'})")
    for r in longs:
        print(f"server RSS over the long run, clients {r['compression']}: {r['rss_after_warmup_mb']} MB after "
              f"warm-up → {r['rss_final_mb']} MB at the end ({100 * r['rss_growth']:+.1f} %, "
              f"{'flat' if r['flat'] else 'NOT flat'}; max {r['rss_max_mb']} MB); fan-out share {r['fanout_share']}")
    profile: list[tuple[str, float]] = []
    if args.profile is not None and args.profile.is_file():
        profile = profile_summary(args.profile)
        print("where the server's time went (py-spy, self time per function, all threads):")
        for name, share in profile:
            print(f"  {100 * share:5.1f} %  {name}")
    write_json(args.json, {
        "meta": {**machine_info("cpu"), "steps_per_frame": args.steps_per_frame, "keys": keys,
                 "window_frames": args.window, "warmup_s": args.warmup, "clients": args.clients},
        "target_points_per_s": TARGET_POINTS_PER_S,
        "peak_points_per_s": peak,
        "met": {c: v >= TARGET_POINTS_PER_S for c, v in peak.items()},
        "sweep": sweep,
        "long": longs,
        "long_clients": long_clients,
        "profile_self_time": [{"function": name, "share": round(share, 4)} for name, share in profile],
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
