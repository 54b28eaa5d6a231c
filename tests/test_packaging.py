"""How gradwatch runs where a user installed it: a server started from any folder starts the real worker."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.live_server import TINY_GAN, config, wait_for, wait_status

pytestmark = pytest.mark.xdist_group("live-packaging")

_URL = re.compile(r"serving on (http://\S+/)")

#: A user's own package named like ours: imported instead of the worker, it leaves a mark and fails the run.
FAKE_WORKER = """
import pathlib, sys
pathlib.Path(__file__).resolve().parents[1].joinpath("SHADOWED").write_text("the user's app.worker ran")
sys.exit(1)
"""


def test_a_users_own_app_package_cannot_stand_in_for_the_worker(tmp_path: Path) -> None:
    """The server starts workers as `python -m app.worker`; from a folder holding an `app/` package of the user's,
    that package used to be imported instead (the current folder comes first on sys.path)."""
    folder = tmp_path / "project"
    (folder / "app").mkdir(parents=True)
    (folder / "app" / "__init__.py").write_text("")
    (folder / "app" / "worker.py").write_text(FAKE_WORKER)
    command = Path(sys.executable).with_name("gradwatch")  # the installed console script, as a user starts it
    assert command.is_file(), "the venv has no gradwatch command: install the project (make install)"
    proc = subprocess.Popen([str(command), "serve", "--port", "0", "--data-dir", str(tmp_path / "data")],
                            cwd=folder, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    found: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            match = _URL.search(line)
            if match and not found:
                found.append(match.group(1).rstrip("/"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = wait_for(lambda: found[0] if found else None, 60, what="the server to start")
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
            wait_for(lambda: http.get("/api/presets").status_code == 200, 30, what="the server to answer")
            run = http.post("/api/runs", json=config(TINY_GAN, train__steps=30)).json()
            detail = wait_status(http, run["id"], {"completed", "failed", "stopped", "interrupted"})
        assert not (folder / "SHADOWED").exists()
        assert detail["status"] == "completed", detail.get("error")
    finally:
        proc.terminate()
        proc.wait(60)
