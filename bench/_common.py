"""Helpers shared by the ``bench/`` modules: a real server in a subprocess, machine facts, results.

Benchmarks measure the product as a user runs it, so the server here is the real
``gradwatch serve`` (``python -m app.cli serve``) on a free port of 127.0.0.1,
talked to over plain HTTP (``urllib``) and websockets, with nothing beyond the
runtime dependencies: a benchmark must not need the test extras to run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import psutil
from websockets.sync.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
_URL = re.compile(r"serving on (http://\S+/)")
# Never through a proxy: the server is on 127.0.0.1, and a proxy variable in the environment
# would otherwise route (and time) benchmark requests through it.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The server did not start, or answered a request with an error."""


class Server:
    """``gradwatch serve --port 0`` in a subprocess, stopped with every worker it started.

    ``env`` is added to the server's environment, which its workers inherit
    (``GRADWATCH_CPU_RUN_LIMIT`` sets how many torch threads each worker gets).
    ``GRADWATCH_*`` variables of the caller's environment are not passed on: a
    token or a worker module set there would silently change what is measured.
    """

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")},
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(env or {}),
        }
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.log: deque[str] = deque(maxlen=200)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> Server:
        cmd = [sys.executable, "-m", "app.cli", "serve", "--port", "0", "--data-dir", str(self.data_dir),
               "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=self.env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, cwd=ROOT)
        found = threading.Event()

        def pump() -> None:  # keeps the pipe drained for the server's whole life
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                match = _URL.search(line)
                if match and not found.is_set():
                    self.url = match.group(1).rstrip("/")
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerError("gradwatch serve did not start:\n" + "".join(self.log))
        while True:  # the URL is printed before uvicorn accepts connections
            with contextlib.suppress(OSError, ServerError):
                self.request("GET", "/api/presets")
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError("gradwatch serve never answered:\n" + "".join(self.log))
            time.sleep(0.1)

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        """One JSON request; the decoded answer (None for 204), ServerError for any 4xx/5xx."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with _OPENER.open(req, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
        return json.loads(raw) if raw else None

    def stream(self, run_id: str, since: int = 0) -> ClientConnection:
        """The run's live websocket, as a dashboard tab would open it."""
        ws_url = self.url.replace("http://", "ws://", 1)
        return connect(f"{ws_url}/ws/runs/{run_id}?since={since}", proxy=None, max_size=None, open_timeout=10)

    def workers(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def wait_workers_gone(self, timeout: float = 60.0) -> bool:
        """Wait until no worker process is left, so that the next measurement has the CPU to itself."""
        deadline = time.monotonic() + timeout
        while self.workers():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """Graceful stop, then force; every worker goes too."""
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


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """What a reader needs to compare figures: CPU, core count, load, versions, GPU if used."""
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with right-aligned columns after the first: what the bench prints."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                            strict=True)))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]) + "\n"
