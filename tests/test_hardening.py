"""Inputs that used to get a 500, an uncaught exception or a leaked secret (issue: hardening), each refused cleanly."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.manager import Active
from app.settings import Settings
from tests.live_server import ROOT, TINY_GAN, config

FORM = {"content-type": "application/x-www-form-urlencoded", "origin": "http://127.0.0.1:8000"}


@pytest.mark.parametrize("path", ["/ui/runs", "/ui/runs/abc/control"])
def test_a_form_with_too_many_fields_is_a_413_not_a_500(client: TestClient, path: str) -> None:
    body = "&".join(f"f{i}=1" for i in range(201))
    response = client.post(path, content=body, headers=FORM)
    assert response.status_code == 413 and "200 fields" in response.text


def test_an_oversized_streamed_form_is_a_413(client: TestClient) -> None:
    def body() -> object:  # 1 MiB in chunks: the server counts as it reads and stops at its 64 KiB limit
        for _ in range(1024):
            yield b"x" * 1024

    response = client.post("/ui/runs", content=body(), headers=FORM)
    assert response.status_code == 413


@pytest.mark.parametrize("payload", [
    pickle.dumps({"format": 1, "step": 1}) + b"garbage",
    b"\x00\x01random bytes, not a zip and not a pickle",
    b"",
], ids=["pickle-with-trailing-junk", "random-bytes", "empty"])
def test_resuming_from_a_file_that_is_not_a_checkpoint_is_a_422(client: TestClient, tmp_path: Path,
                                                                payload: bytes) -> None:
    from tests.test_client_api import create  # a script's run is the quickest run with a checkpoints folder

    run_id = create(client).json()["run"]["id"]
    folder = tmp_path / "runs" / run_id / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step_00000001.pt").write_bytes(payload)
    response = client.post("/api/runs", json={"resume_from": {"run": run_id, "checkpoint": "step_00000001.pt"}})
    assert response.status_code == 422
    assert "not a loadable checkpoint" in json.dumps(response.json()) or "not a gradwatch" in response.text


@pytest.mark.parametrize("seq", ["1e400", "1.5", "true", "-3", '"7"', "null"])
def test_a_frame_with_a_seq_that_is_not_a_positive_integer_closes_the_channel_cleanly(client: TestClient,
                                                                                    seq: str) -> None:
    from starlette.websockets import WebSocketDisconnect

    from tests.test_client_api import _channel, create

    created = create(client).json()
    with _channel(client, created) as ws:
        assert ws.receive_json()["type"] == "hello"
        ws.send_text('{"type": "frames", "frames": [{"type": "status", "seq": ' + seq + ', "status": "running"}]}')
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1002 and "seq" in closed.value.reason
    assert client.get(f"/api/runs/{created['run']['id']}").json()["last_seq"] == 0


def test_the_access_token_never_reaches_the_servers_log(tmp_path: Path) -> None:
    """uvicorn's access log (on stdout) prints request lines verbatim: ``/?token=…`` is how a browser logs in."""
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
           "--token", "generate", "--log-level", "info"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        while not any("?token=" in line for line in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        match = re.search(r"(http://\S+/)\?token=(\S+)", "".join(lines))
        assert match
        url, token = match.group(1), match.group(2)
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=url, timeout=30) as browser:
            while True:
                try:
                    login = browser.get("/", params={"token": token, "next": "x"}, follow_redirects=False)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert login.status_code == 303
            browser.get("/api/runs", params={"token": "wrong-guess-0123456789abcdef0123"})  # a guess: logged too
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    access = [line for line in out.splitlines() if '"GET /' in line]
    assert len(access) >= 2 and all("token=[hidden]" in line for line in access), out
    assert token not in out and "wrong-guess" not in out


