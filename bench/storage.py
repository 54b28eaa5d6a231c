"""Storage: bytes on disk per step per key, and where they go (issue 15, item 4).

A run's metrics reach the disk twice: each ``metrics`` frame's JSON text in the ``frames`` table (what websocket
backfill and ``/events`` replay) and its values in the metric store (``metric_chunks``: the steps, times and values as
arrays, plus per-chunk summaries; what the charts and the CSV read). This writes one run of ``--steps`` × ``--keys``
through :meth:`app.store.Store.append` as the server writes a worker's frames: ``--frame-steps`` steps a frame, the
frame text as the worker encodes it (:func:`trainer.telemetry.frame_to_json`, full-precision floats), values from
a drifting noisy curve per key. Then SQLite's own ``dbstat`` table says how many bytes each table and index holds.

Reported per step per key, and scaled to a 1M-step × 60-key run (the issue's yardstick). The scale is linear: both
stores grow by the step and the key, and a chunk or a page is far smaller than the run.

    python -m bench.storage                       # 50,000 steps × 60 keys, frames of 64 steps: about a minute
    python -m bench.storage --steps 20000         # smaller

Writes ``bench/results/storage.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.store import RunRecord, Store
from bench._common import RESULTS_DIR, machine_info, render_table, write_json
from bench.synthetic_worker import synthetic_keys
from trainer.config import RunConfig
from trainer.telemetry import frame_to_json, metrics_frame_fields

RUN = "storage"
T0 = 1_764_000_000.0
#: The issue's yardstick: a 1M-step run logging 60 keys.
SCALE_STEPS = 1_000_000
SCALE_KEYS = 60
#: Which tables and indexes hold what (dbstat names them; the rest is SQLite's own).
PARTS = {
    "frames": ("frames", "sqlite_autoindex_frames_1", "frames_by_type", "frames_hist_key"),
    "metric store": ("metric_chunks", "chunks_by_key", "chunks_by_step", "metric_summaries", "metric_keys"),
}


def write(path: Path, steps: int, keys: list[str], frame_steps: int, seed: int) -> float:
    """One completed run through Store.append; returns the seconds it took to commit."""
    rng = np.random.default_rng(seed)
    x = np.arange(1, steps + 1, dtype=np.float64)
    table = np.stack([np.sin(x / (3000.0 + 500 * j)) + 2.0 + rng.normal(0.0, 0.1, steps)
                      for j in range(len(keys))], axis=1)
    cfg = RunConfig.model_validate({"name": RUN, "train": {"steps": steps, "device": "cpu"}}).model_dump(mode="json")
    store = Store(path)
    store.start()
    started = time.perf_counter()
    try:
        store.insert_run(RunRecord(id=RUN, name=RUN, kind="gan", status="completed", config=cfg,
                                   created_at=T0, started_at=T0, ended_at=T0 + steps * 0.01))
        for seq, lo in enumerate(range(0, steps, frame_steps), start=1):
            hi = min(steps, lo + frame_steps)
            frame = {"type": "metrics", "run": RUN, "seq": seq,
                     **metrics_frame_fields(keys, list(range(lo + 1, hi + 1)),
                                            [T0 + 0.01 * s for s in range(lo + 1, hi + 1)], table[lo:hi])}
            store.append(RUN, [(frame, frame_to_json(frame))])
        if not store.wait_flushed(600):
            raise RuntimeError("the store did not commit the run")
        took = time.perf_counter() - started
    finally:
        store.close()
    return took


def measure(path: Path) -> dict[str, int]:
    """Bytes per table and index (SQLite's dbstat: pages in use, not free pages), and the file itself."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        sizes = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
    finally:
        conn.close()
    out = {part: sum(int(sizes.get(name, 0)) for name in names) for part, names in PARTS.items()}
    out["file"] = path.stat().st_size
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--keys", type=int, default=60)
    parser.add_argument("--frame-steps", type=int, default=64, help="steps per metrics frame (a worker's flush)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "storage.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.keys < 1 or args.frame_steps < 1:
        parser.error("--steps, --keys and --frame-steps are at least 1")
    keys = synthetic_keys(args.keys)
    with tempfile.TemporaryDirectory(prefix="gradwatch-storage-") as tmp:
        path = Path(tmp) / "gradwatch.db"
        took = write(path, args.steps, keys, args.frame_steps, args.seed)
        sizes = measure(path)
    values = args.steps * args.keys
    rows, results = [], {}
    for part in (*PARTS, "file"):
        per_value = sizes[part] / values
        scaled = per_value * SCALE_STEPS * SCALE_KEYS
        results[part] = {"bytes": sizes[part], "bytes_per_step_per_key": round(per_value, 2),
                         "scaled_bytes": round(scaled)}
        rows.append([part, f"{sizes[part] / 2**20:,.1f} MiB", f"{per_value:.2f}", f"{scaled / 2**30:.2f} GiB"])
    print(render_table(["where", "on disk", "bytes per step per key",
                        f"{SCALE_STEPS:,} steps × {SCALE_KEYS} keys"], rows))
    print(f"{args.steps:,} steps × {args.keys} keys in frames of {args.frame_steps} steps, committed in {took:.1f} s")
    payload: dict[str, Any] = {"meta": {**machine_info("cpu"), "steps": args.steps, "keys": args.keys,
                                        "frame_steps": args.frame_steps, "commit_s": round(took, 1)},
                               "scale": {"steps": SCALE_STEPS, "keys": SCALE_KEYS}, "results": results}
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
