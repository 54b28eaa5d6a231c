"""Submit: does launching a sweep cost more when many runs are already queued?

A real ``gradwatch serve`` with one CPU slot, held by a long tiny GAN, so that
every run submitted after it waits ``queued``. Then ``--sweeps`` sweeps of
``--size`` runs each (``POST /api/sweeps``, timed from request to answer),
one after the other: the first finds an empty queue, the last finds
``(sweeps - 1) × size`` runs queued. Before the queue kept each run's device
request (issue 12, item 12), placing read every queued run's row and
re-validated its config at each submit: a 64-run sweep took 0.39 s on an empty
queue and 9 s with 1,280 queued. The figure is the ratio of the last three
sweeps' median time to the first three's, measured side by side in one run
(one sweep against one is at the mercy of a GC pause or the holder's flush).

    python -m bench.submit                       # 21 sweeps of 64: 0 → 1,280 queued, about a minute
    python -m bench.submit --sweeps 5 --size 16  # quick

Writes ``bench/results/submit.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import RESULTS_DIR, machine_info, render_table, write_json
from bench.server import Server

#: The run holding the one slot: trains until the benchmark stops the server.
HOLDER: dict[str, Any] = {
    "kind": "gan", "data": {"name": "ring8"}, "model": {"width": 32, "depth": 2, "latent_dim": 2},
    "train": {"steps": 10_000_000, "batch_size": 64, "seed": 0, "device": "cpu"},
    "intervals": {"sample_every": 100_000, "eval_every": 100_000, "checkpoint_every": 100_000},
}


def sweep_body(size: int) -> dict[str, Any]:
    """A sweep of ``size`` runs: seeds × the two generator losses, × two D learning rates past 32."""
    vary: dict[str, list[Any]] = {"gan.g_loss": ["saturating", "non_saturating"]}
    if size > 32:
        vary["gan.lr_d"] = [1e-3, 2e-3]
    vary["train.seed"] = list(range(size // (2 * len(vary.get("gan.lr_d", [0])))))
    return {"base": {**HOLDER, "train": {**HOLDER["train"], "steps": 1000}}, "vary": vary}


def measure(sweeps: int, size: int) -> list[dict[str, float]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-submit-") as tmp, Server(
            Path(tmp), env={"GRADWATCH_CPU_RUN_LIMIT": "1", "GRADWATCH_MAX_QUEUED_RUNS": str(sweeps * size)}) as srv:
        holder = srv.request("POST", "/api/runs", HOLDER)["id"]
        deadline = time.monotonic() + 120
        while srv.request("GET", f"/api/runs/{holder}")["status"] != "running":  # it holds the slot
            if time.monotonic() > deadline:
                raise RuntimeError("the run holding the slot never started")
            time.sleep(0.2)
        body = sweep_body(size)
        for _ in range(sweeps):
            queued = sum(r["status"] == "queued" for r in srv.request("GET", "/api/runs"))
            start = time.perf_counter()
            answer = srv.request("POST", "/api/sweeps", body, timeout=120)
            seconds = time.perf_counter() - start
            assert len(answer["runs"]) == size and all(r["status"] == "queued" for r in answer["runs"])
            rows.append({"queued_before": queued, "seconds": round(seconds, 4)})
            print(f"  {queued:>6,} queued: a {size}-run sweep in {seconds:.3f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=21, help="sweeps submitted one after the other")
    parser.add_argument("--size", type=int, default=64, help="runs per sweep: even up to 32, or a multiple of 4 "
                                                               "up to 64")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "submit.json")
    args = parser.parse_args(argv)
    if not 2 <= args.size <= 64 or args.size % (4 if args.size > 32 else 2):
        parser.error("--size: even up to 32, a multiple of 4 up to 64 (a sweep varies train.seed over 16 values "
                     "at most)")
    rows = measure(args.sweeps, args.size)
    ends = min(3, len(rows) // 2) or 1
    first = statistics.median(r["seconds"] for r in rows[:ends])
    last = statistics.median(r["seconds"] for r in rows[-ends:])
    ratio = last / first
    print(render_table(["queued before", f"sweep seconds (median of {ends})"],
                       [[f"{rows[0]['queued_before']:,}–{rows[ends - 1]['queued_before']:,}", f"{first:.3f}"],
                        [f"{rows[-ends]['queued_before']:,}–{rows[-1]['queued_before']:,}", f"{last:.3f}"]]))
    print(f"a {args.size}-run sweep with {rows[-1]['queued_before']:,} queued takes {ratio:.2f}x the time it takes "
          f"on an empty queue")
    write_json(args.json, {"machine": machine_info("cpu"), "size": args.size, "sweeps": rows, "ends": ends,
                           "first_s": first, "last_s": last, "ratio_last_first": ratio})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
