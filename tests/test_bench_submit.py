"""Smoke test of ``bench/submit.py`` at a small size: sweeps pile up behind the one held slot, each timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import submit

pytestmark = pytest.mark.xdist_group("live-bench-submit")


def test_submit_benchmark_queues_every_sweep_behind_the_held_slot(tmp_path: Path) -> None:
    out = tmp_path / "submit.json"
    assert submit.main(["--sweeps", "3", "--size", "8", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [row["queued_before"] for row in payload["sweeps"]] == [0, 8, 16]
    assert all(row["seconds"] > 0 for row in payload["sweeps"]) and payload["ratio_last_first"] > 0


@pytest.mark.parametrize(("size", "runs"), [(8, 8), (32, 32), (64, 64)])
def test_a_sweep_body_has_the_size_asked_for(size: int, runs: int) -> None:
    vary = submit.sweep_body(size)["vary"]
    combos = 1
    for values in vary.values():
        combos *= len(values)
    assert combos == runs and len(vary["train.seed"]) <= 16
