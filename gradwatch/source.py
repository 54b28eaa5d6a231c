"""Where a script's run comes from: host, script, arguments, git commit — shown in the run's header.

Everything here is best effort and quick: a script must never fail, or wait
long, because ``git`` is missing or the folder is not a repository.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 2.0


def _script() -> tuple[str, Path | None]:
    """The script's file name and folder, or ``<notebook>`` / ``<interactive>``."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path:
        resolved = Path(path).resolve()
        return resolved.name, resolved.parent
    if "ipykernel" in sys.modules:
        return "<notebook>", Path.cwd()
    return "<interactive>", Path.cwd()


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_info(folder: Path) -> dict[str, Any] | None:
    """Commit, branch and whether the work tree has uncommitted changes; None outside a repository."""
    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return None
    info: dict[str, Any] = {"commit": commit}
    branch = _git(folder, "rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        info["branch"] = branch
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    info["dirty"] = bool(status)
    return info


def script_source(*, origin: str = "script", project: str | None = None, folder: Path | None = None) -> dict[str, Any]:
    """The ``source`` of a script's run, as ``POST /api/client/runs`` takes it."""
    from gradwatch import __version__

    name, where = _script()
    source: dict[str, Any] = {
        "origin": origin,
        "host": socket.gethostname()[:255],
        "script": name,
        "argv": [a[:500] for a in sys.argv[1:65]],
        "python": platform.python_version(),
        "pid": os.getpid(),
        "gradwatch": __version__,
    }
    git = git_info(where) if where is not None else None
    if git:
        source["git"] = git
    if project:
        source["project"] = project[:200]
    if folder is not None:
        source["folder"] = str(folder)[:500]
    return source