def test_a_flush_larger_than_a_websocket_message_arrives_whole_and_an_undeliverable_frame_becomes_an_alert(
        tmp_path: Path) -> None:
    """Issue 12, item 1: one flush of 300,000 values (~6 MB of JSON) used to kill its own channel."""
    from tests.live_server import LiveServer, wait_status
    from tests.test_client_live import history, run_of, run_script

    server = LiveServer(tmp_path / "data").start()
    try:
        run_script(server, tmp_path, "3000", script=ROOT / "tests" / "scripts" / "client_flood.py")
        run = run_of(server, "flood")
        with server.client() as http:
            detail = wait_status(http, run["id"], {"completed", "failed", "interrupted", "stopped"})
            series = history(http, run["id"], ["flood/k000", "flood/k099", "after"])
        assert detail["status"] == "completed"
        assert sorted(series["flood/k000"]) == list(range(1, 3001)) == sorted(series["flood/k099"])
        assert series["flood/k099"][3000] == pytest.approx(3000.099)
        assert list(series["after"]) == [3001]  # what came after the undeliverable frame arrived too
        assert detail["last_alert"]["kind"] == "frame_too_large" and "config" in detail["last_alert"]["message"]
        assert "huge" not in detail["config"]
    finally:
        server.stop()


def test_a_long_flush_is_cut_into_frames_of_bounded_size() -> None:
    import torch

    from trainer.telemetry import MAX_FRAME_VALUES, MetricBuffer, StepRow, flush_to_frames

    buffer = MetricBuffer(flush_steps=10_000, flush_ms=10**9)
    keys = [f"k{i}" for i in range(30)]
    for step in range(1, 5001):
        row = StepRow()
        row.add(keys, torch.full((30,), float(step)))
        buffer.append(step, row)
    frames: list[dict[str, object]] = []
    flush_to_frames(buffer, lambda kind, **fields: frames.append({"type": kind, **fields}))
    assert len(frames) == 4  # 150,000 values in frames of at most 50,000
    assert all(len(f["step"]) * 30 <= MAX_FRAME_VALUES for f in frames)  # type: ignore[arg-type]
    assert [s for f in frames for s in f["step"]] == list(range(1, 5001))  # type: ignore[attr-defined]
    assert max(len(json.dumps(f)) for f in frames) < 1_500_000


def test_an_artifact_over_the_servers_cap_is_kept_locally_and_the_run_goes_on(tmp_path: Path) -> None:
    """Issue 12, item 2: such a checkpoint used to be re-uploaded forever, and the run wedged."""
    from tests.live_server import LiveServer, wait_status
    from tests.test_client_live import history, run_of, run_script

    server = LiveServer(tmp_path / "data", env={"GRADWATCH_MAX_ARTIFACT_BYTES": "4000"}).start()
    try:
        # client_gan.py saves G and D (~10 kB) at steps 10 and 20, and a sample grid (< 1 kB) with each.
        run_script(server, tmp_path, "--steps", "25", "--every", "10", "--name", "big-checkpoints",
                   "--ref", str(tmp_path / "ref.json"))
        run = run_of(server, "big-checkpoints")
        with server.client() as http:
            detail = wait_status(http, run["id"], {"completed", "failed", "interrupted", "stopped"}, timeout=60)
            events = http.get(f"/api/runs/{run['id']}/events").json()["frames"]
            series = history(http, run["id"], ["loss/g"])
        assert detail["status"] == "completed" and detail["checkpoints"] == []
        assert [s["name"] for s in detail["samples"]] == ["step_00000010.png", "step_00000020.png"]
        alerts = [f for f in events if f["type"] == "alert"]
        assert [a["kind"] for a in alerts] == ["artifact_too_large"] * 2
        assert "max_artifact_bytes" in alerts[0]["message"]
        assert sorted(series["loss/g"]) == list(range(1, 26))
        folder = tmp_path / json.loads((tmp_path / "ref.json").read_text())["folder"]
        assert (folder / "checkpoints" / "step_00000020.pt").stat().st_size > 4000  # kept where it was written
    finally:
        server.stop()


def test_a_worker_does_not_inherit_the_servers_access_token(tmp_path: Path) -> None:
    """Issue 12, item 11: code in a run could read the user's token from its environment and drive the API."""
    import psutil

    from tests.live_server import TINY_GAN, LiveServer, config, wait_for

    token = "Zq8xV3mN7bT1yLc5dFh9sGj4aQekq3ZpWr2Y"
    server = LiveServer(tmp_path / "data", env={"GRADWATCH_TOKEN": token}).start()
    server.token = token
    try:
        run = server.request("POST", "/api/runs", config(TINY_GAN, train__steps=100_000))
        workers = wait_for(server.workers, 60, what="the worker to start")
        environ = psutil.Process(workers[0].pid).environ()
        assert "GRADWATCH_TOKEN" not in environ and token not in "".join(environ.values())
        # Nor its own run token: /proc/<pid>/environ keeps what the process started with, whatever it pops later.
        assert "GRADWATCH_RUN_TOKEN" not in environ
        assert "PATH" in environ  # the rest of the environment is inherited as before
        server.request("POST", f"/api/runs/{run['id']}/stop")
    finally:
        server.stop()


