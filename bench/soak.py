"""Soak: many runs, many websocket clients and a server killed halfway; nothing may be lost, leak or fail.

Issue 12's soak (``make soak``): a real ``gradwatch serve`` on loopback,
``--runs`` real training runs (tiny GANs and VAEs on the CPU, sized so eight
workers share a 2-core machine, ``train.steps`` far beyond the soak so they
train throughout), ``--clients`` websocket clients spread round-robin over
the runs, and one light HTTP poller over the GET endpoints, for ``--minutes``.

**The restart is a ``kill -9`` of the server alone, halfway.** SPEC §4
promises a stream without gaps "strictly increasing, no gaps" and a client
that reconnects with ``since`` gets every frame after it. A graceful stop
(SIGTERM) ends every run ``interrupted`` by design (their workers are told
to stop), so afterwards there is nothing left to lose and "frames lost 0"
says little. A crash is the hard case: the server dies with frames
received but maybe not committed and acknowledged, its workers train on
and buffer, then re-attach to the new server on the same port
(``GRADWATCH_REATTACH_GRACE_S``) and resend everything after its ``hello``
ack; the clients lose their sockets and reconnect with ``since=`` their last
seq. Every such frame must arrive exactly once, in order.

Each client reconnects with ``?since=<last seq>`` after any disconnect: the
restart, and a voluntary drop every ``--churn-s`` seconds on average (seeded),
so that resuming mid-stream is exercised outside the restart too. It records
every frame's seq and a CRC of its text.

At the end every run is stopped through the API, each client reads until the
server closes its stream with "run ended", and then the stored stream of
each run is read back from ``since=0``. The checks:

- **seq gaps**: every client's seqs strictly increasing by one across all its
  reconnects, and every stored stream exactly 1..N;
- **frames lost**: every client saw every stored frame (its distinct seqs are
  1..N of its run) with the same text (CRC); every metric step 1..S is in the
  stored stream, where S is the step of the worker's final checkpoint (the
  worker's own count), and the run ended ``stopped``;
- **HTTP**: no 5xx (nor any other non-2xx) from the poller's valid requests;
  connection errors while the server is down are counted, not failed;
- **RSS flat**: the server's RSS (psutil, every ``--rss-interval`` s), median of
  the last third of the window after ``--warmup`` against the median of its
  first third, growth at most ``--rss-bound``; the halves before and after the
  restart are also reported on their own;
- **no orphan**: every worker, including those that outlived the killed server,
  has exited once its run is stopped.

    python -m bench.soak                                        # 8 runs × 20 clients, 10 minutes: `make soak`
    python -m bench.soak --minutes 2 --runs 4 --clients 8       # a short one
    python -m bench.soak --minutes 0.5 --runs 2 --clients 3     # smoke test (tests/test_bench_soak.py)

Prints a table, writes ``bench/results/soak.json`` and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import random
import re
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake

from bench._common import RESULTS_DIR, machine_info, render_table, write_json
from bench.server import NO_PROXY, Server

#: The server keeps this many bytes of each live run's newest frames in memory (``app/hub.py``): the rings
#: fill during the warm-up, which is why RSS is compared only after it.
HUB_RING_BYTES = 8 << 20
#: What CPython spends on each ring entry beside the text: the str header, the (seq, text) tuple, the int, the
#: deque slot.
RING_FRAME_OVERHEAD = 140
TERMINAL = {"completed", "stopped", "failed", "interrupted"}
#: The seq sits in a frame's first few keys; a regex there spares parsing every frame in the clients.
_SEQ = re.compile(r'"seq":\s*(\d+)')

_INTERVALS: dict[str, Any] = {
    # The dashboard's defaults for flushing; artifacts rarer than the defaults so that a 10-minute soak of eight
    # runs stays within a few hundred MB of disk, and no evaluation (it would dominate the CPU of a tiny run).
    "hist_every": 50, "sample_every": 2000, "checkpoint_every": 2000, "eval_every": 10_000_000,
    "keep_checkpoints": 2, "flush_ms": 50, "flush_steps": 256,
}
#: Tiny models: on 2 cores most of a worker's CPU is its telemetry, which is what the soak is about.
GAN: dict[str, Any] = {
    "kind": "gan", "data": {"name": "ring8"}, "model": {"width": 32, "depth": 2, "latent_dim": 2},
    "gan": {"lr_g": 1e-3, "lr_d": 1e-3},
    "train": {"steps": 2_000_000, "batch_size": 64, "device": "cpu"}, "intervals": _INTERVALS,
}
VAE: dict[str, Any] = {
    "kind": "vae", "data": {"name": "digits"}, "model": {"width": 32, "depth": 1, "latent_dim": 3},
    "train": {"steps": 2_000_000, "batch_size": 32, "device": "cpu"}, "intervals": _INTERVALS,
}


def run_config(index: int) -> dict[str, Any]:
    """The ``index``-th run: GANs and VAEs alternate (their workers send different frames), each its own seed."""
    base = GAN if index % 2 == 0 else VAE
    cfg: dict[str, Any] = json.loads(json.dumps(base))
    cfg["name"] = f"soak {index} ({cfg['kind']})"
    cfg["train"]["seed"] = index
    return cfg


# --- the checks, as pure functions (unit-tested in tests/test_bench_soak.py) ---------------------------------------


def sequence_faults(seqs: Sequence[int], since: int = 0) -> dict[str, int]:
    """How a received seq sequence departs from since+1, since+2, …: jumps forward, frames skipped, repeats.

    ``gaps`` counts the jumps, ``skipped`` the seqs they skipped; ``repeats`` counts seqs not above the previous
    one (a duplicate or a step back). A clean stream has all three at zero.
    """
    gaps = skipped = repeats = 0
    last = since
    for seq in seqs:
        if seq <= last:
            repeats += 1
            continue
        if seq != last + 1:
            gaps += 1
            skipped += seq - last - 1
        last = seq
    return {"gaps": gaps, "skipped": skipped, "repeats": repeats}


def missing_steps(steps: Sequence[int], last: int) -> list[int]:
    """The steps of 1..``last`` not in ``steps``: a metric step the stream lost (or never sent)."""
    present = set(steps)
    return [s for s in range(1, last + 1) if s not in present]


def client_faults(seqs: Sequence[int], crcs: Sequence[int], stored_crcs: Sequence[int]) -> dict[str, int]:
    """One client's frames against its run's stored stream (``stored_crcs[i]`` is seq i+1's CRC).

    ``lost``: stored seqs the client never received; ``mismatched``: frames whose text differs from the stored
    one; ``beyond_stored``: seqs the store does not have at all; plus :func:`sequence_faults` of its order.
    """
    n = len(stored_crcs)
    distinct = set(seqs)
    return {
        **sequence_faults(seqs),
        "lost": sum(1 for s in range(1, n + 1) if s not in distinct),
        "mismatched": sum(1 for s, c in zip(seqs, crcs, strict=True) if 1 <= s <= n and stored_crcs[s - 1] != c),
        "beyond_stored": sum(1 for s in distinct if s > n),
    }


def ring_bytes_estimate(cum: Sequence[int], base: int, head: int, ring: int = HUB_RING_BYTES,
                        per_frame: int = RING_FRAME_OVERHEAD) -> int:
    """What one run's ring in the hub holds once frames ``base+1..head`` were published to this server.

    ``cum[i]`` is the stored texts' total length of seqs 1..i (``cum[0] == 0``). The hub keeps the newest frames
    whose total stays within ``ring`` bytes (and always the newest one): filling them is legitimate growth of the
    server's RSS, which the soak takes out before it judges a leak.
    """
    head = min(head, len(cum) - 1)
    if head <= base:
        return 0
    oldest = max(base + 1, min(head, bisect.bisect_left(cum, cum[head] - ring) + 1))
    return cum[head] - cum[oldest - 1] + (head - oldest + 1) * per_frame


def rss_growth(samples: Sequence[tuple[float, float]], warmup: float) -> dict[str, Any]:
    """Median RSS of the last third of the window after ``warmup`` against that of its first third.

    ``samples`` are ``(seconds, MB)``. Medians, not single samples, so that one garbage-collection spike
    or one freshly reconnected client's buffer does not decide the verdict. None when too few samples.
    """
    window = [(t, mb) for t, mb in samples if t >= warmup]
    if len(window) < 3:
        return {"first_third_mb": None, "last_third_mb": None, "growth": None, "samples": len(window)}
    t0, t1 = window[0][0], window[-1][0]
    third = (t1 - t0) / 3
    first = [mb for t, mb in window if t <= t0 + third] or [window[0][1]]
    last = [mb for t, mb in window if t >= t1 - third] or [window[-1][1]]
    first_mb, last_mb = statistics.median(first), statistics.median(last)
    return {"first_third_mb": round(first_mb, 1), "last_third_mb": round(last_mb, 1),
            "growth": round(last_mb / first_mb - 1, 4), "samples": len(window)}


def crc(text: str) -> int:
    return zlib.crc32(text.encode())


def seq_of(text: str) -> int:
    """A frame's seq, from the head of its text when it is there (cheap), else by parsing the frame."""
    match = _SEQ.search(text, 0, 160)
    if match:
        return int(match.group(1))
    return int(json.loads(text)["seq"])


# --- websocket clients ----------------------------------------------------------------------------------------------


@dataclass
class ClientLog:
    """What one client received over all its connections; written by its task only."""

    index: int
    run_id: str
    seqs: array[int] = field(default_factory=lambda: array("q"))
    crcs: array[int] = field(default_factory=lambda: array("L"))
    bytes: int = 0
    connects: int = 0
    failed_connects: int = 0
    churn_drops: int = 0
    close_codes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # anything else that ended a connection attempt
    ended: bool = False  # the server closed the stream with 1000 "run ended"

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.seqs else 0


class Clients:
    """``n`` websocket clients on one asyncio loop in a background thread, each resuming with ``since=``.

    A client keeps reading until the server ends its stream normally (the run ended); any other close, a refused
    connection while the server is down, or its own seeded churn makes it reconnect from its last seq.
    """

    def __init__(self, server: Server, run_ids: list[str], n: int, *, churn_s: float, seed: int) -> None:
        # Fixed at start: the restarted server listens on the same port, and while it is down the harness's
        # own URL is empty.
        self.ws_base = server.ws_url
        self.logs = [ClientLog(i, run_ids[i % len(run_ids)]) for i in range(n)]
        self.churn_s = churn_s
        self.rngs = [random.Random(seed * 1_000_003 + i) for i in range(n)]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="soak-clients", daemon=True)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._tasks = [self.loop.create_task(self._client(log, rng)) for log, rng in zip(self.logs, self.rngs,
                                                                                       strict=True)]
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        self.loop.close()

    async def _client(self, log: ClientLog, rng: random.Random) -> None:
        while not self._stopping:
            url = f"{self.ws_base}/ws/runs/{log.run_id}?since={log.last_seq}"
            drop_at = time.monotonic() + rng.expovariate(1 / self.churn_s) if self.churn_s > 0 else float("inf")
            try:
                async with connect(url, proxy=None, max_size=None, open_timeout=10, close_timeout=2) as ws:
                    log.connects += 1
                    churned = False
                    while True:
                        timeout = drop_at - time.monotonic()
                        if timeout <= 0:
                            churned = True
                            break
                        try:
                            message = await asyncio.wait_for(ws.recv(), timeout)
                        except TimeoutError:
                            churned = True
                            break
                        text = message if isinstance(message, str) else message.decode()
                        log.seqs.append(seq_of(text))
                        log.crcs.append(crc(text))
                        log.bytes += len(text)
                    if churned:
                        log.churn_drops += 1
                        continue  # leaving the block closes the socket; reconnect at once
            except ConnectionClosedOK as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 1000
                log.close_codes[str(code)] += 1
                if code == 1000:
                    log.ended = True
                    return
            except ConnectionClosed as exc:
                log.close_codes[str(exc.rcvd.code) if exc.rcvd is not None else "no close frame"] += 1
            except (OSError, InvalidHandshake, TimeoutError):
                log.failed_connects += 1  # the server is down (the restart): try again shortly
            except Exception as exc:  # a client must outlive whatever one connection attempt did
                log.errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
            await asyncio.sleep(0.2 + 0.8 * rng.random())

    def all_ended(self) -> bool:
        return all(log.ended for log in self.logs)

    def stop(self) -> None:
        self._stopping = True
        if not self.thread.is_alive():
            return
        for task in self._tasks:
            self.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(10.0)


