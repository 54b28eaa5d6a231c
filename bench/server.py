"""A real ``gradwatch serve`` in a subprocess: the one harness of the benchmarks and the live tests.

Both measure or check the product as a user runs it, so the server is the
real ``python -m app.cli serve`` on port 0 of 127.0.0.1 (or whatever the extra
arguments say), found through the address it prints, and stopped with every
worker it started however the caller ended. It needs nothing beyond the runtime
dependencies (``urllib`` for HTTP, the ``websockets`` client), so a benchmark
runs without the test extras; ``tests/live_server.py`` adds an httpx client.
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
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import psutil
from websockets.sync.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[1]
_URL = re.compile(r"serving on (http://\S+/)")
#: Never through a proxy: the servers measured are local, and a proxy variable in the environment would
#: otherwise route (and time) requests through it.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The server did not start, or answered a request with an error."""


class Server:
    """``gradwatch serve`` in a subprocess, stopped with every worker it started.

    ``args`` are added to ``serve``'s command line and ``env`` to its
    environment, which its workers inherit. ``GRADWATCH_*`` variables of the
    caller's environment are not passed on: a token or a worker module set
    there would silently change what is measured or tested.
    """

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.args = list(args)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")},
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(env or {}),
        }
        #: Where the server starts (its current folder).
        self.cwd = ROOT
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        #: The server's stderr, newest lines; where a ``--token generate`` prints the token it made.
        self.log: deque[str] = deque(maxlen=500)
        #: Sent as a bearer token by :meth:`request` and :meth:`stream` once set.
        self.token: str | None = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> Server:
        """Start, or start again on the same port: that is where surviving workers reconnect."""
        port = self.url.rsplit(":", 1)[1] if self.url else "0"
        self.url = ""
        self.log.clear()
        self.proc = subprocess.Popen(self.command(port), env=self.env, stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, cwd=self.cwd)
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
                time.sleep(0.2)  # the last lines of a server that exited
                self.stop()
                raise ServerError("gradwatch serve did not start:\n" + "".join(self.log))
        while not self._answers():  # the URL is printed before uvicorn accepts connections
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError("gradwatch serve never answered:\n" + "".join(self.log))
            time.sleep(0.1)
        return self

    def command(self, port: str) -> list[str]:
        """The server's command line; ``port`` is "0" at the first start, then the port it listened on."""
        return [sys.executable, "-m", "app.cli", "serve", "--port", port, "--data-dir", str(self.data_dir),
                "--log-level", "warning", *self.args]

    def _answers(self) -> bool:
        try:
            with NO_PROXY.open(self.url + "/api/presets", timeout=5):
                return True
        except urllib.error.HTTPError as exc:  # a 401 of a guarded server is an answer too
            return exc.code < 500
        except OSError:
            return False

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        """One JSON request; the decoded answer (None for 204), ServerError for any 4xx/5xx."""
        data = None if body is None else json.dumps(body).encode()
        headers = {**self._auth(), **({"Content-Type": "application/json"} if data else {})}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with NO_PROXY.open(req, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
        return json.loads(raw) if raw else None

    def stream(self, run_id: str, since: int = 0, **kwargs: Any) -> ClientConnection:
        """The run's live websocket, as a dashboard tab opens it."""
        headers = {**self._auth(), **kwargs.pop("additional_headers", {})}
        return connect(f"{self.ws_url}/ws/runs/{run_id}?since={since}", additional_headers=headers, proxy=None,
                       max_size=None, open_timeout=10, **kwargs)

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

    def kill(self) -> None:
        """kill -9 the server alone: its workers live on, as after a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """Graceful stop, then force; every worker goes too."""
        if self.proc is None:
            return
        children = self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)  # the server gives each worker shutdown_grace_s (30 s) to save its work
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self.proc = None


def thread_nice(pid: int) -> dict[int, int]:
    """Each thread's nice value by thread id, from Linux's /proc (field 19 of stat, counted after the command
    name's closing parenthesis, which may itself hold spaces); how the worker priority is checked."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            out[int(task.name)] = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
    return out
