"""``make bench``: every benchmark at sizes that finish in under ten minutes on the 2-core machine, then one table.

Each benchmark runs as its own process (``python -m bench.<name>``, exactly as
it runs alone), writes ``bench/results/<name>.json``, and this script reads
those files back into one summary with each figure beside its target. The
sizes here are smaller than the documented runs (docs/benchmarks.md gives the
commands for those): shorter windows and a shorter long run, never a smaller
history. A benchmark that fails is reported and the others still run; the exit
status is 1 if any failed. A missed target is a figure, not a failure.

    python -m bench.run_all                  # all of them
    python -m bench.run_all --only history,browser
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench._common import RESULTS_DIR, ROOT, render_table

#: The overhead targets, gradwatch's steps/s over the bare loop's at the default telemetry budget: issue 15's
#: on a CPU (issue 5 asked 0.90), issue 5's on a GPU.
OVERHEAD_TARGET_CPU = 0.95
OVERHEAD_TARGET_GPU = 0.97
#: The other trackers bench/overhead.py runs, each expected below gradwatch: variant name → how the table says it.
OVERHEAD_TRACKERS = {"tensorboard": "TensorBoard", "wandb": "wandb offline", "trackio": "Trackio"}

#: name → arguments for the ``make bench`` run (see each module's docstring for the full-size run).
QUICK: dict[str, list[str]] = {
    # Every variant: bare, gradwatch at the default budget and at every step, client, TensorBoard, wandb, Trackio.
    "overhead": ["--quick"],
    "freshness": ["--seconds", "4"],
    "throughput": ["--runs", "1,2", "--sweep-seconds", "5", "--duration", "20"],
    "history": [],
    "browser": ["--modes", "filled", "--frames", "20", "--case-seconds", "8"],
    "submit": [],
    "runs_table": ["--repeat", "20"],
    "storage": ["--steps", "20000"],
}
#: A sweep with a long queue may take this much longer than on an empty one (it took 23× before issue 12).
SUBMIT_RATIO_TARGET = 2.0


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _ratio(variants: dict[str, Any], name: str) -> float | None:
    """An overhead variant's median ratio to the bare loop; None if it did not run."""
    median: float | None = ((variants.get(name) or {}).get("ratio_to_bare") or {}).get("median")
    return median


