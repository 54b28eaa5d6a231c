"""A real ``gradwatch serve`` in a subprocess, for tests that need the real thing, and helpers to drive it.

The harness itself is ``bench/server.py`` (binds port 0, reads the printed URL,
tears the server and every worker down however the test ended), shared with the
benchmarks; here it gains an httpx client and the test suite's defaults.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection

from bench.server import Server

ROOT = Path(__file__).resolve().parents[1]
_URL = re.compile(r"serving on (http://\S+/)")

#: A run small enough for a 2-core machine: most of its time is the worker's start.
# Both tiny configs ask for every key on every step (telemetry_budget 1): the live tests check streams key by key
# and step by step. What the default budget samples is tested in tests/test_budget.py and test_budget_live.py.
TINY_GAN: dict[str, Any] = {
    "kind": "gan",
    "data": {"name": "ring8"},
    "model": {"width": 32, "depth": 2, "latent_dim": 2},
    "gan": {"lr_g": 1e-3, "lr_d": 1e-3},
    "train": {"steps": 200, "batch_size": 64, "seed": 0, "device": "cpu"},
    "intervals": {"hist_every": 20, "sample_every": 100, "eval_every": 100_000, "checkpoint_every": 100,
                  "flush_ms": 20, "flush_steps": 16, "telemetry_budget": 1.0},
}
TINY_VAE: dict[str, Any] = {
    "kind": "vae",
    "data": {"name": "digits"},
    "model": {"width": 32, "depth": 1, "latent_dim": 3},
    "train": {"steps": 60, "batch_size": 32, "seed": 0, "device": "cpu"},
    "intervals": {"sample_every": 30, "eval_every": 30, "checkpoint_every": 30, "flush_ms": 20, "flush_steps": 16,
                  "telemetry_budget": 1.0},
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


class LiveServer(Server):
    """bench's server harness, with the test suite's defaults and an httpx client."""

    def __init__(self, data_dir: Path, *extra_args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, *extra_args,
                         env={"GRADWATCH_CPU_RUN_LIMIT": "4", "OMP_NUM_THREADS": "1", **(env or {})})

    def start(self, timeout: float = 60.0) -> LiveServer:
        super().start(timeout)
        return self

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = kwargs.pop("headers", {})
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0, **kwargs)


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


#: Default bound on waiting for a run: long, because workers train at nice 10 and a busy CI machine starves them.
RUN_WAIT_S = 300.0


def wait_status(client: httpx.Client, run_id: str, statuses: set[str], timeout: float = RUN_WAIT_S) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run: dict[str, Any] = client.get(f"/api/runs/{run_id}").json()
        return run if run["status"] in statuses else None

    result: dict[str, Any] = wait_for(check, timeout, 0.2, f"run {run_id} to reach {statuses}")
    return result


def read_frames(ws: ClientConnection, until: Any, timeout: float = RUN_WAIT_S) -> list[dict[str, Any]]:
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
