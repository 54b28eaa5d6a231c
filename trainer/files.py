"""Atomic file writes and the sweep of what a killed writer left: one discipline for every file a run writes.

Checkpoints, sample PNGs and JSON, evaluation caches, uploads received by the
server and checkpoints fetched by a worker are all written the same way: to a
temporary file in the destination folder whose name starts with
:data:`TEMP_PREFIX`, flushed and fsynced, then renamed over the destination.
The server serves these files while workers rewrite them, so a reader sees the
old file or the new one, never half of one; a crash or ``kill -9`` mid-write
leaves the previous file intact plus one temp file.

Because every temp file carries the same prefix, one rule finds them all:
listings and the salvage step skip them, and :func:`sweep_temp_files` removes
them when nobody can still be writing them (a run's start, the server's start).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

#: Every temp file of an atomic write starts with this; nothing else may.
TEMP_PREFIX = ".tmp-"
#: Finished files are world-readable like any other file the user makes (mkstemp creates 0600).
FILE_MODE = 0o644


def is_temp_file(path: Path) -> bool:
    """A write in progress, or one a killed writer abandoned: never listed, served or salvaged."""
    return path.name.startswith(TEMP_PREFIX)


def temp_path(final: Path, tag: str) -> Path:
    """A temp name beside ``final`` for a writer that opens the file itself (an upload arriving in chunks)."""
    return final.with_name(f"{TEMP_PREFIX}{tag}-{final.name}")


class WriteError(OSError):
    """A file of the run could not be written: the disk is full, a file-size limit or quota was hit, ...

    Said in plain words, with the file and the folder: torch reports a full disk while saving a checkpoint as
    ``PytorchStreamWriter failed writing file data/0: file write failed``, which tells a user nothing.
    """


#: Why a write failed, by errno, in the words a run's error shows.
_WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is over the file-size limit",
                 errno.EDQUOT: "the disk quota is used up", errno.EROFS: "the file system is read-only"}
#: Below this much free space, a write that failed is put down to a full disk.
_NEARLY_FULL_BYTES = 64 << 20


def _file_size_limit() -> int | None:
    """This process's file-size limit (``ulimit -f``) in bytes; None if unlimited or unknown. ``resource`` is
    imported here: it is Unix-only, and this module is imported by a user's own script on any system."""
    try:
        import resource
    except ImportError:
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def write_error(path: Path, exc: BaseException, written: int = 0) -> WriteError:
    """``exc`` from writing ``path`` (``written`` bytes of it made it), as a :class:`WriteError` saying what
    happened: from the errno if there is one, else (torch's errors carry none) from the state of the disk."""
    reason = _WRITE_ERRNOS.get(getattr(exc, "errno", None) or -1)
    if reason is None:
        try:
            full = shutil.disk_usage(path.parent).free < _NEARLY_FULL_BYTES
        except OSError:
            full = False
        limit = _file_size_limit()
        if full:
            reason = "the disk is full"
        elif limit is not None and written >= limit - (64 << 10):
            reason = f"the file is over the file-size limit ({limit} bytes)"
        else:
            reason = f"the write failed ({exc})"
    return WriteError(getattr(exc, "errno", None) or errno.EIO, f"cannot write {path.name} in {path.parent}: {reason}")


def atomic_write(path: Path, content: bytes | Callable[[IO[bytes]], object]) -> None:
    """Write ``content`` (bytes, or a function writing to a binary file) to ``path`` atomically and durably.

    A write the file system refuses raises :class:`WriteError` (and leaves no temp file).
    """
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=f"-{path.name}", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            if isinstance(content, bytes):
                fh.write(content)
            else:
                content(fh)
            fh.flush()
            os.fsync(fh.fileno())
        rename_into_place(Path(tmp_name), path)
    except BaseException as exc:
        written = 0
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                written = os.path.getsize(tmp_name)
            Path(tmp_name).unlink(missing_ok=True)
        refused = isinstance(exc, OSError) and not isinstance(exc, WriteError) and exc.errno in _WRITE_ERRNOS
        # torch.save reports the file system's refusal as a RuntimeError from its stream writer, without an errno
        torch_refused = isinstance(exc, RuntimeError) and any(
            word in str(exc) for word in ("inline_container", "PytorchStreamWriter", "write"))
        if refused or torch_refused:
            raise write_error(path, exc, written) from exc
        raise


def rename_into_place(tmp: Path, path: Path) -> None:
    """Make the complete, fsynced temp file ``tmp`` the file ``path``, durably."""
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk (not every platform allows this).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def sweep_temp_files(folder: Path) -> list[Path]:
    """Remove the temp files killed writers left in ``folder``; returns what was removed.

    Call it only where no live writer can be mid-write in that folder.
    """
    removed = []
    if folder.is_dir():
        for leftover in folder.glob(f"{TEMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                leftover.unlink()
                removed.append(leftover)
    return removed


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a worker's log, for the error a failed run shows ("" without a log)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