# --- HTTP poller ----------------------------------------------------------------------------------------------------


class Poller:
    """One thread cycling through the dashboard's GET endpoints, about ``rate`` requests a second, counting codes.

    Every request is valid (existing runs, known collections), so anything but a 2xx is a fault; a refused
    connection while the server is down is counted apart, as the outage it is.
    """

    def __init__(self, server: Server, run_ids: list[str], rate: float) -> None:
        self.base = server.url  # the same port after the restart; the harness's URL is empty while it is down
        self.paths = ["/api/runs"]
        for run_id in run_ids:
            self.paths += [f"/api/runs/{run_id}", f"/api/runs/{run_id}/metrics?max_points=500",
                           f"/api/runs/{run_id}/samples", f"/api/runs/{run_id}/checkpoints",
                           f"/api/runs/{run_id}/events"]
        self.period = 1 / rate if rate > 0 else 0.0
        self.codes: Counter[str] = Counter()
        self.by_route: dict[str, Counter[str]] = {}
        self.faults: list[dict[str, Any]] = []  # the first few non-2xx answers, with their bodies
        self.connection_errors = 0
        self.latencies: list[float] = []
        self._lock = threading.Lock()  # the soak's sampler asks through :meth:`get` too
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-poller", daemon=True)

    @staticmethod
    def route(path: str) -> str:
        """The path with its run id replaced, so that counts group by endpoint."""
        return re.sub(r"/api/runs/[0-9a-f]+", "/api/runs/{id}", path.split("?")[0])

    def start(self) -> None:
        if self.period > 0:
            self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            start = time.monotonic()
            self.get(self.paths[i % len(self.paths)])
            i += 1
            self._stop.wait(max(0.0, self.period - (time.monotonic() - start)))

    def get(self, path: str) -> Any:
        """GET ``path``, counted; its decoded JSON on a 2xx, else None."""
        start = time.monotonic()
        code: str | None = None
        body: Any = None
        fault: dict[str, Any] | None = None
        try:
            with NO_PROXY.open(self.base + path, timeout=15) as response:
                raw = response.read()
                code = str(response.status)
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
        except urllib.error.HTTPError as exc:
            code = str(exc.code)
            fault = {"path": path, "code": exc.code, "body": exc.read().decode(errors="replace")[:500]}
        except OSError:  # refused or reset while the server is down
            pass
        with self._lock:
            if code is None:
                self.connection_errors += 1
                return None
            self.latencies.append(time.monotonic() - start)
            self.codes[code] += 1
            self.by_route.setdefault(self.route(path), Counter())[code] += 1
            if fault is not None and len(self.faults) < 20:
                self.faults.append(fault)
        return body

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(20)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        total = sum(self.codes.values())
        return {
            "requests": total,
            "codes": dict(self.codes),
            "by_route": {route: dict(codes) for route, codes in sorted(self.by_route.items())},
            "http_5xx": sum(n for c, n in self.codes.items() if c.startswith("5")),
            "non_2xx": sum(n for c, n in self.codes.items() if not c.startswith("2")),
            "connection_errors": self.connection_errors,
            "latency_p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
            "latency_p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
            "faults": self.faults,
        }