def test_a_run_token_cannot_hold_open_files_with_unfinished_uploads(client: TestClient, tmp_path: Path) -> None:
    """Issue 12, item 11: 2,000 unfinished uploads took the server from 24 to 2,023 open files."""
    from starlette.websockets import WebSocketDisconnect

    from gradwatch.protocol import encode_chunk
    from tests.test_client_api import _channel, create

    created = create(client).json()
    folder = tmp_path / "runs" / created["run"]["id"] / "checkpoints"
    with _channel(client, created) as ws:
        assert ws.receive_json()["type"] == "hello"
        for i in range(5):  # first chunks of files never finished
            ws.send_bytes(encode_chunk("checkpoints", f"step_{i:08d}.pt", 0, 1000, b"x" * 10))
        # A frame after them: a server that let the uploads pile up would acknowledge it.
        ws.send_text('{"type": "frames", "frames": [{"type": "status", "seq": 1, "status": "running", "step": 0}]}')
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1002 and "unfinished uploads" in closed.value.reason
    assert not folder.exists() or not list(folder.iterdir())  # the temp files went with the connection
    with _channel(client, created) as ws:  # the run itself is fine: a new connection works
        assert ws.receive_json()["type"] == "hello"


# -- the queue (item 12) ------------------------------------------------------------------------------------------
def _queue_client(tmp_path: Path, **settings: Any) -> TestClient:
    """The app in process with its one CPU slot held, so every run submitted stays queued and no worker starts."""
    app = create_app(Settings(data_dir=tmp_path, cpu_run_limit=1, _env_file=None, **settings))  # type: ignore[call-arg]
    return TestClient(app, base_url="http://127.0.0.1:8000")


def _hold_the_slot(client: TestClient) -> None:
    manager = client.app.state.manager  # type: ignore[attr-defined]
    manager.active["slot-holder"] = Active("slot-holder", "cpu")


def test_a_submit_reads_no_more_of_the_store_with_a_long_queue(tmp_path: Path) -> None:
    with _queue_client(tmp_path) as client:
        _hold_the_slot(client)
        store = client.app.state.store  # type: ignore[attr-defined]
        reads = {"n": 0}
        get_run = store.get_run

        def counted(run_id: str) -> Any:
            reads["n"] += 1
            return get_run(run_id)

        store.get_run = counted
        body = {"base": config(TINY_GAN), "vary": {"train.seed": list(range(8)), "gan.g_loss": ["saturating",
                                                                                             "non_saturating"]}}

        def reads_per_sweep() -> int:
            before = reads["n"]
            response = client.post("/api/sweeps", json=body)
            assert response.status_code == 201, response.text
            return reads["n"] - before

        first = reads_per_sweep()
        for _ in range(10):  # 176 runs queued behind the next sweep
            reads_per_sweep()
        assert reads_per_sweep() == first  # the old queue read every queued run's row at each submit: 16 × 176 more


def test_a_full_queue_refuses_a_submit_or_a_whole_sweep_with_a_429_naming_the_limit(tmp_path: Path) -> None:
    with _queue_client(tmp_path, max_queued_runs=5) as client:
        _hold_the_slot(client)
        for _ in range(4):
            assert client.post("/api/runs", json=config(TINY_GAN)).status_code == 201
        sweep = {"base": config(TINY_GAN), "vary": {"gan.g_loss": ["saturating", "non_saturating"]}}
        response = client.post("/api/sweeps", json=sweep)
        assert response.status_code == 429 and "max_queued_runs" in response.json()["detail"]
        assert len(client.get("/api/runs").json()) == 4  # neither twin was created
        assert client.post("/api/runs", json=config(TINY_GAN)).status_code == 201
        response = client.post("/api/runs", json=config(TINY_GAN))
        assert response.status_code == 429 and "5" in response.json()["detail"]
        queued = [r for r in client.get("/api/runs").json() if r["status"] == "queued"]
        assert len(queued) == 5
        assert client.post(f"/api/runs/{queued[0]['id']}/stop").status_code == 202  # a stop makes room
        assert client.post("/api/runs", json=config(TINY_GAN)).status_code == 201


