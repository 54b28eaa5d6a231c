"""The soak (``bench/soak.py``, ``make soak``): its checks catch a lost frame, and a tiny soak passes end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import soak


def test_sequence_faults_sees_a_dropped_a_repeated_and_a_reordered_frame() -> None:
    assert soak.sequence_faults([1, 2, 3, 4]) == {"gaps": 0, "skipped": 0, "repeats": 0}
    assert soak.sequence_faults([5, 6], since=4) == {"gaps": 0, "skipped": 0, "repeats": 0}  # a resume
    assert soak.sequence_faults([1, 2, 4, 5]) == {"gaps": 1, "skipped": 1, "repeats": 0}
    assert soak.sequence_faults([1, 2, 2, 3]) == {"gaps": 0, "skipped": 0, "repeats": 1}
    assert soak.sequence_faults([1, 3, 2]) == {"gaps": 1, "skipped": 1, "repeats": 1}
    assert soak.sequence_faults([2, 3])["gaps"] == 1  # the first frame itself missing


def test_client_faults_counts_a_frame_the_client_never_got_or_got_altered() -> None:
    stored = [soak.crc(f'{{"seq":{i}}}') for i in range(1, 6)]
    clean = soak.client_faults([1, 2, 3, 4, 5], stored, stored)
    assert clean == {"gaps": 0, "skipped": 0, "repeats": 0, "lost": 0, "mismatched": 0, "beyond_stored": 0}
    dropped = soak.client_faults([1, 2, 4, 5], [stored[i - 1] for i in (1, 2, 4, 5)], stored)
    assert dropped["lost"] == 1 and dropped["gaps"] == 1
    # The client stopped early: no gap in what it saw, but the tail is lost.
    assert soak.client_faults([1, 2, 3], stored[:3], stored)["lost"] == 2
    altered = soak.client_faults([1, 2, 3, 4, 5], [*stored[:2], 0, *stored[3:]], stored)
    assert altered["mismatched"] == 1 and altered["lost"] == 0
    assert soak.client_faults([1, 2, 3, 4, 5, 6], [*stored, 7], stored)["beyond_stored"] == 1


def test_metric_faults_sees_a_lost_metrics_frame_and_a_repeated_point() -> None:
    every = list(range(1, 101))
    periodic = list(range(10, 101, 10))
    assert soak.metric_faults({"loss/d": every, "loss/g": every, "eval/x": periodic}, 100)["missing"] == 0
    # One flush of the every-step group lost (steps 41..56) while a periodic key still has step 50.
    lost = [s for s in every if not 41 <= s <= 56]
    faults = soak.metric_faults({"loss/d": lost, "loss/g": lost, "eval/x": periodic}, 100)
    assert faults["missing"] == 15 and faults["missing_per_step_key"] == 32 and faults["every_step_keys"] == 2
    # The final evaluation's keys at the last step are another group: fine; the same key twice is not.
    assert soak.metric_faults({"loss/d": every, "eval/x": [100]}, 100)["repeated"] == 0
    assert soak.metric_faults({"loss/d": [*every, 100]}, 100)["repeated"] == 1
    assert soak.metric_faults({"loss/d": [*every, 101]}, 100)["beyond_worker"] == 1


def test_rss_growth_compares_medians_of_the_thirds_after_the_warm_up() -> None:
    flat = [(float(t), 100.0 + (50.0 if t == 40 else 0.0)) for t in range(0, 61)]  # one spike
    assert soak.rss_growth(flat, warmup=10)["growth"] == 0.0
    climbing = [(float(t), 100.0 + t) for t in range(0, 61)]
    verdict = soak.rss_growth(climbing, warmup=10)
    assert verdict["first_third_mb"] < verdict["last_third_mb"] and verdict["growth"] > 0.25
    assert soak.rss_growth([(0.0, 1.0)], warmup=0)["growth"] is None


def test_ring_estimate_follows_the_hubs_eviction() -> None:
    cum = [0, 10, 20, 30, 40, 50]  # five frames of 10 bytes
    assert soak.ring_bytes_estimate(cum, base=0, head=3, ring=100, per_frame=0) == 30  # not full yet
    assert soak.ring_bytes_estimate(cum, base=0, head=5, ring=25, per_frame=0) == 20  # the newest two fit
    assert soak.ring_bytes_estimate(cum, base=0, head=5, ring=5, per_frame=0) == 10  # always the newest frame
    assert soak.ring_bytes_estimate(cum, base=3, head=5, ring=100, per_frame=1) == 22  # a restarted server's ring
    assert soak.ring_bytes_estimate(cum, base=5, head=5) == 0


@pytest.mark.xdist_group("live-soak")
def test_a_tiny_soak_with_a_restart_loses_nothing(tmp_path: Path) -> None:
    """Two runs, three clients, the server killed and restarted halfway: the whole path, in about a minute.

    RSS is not judged here (half a minute is all warm-up: the hub's rings are still filling), only reported.
    """
    out = tmp_path / "soak.json"
    code = soak.main(["--minutes", "0.4", "--runs", "2", "--clients", "3", "--churn-s", "8", "--http-rate", "5",
                      "--rss-interval", "1", "--rss-bound", "10", "--drain-timeout", "60", "--json", str(out)])
    result = json.loads(out.read_text())
    failed = {name: c for name, c in result["checks"].items() if not c["ok"]}
    assert code == 0 and not failed, failed
    checks = result["checks"]
    assert checks["seq_gaps"]["value"] == 0 and checks["frames_lost"]["value"] == 0
    assert checks["http_5xx"]["value"] == 0 and result["http"]["requests"] > 0
    assert result["restart"]["workers_alive_at_kill"] == 2 and result["restart"]["reattached"] is True
    totals = result["totals"]
    # Every client reconnected at least once (the restart), and resumed with since= without a gap.
    assert all(c["connects"] >= 2 for r in result["runs"] for c in r["clients"])
    assert totals["stored_frames"] > 0 and totals["metric_steps"] > 0
    assert all(r["metrics"]["every_step_keys"] > 0 for r in result["runs"])
    rss = result["rss"]
    assert rss["raw"]["growth"] is not None and rss["net_of_rings"]["growth"] is not None
    assert len(rss["series"]) >= 5 and rss["rings_max_mb"] > 0
