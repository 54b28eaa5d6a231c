"""The server for real: uvicorn in a subprocess, real worker processes on the CPU, real websockets.

These tests show what only the whole system can: frames crossing two
process boundaries in order, workers dying and servers restarting, a slow
client beside a healthy one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from bench.server import thread_nice
from tests.live_server import (
    TINY_GAN,
    TINY_VAE,
    LiveServer,
    config,
    metric_series,
    read_frames,
    wait_for,
    wait_status,
)
from trainer.config import RunConfig
from trainer.loop import GAN_KEYS, VAE_KEYS
from trainer.models import build_gan
from trainer.presets import get_preset

pytestmark = pytest.mark.xdist_group("live-server")

TERMINAL = {"completed", "stopped", "failed", "interrupted"}



def launch(server: LiveServer, cfg: dict[str, Any]) -> dict[str, Any]:
    with server.client() as http:
        response = http.post("/api/runs", json=cfg)
    assert response.status_code == 201, response.text
    run: dict[str, Any] = response.json()
    return run


def ended(frames: list[dict[str, Any]]) -> bool:
    return bool(frames) and frames[-1]["type"] == "status" and frames[-1]["status"] in TERMINAL


def test_launch_streams_every_key_in_gapless_order(server: LiveServer) -> None:
    gan = launch(server, config(TINY_GAN, name="gan <b>one</b>"))
    vae = launch(server, TINY_VAE)
    assert gan["status"] in ("queued", "running") and gan["config"]["name"] == "gan <b>one</b>"
    for run, keys in ((gan, GAN_KEYS), (vae, VAE_KEYS)):
        started = time.time()
        with server.stream(run["id"]) as ws:
            frames = read_frames(ws, ended)
        assert ended(frames) and frames[-1]["status"] == "completed", frames[-3:]
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        assert all(f["run"] == run["id"] for f in frames)
        per_step = [f for f in frames if f["type"] == "metrics" and keys[0] in f["data"]]
        steps = [s for f in per_step for s in f["step"]]
        assert steps == list(range(1, run["config"]["train"]["steps"] + 1))
        for frame in per_step:
            assert set(keys) <= set(frame["data"])
            assert len(frame["time"]) == len(frame["step"])
            assert all(started - 60 < t < time.time() + 1 for t in frame["time"])  # the worker's clock, per step
        kinds = {f["type"] for f in frames}
        assert {"status", "metrics", "sample", "checkpoint"} <= kinds
        with server.client() as http:
            detail = http.get(f"/api/runs/{run['id']}").json()
            assert detail["status"] == "completed" and detail["step"] == run["config"]["train"]["steps"]
            sample = next(f for f in frames if f["type"] == "sample" and f["name"].endswith(".png"))
            png = http.get(sample["url"])
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
            assert {a["name"] for a in detail["checkpoints"]} >= {f["name"] for f in frames[-5:]
                                                                  if f["type"] == "checkpoint"}
            history = http.get(f"/api/runs/{run['id']}/metrics", params={"keys": keys[0], "max_points": 10}).json()
            assert 2 <= len(history["metrics"][keys[0]]["step"]) <= 10
            zoom = http.get(f"/api/runs/{run['id']}/metrics",
                            params={"keys": keys[0], "max_points": 10, "start": 3, "end": 7}).json()
            assert zoom["start"] == 3 and zoom["end"] == 7
            assert zoom["metrics"][keys[0]]["step"] == [3, 4, 5, 6, 7]  # a zoom: every step of the range
            csv = http.get(f"/api/runs/{run['id']}/metrics.csv").text.splitlines()
            assert csv[0].startswith("step,time,") and len(csv) >= run["config"]["train"]["steps"] + 1
            # A reloaded page gets the same non-metric frames the stream carried, newest hist per key only.
            assert any(f["type"] == "dldh" for f in frames) == (run is gan)
            url, last = f"/api/runs/{run['id']}", frames[-1]["seq"]
            wait_for(lambda: http.get(url).json()["last_seq"] == last, what="the final frame committed")  # noqa: B023
            latest = {(f["type"], f.get("key")): f for f in frames if f["type"] in ("hist", "dldh")}
            restored = sorted([f for f in frames if f["type"] in ("status", "alert", "control", "sample",
                                                                  "checkpoint")] + list(latest.values()),
                              key=lambda f: f["seq"])
            assert http.get(f"/api/runs/{run['id']}/events").json()["frames"] == restored
    # Nothing a worker wrote stays behind in its scratch folder once uploaded and acknowledged.
    work = server.data_dir / "runs" / gan["id"] / "work" / "samples"
    assert not any(work.glob("*.png"))


def test_reconnect_with_since_gets_exactly_the_missed_frames(server: LiveServer) -> None:
    run = launch(server, config(TINY_GAN, train__steps=600))
    with server.stream(run["id"]) as ws:
        first = read_frames(ws, lambda fs: len(fs) >= 5)
    cut = first[-1]["seq"]
    time.sleep(0.5)  # frames flow while nobody listens
    with server.stream(run["id"], since=cut) as ws:
        rest = read_frames(ws, ended)
    assert rest[0]["seq"] == cut + 1
    assert [f["seq"] for f in rest] == list(range(cut + 1, cut + 1 + len(rest)))
    assert ended(rest)
    with server.stream(run["id"], since=0) as ws:
        everything = read_frames(ws, ended)
    assert everything == first + rest


def test_stop_writes_a_final_checkpoint_that_loads_weights_only(server: LiveServer, tmp_path: Path) -> None:
    run = launch(server, config(TINY_GAN, train__steps=1_000_000, intervals__checkpoint_every=1_000_000))
    with server.client() as http:
        wait_for(lambda: http.get(f"/api/runs/{run['id']}").json()["step"] >= 30, what="30 steps")
        # The runs table's speed column: measured while it trains, gone once it has ended.
        listed = wait_for(lambda: next(r for r in http.get("/api/runs").json() if r["id"] == run["id"])
                          ["steps_per_s"], what="a steps/s rate")
        assert listed > 0
        assert http.post(f"/api/runs/{run['id']}/stop").status_code == 202
        detail = wait_status(http, run["id"], TERMINAL)
        assert detail["status"] == "stopped" and detail["steps_per_s"] is None
        (ckpt,) = detail["checkpoints"]
        assert ckpt["step"] == detail["step"] > 0
        blob = http.get(ckpt["url"])
        assert blob.status_code == 200
        assert http.post(f"/api/runs/{run['id']}/stop").status_code == 409
    path = tmp_path / ckpt["name"]
    path.write_bytes(blob.content)
    state = torch.load(path, weights_only=True)
    cfg = RunConfig.model_validate(state["config"])
    g, d = build_gan(cfg.model, (2,))
    g.load_state_dict(state["models"]["generator"])
    d.load_state_dict(state["models"]["discriminator"])


def test_twin_sweep_collapse_alert_and_live_flip(server: LiveServer) -> None:
    base = get_preset("ring8-saturating").with_overrides({
        "train.steps": 100_000, "train.device": "cpu", "intervals.sample_every": 100_000,
        "intervals.eval_every": 100_000, "intervals.checkpoint_every": 100_000, "intervals.flush_ms": 50,
    }).model_dump(mode="json")
    with server.client() as http:
        response = http.post("/api/sweeps", json={"base": base, "vary": {"gan.g_loss": ["saturating",
                                                                                        "non_saturating"]}})
        assert response.status_code == 201, response.text
        sweep = response.json()
        sat, non_sat = sweep["runs"]
        assert sat["config"]["gan"]["g_loss"] == "saturating" and non_sat["config"]["gan"]["g_loss"] == "non_saturating"
        assert sat["config"]["train"]["seed"] == non_sat["config"]["train"]["seed"]

        with server.stream(sat["id"]) as ws:
            frames = read_frames(ws, lambda fs: any(f["type"] == "alert" for f in fs))
        alert = next(f for f in frames if f["type"] == "alert")
        assert alert["kind"] == "gradient_collapse"
        collapsed = metric_series(frames, "grad/g_norm")
        low = [v for s, v in collapsed.items() if s > alert["step"] - 5 and v is not None]
        # The twin keeps its gradient over the same steps.
        with server.stream(non_sat["id"]) as ws:
            twin = read_frames(ws, lambda fs: max(metric_series(fs, "grad/g_norm") or {0: 0}) >= alert["step"])
        alive = [v for s, v in metric_series(twin, "grad/g_norm").items() if s > alert["step"] - 5]
        assert max(low) < 1e-2 * min(alive)
        assert not [f for f in twin if f["type"] == "alert" and f["kind"] == "gradient_collapse"]

        # Flip the collapsed run to the non-saturating loss: its applied gradient comes back.
        bad = http.post(f"/api/runs/{sat['id']}/control", json={"lr_g": -1})
        assert bad.status_code == 422 and "lr_g" in json.dumps(bad.json()["detail"])
        flip = http.post(f"/api/runs/{sat['id']}/control", json={"g_loss": "non_saturating"})
        assert flip.status_code == 200, flip.text
        last_seen = frames[-1]["seq"]
        with server.stream(sat["id"], since=last_seen) as ws:
            after = read_frames(ws, lambda fs: len(_after_control(fs)) >= 40)
        recovered = _after_control(after)
        assert recovered, "no steps after the control frame"
        # The median: the flip's step depends on timing, and once G moves a batch may land where D says
        # "real", which shrinks 1 - D(G(z)) and that step's norm (seen once in the browser twin of this test).
        assert statistics.median(recovered) > 100 * max(low)
        for run in (sat, non_sat):
            http.post(f"/api/runs/{run['id']}/stop")
        for run in (sat, non_sat):
            wait_status(http, run["id"], TERMINAL)


def _after_control(frames: list[dict[str, Any]]) -> list[float]:
    """The applied generator gradient norms logged after the live change took effect."""
    control = next((f for f in frames if f["type"] == "control"), None)
    if control is None:
        return []
    return [v for s, v in metric_series(frames, "grad/g_norm").items() if s > control["step"] and v is not None]


def test_kill_9_of_a_worker_fails_its_run_and_spares_the_rest(server: LiveServer) -> None:
    victim = launch(server, config(TINY_GAN, train__steps=1_000_000))
    bystander = launch(server, config(TINY_GAN, train__steps=400))
    with server.client() as http:
        wait_status(http, victim["id"], {"running"})
        wait_for(lambda: http.get(f"/api/runs/{victim['id']}").json()["step"] > 10, what="victim training")
        (proc,) = [p for p in server.workers() if victim["id"] in " ".join(p.cmdline())]
        proc.kill()
        killed_at = time.monotonic()
        detail = wait_status(http, victim["id"], TERMINAL, timeout=20)
        assert time.monotonic() - killed_at < 10
        assert detail["status"] == "failed" and "SIGKILL" in detail["error"]
        assert wait_status(http, bystander["id"], TERMINAL)["status"] == "completed"
        assert http.get("/api/presets").status_code == 200
    with server.stream(victim["id"]) as ws:
        frames = read_frames(ws, ended)
    assert frames[-1]["status"] == "failed" and [f["seq"] for f in frames] == list(range(1, len(frames) + 1))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads thread priorities from Linux's /proc")
def test_workers_share_the_servers_session_and_train_below_its_priority(server: LiveServer) -> None:
    run = launch(server, config(TINY_GAN, train__steps=1_000_000))
    try:
        with server.client() as http:
            wait_for(lambda: http.get(f"/api/runs/{run['id']}").json()["step"] > 10, what="the run training")
        (worker,) = [p for p in server.workers() if run["id"] in " ".join(p.cmdline())]
        assert server.proc is not None
        # Its own process group: a Ctrl-C at the server's terminal is the server's to handle, not the worker's.
        assert os.getpgid(worker.pid) == worker.pid != os.getpgid(server.proc.pid)
        # The same session, hence the same Linux autogroup: workers cannot crowd the server out of the CPU.
        assert os.getsid(worker.pid) == os.getsid(server.proc.pid)
        # Niceness adds up: relative to this test's own, which the server and its workers inherit.
        base = os.getpriority(os.PRIO_PROCESS, 0)
        nice = thread_nice(worker.pid)
        assert nice[worker.pid] == min(base + 10, 19)  # the training thread, at the default GRADWATCH_WORKER_NICE
        assert base in nice.values()  # the channel thread, started before, streams at the server's priority
        assert os.getpriority(os.PRIO_PROCESS, server.proc.pid) == base
    finally:
        with server.client() as http:
            http.post(f"/api/runs/{run['id']}/stop")
            wait_status(http, run["id"], TERMINAL)


def test_bad_requests_get_4xx_naming_the_field(server: LiveServer) -> None:
    with server.client() as http:
        response = http.post("/api/runs", json={"gan": {"lr_g": -0.5}})
        assert response.status_code == 422
        assert ["body", "gan", "lr_g"] in [e["loc"] for e in response.json()["detail"]]
        response = http.post("/api/runs", content=b'{"train": {"steps": NaN}}',
                             headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and "steps" in response.text
        response = http.post("/api/runs", json={"trian": {}})
        assert response.status_code == 422 and "trian" in response.text
        response = http.post("/api/runs", json={"train": {"device": "cuda"}})
        if not torch.cuda.is_available():
            assert response.status_code == 422 and "train.device" in response.text
        response = http.post("/api/sweeps", json={"base": TINY_GAN, "vary": {"gan.no_such": [1]}})
        assert response.status_code == 422 and "gan.no_such" in response.text
        response = http.post("/api/sweeps", json={"base": TINY_GAN, "vary": {"gan.lr_g": [1e-3, -1.0]}})
        assert response.status_code == 422 and "lr_g" in response.text
        response = http.post("/api/runs", json={**TINY_GAN, "resume_from": {"run": "abc123", "checkpoint": "x.pt"}})
        assert response.status_code == 422 and "resume_from" in response.text
        assert http.get("/api/runs/nope").status_code == 404
        assert http.get("/api/runs/nope/metrics").status_code == 404
        assert http.post("/api/runs/nope/stop").status_code == 404
        assert http.delete("/api/runs/nope").status_code == 404
        some = launch(server, config(TINY_GAN, train__steps=5))["id"]
        wait_status(http, some, TERMINAL)
        for name in ("..%2Fgradwatch.db", "%2E%2E", ".hidden", "a%00b.png"):
            assert http.get(f"/api/runs/{some}/checkpoints/{name}").status_code == 404
        assert http.get(f"/api/runs/{some}/config.json").status_code == 404
        # Nothing we served held a NaN: every body parsed as strict JSON.
        body = http.get(f"/api/runs/{some}/metrics").text
        json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
        for params, field in (({"start": 9, "end": 3}, "end"), ({"start": -1}, "start"), ({"end": "x"}, "end")):
            response = http.get(f"/api/runs/{some}/metrics", params=params)
            assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", field], params
    with server.stream("nope") as ws:
        with pytest.raises(Exception) as info:
            ws.recv(timeout=10)
        assert "4404" in str(info.value)


def _never_reading_client(ws_url: str, path: str) -> socket.socket:
    """A websocket client that completes the handshake and then never reads a byte."""
    host, port = ws_url.removeprefix("ws://").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    return sock


def test_a_client_that_never_reads_slows_nothing(server: LiveServer) -> None:
    cfg = config(TINY_GAN, train__steps=4000, intervals__flush_steps=1, intervals__hist_every=2)
    assert server.proc is not None
    rss_before = psutil.Process(server.proc.pid).memory_info().rss
    run = launch(server, cfg)
    stuck = _never_reading_client(server.ws_url, f"/ws/runs/{run['id']}?since=0")
    try:
        lags: list[float] = []
        with server.stream(run["id"]) as ws:
            frames: list[dict[str, Any]] = []
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                frame = json.loads(ws.recv(timeout=60))
                if frame["type"] == "metrics":
                    lags.append(time.time() - frame["time"][-1])
                frames.append(frame)
                if ended(frames):
                    break
        assert ended(frames) and frames[-1]["status"] == "completed"
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        lags.sort()
        assert lags[len(lags) // 2] < 0.5, f"median step→client latency {lags[len(lags) // 2]:.3f} s"
        assert psutil.Process(server.proc.pid).memory_info().rss - rss_before < 150 << 20
        # The server gave up on the stuck client (send deadline) and closed its connection: reading what
        # the kernel buffered ends in EOF or a reset, well short of the whole stream. (Its close frame,
        # reason "client too slow: reconnect with ?since=N", can only reach a client that reads again.)
        stuck.settimeout(30)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := stuck.recv(1 << 20):
                received += len(chunk)
        assert received < 0.9 * sum(len(json.dumps(f)) for f in frames), "the stuck client got everything"
    finally:
        stuck.close()


def test_a_run_that_cannot_start_fails_with_a_reason(server: LiveServer, tmp_path: Path) -> None:
    empty = tmp_path / "no-idx-files-here"
    empty.mkdir()
    cfg = config(TINY_GAN, data={"name": "mnist_idx", "path": str(empty)})
    run = launch(server, cfg)
    with server.client() as http:
        detail = wait_status(http, run["id"], TERMINAL)
        assert detail["status"] == "failed" and detail["error"].startswith("DataError: data.path")
        # Once the worker has exited, the run's error carries its traceback too.
        error = wait_for(lambda: "Traceback" in (e := http.get(f"/api/runs/{run['id']}").json()["error"]) and e,
                         timeout=20, what="the worker's log tail in the error")
    assert "last lines of the worker's log" in error


def test_delete_removes_a_finished_run_and_refuses_a_live_one(server: LiveServer) -> None:
    live = launch(server, config(TINY_GAN, train__steps=1_000_000))
    done = launch(server, config(TINY_GAN, train__steps=10))
    with server.client() as http:
        wait_status(http, done["id"], TERMINAL)
        assert http.delete(f"/api/runs/{live['id']}").status_code == 409
        assert http.delete(f"/api/runs/{done['id']}").status_code == 204
        assert http.get(f"/api/runs/{done['id']}").status_code == 404
        assert http.get(f"/api/runs/{done['id']}/metrics.csv").status_code == 404
        assert not (server.data_dir / "runs" / done["id"]).exists()
        assert done["id"] not in {r["id"] for r in http.get("/api/runs").json()}
        http.post(f"/api/runs/{live['id']}/stop")
        wait_status(http, live["id"], TERMINAL)
        assert http.delete(f"/api/runs/{live['id']}").status_code == 204


def test_a_diverging_run_alerts_then_fails(server: LiveServer) -> None:
    # Plain SGD at learning rate 1 with heavy momentum: the losses leave the floats within a few steps.
    cfg = config(TINY_GAN, gan={"lr_g": 1.0, "lr_d": 1.0, "g_optimizer": "sgd", "d_optimizer": "sgd",
                                "momentum": 0.99})
    run = launch(server, cfg)
    with server.stream(run["id"]) as ws:
        frames = read_frames(ws, ended)
    alerts = [f for f in frames if f["type"] == "alert"]
    assert alerts and alerts[0]["kind"] == "diverged"
    assert frames[-1]["status"] == "failed" and "diverged" in frames[-1]["error"]
    assert any(None in values for f in frames if f["type"] == "metrics" for values in f["data"].values())
    with server.client() as http:
        detail = http.get(f"/api/runs/{run['id']}").json()
    assert detail["status"] == "failed" and detail["last_alert"]["kind"] == "diverged"