# -- a worker from before a restart (item 5) ----------------------------------------------------------------------
def test_a_worker_launched_just_before_a_crash_does_not_train_on_beside_its_relaunch(tmp_path: Path) -> None:
    """Kill the server while a new worker is still starting: on restart its queued run is launched again, and the old
    worker must not go on training (at full CPU, in the same folder) with a token the server no longer knows."""
    import psutil

    from tests.live_server import LiveServer, wait_for, wait_status

    server = LiveServer(tmp_path / "data").start()
    try:
        run = server.request("POST", "/api/runs", config(TINY_GAN, train__steps=1_000_000))
        old = wait_for(server.workers, 30, 0.01, what="the worker to start")[0]
        server.kill()  # the worker is still importing torch: its run is queued, with this worker's pid
        server.start()
        with server.client() as http:
            wait_status(http, run["id"], {"running"})
            wait_for(lambda: not old.is_running() or old.status() == psutil.STATUS_ZOMBIE, 30,
                     what="the pre-restart worker to end")
            workers = [p for p in server.workers() if run["id"] in " ".join(p.cmdline())]
            assert len(workers) == 1 and workers[0].pid != old.pid
            assert http.post(f"/api/runs/{run['id']}/stop").status_code == 202
            assert wait_status(http, run["id"], {"stopped", "failed", "interrupted"})["status"] == "stopped"
        assert server.wait_workers_gone(60)
    finally:
        server.stop()


# -- deleting a run whose sender is still connected ---------------------------------------------------------------
def test_a_deleted_run_is_not_brought_back_by_its_senders_late_uploads(client: TestClient, tmp_path: Path) -> None:
    """A run that reported its end can be deleted while its sender still uploads what it had: nothing may come
    back, neither files in a recreated folder nor rows for a run that no longer exists."""
    from starlette.websockets import WebSocketDisconnect

    from gradwatch.protocol import encode_chunk
    from tests.test_client_api import _channel, _frames, create

    created = create(client).json()
    run_id = created["run"]["id"]
    with _channel(client, created) as ws:
        assert ws.receive_json()["type"] == "hello"
        ws.send_text(_frames({"type": "status", "seq": 1, "status": "completed", "error": None, "step": 0}))
        assert ws.receive_json() == {"type": "ack", "seq": 1}
        assert client.delete(f"/api/runs/{run_id}").status_code == 204
        with pytest.raises(WebSocketDisconnect) as closed:  # the server lets go of the connection at once
            for step in range(1, 4):
                name = f"step_{step:08d}.pt"
                ws.send_bytes(encode_chunk("checkpoints", name, 0, 4, b"late"))
                ws.send_text(_frames({"type": "checkpoint", "seq": step + 1, "step": step, "name": name}))
            # A resend of seq 1, which a server still serving the connection acknowledges at once.
            ws.send_text(_frames({"type": "status", "seq": 1, "status": "completed", "error": None, "step": 0}))
            ws.receive_json()
    assert closed.value.code == 1008 and "deleted" in closed.value.reason
    assert not (tmp_path / "runs" / run_id).exists()
    assert client.get(f"/api/runs/{run_id}").status_code == 404
    store = client.app.state.store  # type: ignore[attr-defined]
    assert store.wait_flushed() and store.frames_after(run_id, 0) == []
    with pytest.raises(WebSocketDisconnect) as refused, _channel(client, created):  # and its token is dead
        pass
    assert refused.value.code == 1008


def test_a_launched_runs_samples_are_pruned_on_the_server_too(tmp_path: Path) -> None:
    """Item 7: uploads land in the run's folder, where the worker's own pruning does not reach."""
    from tests.live_server import TINY_VAE, LiveServer, wait_status

    server = LiveServer(tmp_path / "data").start()
    try:
        body = config(TINY_VAE, train__steps=40, intervals__sample_every=1, intervals__keep_samples=3,
                      intervals__eval_every=1000, intervals__checkpoint_every=1000)
        run = server.request("POST", "/api/runs", body)
        with server.client() as http:
            assert wait_status(http, run["id"], {"completed", "failed"})["status"] == "completed"
            names = [a["name"] for a in http.get(f"/api/runs/{run['id']}/samples").json()]
        steps = sorted({int(name.split("_")[1].split(".")[0]) for name in names})
        assert steps == [1, 38, 39, 40]
    finally:
        server.stop()


