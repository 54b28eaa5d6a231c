"""Smoke tests of ``bench/throughput.py`` and its synthetic worker: the plumbing at the smallest sizes."""

from __future__ import annotations

import json
from pathlib import Path

from bench import throughput
from bench.synthetic_worker import FrameFactory, synthetic_keys


def test_synthetic_frames_are_strict_json_metrics_frames_of_the_promised_size() -> None:
    factory = FrameFactory("abc123", steps_per_frame=8, n_keys=30)
    frame = json.loads(factory.metrics(seq=5, first_step=17))
    assert (frame["type"], frame["run"], frame["seq"]) == ("metrics", "abc123", 5)
    assert frame["step"] == list(range(17, 25))
    assert len(frame["time"]) == 8 and frame["time"] == sorted(frame["time"])
    assert list(frame["data"]) == synthetic_keys(30) and len(set(frame["data"])) == 30
    assert all(len(values) == 8 for values in frame["data"].values())
    assert factory.points_per_frame == 8 * 30
    assert synthetic_keys(14)[:4] == ["loss/d", "loss/d_real", "loss/d_fake", "loss/g"]


def test_throughput_runs_end_to_end_and_writes_its_json(tmp_path: Path) -> None:
    """A real server launching the synthetic worker (GRADWATCH_WORKER_MODULE), two clients, one short sweep step."""
    out = tmp_path / "throughput.json"
    assert throughput.main(["--runs", "1", "--clients", "2", "--sweep-seconds", "1.5", "--warmup", "0.5",
                            "--duration", "1.5", "--interval", "0.25", "--compression", "none",
                            "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["meta"]["keys"] == throughput.KEYS and payload["meta"]["clients"] == 2
    (step,) = payload["sweep"]
    assert step["runs"] == 1 and step["compression"] == "none"
    assert step["ingest_points_per_s"] > 0 and step["fanout_points_per_s"] > 0
    assert step["client_gaps"] == 0  # every client saw every seq in order
    (long,) = payload["long"]
    assert long["compression"] == "none"
    for key in ("rss_after_warmup_mb", "rss_final_mb", "rss_growth", "flat", "rss_series_mb", "fanout_share"):
        assert key in long, key
    assert long["rss_final_mb"] > 0 and len(long["rss_series_mb"]) >= 2
    assert set(payload["peak_points_per_s"]) == {"none"}
    assert all(c["frames"] > 0 for c in payload["long_clients"]["none"])
