"""Storage: bytes on disk per step per key, and where they go (issue 15, item 4).

A run's metrics reach the disk twice while it runs: each ``metrics`` frame's JSON text in the ``frames`` table (what
websocket backfill replays) and its values in the metric store (app/metricstore.py: values per key, steps and times
once per group of keys logged together, per-chunk summaries; what the charts and the CSV read). Once the run has
ended, the frames the metric store holds are dropped and backfill rebuilds them from it.

This writes one run of ``--steps`` × ``--keys`` through :meth:`app.store.Store.append` as the server writes a worker's
frames: ``--frame-steps`` steps a frame, the frame text as the worker encodes it
(:func:`trainer.telemetry.frame_to_json`, full-precision floats), values from a drifting noisy curve per key. SQLite's
own ``dbstat`` table then says how many bytes each table and index holds (pages in use; pages a dropped frame freed are
reused by the next writes or handed back to the file system, so they are counted apart, as ``free``, and not scaled
with the run), twice: while the run is live, and after it has ended (its status set, the writer's drop finished).
The same run is written with the store as it was before this layout (``git show REV:app/store.py``, schema 2), for
the side-by-side figure; ``--baseline-rev ''`` skips that.

Also measured, both layouts: a full websocket backfill of the ended run read from the store as app.hub reads it
(batches of 500 frames or 1 MiB), its MB/s, and whether the new layout gives back the very bytes the old one stored.

Reported per step per key, and scaled to a 1M-step × 60-key run (the issue's yardstick). The scale is linear: both
stores grow by the step and the key, and a chunk or a page is far smaller than the run.

    python -m bench.storage                       # 50,000 steps × 60 keys, frames of 64 steps: a few minutes
    python -m bench.storage --steps 20000         # smaller

Writes ``bench/results/storage.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from app import store as store_module
from app.hub import CATCH_UP_BYTES
from bench._common import RESULTS_DIR, machine_info, render_table, write_json
from bench.synthetic_worker import synthetic_keys
from trainer.config import RunConfig
from trainer.telemetry import frame_to_json, metrics_frame_fields

RUN = "storage"
T0 = 1_764_000_000.0
#: The issue's yardstick: a 1M-step run logging 60 keys.
SCALE_STEPS = 1_000_000
SCALE_KEYS = 60
#: The last commit whose app/store.py wrote schema 2 (every key's chunk with its own steps and times, every
#: metrics frame kept as text for good): the "before" of this benchmark.
BASELINE_REV = "866cb2a"
ROOT = Path(__file__).resolve().parents[1]
#: The frames table and its indexes; the runs table's; everything else in the file is the metric store's.
FRAME_NAMES = frozenset({"frames", "sqlite_autoindex_frames_1", "frames_by_type", "frames_hist_key"})
RUN_NAMES_PREFIX = ("runs", "sqlite_autoindex_runs", "sqlite_schema", "sqlite_master")
PARTS = ("frames", "metric store")
#: How app.hub reads a backfill from the store.
BACKFILL_FRAMES = 500


def baseline_store(rev: str) -> ModuleType | None:
    """app/store.py as it was at ``rev``, imported as a module of its own; None where git cannot show it."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:app/store.py"], cwd=ROOT, capture_output=True, check=True,
                                text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    folder = Path(tempfile.mkdtemp(prefix="gradwatch-store-baseline-"))
    path = folder / "gradwatch_store_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("gradwatch_store_baseline", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def write(module: ModuleType, path: Path, steps: int, keys: list[str], frame_steps: int, seed: int) -> dict[str, Any]:
    """One run through ``module``'s Store.append, measured live and after its end; returns the figures."""
    rng = np.random.default_rng(seed)
    x = np.arange(1, steps + 1, dtype=np.float64)
    table = np.stack([np.sin(x / (3000.0 + 500 * j)) + 2.0 + rng.normal(0.0, 0.1, steps)
                      for j in range(len(keys))], axis=1)
    cfg = RunConfig.model_validate({"name": RUN, "train": {"steps": steps, "device": "cpu"}}).model_dump(mode="json")
    store = module.Store(path)
    store.start()
    out: dict[str, Any] = {}
    try:
        store.insert_run(module.RunRecord(id=RUN, name=RUN, kind="gan", status="running", config=cfg,
                                          created_at=T0, started_at=T0))
        started = time.perf_counter()
        for seq, lo in enumerate(range(0, steps, frame_steps), start=1):
            hi = min(steps, lo + frame_steps)
            frame = {"type": "metrics", "run": RUN, "seq": seq,
                     **metrics_frame_fields(keys, list(range(lo + 1, hi + 1)),
                                            [T0 + 0.01 * s for s in range(lo + 1, hi + 1)], table[lo:hi])}
            store.append(RUN, [(frame, frame_to_json(frame))])
        if not store.wait_flushed(600):
            raise RuntimeError("the store did not commit the run")
        out["commit_s"] = round(time.perf_counter() - started, 1)
        out["live"] = measure(path)
        started = time.perf_counter()
        store.update_run(RUN, status="completed", ended_at=T0 + steps * 0.01)
        wait = getattr(store, "wait_dropped", None)
        if wait is not None and not wait(3600):
            raise RuntimeError("the store did not drop the ended run's frames")
        out["drop_s"] = round(time.perf_counter() - started, 1)
        out["ended"] = measure(path)
        out["backfill"] = backfill(store)
    finally:
        store.close()
    return out


