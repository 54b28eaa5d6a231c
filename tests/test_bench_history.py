"""Smoke test of ``bench/history.py`` at a small size: it builds, queries in process and over HTTP, checks spikes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import history
from bench.synthetic_worker import synthetic_keys


def test_history_benchmark_writes_its_json_with_every_spike_checked(tmp_path: Path) -> None:
    out = tmp_path / "history.json"
    assert history.main(["--steps", "30000", "--keys", "8", "--repeat", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["meta"]["steps"] == 30000 and payload["meta"]["keys"] == 8
    assert payload["spikes_checked"] == 4  # the planted spikes on keys 0, 1, 5 and 7
    for mode in ("summaries", "full read"):
        assert payload["in_process"][mode]["warm_median_ms"] > 0
    for max_points in ("2000", "4000"):
        assert payload["http"][max_points]["cold_ms"] > 0 and payload["http"][max_points]["bytes"] > 0
    assert set(payload["http"]["zoom"]) == {"2,000 steps", "1 %", "10 %", "50 %"}
    assert all(z["cold_ms"] > 0 and z["start"] <= z["end"] for z in payload["http"]["zoom"].values())
    assert isinstance(payload["met"], bool)


def test_the_check_catches_a_lost_spike() -> None:
    keys = synthetic_keys(2)
    spikes = history.planted_spikes(1000, keys)
    facts: dict[str, Any] = {"spikes": spikes, "ends": (1, 1000)}
    answer: dict[str, dict[str, list[Any]]] = {}
    for key in keys:
        ((spike_step, spike_value),) = spikes[key].items()
        answer[key] = {"step": [1, spike_step, 1000], "value": [0.0, spike_value, 0.0]}
    history.check(answer, keys, facts, 2000)
    answer[keys[0]]["value"][1] = 1.0
    with pytest.raises(AssertionError, match="spike"):
        history.check(answer, keys, facts, 2000)
    with pytest.raises(AssertionError, match="max_points"):
        history.check(answer, keys, facts, 2)
    # A zoom checks its own ends and only the spikes inside it.
    spike_step = next(iter(spikes[keys[1]]))
    zoomed = {key: {"step": [spike_step - 1, spike_step, spike_step + 1], "value": [0.0, 0.0, 0.0]} for key in keys}
    zoomed[keys[1]]["value"][1] = spikes[keys[1]][spike_step]
    history.check(zoomed, keys, facts, 2000, (spike_step - 1, spike_step + 1))
    zoomed[keys[1]]["value"][1] = 0.0
    with pytest.raises(AssertionError, match="spike"):
        history.check(zoomed, keys, facts, 2000, (spike_step - 1, spike_step + 1))
