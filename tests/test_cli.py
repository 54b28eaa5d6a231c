"""`gradwatch train` end to end, in a real subprocess."""

from __future__ import annotations

import json
from pathlib import Path

from tests.command import gradwatch
from tests.conftest import read_frames


def test_train_preset_writes_frames_samples_and_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = gradwatch("train", "--preset", "ring8-saturating", "--steps", "260", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "step" in done.stderr  # the progress bar
    frames = read_frames(out / "events.jsonl")
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert frames[-1] == {"type": "status", "run": "run", "seq": len(frames), "status": "completed",
                          "error": None, "step": 260}
    assert {"metrics", "hist", "sample", "checkpoint", "status"} <= {f["type"] for f in frames}
    assert (out / "samples" / "step_00000260.png").is_file()  # every run ends with a sample of its final state
    assert (out / "samples" / "step_00000260.json").is_file()
    assert (out / "checkpoints" / "step_00000260.pt").is_file()
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 260


def test_bad_config_file_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"gan": {"lr_g": -0.1}, "train": {"batch_size": 1}}))
    done = gradwatch("train", str(cfg), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert done.returncode != 0
    assert "gan.lr_g" in done.stderr and "train.batch_size" in done.stderr
    assert not (tmp_path / "x").exists()


def test_unknown_preset_lists_the_choices(tmp_path: Path) -> None:
    done = gradwatch("train", "--preset", "nope", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert done.returncode != 0 and "ring8-non-saturating" in done.stderr


def test_resume_continues_from_the_checkpoint_step(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert gradwatch("train", "--preset", "ring8-non-saturating", "--steps", "20", "--out", str(first),
                     "--no-progress", cwd=tmp_path).returncode == 0
    second = tmp_path / "second"
    done = gradwatch("train", "--preset", "ring8-non-saturating", "--steps", "30", "--out", str(second),
                     "--resume", str(first / "checkpoints" / "step_00000020.pt"), "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    steps = [s for f in read_frames(second / "events.jsonl") if f["type"] == "metrics" and "loss/d" in f["data"]
             for s in f["step"]]
    assert steps == list(range(21, 31))


def test_presets_command_prints_complete_configs(tmp_path: Path) -> None:
    done = gradwatch("presets", cwd=tmp_path)
    presets = json.loads(done.stdout)
    assert presets["ring8-saturating"]["gan"]["d_head_start"] > 0