def summary_rows(names: list[str]) -> list[list[str]]:
    """One row per headline figure: benchmark, figure, value, target, met."""
    rows: list[list[str]] = []
    if "overhead" in names and (d := _load("overhead")) is not None:
        gpu = str(d.get("meta", {}).get("device", "cpu")).startswith("cuda")
        target = OVERHEAD_TARGET_GPU if gpu else OVERHEAD_TARGET_CPU
        for result in d.get("results", []):
            variants = result.get("variants", {})
            case, ratio = result.get("case"), _ratio(variants, "gradwatch")
            rows.append(["overhead", f"{case}: gradwatch (default budget) / bare steps/s", _fmt(ratio, "", 2),
                         f"≥ {target:.2f} ({'GPU' if gpu else 'CPU'})",
                         "—" if ratio is None else "yes" if ratio >= target else "NO"])
            every = _ratio(variants, "every-step")
            if every is not None:
                rows.append(["overhead", f"{case}: gradwatch every step (budget 1) / bare steps/s",
                             _fmt(every, "", 2), "(comparison)", "—"])
            for variant, label in OVERHEAD_TRACKERS.items():
                other = _ratio(variants, variant)
                if ratio is not None and other is not None:
                    rows.append(["overhead", f"{case}: {label} / bare steps/s", _fmt(other, "", 2),
                                 "below gradwatch", "yes" if ratio > other else "NO"])
    if "freshness" in names and (d := _load("freshness")) is not None:
        for cell in d["gradwatch"]:
            label = f"{cell['runs']} run(s) × {cell['clients']} client(s), {cell['compression']}"
            if cell["workers"] != "as launched":
                label += f", {cell['workers']}"
            p99 = cell["per_step_ms"]["p99"]
            rows.append(["freshness", f"{label}: p99 per step", _fmt(p99, " ms"), "≤ 50 ms",
                         "yes" if p99 is not None and p99 <= d["target_p99_ms"] else "NO"])
        tb = d.get("tensorboard", {})
        if tb.get("available"):
            rows.append(["freshness", "TensorBoard (reload 1 s): p99 per step", _fmt(tb["per_step_ms"]["p99"], " ms"),
                         "(comparison)", f"{_fmt(d.get('tensorboard_over_gradwatch_p99'))}× gradwatch"])
    if "throughput" in names and (d := _load("throughput")) is not None:
        for compression, peak in d["peak_points_per_s"].items():
            rows.append(["throughput", f"peak committed points/s, clients {compression}", _fmt(peak),
                         "≥ 250,000", "yes" if peak >= d["target_points_per_s"] else "NO"])
        for long in d["long"]:
            kind = f"clients {long['compression']}"
            share = long["fanout_share"]
            rows.append(["throughput", f"fan-out share, long run, {kind}", "—" if share is None else f"{share:.2f}",
                         "1.0 (keeps up)", "yes" if (long["fanout_share"] or 0) >= 0.95 else "NO"])
            rows.append(["throughput", f"server RSS growth over {long['window_s']:.0f} s, {kind}",
                         f"{100 * long['rss_growth']:+.1f} %", f"≤ {100 * long['rss_margin']:.0f} %",
                         "yes" if long["flat"] else "NO"])
    if "history" in names and (d := _load("history")) is not None:
        http = d["http"]["2000"]
        rows.append(["history", "1M × 20 keys → 2,000 points, HTTP warm median", _fmt(http["warm_median_ms"], " ms"),
                     "< 200 ms", "yes" if d["met"] else "NO"])
        rows.append(["history", "same, first request", _fmt(http["cold_ms"], " ms"), "< 200 ms",
                     "yes" if http["cold_ms"] < d["target_ms"] else "NO"])
    if "browser" in names and (d := _load("browser")) is not None:
        if not d.get("available"):
            rows.append(["browser", "per-frame JS", "not available", "flat", d.get("reason", "")])
        for name, ratio in d.get("ratio_largest_over_smallest", {}).items():
            small, large = d.get("ratio_sizes", {}).get(name, [0, 0])
            rows.append(["browser", f"{name}: per-frame ms, N={large:,} / N={small:,}", _fmt(ratio, "×"),
                         "≈ 1–2×", "yes" if ratio <= 2.0 else "NO"])
    if "submit" in names and (d := _load("submit")) is not None:
        ratio, queued = d["ratio_last_first"], d["sweeps"][-1]["queued_before"]
        rows.append(["submit", f"{d['size']}-run sweep, {queued:,} queued / none queued", _fmt(ratio, "×", 2),
                     f"≤ {SUBMIT_RATIO_TARGET:g}×", "yes" if ratio <= SUBMIT_RATIO_TARGET else "NO"])
    if "runs_table" in names and (d := _load("runs_table")) is not None:
        runs = d.get("meta", {}).get("runs")
        for query, r in d["http"].items():
            rows.append(["runs_table", f"{_fmt(runs)} runs, GET /ui/runs-table {query}: p95", _fmt(r["p95_ms"], " ms"),
                         f"< {d['target_ms']:.0f} ms", "yes" if r["p95_ms"] < d["target_ms"] else "NO"])
    if "storage" in names and (d := _load("storage")) is not None:
        scale = d["scale"]
        size = f"{scale['steps']:,} steps × {scale['keys']} keys"
        for part, r in d["results"].items():
            rows.append(["storage", f"{part}: bytes per step per key (→ {size})",
                         f"{r['bytes_per_step_per_key']:.1f} B (→ {r['scaled_bytes'] / 2**30:.2f} GiB)",
                         "(issue 15: file ≤ ¼ of today's)", "—"])
        # Before and after side by side, both measured in this run: the old store (its file from git) and the new.
        before = next((v["ended"]["total"] for k, v in d.get("layouts", {}).items() if k.startswith("before")), None)
        after = d["results"].get("total")
        if before is not None and after is not None:
            share = after["bytes_per_step_per_key"] / before["bytes_per_step_per_key"]
            rows.append(["storage", f"ended run, before → after: bytes per step per key (→ {size})",
                         f"{before['bytes_per_step_per_key']:.1f} → {after['bytes_per_step_per_key']:.1f} B "
                         f"({before['scaled_bytes'] / 2**30:.2f} → {after['scaled_bytes'] / 2**30:.2f} GiB)",
                         "≤ ¼ of before", "yes" if share <= 0.25 else "NO"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of {list(QUICK)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(QUICK)
    unknown = [n for n in names if n not in QUICK]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(QUICK)}")
    failed: list[str] = []
    timings: list[list[str]] = []
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}", *QUICK[name]]
        print(f"\n=== {' '.join(['python', *cmd[1:]])}", flush=True)
        started = time.monotonic()
        code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        elapsed = time.monotonic() - started
        timings.append([name, f"{elapsed:.0f} s", "ok" if code == 0 else f"FAILED (exit {code})"])
        if code != 0:
            failed.append(name)
    print("\n" + render_table(["benchmark", "wall time", "status"], timings))
    rows = summary_rows([n for n in names if n not in failed])
    if rows:
        print(render_table(["benchmark", "figure", "value", "target", "met"], rows))
    print(f"results in {RESULTS_DIR.relative_to(ROOT)}/; full-size runs and their figures: docs/benchmarks.md")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
