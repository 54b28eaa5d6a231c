"""Smoke test of ``bench/storage.py``: a small run through the real store, live and ended, its bytes read back from
SQLite's dbstat, beside the same run written by the store of schema 2 (from git)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import storage


def test_storage_benchmark_reports_bytes_per_step_per_key_before_and_after(tmp_path: Path) -> None:
    out = tmp_path / "storage.json"
    assert storage.main(["--steps", "2000", "--keys", "6", "--frame-steps", "50", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["results"] == {part: payload["layouts"]["after"]["ended"][part]
                                  for part in ("frames", "metric store", "total", "file")}  # what run_all reads
    results = payload["layouts"]
    after = results["after"]
    for phase in ("live", "ended"):
        assert set(after[phase]) == {"frames", "metric store", "total", "free", "file"}
        # The metric store holds at least its raw values (8 bytes each), and the parts fit in the file.
        assert after[phase]["metric store"]["bytes_per_step_per_key"] >= 8
        assert after[phase]["frames"]["bytes"] + after[phase]["metric store"]["bytes"] <= after[phase]["file"]["bytes"]
    # While the run is live each frame's text is kept (a float's text: more than 8 bytes a value); once it has
    # ended, only the metric store is.
    assert after["live"]["frames"]["bytes_per_step_per_key"] >= 8
    assert after["ended"]["frames"]["bytes"] <= 4 * 4096  # the table and its three indexes, a page each, empty
    file, free = after["ended"]["file"]["bytes"], after["ended"]["free"]["bytes"]
    assert after["ended"]["file"]["scaled_bytes"] == round((file - free) / (2000 * 6) * 1_000_000 * 60) + free
    assert after["backfill"]["frames"] == 40
    # The store of schema 2 is the "before", where git can show it (a checkout without history skips it).
    before = [name for name in results if name.startswith("before")]
    if before:
        old = results[before[0]]
        assert old["ended"]["frames"]["bytes"] == old["live"]["frames"]["bytes"]  # it kept every frame
        assert old["ended"]["total"]["bytes"] > after["ended"]["total"]["bytes"]
        assert payload["backfill_identical"] and old["backfill"]["sha256"] == after["backfill"]["sha256"]
