"""One atomic write for every file a run writes (trainer/files.py), and one temp prefix the sweep removes."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer import evaluation, samples
from trainer.checkpoint import save_checkpoint
from trainer.files import TEMP_PREFIX, atomic_write, is_temp_file, sweep_temp_files, temp_path


def test_atomic_write_of_bytes_and_of_a_writer(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a.bin", b"abc")
    atomic_write(tmp_path / "sub" / "b.bin", lambda fh: fh.write(b"xyz"))
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"xyz"
    # Readable by the server and the user like any other file, although mkstemp made it 0600.
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "sub"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    atomic_write(path, b"old")

    def broken(fh: object) -> None:
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_sweep_removes_only_temp_files(tmp_path: Path) -> None:
    keep = tmp_path / "step_00000010.png"
    keep.write_bytes(b"png")
    left = [tmp_path / f"{TEMP_PREFIX}x-step_00000020.png", temp_path(tmp_path / "step_00000030.pt", "abc")]
    for path in left:
        path.write_bytes(b"half")
    assert sorted(sweep_temp_files(tmp_path)) == sorted(left)
    assert list(tmp_path.iterdir()) == [keep]
    assert sweep_temp_files(tmp_path / "missing") == []


class _Critic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(1)


def _writers(folder: Path) -> dict[str, Callable[[], None]]:
    """Every way a run puts a file on disk, each writing into ``folder``."""
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(16, 2, generator=gen), torch.randn(16, 2, generator=gen)
    images = torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1
    classifier = evaluation.FeatureClassifier(1, 8, 10, 16)

    def field_plot() -> None:
        snapshot = samples.field_snapshot(_Critic(), real, fake, grid=8)
        samples.save_field_plot(snapshot, folder / "step_00000001.png", folder / "step_00000001.json")

    return {
        "checkpoint": lambda: save_checkpoint({"step": 1, "w": torch.zeros(2)}, folder / "step_00000001.pt"),
        "image grid": lambda: samples.save_image_grid(images, folder / "step_00000001.png"),
        "field plot and its JSON": field_plot,
        "classifier cache": lambda: evaluation._save_atomic(folder / "classifier-k.pt", classifier, "k", 0),
    }


@pytest.mark.parametrize("writer", ["checkpoint", "image grid", "field plot and its JSON", "classifier cache"])
def test_every_writer_renames_a_temp_file_the_sweep_would_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    # A writer killed before its rename leaves its temp file behind: only the shared prefix lets the
    # sweep find it and keeps listings and the salvage step from taking it for a finished file.
    renamed: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renamed.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    _writers(tmp_path)[writer]()
    assert renamed
    for src, dst in renamed:
        assert is_temp_file(src), f"{writer} wrote through {src.name}, which no sweep removes"
        assert src.parent == dst.parent  # a rename within one folder is atomic
    assert not any(is_temp_file(p) for p in tmp_path.iterdir())
