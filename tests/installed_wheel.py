"""gradwatch as a user installs it: the sdist and wheel ``python -m build`` makes, installed into a fresh venv.

Built once per test session (``installed_wheel`` in conftest.py) and shared by tests/test_wheel.py and
tests/test_container.py, which run in one xdist group for that. The fresh venv has no way back to this
checkout: it is made from the base interpreter (not this venv, whose editable install points here), and every
command it runs gets a PATH holding that venv's bin/ alone (no Node, no npm) and no PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from bench.server import Server

ROOT = Path(__file__).resolve().parents[1]
#: The CPU wheel on this machine's disk (as .ci/run installs it): pip never resolves a CUDA build here.
TORCH = "torch==2.13.0"
#: Variables of this test process that would lead the fresh venv back to the checkout or change the server.
_DROPPED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")


def _unavailable(reason: str) -> NoReturn:
    """Skip, or fail under CI: CI installs npm and the dev extra, so a missing tool there is a broken set-up."""
    if os.environ.get("CI"):
        pytest.fail(f"the wheel tests need npm and `build` in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class InstalledWheel:
    """The built artifacts and the fresh venv the wheel is installed in."""

    sdist: Path
    wheel: Path
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for the fresh venv's commands: its bin/ the whole PATH, nothing of gradwatch's own."""
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED and not k.startswith("GRADWATCH_")}
        return {**env, "PATH": str(self.bin), "OMP_NUM_THREADS": "1", **(extra or {})}

    def run(self, *args: str, cwd: Path, timeout: float = 600) -> str:
        """A command of the fresh venv (``args[0]`` found on its PATH); its stdout, or the test fails with both."""
        done = subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=cwd, env=self.env(), capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout


def build_and_install(tmp: Path) -> InstalledWheel:
    """``python -m build`` (the sdist, then the wheel from that sdist), then a fresh venv with torch and the wheel."""
    if shutil.which("npm") is None:
        _unavailable("building the wheel needs npm on PATH (apt-get install npm)")
    if importlib.util.find_spec("build") is None:
        _unavailable("`build` is not installed: pip install -e '.[dev]' (make install)")
    dist = tmp / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"python -m build failed:\n{done.stdout}\n{done.stderr}"
    (sdist,), (wheel,) = dist.glob("gradwatch-*.tar.gz"), dist.glob("gradwatch-*.whl")

    venv = tmp / "venv"
    base = getattr(sys, "_base_executable", sys.executable)  # not this venv's python: its site-packages lead here
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    installed = InstalledWheel(sdist, wheel, venv)
    assert shutil.which("node", path=installed.env()["PATH"]) is None
    installed.run("python", "-m", "pip", "install", "--quiet", TORCH, cwd=tmp)
    installed.run("python", "-m", "pip", "install", "--quiet", str(wheel), cwd=tmp)
    return installed


#: A user's own package named like ours, in the folder the server starts from: importing it fails, and its worker
#: module leaves a mark before failing the run.
FAKE_APP = {
    "__init__.py": "raise ImportError('the user\\'s own app package was imported')\n",
    "worker.py": "import pathlib, sys\n"
                 "pathlib.Path(__file__).resolve().parents[1].joinpath('SHADOWED').write_text('ran')\n"
                 "sys.exit(1)\n",
}


def users_folder(tmp: Path) -> Path:
    """An empty project folder of the user's, holding nothing but their own ``app/`` package."""
    folder = tmp / "project"
    (folder / "app").mkdir(parents=True)
    for name, text in FAKE_APP.items():
        (folder / "app" / name).write_text(text)
    return folder


class WheelServer(Server):
    """``gradwatch serve`` of the installed wheel, started from ``cwd`` with the fresh venv's environment.

    ``argv`` is the whole command line (a container's entry command, say); by default the venv's console script
    on port 0 of loopback.
    """

    def __init__(self, installed: InstalledWheel, data_dir: Path, cwd: Path, argv: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir)
        self.env = installed.env(env)
        self.cwd = cwd
        self.argv = argv or [str(installed.bin / "gradwatch"), "serve", "--data-dir", str(data_dir)]

    def command(self, port: str) -> list[str]:
        return self.argv + (["--port", port] if "--port" not in self.argv else [])
