"""History: how long a chart query over a long run takes, and whether its spikes survive the downsampling.

A run of ``--steps`` (1,000,000) steps × ``--keys`` (20) keys is written into a
fresh data directory through :meth:`app.store.Store.append`, as the server
writes a worker's frames: ``--frame-steps`` (256, a worker's ``flush_steps``)
steps per metrics frame, queued as fast as they are made so the writer thread
groups them into transactions as it does under load. A few one-step spikes and
dips are planted in some keys. Then:

- **in process**: :meth:`Store.metric_history` for every key at
  ``max_points=2000`` on a freshly opened store (first query: connections,
  statements and SQLite's cache all cold; the OS file cache is whatever the
  build left) and then warm (median of ``--repeat``), beside the same query
  forced to read every point instead of the chunk summaries (the path a store
  without summaries takes), as a ratio;
- **zoomed** (``start``/``end``, issue 14): the same over HTTP for 2,000 steps
  around a planted spike (every step must come back), then 1 %, 10 % and half
  of the run, each thinned within its range with the spikes inside it kept;
- **over HTTP**: a real ``gradwatch serve`` on that data directory, and
  ``GET /api/runs/{id}/metrics?max_points=2000`` timed from request to the
  last byte of the answer, first request and median of warm ones (2,000 points
  per key is also what the run and compare pages ask for); also
  ``max_points=4000``, the pages' query before it was lowered to 2,000, which
  misses the summaries on a 1M-step run.

Every answer is checked: each planted spike is in it with its exact value,
both ends are, and no key has more than ``max_points`` points.

    python -m bench.history                        # 1M steps x 20 keys, about 1 minute
    python -m bench.history --steps 200000         # smaller (make bench uses the full size)

Writes ``bench/results/history.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from app.store import RunRecord, Store
from bench._common import RESULTS_DIR, machine_info, render_table, write_json
from bench.server import NO_PROXY, Server
from bench.synthetic_worker import synthetic_keys
from trainer.config import RunConfig

TARGET_MS = 200.0
RUN_ID = "history1m"
T0 = 1_764_000_000.0


def planted_spikes(steps: int, keys: list[str]) -> dict[str, dict[int, float]]:
    """One-step extremes, far outside each key's normal range, at steps no bucket boundary favours."""
    spots = [(0, 0.123457, 50.0), (1, 0.876543, -50.0), (5, 0.5, 75.0), (7, 0.0314159, -40.0),
             (12, 0.999001, 60.0), (19, 0.271828, 33.0)]
    out: dict[str, dict[int, float]] = {}
    for index, where, value in spots:
        if index < len(keys):
            out.setdefault(keys[index], {})[max(2, min(steps - 1, int(where * steps)))] = value
    return out


def write_run(store: Store, run_id: str, columns: dict[str, np.ndarray], frame_steps: int,
              config: dict[str, Any] | None = None) -> None:
    """A completed GAN run with steps 1..n of ``columns`` (one array per key), through :meth:`Store.append`.

    Frames of ``frame_steps`` steps are queued as fast as they are made, so the writer thread groups them
    into transactions as it does under load. They hold numpy arrays where a worker's JSON has lists (the
    store reads both alike), and the frame text, which websocket backfill replays and no chart query
    reads, is a stub rather than the megabytes of JSON a real run stores.
    """
    steps = len(next(iter(columns.values())))
    all_steps = np.arange(1, steps + 1, dtype=np.int64)
    times = T0 + all_steps * 0.01
    cfg = config or RunConfig.model_validate({"name": run_id, "train": {"steps": steps, "device": "cpu"}}).model_dump(
        mode="json")
    store.insert_run(RunRecord(id=run_id, name=run_id, kind="gan", status="completed", config=cfg,
                               created_at=time.time(), started_at=T0, ended_at=T0 + steps * 0.01))
    for seq, lo in enumerate(range(0, steps, frame_steps), start=1):
        hi = min(steps, lo + frame_steps)
        body = {"type": "metrics", "run": run_id, "seq": seq, "step": all_steps[lo:hi], "time": times[lo:hi],
                "data": {key: column[lo:hi] for key, column in columns.items()}}
        store.append(run_id, [(body, json.dumps({"type": "metrics", "run": run_id, "seq": seq}))])


