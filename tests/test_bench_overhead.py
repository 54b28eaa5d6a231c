"""Smoke tests of ``bench/overhead.py``: it runs end to end at the smallest sizes and writes the JSON it promises.

These check the benchmark's plumbing, not its figures (five steps measure nothing).
TensorBoard and wandb are optional (the ``bench`` extra): without them the variant
must come back as "not available" with a reason, not fail the benchmark.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import overhead

WANDB_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")


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
            assert name in ("tensorboard", "wandb")  # only the optional libraries may be missing
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
    for name in WANDB_ENV:  # the wandb variant sets these in this process: restore them afterwards
        monkeypatch.setenv(name, "")
    out = tmp_path / "overhead.json"
    assert overhead.main(["--inprocess", "--cases", "ring8-non-saturating", "--rounds", "1", "--steps", "5",
                          "--warmup-steps", "1", "--json", str(out)]) == 0
    _check_shape(json.loads(out.read_text()), list(overhead.VARIANTS))
    table = capsys.readouterr().out
    assert "ring8 MLP GAN" in table and "(b) gradwatch" in table


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
    for name in WANDB_ENV:
        monkeypatch.setenv(name, "")
    out = tmp_path / "overhead.json"
    assert overhead.main(["--inprocess", "--cases", "ring8-non-saturating", "--rounds", "1", "--steps", "2",
                          "--warmup-steps", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    _check_shape(payload, list(overhead.VARIANTS))
    variants = payload["results"][0]["variants"]
    assert not variants["tensorboard"]["available"] and "tensorboard" in variants["tensorboard"]["reason"]
    assert not variants["wandb"]["available"] and "wandb" in variants["wandb"]["reason"]


@pytest.mark.slow  # a server, a worker and a bare-loop process start: about 10 s on a 2-core machine
def test_live_benchmark_streams_through_a_real_server(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    assert overhead.main(["--cases", "ring8-non-saturating", "--variants", "bare,gradwatch,client", "--rounds",
                          "1", "--steps", "5", "--warmup-steps", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    _check_shape(payload, ["bare", "gradwatch", "client"])
    (live,) = payload["results"][0]["variants"]["gradwatch"]["rounds"]
    assert live["metric_keys"] == 30  # every SPEC §2 key of this GAN (14 + 8 G and 8 D tensors) went through
    # (e), a user loop with the client streaming to the same server, is reported beside (b).
    assert "client_minus_builtin" in payload["results"][0]
