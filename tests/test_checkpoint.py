"""Checkpoints are atomic and load with weights_only=True."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.files import TEMP_PREFIX, sweep_temp_files

# A child process that overwrites the checkpoint with a large payload, slowly enough to be killed mid-write.
_WRITER = """
import sys, torch
from pathlib import Path
from trainer.checkpoint import save_checkpoint
big = {"step": 2, "w": torch.ones(64, 1024, 1024)}  # 256 MiB
while True:
    save_checkpoint(big, Path(sys.argv[1]))
"""


def test_round_trip_with_plain_data_and_tensors(tmp_path: Path) -> None:
    state = {"step": 3, "config": {"a": [1, 2.5, None, "x"]}, "t": torch.arange(4), "rng": torch.get_rng_state()}
    path = tmp_path / "c.pt"
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and loaded["config"] == state["config"]
    assert torch.equal(loaded["t"], state["t"])
    assert list(tmp_path.iterdir()) == [path]


class Custom:
    """Any class at all: pickle would happily rebuild it, weights_only must not."""


def test_objects_that_are_not_plain_data_are_refused_on_load(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": Custom()}, path)
    with pytest.raises(Exception, match=r"weights_only|Unsupported global"):
        load_checkpoint(path)


def test_foreign_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"hello": 1}, path)
    with pytest.raises(ValueError, match="not a gradwatch checkpoint"):
        load_checkpoint(path)


def test_kill_mid_write_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.zeros(3)}, path)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env)
    try:
        deadline = time.monotonic() + 60
        # Wait until a temp file is being written, then kill the writer in the middle of it.
        while not any(p.name.startswith(TEMP_PREFIX) and p.stat().st_size > 1 << 20 for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline, "writer never started"
            assert child.poll() is None, "writer died on its own"
            time.sleep(0.005)
        # Only test the interrupted case: the first write must not have completed yet.
        if load_checkpoint(path)["step"] != 1:
            pytest.skip("the writer finished a full write before it could be interrupted")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.zeros(3))
    leftovers = sweep_temp_files(tmp_path)
    assert leftovers, "the killed write should have left its temp file behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