def test_a_queued_run_stored_under_looser_rules_fails_with_its_reasons_at_restart(tmp_path: Path) -> None:
    """Configs once accepted (keep_checkpoints up to 1000) may be refused today: the server must still start."""
    from app.store import RunRecord, Store

    store = Store(tmp_path / "gradwatch.db")
    store.start()
    stale = config(TINY_GAN, intervals__keep_checkpoints=500)
    store.insert_run(RunRecord(id="stale0000000", name="old", kind="gan", status="queued", config=stale,
                               created_at=time.time()))
    store.close()
    with _queue_client(tmp_path) as client:
        run = client.get("/api/runs/stale0000000").json()
    assert run["status"] == "failed"
    assert "config no longer accepted" in run["error"] and "intervals.keep_checkpoints" in run["error"]


# -- a full disk (item 8) -----------------------------------------------------------------------------------------
def test_frames_the_store_could_not_write_are_resent_not_lost(client: TestClient) -> None:
    """The store drops frames it cannot write; the sender must not be told they are stored (a later ack covering
    them left a permanent gap): the server closes the connection and the sender resends from the first lost one.
    SQLite's own "database or disk is full" (max_page_count) stands in for a full disk."""
    from starlette.websockets import WebSocketDisconnect

    from tests.test_client_api import _channel, _frames, create

    created = create(client).json()
    run_id = created["run"]["id"]
    store = client.app.state.store  # type: ignore[attr-defined]
    big = "x" * 50_000

    def alerts(first: int, last: int) -> str:
        return _frames(*({"type": "alert", "seq": seq, "step": seq, "kind": "note", "message": big}
                         for seq in range(first, last + 1)))

    with _channel(client, created) as ws:
        assert ws.receive_json()["ack"] == 0
        ws.send_text(alerts(1, 2))
        assert ws.receive_json() == {"type": "ack", "seq": 2}
        pages = store._write_conn.execute("PRAGMA page_count").fetchone()[0]
        store._write_conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
        ws.send_text(alerts(3, 4))
        ws.send_text(alerts(2, 2))  # a resend, answered at once with what is stored
        with pytest.raises(WebSocketDisconnect) as closed:
            while True:
                assert ws.receive_json() == {"type": "ack", "seq": 2}  # never 4: 3-4 were not stored
    assert closed.value.code == 1011 and "seq 3" in closed.value.reason
    store._write_conn.execute("PRAGMA max_page_count = 1000000")  # room again
    with _channel(client, created) as ws:
        assert ws.receive_json()["ack"] == 2  # not 6: 3-6 are not stored, so they are asked for again
        ws.send_text(alerts(3, 6))
        assert ws.receive_json() == {"type": "ack", "seq": 6}
    frames = client.get(f"/api/runs/{run_id}/events").json()["frames"]
    assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5, 6]


