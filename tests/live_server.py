"""A real ``gradwatch serve`` in a subprocess, for tests that need the real thing.

The server binds port 0 and prints its URL; the harness reads it, talks HTTP
with httpx and websockets with the ``websockets`` client, and always tears the
server and every worker it started down, however the test ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from websockets.sync.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[1]
_URL = re.compile(r"serving on (http://\S+/)")

#: A run small enough for a 2-core machine: most of its time is the worker's start.
TINY_GAN: dict[str, Any] = {
    "kind": "gan",
    "data": {"name": "ring8"},
    "model": {"width": 32, "depth": 2, "latent_dim": 2},
    "gan": {"lr_g": 1e-3, "lr_d": 1e-3},
    "train": {"steps": 200, "batch_size": 64, "seed": 0, "device": "cpu"},
    "intervals": {"hist_every": 20, "sample_every": 100, "eval_every": 100_000, "checkpoint_every": 100,
                  "flush_ms": 20, "flush_steps": 16},
}
TINY_VAE: dict[str, Any] = {
    "kind": "vae",
    "data": {"name": "digits"},
    "model": {"width": 32, "depth": 1, "latent_dim": 3},
    "train": {"steps": 60, "batch_size": 32, "seed": 0, "device": "cpu"},
    "intervals": {"sample_every": 30, "eval_every": 30, "checkpoint_every": 30, "flush_ms": 20, "flush_steps": 16},
}


def config(base: dict[str, Any], **dotted: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with ``{"train__steps": 5}``-style overrides applied."""
    out: dict[str, Any] = json.loads(json.dumps(base))
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


class LiveServer:
    def __init__(self, data_dir: Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.args = list(extra_args)
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "GRADWATCH_CPU_RUN_LIMIT": "4",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.log: list[str] = []
        self.token: str | None = None

    def start(self, timeout: float = 60.0) -> LiveServer:
        # A restart comes back on the same port: that is where surviving workers reconnect.
        port = self.url.rsplit(":", 1)[1] if self.url else "0"
        self.url, self.log = "", []
        cmd = [sys.executable, "-m", "app.cli", "serve", "--port", port, "--data-dir", str(self.data_dir),
               "--log-level", "warning", *self.args]
        self.proc = subprocess.Popen(cmd, env=self.env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, cwd=ROOT)
        found = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                match = _URL.search(line)
                if match and not self.url:
                    self.url = match.group(1).rstrip("/")
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.is_set():
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError("server exited at start:\n" + "".join(self.log))
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + "".join(self.log))
            found.wait(0.1)
        # The URL is printed before uvicorn finishes its start-up: wait until it answers.
        while True:
            try:
                if self.client().get("/api/presets").status_code < 500:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server never answered:\n" + "".join(self.log))
            time.sleep(0.1)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = kwargs.pop("headers", {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0, **kwargs)

    def stream(self, run_id: str, since: int = 0, **kwargs: Any) -> ClientConnection:
        headers = kwargs.pop("additional_headers", {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        return connect(f"{self.ws_url}/ws/runs/{run_id}?since={since}", additional_headers=headers, proxy=None,
                       max_size=None, open_timeout=10, **kwargs)

    def workers(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def kill(self) -> None:
        """kill -9 the server alone: its workers live on, as after a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """Graceful stop, then force; every worker process goes too."""
        if self.proc is None:
            return
        children = self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.proc = None


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def wait_status(client: httpx.Client, run_id: str, statuses: set[str], timeout: float = 90.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run: dict[str, Any] = client.get(f"/api/runs/{run_id}").json()
        return run if run["status"] in statuses else None

    result: dict[str, Any] = wait_for(check, timeout, 0.2, f"run {run_id} to reach {statuses}")
    return result


def read_frames(ws: ClientConnection, until: Any, timeout: float = 90.0) -> list[dict[str, Any]]:
    """Frames from an open stream until ``until(frames)`` holds or the server closes."""
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):
        while time.monotonic() < deadline:
            message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            frames.append(json.loads(message))
            if until(frames):
                break
    return frames


def metric_series(frames: list[dict[str, Any]], key: str) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for frame in frames:
        if frame["type"] == "metrics" and key in frame["data"]:
            out.update(zip(frame["step"], frame["data"][key], strict=True))
    return out