# --- the soak -------------------------------------------------------------------------------------------------------


@dataclass
class RssSample:
    t: float  # seconds since the clients started
    life: int  # 0 before the restart, 1 after
    server_mb: float
    workers: int  # live worker processes (those of the killed server included)
    heads: dict[str, int]  # each run's last_seq (GET /api/runs) at the time


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
    return alive


def _read_stored(server: Server, run_id: str, timeout: float = 300.0) -> dict[str, Any]:
    """The run's stored stream, read back from ``since=0`` on a fresh websocket until the server closes it.

    Metric steps are kept per key: a flush sends one ``metrics`` frame per key group, so one step legitimately
    appears in several frames (the final evaluation's keys at the last step, say), but never one key twice.
    """
    seqs: list[int] = []
    crcs: list[int] = []
    sizes: list[int] = []
    key_steps: dict[str, array[int]] = {}
    types: Counter[str] = Counter()
    statuses: list[str] = []
    total_bytes = 0
    close: int | str | None = None
    deadline = time.monotonic() + timeout
    with server.stream(run_id, since=0, close_timeout=2) as ws:
        try:
            while time.monotonic() < deadline:
                message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                text = message if isinstance(message, str) else message.decode()
                frame = json.loads(text)
                seqs.append(int(frame["seq"]))
                crcs.append(crc(text))
                sizes.append(len(text))
                total_bytes += len(text)
                types[frame["type"]] += 1
                if frame["type"] == "metrics":
                    for key in frame["data"]:
                        key_steps.setdefault(key, array("q")).extend(frame["step"])
                elif frame["type"] == "status":
                    statuses.append(frame["status"])
        except ConnectionClosed as exc:
            close = exc.rcvd.code if exc.rcvd is not None else None
        except TimeoutError:
            close = "timeout"
    return {"seqs": seqs, "crcs": crcs, "sizes": sizes, "key_steps": key_steps, "types": dict(types),
            "statuses": statuses, "bytes": total_bytes, "close": close}


def metric_faults(key_steps: dict[str, Sequence[int]], last: int) -> dict[str, Any]:
    """Metric points against the worker's ``last`` step: missing, repeated, or beyond it.

    ``missing`` counts the steps of 1..``last`` that no key has; ``missing_per_step_key`` the points missing from
    the keys logged at every step (those holding at least half of 1..``last``: a lost frame takes a few hundred
    steps at most, so such a key stays one); ``repeated`` counts (key, step) pairs seen more than once.
    """
    union: set[int] = set()
    repeated = 0
    every_step_missing = 0
    every_step_keys = 0
    first_missing: list[list[Any]] = []
    for key, steps in key_steps.items():
        distinct = set(steps)
        repeated += len(steps) - len(distinct)
        union |= distinct
        if last and len(distinct) >= last / 2:
            every_step_keys += 1
            gone = missing_steps(steps, last)
            every_step_missing += len(gone)
            if gone and len(first_missing) < 10:
                first_missing.append([key, gone[:10]])
    missing = missing_steps(sorted(union), last)
    return {"missing": len(missing), "missing_first": missing[:20], "every_step_keys": every_step_keys,
            "missing_per_step_key": every_step_missing, "missing_per_step_key_first": first_missing,
            "repeated": repeated, "beyond_worker": sum(1 for s in union if s > last),
            "metric_points": sum(len(v) for v in key_steps.values())}