def test_an_upload_the_disk_refuses_closes_the_channel_cleanly_and_leaves_no_partial_file(
        client: TestClient, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk used to raise out of the upload path (675 tracebacks) and leave partial temp files. A file-size
    limit on this process (the server is in process here) makes the disk refuse the write."""
    import resource

    from starlette.websockets import WebSocketDisconnect

    from gradwatch.protocol import encode_chunk
    from tests.test_client_api import _channel, create

    created = create(client).json()
    folder = tmp_path / "runs" / created["run"]["id"] / "checkpoints"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        for _ in range(2):  # a sender retries: the server says so once
            with _channel(client, created) as ws:
                assert ws.receive_json()["type"] == "hello"
                ws.send_bytes(encode_chunk("checkpoints", "step_00000001.pt", 0, 3 << 20, b"w" * (2 << 20)))
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
            assert closed.value.code == 1011 and "server cannot write: File too large" in closed.value.reason
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not folder.exists() or list(folder.iterdir()) == []  # no partial file left
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "could not write" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is None


def test_a_run_whose_checkpoint_the_disk_refuses_fails_saying_so(tmp_path: Path) -> None:
    """The worker's message was torch's "PytorchStreamWriter failed writing file data/0". A real headless run in a
    subprocess under a file-size limit that its checkpoint (not its small files) is over."""
    body = config(TINY_GAN, train__steps=30, intervals__checkpoint_every=10, intervals__sample_every=1000,
                  model__width=256)
    (tmp_path / "cfg.json").write_text(json.dumps(body))
    limit = 256 << 10  # the checkpoint of a width-256 MLP with Adam's state is over 1 MiB; events stay far below
    out = tmp_path / "out"
    proc = subprocess.run(
        ["prlimit", f"--fsize={limit}", sys.executable, "-m", "app.cli", "train", str(tmp_path / "cfg.json"),
         "--out", str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    status = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()][-1]
    assert status["type"] == "status" and status["status"] == "failed", status
    assert status["error"].startswith("cannot write step_00000010.pt in ") and "file-size limit" in status["error"]
    assert "Traceback" not in proc.stderr and proc.returncode == 1
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


# -- the worker's outbox when acknowledgements stop -----------------------------------------------------------------
def test_a_workers_outbox_is_bounded_when_the_server_stops_acknowledging(tmp_path: Path) -> None:
    """A real websocket server that says hello and then acknowledges nothing (a store that cannot write, say):
    the channel's memory outbox must not grow without end; past its bound the run is told to stop, once."""
    import threading

    from websockets.sync.server import ServerConnection, serve

    from gradwatch.channel import Channel, MemoryOutbox

    received = threading.Event()

    def handler(ws: ServerConnection) -> None:
        ws.send(json.dumps({"type": "hello", "ack": 0}))
        for _ in ws:  # read everything, acknowledge nothing
            received.set()

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"ws://127.0.0.1:{server.socket.getsockname()[1]}/ws/worker/r"
        outbox = MemoryOutbox()
        channel = Channel(lambda: (url, "t" * 43), outbox, tmp_path, max_backlog_bytes=64 << 10)
        full: list[int] = []
        channel.on_backlog_full = full.append
        channel.start()
        text = "x" * 1000
        for seq in range(1, 201):  # about 200 kB: three times the bound
            channel.send_frame({"type": "alert", "run": "r", "seq": seq, "step": seq, "kind": "note", "message": text})
        assert received.wait(10)
        assert len(full) == 1 and 64 << 10 < full[0] < (64 << 10) + 2000  # told once, as soon as it was over
        assert channel.pending() == 200  # nothing was dropped: the bound stops the run, it loses no frame
        channel.close(drain_timeout_s=0.1)
        server.shutdown()


def test_a_run_stopped_for_a_reason_ends_failed_with_it(tmp_path: Path) -> None:
    from trainer.config import RunConfig
    from trainer.loop import RunOptions, make_trainer

    frames: list[dict[str, Any]] = []

    def sink(frame: dict[str, Any]) -> None:  # told once training runs, as a channel would be
        frames.append(frame)
        if frame["type"] == "metrics":
            trainer.request_stop(error="backlog: 300 MiB of frames were never acknowledged")

    cfg = RunConfig.model_validate(config(TINY_GAN, train__steps=5000))
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=sink))
    assert trainer.run() == "failed"
    status = frames[-1]
    assert status["type"] == "status" and status["status"] == "failed" and status["error"].startswith("backlog: ")
    assert list((tmp_path / "checkpoints").glob("step_*.pt"))  # stopped like a stop: its checkpoint is kept


def test_the_launch_form_says_why_when_the_queue_is_full(tmp_path: Path) -> None:
    """A 429 from the form is swapped into the page by htmx: it must be the form saying why, not raw JSON."""
    with _queue_client(tmp_path, max_queued_runs=1) as client:
        _hold_the_slot(client)
        form = "kind=gan&data.name=ring8&train.steps=100&train.device=cpu"
        assert client.post("/ui/runs", content=form, headers=FORM).status_code == 201
        for body in (form, form + "&twin=1"):
            response = client.post("/ui/runs", content=body, headers=FORM)
            assert response.status_code == 429 and response.headers["content-type"].startswith("text/html")
            assert 'id="launch-form"' in response.text and "Nothing was launched: queue: 1 run is waiting" \
                in response.text and "max_queued_runs" in response.text
        assert len(client.get("/api/runs").json()) == 1
