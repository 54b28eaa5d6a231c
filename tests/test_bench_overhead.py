"""Smoke tests of ``bench/overhead.py``: it runs end to end at the smallest sizes and writes the JSON it promises.

These check the benchmark's plumbing, not its figures (five steps measure nothing).
TensorBoard, wandb and Trackio are optional (the ``bench`` extra): without them the
variant must come back as "not available" with a reason, not fail the benchmark.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import overhead
from trainer.presets import get_preset

#: What the wandb and Trackio variants set in this process: restored after each test.
TRACKER_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT", "TRACKIO_DIR", "HF_HUB_OFFLINE")


def _check_shape(payload: dict[str, Any], variants: list[str]) -> None:
    meta = payload["meta"]
    for key in ("torch", "device", "cpu_count", "threads_per_process", "rounds", "window", "warmup", "mode"):
        assert key in meta, key
    assert meta["variants"] == variants
    (result,) = payload["results"]
    assert result["preset"] == "ring8-non-saturating"
    assert result["case"] == overhead.CASES["ring8-non-saturating"]
    assert list(result["variants"]) == variants
    for name, entry in result["variants"].items():
        if not entry["available"]:
            assert name in overhead.TRACKERS  # only the optional libraries may be missing
            assert isinstance(entry["reason"], str) and entry["reason"]
            assert entry["rounds"] == []
            continue
        assert entry["reason"] is None
        assert len(entry["rounds"]) == 1
        assert entry["steps_per_s"] > 0
        if name == "bare":
            assert "ratio_to_bare" not in entry
        else:
            ratio = entry["ratio_to_bare"]
            assert ratio["median"] > 0 and ratio["min"] <= ratio["median"] <= ratio["max"]


def test_inprocess_benchmark_writes_every_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for name in TRACKER_ENV:  # the wandb and Trackio variants set these in this process: restore them afterwards
        monkeypatch.setenv(name, "")
    out = tmp_path / "overhead.json"
    assert overhead.main(["--inprocess", "--cases", "ring8-non-saturating", "--rounds", "1", "--steps", "5",
                          "--warmup-steps", "1", "--json", str(out)]) == 0
    _check_shape(json.loads(out.read_text()), list(overhead.VARIANTS))
    table = capsys.readouterr().out
    assert "ring8 MLP GAN" in table and "(b) gradwatch" in table and "(f) every-step" in table
    assert "(g) trackio" in table


def test_window_measures_between_warmup_and_end() -> None:
    window = overhead.Window(warmup_s=1.0, seconds=2.0)
    stamps = [(step, 10.0 + 0.5 * step) for step in range(1, 20)]  # two steps per second
    done = [window.feed(step, t) for step, t in stamps]
    assert window.start == (3, 11.5) and window.end == (7, 13.5)
    assert done.index(True) == 6 and all(done[6:])
    assert window.summary() == {"steps_per_s": 2.0, "steps": 4, "seconds": 2.0}


def test_missing_libraries_are_reported_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # None in sys.modules: ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "trackio", None)
    for name in TRACKER_ENV:
        monkeypatch.setenv(name, "")
    out = tmp_path / "overhead.json"
    assert overhead.main(["--inprocess", "--cases", "ring8-non-saturating", "--rounds", "1", "--steps", "2",
                          "--warmup-steps", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    _check_shape(payload, list(overhead.VARIANTS))
    variants = payload["results"][0]["variants"]
    assert not variants["tensorboard"]["available"] and "tensorboard" in variants["tensorboard"]["reason"]
    assert not variants["wandb"]["available"] and "wandb" in variants["wandb"]["reason"]
    assert not variants["trackio"]["available"] and "trackio" in variants["trackio"]["reason"]


def test_every_step_is_the_default_run_with_the_budget_at_one() -> None:
    cfg = overhead._quiet(get_preset("digits-gan"), "cpu")
    default, every = (overhead.server_config(cfg, v) for v in ("gradwatch", "every-step"))
    assert default == cfg and default.intervals.telemetry_budget < 1
    assert every.intervals.telemetry_budget == 1.0
    assert every.model_dump(exclude={"intervals"}) == cfg.model_dump(exclude={"intervals"})
    assert list(overhead.LETTER.values()) == list("abcdefg")


def test_max_seconds_shares_the_time_between_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SimpleNamespace(t=0.0)
    monkeypatch.setattr(overhead, "time", SimpleNamespace(monotonic=lambda: clock.t))

    def child_round(variant: str, preset: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        clock.t += 10.0  # every round takes 10 s
        return {"ok": True, "steps_per_s": 100.0, "steps": 100, "seconds": 1.0}

    monkeypatch.setattr(overhead, "child_round", child_round)
    out = tmp_path / "overhead.json"
    # 45 s for two cases: the first may start rounds that end by 22.5 s (2), the second by 45 s (2 more).
    assert overhead.main(["--cases", "ring8-non-saturating,digits-vae", "--variants", "bare", "--rounds", "9",
                          "--max-seconds", "45", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [r["rounds_done"] for r in payload["results"]] == [2, 2]
    assert [len(r["variants"]["bare"]["rounds"]) for r in payload["results"]] == [2, 2]
    assert payload["meta"]["max_seconds"] == 45
    # Past its share, a case still runs one round.
    clock.t = 0.0
    assert overhead.main(["--cases", "ring8-non-saturating,digits-vae", "--variants", "bare", "--rounds", "9",
                          "--max-seconds", "1", "--json", str(out)]) == 0
    assert [r["rounds_done"] for r in json.loads(out.read_text())["results"]] == [1, 1]


@pytest.mark.slow  # a server, a worker and a bare-loop process start: about 10 s on a 2-core machine
def test_live_benchmark_streams_through_a_real_server(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    assert overhead.main(["--cases", "ring8-non-saturating", "--variants", "bare,gradwatch,client,every-step",
                          "--rounds", "1", "--steps", "5", "--warmup-steps", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    _check_shape(payload, ["bare", "gradwatch", "client", "every-step"])
    (live,) = payload["results"][0]["variants"]["every-step"]["rounds"]
    assert live["metric_keys"] == 30  # every SPEC §2 key of this GAN (14 + 8 G and 8 D tensors), every step
    # (e), a user loop with the client streaming to the same server, is reported beside (b).
    assert "client_minus_builtin" in payload["results"][0]
