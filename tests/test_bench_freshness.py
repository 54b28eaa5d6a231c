"""Smoke tests of ``bench/freshness.py``: one real run and one client for a second, and TensorBoard if installed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import freshness


def test_worst_by_setup_counts_one_run_cells_for_both_worker_setups() -> None:
    def cell(runs: int, workers: str, compression: str, p99: float) -> dict[str, object]:
        return {"runs": runs, "workers": workers, "compression": compression, "per_step_ms": {"p99": p99}}

    cells = [cell(1, "as launched", "deflate", 60.0), cell(8, "as launched", "deflate", 900.0),
             cell(8, "before fix", "deflate", 80.0)]
    got = {(v["workers"], v["compression"]): (v["worst_p99_ms"], v["met"]) for v in freshness.worst_by_setup(cells)}
    assert got == {("as launched", "deflate"): (900.0, False), ("before fix", "deflate"): (80.0, True)}


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


def test_freshness_runs_end_to_end_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "freshness.json"
    assert freshness.main(["--runs", "1", "--clients", "1", "--seconds", "1.5", "--settle", "0.3",
                           "--compression", "none", "--no-tensorboard", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    (cell,) = payload["gradwatch"]
    assert (cell["runs"], cell["clients"], cell["workers"], cell["compression"]) == (1, 1, "as launched", "none")
    assert [v["workers"] for v in payload["worst_by_setup"]] == ["as launched"]
    assert cell["frames"] > 0 and cell["steps_per_s_per_run"] > 0
    for kind in ("per_step_ms", "per_frame_ms"):
        assert cell[kind]["n"] > 0 and 0 < cell[kind]["p50"] <= cell[kind]["p99"] <= cell[kind]["max"]
    assert cell["per_step_ms"]["n"] >= cell["per_frame_ms"]["n"]
    assert payload["tensorboard"] == {"available": False, "reason": "--no-tensorboard"}
    assert payload["meta"]["config"]["intervals"]["flush_ms"] == 50


def test_with_two_runs_the_launch_before_the_fix_is_measured_beside_the_app(tmp_path: Path) -> None:
    """The comparison must measure what it says: main() refuses to run a variant whose workers are not
    launched as named (own sessions and no nice before the fix; the server's session and nice 10 now)."""
    out = tmp_path / "freshness.json"
    assert freshness.main(["--runs", "2", "--clients", "1", "--seconds", "1", "--settle", "0.3",
                           "--no-tensorboard", "--json", str(out)]) == 0
    cells = json.loads(out.read_text())["gradwatch"]
    assert [(c["runs"], c["workers"], c["compression"]) for c in cells] == [
        (2, "as launched", "deflate"), (2, "before fix", "deflate")]
    assert all(c["per_step_ms"]["n"] > 0 for c in cells)


def test_tensorboard_is_measured_the_same_way(tmp_path: Path) -> None:
    """A tensorboard server, a SummaryWriter process and the poller; skipped without the bench extra."""
    pytest.importorskip("tensorboard")
    args = argparse.Namespace(settle=0.5, seconds=2.0, tb_reload=1.0, tb_poll_ms=20.0)
    tb = freshness.tensorboard_cell(args, ["loss/d", "loss/g"], rate=50.0)
    assert tb["available"], tb.get("reason")
    assert tb["per_step_ms"]["n"] > 0 and tb["per_step_ms"]["p50"] > 0
    assert tb["polls"] > 10
