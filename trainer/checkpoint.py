"""Checkpoints: tensors and plain data only, written atomically, loaded safely.

A checkpoint is written to a temporary file in the destination folder, fsynced,
then renamed over the destination: a crash or ``kill -9`` mid-write leaves the
previous file intact (plus a ``.tmp-*`` file that :func:`sweep_temp_files`
removes). Loading always uses ``weights_only=True`` so a checkpoint cannot run
code, whoever wrote it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

TEMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, writer: Any) -> None:
    """Call ``writer(fileobj)`` on a temp file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically write ``state`` (tensors, dicts, lists, str/int/float/bool/None)."""
    payload = {"format": FORMAT_VERSION, **state}
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: nothing in the file is unpickled as code."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path.name} is not a gradwatch checkpoint (format {FORMAT_VERSION})")
    return state


def sweep_temp_files(folder: Path) -> list[Path]:
    """Remove temp files a killed writer left behind; returns what was removed."""
    removed = []
    if folder.is_dir():
        for leftover in folder.glob(f"{TEMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed
