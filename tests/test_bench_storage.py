"""Smoke test of ``bench/storage.py``: a small run through the real store, its bytes read back from SQLite's dbstat."""

from __future__ import annotations

import json
from pathlib import Path

from bench import storage


def test_storage_benchmark_reports_bytes_per_step_per_key_for_each_store(tmp_path: Path) -> None:
    out = tmp_path / "storage.json"
    assert storage.main(["--steps", "2000", "--keys", "6", "--frame-steps", "50", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert set(results) == {"frames", "metric store", "file"}
    # Each store holds at least its raw values (8 bytes each in the chunks; a float's text in the frames), and
    # the two together fit in the file.
    assert results["metric store"]["bytes_per_step_per_key"] >= 8
    assert results["frames"]["bytes_per_step_per_key"] >= 8
    assert results["frames"]["bytes"] + results["metric store"]["bytes"] <= results["file"]["bytes"]
    per_value = results["file"]["bytes"] / (2000 * 6)
    assert results["file"]["scaled_bytes"] == round(per_value * 1_000_000 * 60)
