"""A server killed mid-run: what it stored survives, its workers re-attach or their runs end ``interrupted``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.live_server import TINY_GAN, LiveServer, config, metric_series, read_frames, wait_for, wait_status

pytestmark = pytest.mark.xdist_group("live-restart")

TERMINAL = {"completed", "stopped", "failed", "interrupted"}


def _worker_of(server: LiveServer, run_id: str) -> psutil.Process:
    def find() -> psutil.Process | None:
        matches = [p for p in server.workers() if run_id in " ".join(p.cmdline())]
        return matches[0] if matches else None

    found: psutil.Process = wait_for(find, what=f"worker of {run_id}")
    return found


def _frames(server: LiveServer, run_id: str) -> list[dict[str, Any]]:
    with server.stream(run_id) as ws:
        return read_frames(ws, lambda fs: fs[-1]["type"] == "status" and fs[-1]["status"] in TERMINAL)


def _resume_completes(server: LiveServer, run: dict[str, Any], ckpt: dict[str, Any]) -> None:
    # The README's form: only what changes; the rest comes from the checkpointed run.
    body = {"train": {"steps": ckpt["step"] + 30}, "resume_from": {"run": run["id"], "checkpoint": ckpt["name"]}}
    with server.client() as http:
        response = http.post("/api/runs", json=body)
        assert response.status_code == 201, response.text
        resumed = response.json()
        assert resumed["config"]["model"] == run["config"]["model"]
        assert f"resumed at step {ckpt['step']}" in resumed["name"]
        # The new run holds its own copy of the checkpoint: the source can go at once.
        assert http.delete(f"/api/runs/{run['id']}").status_code == 204
        assert wait_status(http, resumed["id"], TERMINAL)["status"] == "completed"
    steps = sorted(metric_series(_frames(server, resumed["id"]), "loss/d"))
    assert steps == list(range(ckpt["step"] + 1, ckpt["step"] + 31))  # the same curve, carried on


def test_worker_outlives_a_killed_server_and_reattaches(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data", env={"GRADWATCH_REATTACH_GRACE_S": "60"}).start()
    try:
        run, worker = _launch_until_checkpoint(server)
        server.kill()
        time.sleep(1.0)  # the worker trains on and keeps its unacknowledged frames
        assert worker.is_running()
        # A live worker may be mid-write in its scratch folder: the restart must leave that alone,
        # while a half-received upload of the dead server is swept.
        run_dir = server.data_dir / "runs" / run["id"]
        writing = run_dir / "work" / "checkpoints" / ".tmp-being-written.pt"
        writing.write_bytes(b"the worker's checkpoint in progress")
        upload = run_dir / "checkpoints" / ".tmp-half-uploaded.pt"
        upload.write_bytes(b"half an upload")
        server.start()
        assert writing.exists() and not upload.exists()
        writing.unlink()
        with server.client() as http:
            before = http.get(f"/api/runs/{run['id']}").json()
            assert before["status"] == "running"
            wait_for(lambda: http.get(f"/api/runs/{run['id']}").json()["step"] > before["step"] + 20,
                     what="training to continue after the restart")
            assert http.post(f"/api/runs/{run['id']}/stop").status_code == 202
            detail = wait_status(http, run["id"], TERMINAL)
        assert detail["status"] == "stopped"
        frames = _frames(server, run["id"])
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        steps = sorted(metric_series(frames, "loss/d"))
        assert steps == list(range(1, detail["step"] + 1))  # nothing lost across the restart
        worker.wait(15)  # the worker exits once its last frames are acknowledged: no orphan
        _resume_completes(server, detail, detail["checkpoints"][-1])
    finally:
        server.stop()


def test_run_whose_worker_died_with_the_server_is_interrupted_and_resumable(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data").start()
    try:
        run, worker = _launch_until_checkpoint(server)
        server.kill()
        worker.kill()
        worker.wait(10)
        # What a writer killed mid-write leaves behind is swept at start.
        leftover = server.data_dir / "runs" / run["id"] / "checkpoints" / ".tmp-killed-mid-write.pt"
        leftover.write_bytes(b"half a checkpoint")
        server.start()
        assert not leftover.exists()
        with server.client() as http:
            detail = wait_status(http, run["id"], TERMINAL, timeout=20)
            assert detail["status"] == "interrupted" and detail["error"]
            history = http.get(f"/api/runs/{run['id']}/metrics", params={"keys": "loss/d", "max_points": 100_000})
            steps = history.json()["metrics"]["loss/d"]["step"]
            assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 50
        assert _frames(server, run["id"])[-1]["status"] == "interrupted"
        _resume_completes(server, detail, detail["checkpoints"][-1])
    finally:
        server.stop()


def _launch(server: LiveServer) -> dict[str, Any]:
    cfg = config(TINY_GAN, train__steps=1_000_000, intervals__checkpoint_every=50, intervals__sample_every=1_000_000)
    with server.client() as http:
        response = http.post("/api/runs", json=cfg)
        assert response.status_code == 201, response.text
        run: dict[str, Any] = response.json()
        wait_status(http, run["id"], {"running"})
    return run


def test_graceful_shutdown_leaves_no_worker_and_keeps_the_final_checkpoint(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data").start()
    try:
        run = _launch(server)
        worker = _worker_of(server, run["id"])
        with server.client() as http:
            wait_for(lambda: http.get(f"/api/runs/{run['id']}").json()["step"] > 30, what="training")
        server.stop()  # SIGTERM: workers are stopped (final checkpoint), then the server exits
        assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
        server.start()
        with server.client() as http:
            detail = http.get(f"/api/runs/{run['id']}").json()
        assert detail["status"] == "interrupted"
        # The checkpoint the worker wrote as it stopped was salvaged into the run's folder, and the run says so.
        final = detail["checkpoints"][-1]
        assert final["step"] >= 30
        assert detail["error"].endswith(f"its worker saved a final checkpoint; resume from {final['name']}")
        _resume_completes(server, detail, final)
    finally:
        server.stop()


def test_graceful_shutdown_kills_a_worker_that_will_not_stop_and_the_run_says_so(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data", env={"GRADWATCH_SHUTDOWN_GRACE_S": "3",
                                                "GRADWATCH_WORKER_MODULE": "tests.stubborn_worker"}).start()
    try:
        run, worker = _launch_until_checkpoint(server)
        server.stop()
        assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
        server.start()
        with server.client() as http:
            detail = http.get(f"/api/runs/{run['id']}").json()
        assert detail["status"] == "interrupted"
        newest = detail["checkpoints"][-1]["name"]  # a periodic one: the worker never wrote a final checkpoint
        assert detail["error"] == ("the server was shut down while this run was training; its worker was killed "
                                   f"after 3 s without writing its final checkpoint; resume from {newest}")
    finally:
        server.stop()


def test_runs_beyond_the_device_limit_wait_queued(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data", env={"GRADWATCH_CPU_RUN_LIMIT": "1"}).start()
    try:
        first = _launch(server)
        with server.client() as http:
            second = http.post("/api/runs", json=config(TINY_GAN, train__steps=20)).json()
            time.sleep(2.0)
            assert http.get(f"/api/runs/{second['id']}").json()["status"] == "queued"
            assert len(server.workers()) == 1
            http.post(f"/api/runs/{first['id']}/stop")
            assert wait_status(http, second["id"], TERMINAL)["status"] == "completed"
    finally:
        server.stop()


def _launch_until_checkpoint(server: LiveServer) -> tuple[dict[str, Any], psutil.Process]:
    run = _launch(server)
    worker = _worker_of(server, run["id"])
    with server.client() as http:
        wait_for(lambda: http.get(f"/api/runs/{run['id']}").json()["checkpoints"], what="a checkpoint")
    return run, worker
