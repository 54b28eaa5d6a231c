"""Smoke tests of ``bench/freshness.py``: one real run and one client for a second, and the peers if installed."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench import freshness
from trainer.config import RunConfig


def test_worst_by_setup_counts_one_run_cells_for_the_launch_before_the_fix_only() -> None:
    def cell(runs: int, workers: str, compression: str, p99: float) -> dict[str, object]:
        return {"runs": runs, "workers": workers, "compression": compression, "per_step_ms": {"p99": p99}}

    assert freshness.TARGET_P99_MS == 50.0  # issue 15's target
    cells = [cell(1, "as launched", "deflate", 30.0), cell(8, "as launched", "deflate", 900.0),
             cell(8, "before fix", "deflate", 45.0), cell(1, "flush floor", "deflate", 20.0),
             cell(8, "flush floor", "deflate", 60.0)]
    got = {(v["workers"], v["compression"]): (v["worst_p99_ms"], v["met"]) for v in freshness.worst_by_setup(cells)}
    assert got == {("as launched", "deflate"): (900.0, False), ("before fix", "deflate"): (45.0, True),
                   ("flush floor", "deflate"): (60.0, False)}
    cells[0]["per_step_ms"] = {"p99": 48.0}  # the one-run cell of the app counts for "before fix" too
    assert {v["workers"]: v["worst_p99_ms"] for v in freshness.worst_by_setup(cells)}["before fix"] == 48.0


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    got = freshness.percentiles([i / 1000 for i in range(1, 101)])
    assert got == {"n": 100, "p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    assert freshness.percentiles([])["p99"] is None


def test_recorder_keeps_only_frames_computed_inside_the_window() -> None:
    recorder = freshness.Recorder()
    recorder.window(100.0, 110.0)
    recorder.record(100.5, [99.9, 100.0, 100.2], ["loss/d"])  # newest step inside: every step counts
    recorder.record(99.9, [99.5, 99.8], ["loss/d"])  # computed before the window
    recorder.record(111.0, [110.0, 110.5], ["loss/d"])  # after it
    assert recorder.frames == 1
    assert recorder.per_frame == pytest.approx([0.3])
    assert recorder.per_step == pytest.approx([0.6, 0.5, 0.3])


def test_stage_latencies_join_receipts_with_the_workers_traces() -> None:
    """Worker-side stages count a frame once, whatever the number of clients; a frame the traces lack counts
    for ``received`` only."""
    traces: dict[tuple[str, int], dict[str, Any]] = {
              ("r", 1): {"queued": 10.010, "sent": 10.012, "acked": 10.020},
              ("r", 2): {"queued": 10.110, "sent": 10.111, "acked": None}}
    receipts = [("r", 1, 10.015, [9.990, 10.000]), ("r", 1, 10.018, [9.990, 10.000]),  # two clients
                ("r", 2, 10.114, [10.100]), ("r", 3, 10.300, [10.290])]  # seq 3: not traced
    stages = freshness.stage_latencies(receipts, traces)
    assert stages["traced_share"] == 0.75
    frame, step = stages["per_frame_ms"], stages["per_step_ms"]
    assert frame["flushed"]["n"] == 2 and frame["flushed"]["max"] == pytest.approx(10.0)
    assert frame["acked"]["n"] == 1 and frame["acked"]["p50"] == pytest.approx(20.0)
    assert frame["received"]["n"] == 4 and frame["received"]["max"] == pytest.approx(18.0)
    assert step["flushed"]["n"] == 3 and step["flushed"]["max"] == pytest.approx(20.0)
    assert step["received"]["n"] == 6


def test_read_traces_indexes_every_workers_lines_by_run_and_seq(tmp_path: Path) -> None:
    (tmp_path / "a-1.jsonl").write_text('{"run": "a", "seq": 1, "queued": 1.0}\nnot json\n')
    (tmp_path / "b-2.jsonl").write_text('{"run": "b", "seq": 1, "queued": 2.0}\n')
    (tmp_path / "flush-floor-2").write_text("")
    traces = freshness.read_traces(tmp_path)
    assert sorted(traces) == [("a", 1), ("b", 1)] and traces[("b", 1)]["queued"] == 2.0
    assert freshness.read_traces(tmp_path / "missing") == {}


def test_freshness_runs_end_to_end_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "freshness.json"
    assert freshness.main(["--runs", "1", "--clients", "1", "--seconds", "1.5", "--settle", "0.3",
                           "--compression", "none", "--variants", "as launched", "--no-peers",
                           "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    (cell,) = payload["gradwatch"]
    assert (cell["runs"], cell["clients"], cell["workers"], cell["compression"]) == (1, 1, "as launched", "none")
    assert [v["workers"] for v in payload["worst_by_setup"]] == ["as launched"]
    assert cell["frames"] > 0 and cell["steps_per_s_per_run"] > 0
    for kind in ("per_step_ms", "per_frame_ms"):
        assert cell[kind]["n"] > 0 and 0 < cell[kind]["p50"] <= cell[kind]["p99"] <= cell[kind]["max"]
    assert cell["per_step_ms"]["n"] >= cell["per_frame_ms"]["n"]
    # The workers' traces were joined: every stage of the frames' way, in order for the median frame.
    stages = cell["stages"]
    assert stages["traced_share"] > 0.9
    by = stages["per_frame_ms"]
    assert all(by[stage]["n"] > 0 for stage in freshness.STAGES)
    assert by["flushed"]["p50"] <= by["sent"]["p50"] <= by["acked"]["p50"]
    assert payload["tensorboard"] == {"available": False, "reason": "--no-peers"}
    assert payload["trackio"] == {"available": False, "reason": "--no-peers"}
    assert payload["meta"]["config"]["intervals"]["flush_ms"] == RunConfig().intervals.flush_ms == 25


def test_every_variant_is_measured_on_workers_that_run_as_named(tmp_path: Path) -> None:
    """The comparisons must measure what they say: main() refuses a variant whose workers do not run as named
    (the server's session and nice 10 now, own sessions and no nice before the autogroup fix; every worker with
    the old flush policy for "flush floor")."""
    out = tmp_path / "freshness.json"
    assert freshness.main(["--runs", "2", "--clients", "1", "--seconds", "1", "--settle", "0.3",
                           "--variants", "as launched,flush floor,before fix", "--no-peers",
                           "--json", str(out)]) == 0
    cells = json.loads(out.read_text())["gradwatch"]
    assert [(c["runs"], c["workers"], c["compression"]) for c in cells] == [
        (2, "as launched", "deflate"), (2, "flush floor", "deflate"), (2, "before fix", "deflate")]
    assert all(c["per_step_ms"]["n"] > 0 for c in cells)


def test_the_flush_floor_shim_restores_the_old_policy(tmp_path: Path) -> None:
    """What the "flush floor" variant runs in each worker: a buffer due only flush_ms after the last flush, however
    idle the channel, and never flushed by another thread."""
    import math
    import subprocess
    import sys

    shim = tmp_path / "sitecustomize.py"
    shim.write_text(freshness.FLUSH_FLOOR_SHIM)
    probe = ("import sys, torch\n"
             "sys.orig_argv.append('app.worker')\n"  # what the shim looks for: it runs in workers only
             f"exec(open({str(shim)!r}).read())\n"
             "from trainer.telemetry import MetricBuffer, StepRow\n"
             "buf = MetricBuffer(1000, 60_000, idle=lambda: True)\n"
             "row = StepRow(); row.add(('a',), torch.ones(1)); buf.append(1, row)\n"
             "print(buf.due(), buf.due_in())\n")
    env = {**os.environ, "PYTHONPATH": str(freshness.ROOT), "GRADWATCH_TRACE_FRAMES": str(tmp_path / "trace")}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", str(math.inf)]
    assert list((tmp_path / "trace").glob("flush-floor-*"))


def test_tensorboard_is_measured_the_same_way(tmp_path: Path) -> None:
    """A tensorboard server, a SummaryWriter process and the poller; skipped without the bench extra."""
    pytest.importorskip("tensorboard")
    args = argparse.Namespace(settle=0.5, seconds=2.0, tb_reload=1.0, tb_poll_ms=20.0)
    tb = freshness.tensorboard_cell(args, ["loss/d", "loss/g"], rate=50.0)
    assert tb["available"], tb.get("reason")
    assert tb["per_step_ms"]["n"] > 0 and tb["per_step_ms"]["p50"] > 0
    assert tb["polls"] > 10


def test_trackio_is_measured_the_same_way(tmp_path: Path) -> None:
    """Trackio's dashboard server, a writer process in its local mode and the reader; skipped without the bench
    extra. Every step the writer logged inside the window is seen, each no sooner than it was logged."""
    pytest.importorskip("trackio")
    args = argparse.Namespace(settle=0.5, seconds=2.0, trackio_poll_ms=20.0)
    tk = freshness.trackio_cell(args, ["loss/d", "loss/g"], rate=50.0)
    assert tk["available"], tk.get("reason")
    assert tk["steps_written_in_window"] > 0 and tk["steps_seen_in_window"] == tk["steps_written_in_window"]
    assert tk["per_step_ms"]["n"] == tk["steps_seen_in_window"] and tk["per_step_ms"]["p50"] > 0
    assert tk["polls"] > 10
