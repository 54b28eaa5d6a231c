"""Checkpoints: tensors and plain data only, written atomically, loaded safely.

A checkpoint is written like every file a run writes (:mod:`trainer.files`): to
a temporary file in the destination folder, fsynced, then renamed over the
destination, so a crash or ``kill -9`` mid-write leaves the previous file
intact. Loading always uses ``weights_only=True`` so a checkpoint cannot run
code, whoever wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.files import atomic_write

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically write ``state`` (tensors, dicts, lists, str/int/float/bool/None)."""
    payload = {"format": FORMAT_VERSION, **state}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: nothing in the file is unpickled as code."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        # Random bytes, a truncated file, a pickle holding code (refused by weights_only): each library layer
        # raises its own type (UnpicklingError, EOFError, RuntimeError, ...). To a caller they are one thing.
        raise ValueError(f"{path.name} is not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path.name} is not a gradwatch checkpoint (format {FORMAT_VERSION})")
    return state