def curves(steps: int, keys: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """A drifting, noisy curve per key, like a loss or a gradient norm: a smooth trend plus batch noise."""
    rng = np.random.default_rng(seed)
    x = np.arange(1, steps + 1, dtype=np.float64)
    return {key: np.sin(x / (3000.0 + 500 * i)) + 2.0 + rng.normal(0.0, 0.1, steps) for i, key in enumerate(keys)}


def build(data_dir: Path, steps: int, keys: list[str], frame_steps: int) -> dict[str, Any]:
    """Write the run into ``data_dir`` through the store's own write path; returns what the check needs."""
    columns = curves(steps, keys)
    spikes = planted_spikes(steps, keys)
    for key, where in spikes.items():
        for step, value in where.items():
            columns[key][step - 1] = value
    store = Store(data_dir / "gradwatch.db")
    store.start()
    started = time.perf_counter()
    try:
        write_run(store, RUN_ID, columns, frame_steps)
        if not store.wait_flushed(600):
            raise RuntimeError("the store did not commit the run within 10 minutes")
    finally:
        store.close()
    return {"spikes": spikes, "build_s": round(time.perf_counter() - started, 1), "ends": (1, steps),
            "db_mb": round((data_dir / "gradwatch.db").stat().st_size / 2**20, 1)}


def check(history: dict[str, dict[str, list[Any]]], keys: list[str], facts: dict[str, Any], max_points: int,
          span: tuple[int, int] | None = None) -> None:
    """Every key present, within budget, both ends kept, every planted spike kept with its exact value; for a
    zoom (``span``: its first and last step), the ends are the span's and the spikes those inside it."""
    if sorted(history) != sorted(keys):
        raise AssertionError(f"keys {sorted(history)} != {sorted(keys)}")
    first, last = span or facts["ends"]
    for key, series in history.items():
        if len(series["step"]) > max_points:
            raise AssertionError(f"{key}: {len(series['step'])} points > max_points {max_points}")
        if series["step"][0] != first or series["step"][-1] != last:
            raise AssertionError(f"{key}: ends {series['step'][0]}..{series['step'][-1]}, not {first}..{last}")
        picked = dict(zip(series["step"], series["value"], strict=True))
        for step, value in facts["spikes"].get(key, {}).items():
            if first <= step <= last and picked.get(step) != value:
                raise AssertionError(f"{key}: spike {value} at step {step} lost (got {picked.get(step)})")


@contextmanager
def full_reads() -> Iterator[None]:
    """Force the chart query to read every point (the path taken without chunk summaries): the comparison."""
    import app.store as store_module

    original = store_module._summary_suffices
    store_module._summary_suffices = lambda chunks, max_points: False
    try:
        yield
    finally:
        store_module._summary_suffices = original


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return 1000 * (time.perf_counter() - start), out


def _query_times(store: Store, max_points: int, repeat: int) -> tuple[float, list[float], dict[str, Any]]:
    """The first query's time, ``repeat`` more, and the first answer."""
    cold, history = _timed(lambda: store.metric_history(RUN_ID, None, max_points))
    warm = [_timed(lambda: store.metric_history(RUN_ID, None, max_points))[0] for _ in range(repeat)]
    return cold, warm, history


def in_process(data_dir: Path, keys: list[str], facts: dict[str, Any], max_points: int,
               repeat: int) -> dict[str, Any]:
    """``Store.metric_history`` cold and warm, from the summaries and (the comparison) from every point."""
    result: dict[str, Any] = {}
    for mode in ("summaries", "full read"):
        store = Store(data_dir / "gradwatch.db")  # fresh connections: the first query pays for opening them
        try:
            with full_reads() if mode == "full read" else nullcontext():
                cold, warm, history = _query_times(store, max_points, repeat)
        finally:
            store.close()
        check(history, keys, facts, max_points)
        result[mode] = {"cold_ms": round(cold, 1), "warm_median_ms": round(statistics.median(warm), 1),
                        "warm_min_ms": round(min(warm), 1), "warm_max_ms": round(max(warm), 1)}
    result["full_over_summaries"] = round(result["full read"]["warm_median_ms"]
                                          / result["summaries"]["warm_median_ms"], 1)
    return result


def _timed_gets(url: str, repeat: int) -> tuple[dict[str, Any], bytes]:
    """GET ``url`` once cold and ``repeat`` times warm, each timed to the last byte; the times and the first body."""

    def get() -> bytes:
        with NO_PROXY.open(url, timeout=60) as response:
            body: bytes = response.read()
        return body

    cold, body = _timed(get)
    warm = [_timed(get)[0] for _ in range(repeat)]
    return {"cold_ms": round(cold, 1), "warm_median_ms": round(statistics.median(warm), 1),
            "warm_min_ms": round(min(warm), 1), "warm_max_ms": round(max(warm), 1), "bytes": len(body)}, body


def over_http(data_dir: Path, keys: list[str], facts: dict[str, Any], repeat: int) -> dict[str, Any]:
    """The real server on the built data directory; each GET timed to the last byte of its body."""
    out: dict[str, Any] = {"zoom": {}}
    with Server(data_dir) as server:
        for max_points in (2000, 4000):
            times, body = _timed_gets(f"{server.url}/api/runs/{RUN_ID}/metrics?max_points={max_points}", repeat)
            check(json.loads(body)["metrics"], keys, facts, max_points)
            out[str(max_points)] = times
        for label, (start, end) in zooms(facts["ends"][1]).items():
            url = f"{server.url}/api/runs/{RUN_ID}/metrics?max_points=2000&start={start}&end={end}"
            times, body = _timed_gets(url, repeat)
            answer = json.loads(body)["metrics"]
            check(answer, keys, facts, 2000, (start, end))
            if end - start + 1 <= 2000 and any(len(s["step"]) != end - start + 1 for s in answer.values()):
                raise AssertionError(f"zoom {label}: not every step of a range that fits in max_points")
            out["zoom"][label] = {"start": start, "end": end, **times}
    return out


def zooms(steps: int) -> dict[str, tuple[int, int]]:
    """Step ranges a zoomed chart asks for: 2,000 steps around the first planted spike (every point comes back),
    then 1 %, 10 % and half of the run."""
    spike = max(2, min(steps - 1, int(0.123457 * steps)))
    out = {"2,000 steps": (max(1, spike - 999), max(1, spike - 999) + 1_999)}
    for label, fraction in (("1 %", 0.01), ("10 %", 0.1), ("50 %", 0.5)):
        width = max(2, int(steps * fraction))
        out[label] = (max(1, spike - width // 2), max(1, spike - width // 2) + width - 1)
    return {label: (start, min(end, steps)) for label, (start, end) in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--frame-steps", type=int, default=256, help="steps per metrics frame appended")
    parser.add_argument("--repeat", type=int, default=7, help="warm queries per measurement (median reported)")
    parser.add_argument("--data-dir", type=Path, help="build here and keep it (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "history.json")
    args = parser.parse_args(argv)
    keys = synthetic_keys(args.keys)
    max_points = 2000

    with tempfile.TemporaryDirectory(prefix="gradwatch-history-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        print(f"  building {args.steps:,} steps x {len(keys)} keys through Store.append ...", flush=True)
        facts = build(data_dir, args.steps, keys, args.frame_steps)
        print(f"  built in {facts['build_s']} s ({facts['db_mb']} MB)", flush=True)
        local = in_process(data_dir, keys, facts, max_points, args.repeat)
        http = over_http(data_dir, keys, facts, args.repeat)

    rows = [
        ["Store.metric_history, summaries (now)", f"{local['summaries']['cold_ms']:.1f}",
         f"{local['summaries']['warm_median_ms']:.1f}", "—"],
        ["Store.metric_history, every point read", f"{local['full read']['cold_ms']:.1f}",
         f"{local['full read']['warm_median_ms']:.1f}", "—"],
        ["GET /metrics?max_points=2000 (HTTP)", f"{http['2000']['cold_ms']:.1f}",
         f"{http['2000']['warm_median_ms']:.1f}", f"{http['2000']['bytes']:,}"],
        ["GET /metrics?max_points=4000 (page, before)", f"{http['4000']['cold_ms']:.1f}",
         f"{http['4000']['warm_median_ms']:.1f}", f"{http['4000']['bytes']:,}"],
        *[[f"GET /metrics zoomed to {label} (start, end)", f"{z['cold_ms']:.1f}", f"{z['warm_median_ms']:.1f}",
           f"{z['bytes']:,}"] for label, z in http["zoom"].items()],
    ]
    print(render_table(["query (all keys)", "first ms", "warm median ms", "bytes"], rows))
    n_spikes = sum(len(v) for v in facts["spikes"].values())
    figure = http["2000"]["warm_median_ms"]
    worst = max(figure, http["2000"]["cold_ms"], *(max(z["cold_ms"], z["warm_median_ms"])
                                                    for z in http["zoom"].values()))
    print(f"every answer kept all {n_spikes} planted spikes and both ends; summaries are "
          f"{local['full_over_summaries']}x faster than reading every point")
    verdict = "met" if worst < TARGET_MS else "MISSED"
    print(f"HTTP, 2,000 points per key: {figure:.1f} ms warm, {http['2000']['cold_ms']:.1f} ms first; zooms "
          f"included, the slowest {worst:.1f} ms (target < {TARGET_MS:.0f} ms: {verdict})")
    write_json(args.json, {
        "meta": {**machine_info("cpu"), "steps": args.steps, "keys": len(keys), "frame_steps": args.frame_steps,
                 "repeat": args.repeat, "build_s": facts["build_s"], "db_mb": facts["db_mb"]},
        "target_ms": TARGET_MS,
        "spikes_checked": n_spikes,
        "in_process": local,
        "http": http,
        "met": worst < TARGET_MS,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
