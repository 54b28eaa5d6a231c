"""Smoke test of ``bench/runs_table.py`` at a small size: every query answers with the rows and total it must."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import runs_table

pytestmark = pytest.mark.xdist_group("live-bench-runs-table")


def test_runs_table_benchmark_checks_and_times_every_query(tmp_path: Path) -> None:
    out = tmp_path / "runs_table.json"
    runs_table.main(["--runs", "1500", "--repeat", "3", "--json", str(out)])  # 1 when over the target: not judged here
    payload = json.loads(out.read_text())
    http = payload["http"]
    assert http["first page"]["total"] == 1500 and http["tag filter (keeper)"]["total"] == 15
    assert all(0 < row["p50_ms"] <= row["p95_ms"] for row in http.values())