def backfill(store: Any) -> dict[str, Any]:
    """Read the whole run from seq 0 as app.hub's catch-up does; its speed, and a digest of the bytes read."""
    digest = hashlib.sha256()
    since, frames, size = 0, 0, 0
    started = time.perf_counter()
    while True:
        rows = store.frames_after(RUN, since, BACKFILL_FRAMES, CATCH_UP_BYTES)
        if not rows:
            break
        for seq, text in rows:
            digest.update(f"{seq}\n{text}\n".encode())
            size += len(text)
        frames += len(rows)
        since = rows[-1][0]
    took = time.perf_counter() - started
    return {"frames": frames, "mib": round(size / 2**20, 1), "seconds": round(took, 2),
            "mib_per_s": round(size / 2**20 / max(took, 1e-9), 1), "sha256": digest.hexdigest()}


def measure(path: Path) -> dict[str, int]:
    """Bytes per part (SQLite's dbstat: pages in use, not free pages), the free pages, and the file itself."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the file's size, not the log's
        sizes = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0]) * int(
            conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()
    out = {part: 0 for part in PARTS}
    for name, size in sizes.items():
        if name in FRAME_NAMES:
            out["frames"] += int(size)
        elif not str(name).startswith(RUN_NAMES_PREFIX):
            out["metric store"] += int(size)
    out["free"] = free
    out["file"] = path.stat().st_size
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--keys", type=int, default=60)
    parser.add_argument("--frame-steps", type=int, default=64, help="steps per metrics frame (a worker's flush)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-rev", default=BASELINE_REV,
                        help="git revision whose app/store.py is the 'before' ('' to skip it)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "storage.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.keys < 1 or args.frame_steps < 1:
        parser.error("--steps, --keys and --frame-steps are at least 1")
    keys = synthetic_keys(args.keys)
    layouts: dict[str, ModuleType] = {}
    if args.baseline_rev:
        old = baseline_store(args.baseline_rev)
        if old is None:
            print(f"(no baseline: git cannot show {args.baseline_rev}:app/store.py here)")
        else:
            layouts[f"before ({args.baseline_rev})"] = old
    layouts["after"] = store_module
    values = args.steps * args.keys
    results: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-storage-") as tmp:
        for i, (name, module) in enumerate(layouts.items()):
            figures = write(module, Path(tmp) / f"{i}.db", args.steps, keys, args.frame_steps, args.seed)
            results[name] = figures
            for phase in ("live", "ended"):
                sizes = figures[phase]
                entry = {}
                for part in (*PARTS, "free", "file"):
                    per_value = sizes[part] / values
                    entry[part] = {"bytes": sizes[part], "bytes_per_step_per_key": round(per_value, 2),
                                   "scaled_bytes": round(per_value * SCALE_STEPS * SCALE_KEYS)}
                # The free pages the store keeps (at most its KEEP_FREE_BYTES) do not grow with the run: the file
                # scales as its pages in use, plus those as they are.
                used = (sizes["file"] - sizes["free"]) / values
                entry["file"]["scaled_bytes"] = round(used * SCALE_STEPS * SCALE_KEYS) + sizes["free"]
                entry["free"]["scaled_bytes"] = sizes["free"]
                total = (sizes["frames"] + sizes["metric store"]) / values
                entry["total"] = {"bytes": sizes["frames"] + sizes["metric store"],
                                  "bytes_per_step_per_key": round(total, 2),
                                  "scaled_bytes": round(total * SCALE_STEPS * SCALE_KEYS)}
                figures[phase] = entry
                rows.append([name, f"run {phase}", *(f"{entry[p]['bytes_per_step_per_key']:.2f}" for p in PARTS),
                             f"{total:.2f}", f"{entry['total']['scaled_bytes'] / 2**30:.2f} GiB",
                             f"{sizes['free'] / 2**20:,.1f} MiB", f"{sizes['file'] / 2**20:,.1f} MiB"])
    print(render_table(["layout", "when", "frames B/value", "metric store B/value", "total B/value",
                        f"{SCALE_STEPS:,} × {SCALE_KEYS} keys", "free pages", "file"], rows))
    print(f"{args.steps:,} steps × {args.keys} keys in frames of {args.frame_steps} steps")
    for name, figures in results.items():
        fill = figures["backfill"]
        print(f"{name}: committed in {figures['commit_s']} s, ended-run drop {figures['drop_s']} s; backfill from "
              f"seq 0: {fill['frames']} frames, {fill['mib']} MiB in {fill['seconds']} s ({fill['mib_per_s']} MiB/s)")
    digests = {figures["backfill"]["sha256"] for figures in results.values()}
    if len(results) > 1:
        print("backfill of the ended run, byte for byte: " + ("the same in both layouts" if len(digests) == 1
                                                              else "DIFFERENT"))
    # "results": the headline, the new layout once the run has ended, per part (what bench.run_all reads);
    # "layouts": every figure of both layouts, live and ended.
    ended = results["after"]["ended"]
    payload: dict[str, Any] = {"meta": {**machine_info("cpu"), "steps": args.steps, "keys": args.keys,
                                        "frame_steps": args.frame_steps, "baseline_rev": args.baseline_rev},
                               "scale": {"steps": SCALE_STEPS, "keys": SCALE_KEYS},
                               "results": {part: ended[part] for part in (*PARTS, "total", "file")},
                               "layouts": results, "backfill_identical": len(digests) == 1}
    write_json(args.json, payload)
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