def _wait(predicate: Any, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak and return every figure and check (the JSON written to ``--json``)."""
    duration = args.minutes * 60
    warmup = min(args.warmup, duration / 4)
    env = {
        "GRADWATCH_CPU_RUN_LIMIT": str(max(args.runs, 1)),
        "OMP_NUM_THREADS": "1",
        # The killed server's workers must find the new one within this; they retry with a back-off.
        "GRADWATCH_REATTACH_GRACE_S": str(args.reattach_grace),
    }
    machine = machine_info("cpu")  # now: its load average is the one the soak started under
    started_pids: set[int] = set()
    samples: list[RssSample] = []
    restart: dict[str, Any] = {"mode": "none" if args.no_restart else "kill -9 (SIGKILL), workers re-attach"}
    bases: list[dict[str, int]] = [{}]  # per server life, each run's last seq when it started (its ring empty)
    clients: Clients | None = None
    poller: Poller | None = None
    with tempfile.TemporaryDirectory(prefix="gradwatch-soak-") as tmp:
        server = Server(Path(tmp) / "data", env=env)
        try:
            server.start()
            ids = [server.request("POST", "/api/runs", run_config(i))["id"] for i in range(args.runs)]
            if not _wait(lambda: all(r["status"] == "running" for r in server.request("GET", "/api/runs")), 180):
                raise RuntimeError("the runs did not all start:\n" + "".join(server.log))
            print(f"soak: {args.runs} runs running, {args.clients} clients, {args.minutes:g} min"
                  f"{'' if args.no_restart else ', server killed and restarted halfway'}", flush=True)
            clients = Clients(server, ids, args.clients, churn_s=args.churn_s, seed=args.seed)
            poller = Poller(server, ids, args.http_rate)
            t0 = time.monotonic()
            clients.start()
            poller.start()
            life = 0
            restart_at = duration / 2 if not args.no_restart else float("inf")
            next_report = 30.0
            while (t := time.monotonic() - t0) < duration:
                started_pids |= {p.pid for p in server.workers()}
                if t >= restart_at and life == 0:
                    restart["workers_alive_at_kill"] = len(_alive(started_pids))
                    restart["at_s"] = round(t, 1)
                    server.kill()
                    time.sleep(args.outage)
                    restart_t = time.monotonic()
                    url = server.url
                    server.start()
                    if server.url != url:
                        raise RuntimeError(f"the server came back on {server.url}, not {url}")
                    restart["server_down_s"] = round(time.monotonic() - t0 - t, 1)
                    restart["start_s"] = round(time.monotonic() - restart_t, 1)
                    life = 1
                    bases.append({r["id"]: r["last_seq"] for r in server.request("GET", "/api/runs")})
                    print(f"  {t:5.0f} s: server killed, back after {restart['server_down_s']} s", flush=True)
                    continue
                listing = poller.get("/api/runs")
                if server.proc is not None and listing is not None:
                    with contextlib.suppress(psutil.Error):
                        samples.append(RssSample(t, life, psutil.Process(server.proc.pid).memory_info().rss / 2**20,
                                                 len(_alive(started_pids)),
                                                 {r["id"]: r["last_seq"] for r in listing}))
                if t >= next_report and samples:
                    next_report += 30.0
                    print(f"  {t:5.0f} s: server RSS {samples[-1].server_mb:.0f} MB, "
                          f"{sum(len(c.seqs) for c in clients.logs):,} frames to clients, "
                          f"{poller.codes.total()} HTTP answers", flush=True)
                time.sleep(min(args.rss_interval, max(0.0, duration - (time.monotonic() - t0))))
            elapsed = time.monotonic() - t0
            if life == 1:
                restart["reattached"] = all(r["status"] == "running" for r in server.request("GET", "/api/runs"))

            # The end: stop every run, let each client read to the server's "run ended".
            for run_id in ids:
                server.request("POST", f"/api/runs/{run_id}/stop")
            _wait(lambda: all(r["status"] in TERMINAL for r in server.request("GET", "/api/runs")), 180)
            clients_ended = _wait(clients.all_ended, args.drain_timeout)
            poller.stop()
            clients.stop()
            workers_exited = _wait(lambda: not _alive(started_pids), 60)
            runs = [_verify_run(server, run_id, [c for c in clients.logs if c.run_id == run_id])
                    for run_id in ids]
            cums = {r["run"]: list(accumulate(r.pop("sizes"), initial=0)) for r in runs}
            rings = [sum(ring_bytes_estimate(cum, bases[s.life].get(run_id, 0), s.heads.get(run_id, 0))
                         for run_id, cum in cums.items()) / 2**20 for s in samples]
        finally:
            if clients is not None:
                clients.stop()
            if poller is not None:
                poller.stop()
            server.stop()
            for pid in _alive(started_pids):  # a worker of the killed server is no longer the new one's child
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()
    result = _report(args, elapsed, warmup, samples, rings, restart, runs, clients, poller, clients_ended,
                     workers_exited, len(started_pids))
    result["meta"] = {**machine, "load_avg_at_end": list(os.getloadavg()), **result["meta"]}
    return result


def _verify_run(server: Server, run_id: str, logs: list[ClientLog]) -> dict[str, Any]:
    """One run's stored stream against what its clients saw and against its worker's final step."""
    detail = server.request("GET", f"/api/runs/{run_id}")
    stored = _read_stored(server, run_id)
    stored_faults = sequence_faults(stored["seqs"])
    final_ckpt = max((c["step"] for c in detail.get("checkpoints", [])), default=0)
    worker_step = final_ckpt  # the final checkpoint is written at the worker's last step when it is stopped
    metrics = metric_faults(stored.pop("key_steps"), worker_step)
    client_rows = []
    stored_crcs = stored["crcs"]
    for log in logs:
        client_rows.append({
            "client": log.index, "frames": len(log.seqs), "last_seq": log.last_seq, "bytes": log.bytes,
            **client_faults(log.seqs, log.crcs, stored_crcs),
            "connects": log.connects, "failed_connects": log.failed_connects, "churn_drops": log.churn_drops,
            "close_codes": dict(log.close_codes), "errors": dict(log.errors), "ended": log.ended,
        })
    return {
        "run": run_id, "name": detail["name"], "status": detail["status"], "error": detail.get("error"),
        "step": detail["step"], "final_checkpoint_step": worker_step, "stored_frames": len(stored["seqs"]),
        "stored_bytes": stored["bytes"], "sizes": stored["sizes"], "stored_types": stored["types"],
        "stored_close": stored["close"],
        "stored_last_status": stored["statuses"][-1] if stored["statuses"] else None,
        "stored_seq_faults": stored_faults,
        "metrics": metrics,
        "clients": client_rows,
    }


def _report(args: argparse.Namespace, elapsed: float, warmup: float, samples: list[RssSample], rings: list[float],
            restart: dict[str, Any], runs: list[dict[str, Any]], clients: Clients | None, poller: Poller | None,
            clients_ended: bool, workers_exited: bool, workers_started: int) -> dict[str, Any]:
    assert clients is not None and poller is not None
    all_clients = [c for r in runs for c in r["clients"]]
    http = poller.summary()
    series = [(s.t, s.server_mb) for s in samples]
    net_series = [(s.t, s.server_mb - ring) for s, ring in zip(samples, rings, strict=True)]
    restart_t = restart.get("at_s")
    spans = [(0.0, restart_t), (restart_t, elapsed)] if restart_t is not None else [(0.0, elapsed)]

    def verdicts(points: list[tuple[float, float]]) -> dict[str, Any]:
        out = rss_growth(points, warmup)
        if len(spans) > 1:  # each server life on its own too: the restart resets whatever grew
            out["lives"] = {name: rss_growth([(t - lo, mb) for t, mb in points if lo <= t < hi],
                                             min(warmup, (hi - lo) / 4))
                            for name, (lo, hi) in zip(("before_restart", "after_restart"), spans, strict=True)}
        return out

    rss: dict[str, Any] = {"raw": verdicts(series), "net_of_rings": verdicts(net_series), "bound": args.rss_bound,
                           "max_mb": round(max(mb for _, mb in series), 1) if series else None,
                           "rings_max_mb": round(max(rings), 1) if rings else None}
    # How long a run's ring takes to fill at the rate its frames came: the raw RSS grows until they are full.
    stream_rate = statistics.mean(r["stored_bytes"] for r in runs) / elapsed if runs else 0.0
    rss["ring_fill_s"] = round(HUB_RING_BYTES / stream_rate, 1) if stream_rate else None
    growth = rss["net_of_rings"]["growth"]

    gaps = sum(c["gaps"] + c["repeats"] for c in all_clients) + sum(
        r["stored_seq_faults"]["gaps"] + r["stored_seq_faults"]["repeats"] for r in runs)
    lost = (sum(c["lost"] + c["mismatched"] + c["beyond_stored"] for c in all_clients)
            + sum(r["metrics"]["missing"] + r["metrics"]["missing_per_step_key"] + r["metrics"]["repeated"]
                  + r["metrics"]["beyond_worker"] + (r["step"] != r["final_checkpoint_step"]) for r in runs))
    checks = {
        "seq_gaps": {"value": gaps, "want": "0", "ok": gaps == 0},
        "frames_lost": {"value": lost, "want": "0", "ok": lost == 0},
        "http_5xx": {"value": http["http_5xx"], "want": "0", "ok": http["http_5xx"] == 0},
        "http_other_non_2xx": {"value": http["non_2xx"] - http["http_5xx"], "want": "0",
                               "ok": http["non_2xx"] == http["http_5xx"]},
        "rss_growth_net_of_rings": {"value": growth, "want": f"<= {args.rss_bound:+.0%}",
                                    "ok": growth is not None and growth <= args.rss_bound},
        "runs_stopped": {"value": sum(r["status"] == "stopped" for r in runs), "want": str(len(runs)),
                         "ok": all(r["status"] == r["stored_last_status"] == "stopped" and r["stored_close"] == 1000
                                   for r in runs)},
        "clients_reached_run_end": {"value": sum(c["ended"] for c in all_clients), "want": str(len(all_clients)),
                                    "ok": clients_ended and all(c["ended"] for c in all_clients)},
        "workers_left": {"value": 0 if workers_exited else "some", "want": "0", "ok": workers_exited},
        "runs_reattached": {"value": restart.get("reattached", "no restart"), "want": "True",
                            "ok": args.no_restart or restart.get("reattached") is True},
        "traffic": {"value": min((c["frames"] for c in all_clients), default=0), "want": "> 0 frames per client",
                    "ok": bool(all_clients) and all(c["frames"] > 0 for c in all_clients) and http["requests"] > 0},
    }
    return {
        "meta": {"minutes": args.minutes, "runs": args.runs, "clients": args.clients,
                 "seconds": round(elapsed, 1), "warmup_s": warmup, "churn_s": args.churn_s, "seed": args.seed,
                 "http_rate": args.http_rate, "outage_s": args.outage, "reattach_grace_s": args.reattach_grace,
                 "workers_started": workers_started, "configs": [run_config(i) for i in range(min(args.runs, 2))]},
        "ok": all(c["ok"] for c in checks.values()),
        "checks": checks,
        "restart": restart,
        "rss": {**rss, "series_columns": ["t_s", "life", "server_rss_mb", "rings_estimate_mb", "workers"],
                "series": [[round(s.t, 1), s.life, round(s.server_mb, 1), round(ring, 1), s.workers]
                           for s, ring in zip(samples, rings, strict=True)]},
        "http": http,
        "runs": runs,
        "totals": {
            "client_frames": sum(c["frames"] for c in all_clients),
            "client_bytes": sum(c["bytes"] for c in all_clients),
            "client_connects": sum(c["connects"] for c in all_clients),
            "client_failed_connects": sum(c["failed_connects"] for c in all_clients),
            "client_churn_drops": sum(c["churn_drops"] for c in all_clients),
            "stored_frames": sum(r["stored_frames"] for r in runs),
            "metric_steps": sum(r["final_checkpoint_step"] for r in runs),
        },
    }


def print_summary(result: dict[str, Any]) -> None:
    """The per-run table, the restart, HTTP and RSS lines, and the checks: what `make soak` shows."""
    rows = []
    for r in result["runs"]:
        cl = r["clients"]
        rows.append([r["name"], r["status"], f"{r['final_checkpoint_step']:,}", f"{r['stored_frames']:,}",
                     str(r["stored_seq_faults"]["gaps"]),
                     str(r["metrics"]["missing"] + r["metrics"]["missing_per_step_key"]), str(len(cl)),
                     f"{sum(c['frames'] for c in cl):,}", str(sum(c["gaps"] + c["repeats"] for c in cl)),
                     str(sum(c["lost"] + c["mismatched"] for c in cl)), str(sum(c["connects"] for c in cl))])
    print(render_table(["run", "status", "worker steps", "stored frames", "stored gaps", "missing steps",
                        "clients", "frames to clients", "client gaps", "client lost", "connects"], rows))
    restart, http, rss, totals = result["restart"], result["http"], result["rss"], result["totals"]
    if "at_s" in restart:
        print(f"restart: {restart['mode']} at {restart['at_s']} s, server down {restart['server_down_s']} s; "
              f"{restart['workers_alive_at_kill']} workers outlived it, all re-attached: {restart.get('reattached')}")
    print(f"clients: {totals['client_frames']:,} frames, {totals['client_bytes'] / 2**20:,.0f} MiB, "
          f"{totals['client_connects']} connections ({totals['client_churn_drops']} voluntary drops, "
          f"{totals['client_failed_connects']} refused while down)")
    print(f"HTTP: {http['requests']:,} requests, codes {http['codes']}, {http['connection_errors']} refused while "
          f"down, p50 {http['latency_p50_ms']} ms, p99 {http['latency_p99_ms']} ms")
    def line(v: dict[str, Any]) -> str:
        growth = "n/a" if v["growth"] is None else f"{v['growth']:+.1%}"
        lives = ", ".join(f"{k.replace('_', ' ')} {x['growth']:+.1%}" for k, x in v.get("lives", {}).items()
                          if x["growth"] is not None)
        return f"{v['first_third_mb']} → {v['last_third_mb']} MB, {growth}" + (f" ({lives})" if lives else "")

    print(f"server RSS, median of the first third after the {result['meta']['warmup_s']:.0f} s warm-up → of the "
          f"last third: {line(rss['raw'])}; max {rss['max_mb']} MB")
    print(f"  net of the hub's rings (≤ {HUB_RING_BYTES >> 20} MiB a run, estimated up to {rss['rings_max_mb']} MB; "
          f"a ring fills in ≈ {rss['ring_fill_s']} s): {line(rss['net_of_rings'])}")
    print(render_table(["check", "value", "want", "ok"],
                       [[name, str(c["value"]), c["want"], "yes" if c["ok"] else "FAIL"]
                        for name, c in result["checks"].items()]))
    print("soak: " + ("PASS" if result["ok"] else "FAIL"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--clients", type=int, default=20, help="websocket clients, spread round-robin over the runs")
    parser.add_argument("--no-restart", action="store_true", help="leave the server alone (a baseline)")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds the killed server stays down")
    parser.add_argument("--reattach-grace", type=float, default=60.0,
                        help="GRADWATCH_REATTACH_GRACE_S: how long the new server waits for the old workers")
    parser.add_argument("--churn-s", type=float, default=90.0,
                        help="mean seconds between a client's voluntary drop-and-resume (0: never)")
    parser.add_argument("--http-rate", type=float, default=4.0, help="poller requests per second (0: none)")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds before RSS counts (at most a quarter of the soak): rings and caches fill")
    parser.add_argument("--rss-interval", type=float, default=2.0)
    parser.add_argument("--rss-bound", type=float, default=0.10, help="largest RSS growth that passes")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds the clients get, once the runs are stopped, to read to the end")
    parser.add_argument("--seed", type=int, default=0, help="seeds the clients' churn and back-off")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "soak.json")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.clients < 1 or args.minutes <= 0:
        parser.error("--runs, --clients and --minutes must be positive")
    result = soak(args)
    write_json(args.json, result)
    print_summary(result)
    print(f"wrote {args.json}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
