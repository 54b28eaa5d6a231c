"""Freshness with the real thing (issue 15): telemetry leaves when the channel is idle, not on a period.

A real ``gradwatch serve``, real worker processes and real websocket clients. Speed is the benchmark's
business (bench/freshness.py); these check the behaviour: a worker sends its steps while it trains even
when ``flush_ms`` is far away, every step arrives once and in order, and the channel's notion of "nothing
in flight" is what the server acknowledged.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from gradwatch.channel import Channel, MemoryOutbox
from gradwatch.client import Run
from tests.live_server import TINY_GAN, LiveServer, config, read_frames, wait_for
from trainer.loop import GAN_KEYS

pytestmark = pytest.mark.xdist_group("live-server")


def _ended(frames: list[dict[str, Any]]) -> bool:
    return bool(frames) and frames[-1]["type"] == "status" and frames[-1]["status"] not in ("queued", "running")


def test_a_worker_streams_its_steps_while_it_trains_with_the_deadline_far_away(server: LiveServer) -> None:
    """flush_ms a minute and flush_steps beyond the run, no samples, checkpoints or evaluations before the end:
    a flush on a period, or on a count, would send the run's metrics in one piece at its end. The worker's
    channel is idle most of the time, so steps leave as they come (batched while a frame is in flight), every
    step once, in order. (How many frames go early depends on the machine: early flushes stop while the
    training thread waits for a CPU, and a busy test machine may make it wait. The first ones always go.)"""
    steps = 1500
    cfg = config(TINY_GAN, train__steps=steps, intervals__flush_ms=60_000, intervals__flush_steps=100_000,
                 intervals__sample_every=1_000_000, intervals__checkpoint_every=1_000_000,
                 intervals__eval_every=1_000_000, intervals__hist_every=1_000_000)
    with server.client() as http:
        run = http.post("/api/runs", json=cfg).json()
    with server.stream(run["id"]) as ws:
        frames = read_frames(ws, _ended)
    assert _ended(frames) and frames[-1]["status"] == "completed", frames[-3:]
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    per_step = [f for f in frames if f["type"] == "metrics" and GAN_KEYS[0] in f["data"]]
    assert [s for f in per_step for s in f["step"]] == list(range(1, steps + 1))
    # Sent while it trained, not in one piece at the end (the run's final flush): the first frame early on.
    assert len(per_step) >= 2 and per_step[0]["step"][-1] < steps // 2


def test_the_channel_is_idle_only_when_the_server_has_acknowledged_everything(server: LiveServer) -> None:
    """A script's channel to the real server: idle() never says so while a frame waits for its acknowledgement,
    and says so once the server has committed everything; the wake hook runs on the channel thread when the
    acknowledgement comes and when the time it asked for has come."""
    with server.client() as http:
        created = http.post("/api/client/runs", json={"name": "idle"}).json()
    run_id, token = created["run"]["id"], created["token"]
    url = server.url.replace("http://", "ws://", 1).rstrip("/") + created["channel"]
    wakes: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        channel = Channel(lambda: (url, token), MemoryOutbox(), Path(tmp), orphan_timeout_s=None)

        def on_wake() -> float:
            wakes.append((time.monotonic(), channel.acked))
            return 0.05  # call me again in 50 ms, traffic or not

        channel.on_wake = on_wake
        assert not channel.idle()  # not connected: frames could not go
        channel.start()
        try:
            wait_for(channel.idle, what="the channel connected with nothing in flight")
            before = len(wakes)
            wait_for(lambda: len(wakes) >= before + 3, what="wake-ups on the timer alone")
            for seq in range(1, 201):
                channel.send_frame({"type": "metrics", "run": run_id, "seq": seq, "step": [seq],
                                    "time": [time.time()], "data": {"x": [float(seq)]}})
                if channel.idle():
                    assert channel.acked >= seq  # idle means everything queued so far is acknowledged
            wait_for(channel.idle, what="every frame acknowledged")
            assert channel.acked == 200
            assert any(acked > 0 for _, acked in wakes)  # woken after acknowledgements came
        finally:
            assert channel.close(drain_timeout_s=30)
    with server.client() as http:
        stored = http.get(f"/api/runs/{run_id}/metrics", params={"keys": "x", "max_points": 1000}).json()
    assert stored["metrics"]["x"]["step"] == list(range(1, 201))


def test_a_scripts_steps_reach_the_server_while_its_thread_is_inside_a_long_step(server: LiveServer,
                                                                                   tmp_path: Path) -> None:
    """A script logs three steps, then spends a long time in its next one (here: this thread polls the server and
    never calls the client). The steps reach the server anyway, within flush_ms (2 s): the client's channel thread keeps
    the deadline, as a worker's does. Only the deadline sends them (a script's run has no idle flush), and the
    script's own thread, which checks it only inside ``log()``, cannot."""
    run = Run(name="long step", server=server.url, token=server.token, mode="online", out=tmp_path / "run",
              quiet=True, flush_ms=2000, flush_steps=10_000)
    try:
        for step in (1, 2, 3):  # the first due() counts the time since init as a step; the third sees short ones
            run.log({"x": float(step)}, step=step)
        assert math.isfinite(run.buffer.due_in())  # step 3 at least is still buffered; nothing here flushes it

        def stored() -> list[int]:
            with server.client() as http:
                body = http.get(f"/api/runs/{run.id}/metrics", params={"keys": "x"}).json()
            return list(body["metrics"].get("x", {}).get("step", []))

        wait_for(lambda: stored() == [1, 2, 3], timeout=30, what="the buffered steps, sent by the channel thread")
    finally:
        run.finish()
    assert stored() == [1, 2, 3]


def test_a_worker_leaves_a_trace_of_each_frames_way_when_asked(tmp_path: Path) -> None:
    """GRADWATCH_TRACE_FRAMES (what bench/freshness.py reads): one line per acknowledged frame, with the times
    at which it was queued, sent and acknowledged, in that order, and the span of its steps."""
    trace = tmp_path / "trace"
    srv = LiveServer(tmp_path / "data", env={"GRADWATCH_TRACE_FRAMES": str(trace)}).start()
    try:
        with srv.client() as http:
            run = http.post("/api/runs", json=config(TINY_GAN, train__steps=300)).json()
        with srv.stream(run["id"]) as ws:
            frames = read_frames(ws, _ended)
        assert _ended(frames)
        srv.wait_workers_gone(60)
    finally:
        srv.stop()
    records = [json.loads(line) for path in trace.glob(f"{run['id']}-*.jsonl") for line in path.open()]
    assert sorted(r["seq"] for r in records) == [f["seq"] for f in frames]
    for record in records:
        assert record["queued"] <= record["sent"] <= record["acked"]
        if record["type"] == "metrics":
            assert record["steps"] >= 1 and record["oldest"] <= record["newest"] <= record["queued"]
