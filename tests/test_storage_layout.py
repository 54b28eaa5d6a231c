"""Schema 3 of the store (issue 15, item 4): an ended run's metrics are on disk once, and nobody can tell.

Once a run has ended its ``metrics`` frames are dropped from the frames table (the metric store holds them), and
backfill rebuilds them from the metric store: every test here compares bytes a client receives, before and after
the drop. Real SQLite files, a real app, a real server; no mocks.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import metricstore as ms
from app import store as store_module
from app.main import create_app
from app.settings import Settings
from app.store import COMPACT_AFTER, RunRecord, Store
from tests.live_server import TINY_GAN, LiveServer, config, wait_for
from tests.test_store import raw_count as count
from trainer.telemetry import frame_to_json

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_764_000_000.0
Frame = tuple[dict[str, Any], str]
OTHER_TYPES = ("status", "alert", "sample", "checkpoint", "control", "hist", "dldh")


def wire(run: str, seq: int, kind: str, **fields: Any) -> Frame:
    """A frame as the server stores it: the worker's field order, frame_to_json's text."""
    body = {"type": kind, "run": run, "seq": seq, **fields}
    return body, frame_to_json(body)


def metrics(run: str, seq: int, steps: list[int], data: dict[str, list[float | None]]) -> Frame:
    return wire(run, seq, "metrics", step=steps, time=[round(T0 + s / 100, 6) for s in steps], data=data)


def metrics_frames(path: Path, run: str) -> int:
    return count(path, "SELECT COUNT(*) FROM frames WHERE run_id = ? AND type = 'metrics'", run)


def every_view(store: Store, run: str) -> dict[str, Any]:
    """What a client can read of a run: backfill from every seq (whole, capped by count, capped by bytes), the
    chart history at two resolutions, a zoomed range, and the CSV."""
    last = store.last_seq(run)
    return {
        "all": store.frames_after(run, 0, limit=1_000_000),
        "from": [store.frames_after(run, since, limit=7) for since in range(last + 1)],
        "bytes": [store.frames_after(run, since, limit=500, max_bytes=cap)
                  for since in range(0, last + 1, 3) for cap in (1, 900, 5000)],
        "history": [store.metric_history(run, None, m) for m in (3, 100_000)],
        "zoom": store.metric_history(run, None, 50, start=40, end=90),
        "csv": "".join(store.export_csv(run)),
    }


def a_real_run(store: Store, run: str = "r", status: str = "running") -> list[Frame]:
    """A GAN-like stream: two key groups every step (one with nulls), an evaluation key every 10 steps in frames of
    its own, and every other kind of frame between them; 24 frames of 8 steps."""
    rng = np.random.default_rng(7)
    store.insert_run(RunRecord(id=run, name=run, kind="gan", status=status, config={}, created_at=T0))
    sent: list[Frame] = []
    seq = 0

    def add(frame: Frame) -> None:
        sent.append(frame)
        store.append(run, [frame])

    for block in range(24):
        steps = list(range(block * 8 + 1, block * 8 + 9))
        losses: dict[str, list[float | None]] = {
            "loss/d": rng.normal(0.7, 0.1, 8).tolist(), "loss/g": rng.normal(1.2, 0.3, 8).tolist()}
        grads: dict[str, list[float | None]] = {
            f"grad/g_layer/{i}.weight": [None if rng.random() < 0.2 else float(v) for v in rng.lognormal(0, 1, 8)]
            for i in range(3)}
        seq += 1
        add(metrics(run, seq, steps, losses))
        seq += 1
        add(metrics(run, seq, steps, grads))
        if steps[-1] % 10 < 8:
            seq += 1
            tenth = steps[-1] - steps[-1] % 10
            add(metrics(run, seq, [tenth], {"eval/modes": [float(rng.integers(0, 9))], "eval/hq_frac": [0.5]}))
        kind = OTHER_TYPES[block % len(OTHER_TYPES)]
        seq += 1
        extra: dict[str, Any] = {"step": steps[-1]}
        if kind == "hist":
            extra.update(key="hist/real_logit", edges=[0.0, 1.0], counts=[3])
        elif kind == "status":
            extra.update(status="running", error=None)
        add(wire(run, seq, kind, **extra))
    assert store.wait_flushed()
    return sent


# ---------------------------------------------------------------------------- the drop, in the store


def test_an_ended_run_keeps_its_metrics_frames_once_and_every_other_frame(store: Store, db_path: Path) -> None:
    sent = a_real_run(store)
    n_metrics = sum(1 for frame, _ in sent if frame["type"] == "metrics")
    others = {kind: sum(1 for frame, _ in sent if frame["type"] == kind) for kind in OTHER_TYPES}
    assert store.wait_dropped()
    assert metrics_frames(db_path, "r") == n_metrics  # while it runs: the text, for backfill, and the metric store
    store.update_run("r", status="completed", ended_at=T0 + 10)
    assert store.wait_dropped()
    assert metrics_frames(db_path, "r") == 0
    assert count(db_path, "SELECT COUNT(*) FROM metric_frames WHERE run_id = 'r'") == n_metrics
    for kind, n in others.items():
        assert count(db_path, "SELECT COUNT(*) FROM frames WHERE run_id = 'r' AND type = ?", kind) == n, kind


def test_an_ended_runs_backfill_history_and_csv_are_the_same_bytes_after_the_drop(store: Store, db_path: Path) -> None:
    sent = a_real_run(store)
    before = every_view(store, "r")
    assert before["all"] == [(frame["seq"], text) for frame, text in sent]
    store.update_run("r", status="stopped", ended_at=T0 + 10)
    assert store.wait_dropped()
    assert metrics_frames(db_path, "r") == 0
    assert every_view(store, "r") == before
    store.close()
    reopened = Store(db_path)  # and from the file alone, by a fresh server
    try:
        assert every_view(reopened, "r") == before
    finally:
        reopened.close()


def test_frames_the_metric_store_cannot_give_back_keep_their_text(store: Store, db_path: Path) -> None:
    store.insert_run(RunRecord(id="r", name="r", kind="gan", status="running", config={}, created_at=T0))
    odd = [
        metrics("r", 1, [1, 2], {"a": [0.5, 0.25]}),  # fine: dropped
        wire("r", 2, "metrics", step=[3, 4], time=[T0, T0], data={"a": [1, 2]}),  # integers: come back as 1.0
        wire("r", 3, "metrics", step=[5, 6], time=[T0, T0], data={"a": [0.1, 0.2]}, note="x"),  # an extra field
        wire("r", 4, "metrics", step=[8, 7], time=[T0, T0], data={"a": [0.1, 0.2]}),  # steps out of order
        wire("r", 5, "metrics", step=[9, 9], time=[T0, T0], data={"a": [0.1, 0.2]}),  # a step twice
        ({"type": "metrics", "run": "r", "seq": 6, "step": [10], "time": [T0], "data": {"a": [0.3]}},
         json.dumps({"type": "metrics", "run": "r", "seq": 6, "step": [10], "time": [T0], "data": {"a": [0.3]}})),
        wire("r", 7, "metrics", step=[11, 12], time=[T0, T0], data={"a": [0.7, 0.8], "b": [1.0, "x"]}),  # b: text
        metrics("r", 8, [13, 14], {"a": [0.9, 1.0]}),  # and two frames with steps in common:
        metrics("r", 9, [14], {"a": [2.0]}),  # each would be rebuilt with the other's point
        wire("r", 10, "metrics", step=[15], data={"a": [3.0]}),  # no times: fine, dropped
        wire("r", 11, "metrics", step=[16], time=[T0], data={}),  # no keys: nothing to rebuild its steps from
    ]
    store.append("r", odd)
    assert store.wait_flushed()
    before = every_view(store, "r")
    store.update_run("r", status="completed")
    assert store.wait_dropped()
    dropped = [int(row[0]) for row in sqlite3.connect(db_path).execute("SELECT seq FROM metric_frames ORDER BY seq")]
    assert dropped == [1, 10]
    assert every_view(store, "r") == before


def test_a_run_that_comes_back_after_its_drop_continues_exactly(store: Store, db_path: Path) -> None:
    """A script's interrupted run may come back, and a script restarted from a checkpoint logs steps again."""
    sent = a_real_run(store, "r")
    store.update_run("r", status="interrupted")
    assert store.wait_dropped()
    assert metrics_frames(db_path, "r") == 0
    store.update_run("r", status="running")
    last = store.last_seq("r")
    later = [metrics("r", last + 1, [193, 194], {"loss/d": [0.1, 0.2], "loss/g": [0.3, None]}),  # after: no clash
             metrics("r", last + 2, [150, 151], {"loss/d": [9.0, 9.5]})]  # steps logged again
    store.append("r", later)
    assert store.wait_dropped()
    expected = [(frame["seq"], text) for frame, text in sent + later]
    assert store.frames_after("r", 0, limit=10_000) == expected
    # The frames whose steps now have two points each got their text back; the others stay dropped.
    assert 0 < metrics_frames(db_path, "r") < 10
    history = store.metric_history("r", ["loss/d"], 10_000)["loss/d"]
    assert history["step"].count(150) == 2 and history["step"][-1] == 194
    store.update_run("r", status="completed")
    assert store.wait_dropped()
    assert store.frames_after("r", 0, limit=10_000) == expected
    assert all(json.loads(text)["step"][0] in range(145, 153)
               for _, text in sqlite3.connect(db_path).execute("SELECT seq, body FROM frames WHERE type = 'metrics'"))


def test_a_resent_frame_of_a_dropped_seq_is_not_stored_again(store: Store, db_path: Path) -> None:
    sent = a_real_run(store)
    store.update_run("r", status="completed")
    assert store.wait_dropped()
    history = store.metric_history("r", None, 10_000)
    acked: list[int] = []
    store.append("r", sent[:5], on_commit=acked.append)
    assert store.wait_flushed()
    assert acked == [max(frame["seq"] for frame, _ in sent[:5])]  # acknowledged: it is stored
    assert metrics_frames(db_path, "r") == 0
    assert store.metric_history("r", None, 10_000) == history
    assert store.frames_after("r", 0, limit=10_000) == [(frame["seq"], text) for frame, text in sent]


def test_a_deleted_run_leaves_nothing_of_its_drop(store: Store, db_path: Path) -> None:
    a_real_run(store, "gone")
    kept = a_real_run(store, "kept")
    for run in ("gone", "kept"):
        store.update_run(run, status="completed")
    assert store.wait_dropped()
    store.delete_run("gone")
    for table in ("frames", "metric_frames", "metric_layouts", "frames_compacted", "metric_chunks", "metric_keys"):
        assert count(db_path, f"SELECT COUNT(*) FROM {table} WHERE run_id = 'gone'") == 0, table
    assert count(db_path, "SELECT COUNT(*) FROM metric_axes WHERE id NOT IN (SELECT axis_id FROM metric_chunks"
                     " WHERE axis_id IS NOT NULL)") == 0
    assert store.frames_after("kept", 0, limit=10_000) == [(frame["seq"], text) for frame, text in kept]


def test_keys_logged_together_share_one_copy_of_steps_and_times(store: Store, db_path: Path) -> None:
    store.insert_run(RunRecord(id="r", name="r", kind="gan", status="running", config={}, created_at=T0))
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(20)]
    for seq in range(1, 4 * COMPACT_AFTER + 1):  # small frames, one transaction each: compactions on the way
        steps = [2 * seq - 1, 2 * seq]
        store.append("r", [metrics("r", seq, steps, {k: rng.normal(size=2).tolist() for k in keys})])
        assert store.wait_flushed()
    chunks = count(db_path, "SELECT COUNT(*) FROM metric_chunks")
    assert count(db_path, "SELECT COUNT(*) FROM metric_axes") * len(keys) == chunks  # one axis per chunk of all keys
    assert count(db_path, "SELECT SUM(length(steps) + length(times)) FROM metric_chunks") == 0
    assert chunks < COMPACT_AFTER * len(keys)


def test_the_pages_an_ended_runs_frames_freed_go_back_to_the_file_system(
        db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "KEEP_FREE_BYTES", 0)  # hand back every free page (a server keeps 16 MiB)
    rng = np.random.default_rng(3)
    store = Store(db_path)
    store.start()
    try:
        store.insert_run(RunRecord(id="r", name="r", kind="gan", status="running", config={}, created_at=T0))
        keys = [f"k{i}" for i in range(20)]
        for seq in range(1, 201):
            steps = list(range(32 * seq - 31, 32 * seq + 1))
            store.append("r", [metrics("r", seq, steps, {k: rng.normal(size=32).tolist() for k in keys})])
        assert store.wait_flushed()
        conn = sqlite3.connect(db_path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        text = int(conn.execute("SELECT SUM(pgsize) FROM dbstat WHERE name = 'frames'").fetchone()[0])
        live = db_path.stat().st_size
        store.update_run("r", status="completed")
        assert store.wait_dropped()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert int(conn.execute("PRAGMA freelist_count").fetchone()[0]) == 0
        conn.close()
        assert live - db_path.stat().st_size >= 0.9 * text > 2 << 20
    finally:
        store.close()


# ---------------------------------------------------------------------------- a crash while dropping

_DROP_SLOWLY = """
import sys, time
from pathlib import Path
from app import metricstore as ms
from app.store import Store
ms.DROP_SLICE_FRAMES = 1
drop_slice = ms.drop_slice
def slowly(conn, run_id):
    out = drop_slice(conn, run_id)
    time.sleep(0.02)  # inside the write transaction: the kill may land in one
    return out
ms.drop_slice = slowly
store = Store(Path(sys.argv[1]))
store.start()
store.wait_dropped(600)
"""


def test_a_server_killed_while_dropping_loses_nothing(db_path: Path) -> None:
    first = Store(db_path)
    first.start()
    sent = a_real_run(first)
    before = every_view(first, "r")
    first.close()
    # The run's end recorded, and the server gone before its writer got to the drop: the next one finds it to do.
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE runs SET status = 'completed' WHERE id = 'r'")
    conn.commit()
    conn.close()
    assert metrics_frames(db_path, "r") > 40
    child = subprocess.Popen([sys.executable, "-c", _DROP_SLOWLY, str(db_path)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_for(lambda: count(db_path, "SELECT COUNT(*) FROM metric_frames") >= 5, 60, 0.01, what="dropping to start")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    assert metrics_frames(db_path, "r") > 0  # killed half way
    second = Store(db_path)
    try:
        assert every_view(second, "r") == before
        second.start()
        assert second.wait_dropped()
        assert metrics_frames(db_path, "r") == 0
        assert every_view(second, "r") == before
        assert before["all"] == [(frame["seq"], text) for frame, text in sent]
    finally:
        second.close()


# ---------------------------------------------------------------------------- a file of schema 2

#: The metric tables as gradwatch wrote them before schema 3 (app/store.py at 866cb2a): every key's chunk with its
#: own steps and times, no axes, no dropped frames.
_SCHEMA_2 = """
CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    config TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, ended_at REAL,
    step INTEGER NOT NULL DEFAULT 0, error TEXT, sweep_id TEXT, device TEXT, pid INTEGER, pid_started REAL,
    token_hash TEXT, last_alert TEXT, resume_from TEXT, last_seq INTEGER NOT NULL DEFAULT 0, source TEXT,
    controls TEXT, seq_offset INTEGER NOT NULL DEFAULT 0, uid TEXT);
CREATE TABLE frames (run_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (run_id, seq));
CREATE INDEX frames_by_type ON frames (run_id, type, seq);
CREATE TABLE metric_chunks (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, key TEXT NOT NULL,
    first_step INTEGER NOT NULL, last_step INTEGER NOT NULL, n INTEGER NOT NULL,
    steps BLOB NOT NULL, times BLOB NOT NULL, vals BLOB NOT NULL);
CREATE INDEX chunks_by_key ON metric_chunks (run_id, key, first_step);
CREATE INDEX chunks_by_step ON metric_chunks (run_id, first_step);
CREATE TABLE metric_summaries (chunk_id INTEGER PRIMARY KEY, summary BLOB NOT NULL);
CREATE TRIGGER metric_summaries_on_delete AFTER DELETE ON metric_chunks
BEGIN DELETE FROM metric_summaries WHERE chunk_id = OLD.id; END;
CREATE TABLE metric_keys (run_id TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (run_id, key)) WITHOUT ROWID;
PRAGMA user_version = 2;
"""


def write_schema_2(path: Path, runs: dict[str, tuple[str, list[Frame]]]) -> None:
    """A file of schema 2 holding ``runs`` ({id: (status, frames)}), each key's points in chunks of 40 (every other
    chunk with its summary, as a file that lived through the summaries' arrival has)."""
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA_2)
    for run_id, (status, frames) in runs.items():
        steps_of: dict[str, list[tuple[int, float, float]]] = {}
        last_step = 0
        for frame, text in frames:
            conn.execute("INSERT INTO frames VALUES (?, ?, ?, ?)", (run_id, frame["seq"], frame["type"], text))
            if frame["type"] != "metrics":
                continue
            times = frame.get("time") or [math.nan] * len(frame["step"])
            for key, values in frame["data"].items():
                steps_of.setdefault(key, []).extend(
                    (s, t, math.nan if v is None else v) for s, t, v in zip(frame["step"], times, values, strict=True))
            last_step = max(last_step, *frame["step"])
        conn.execute("INSERT INTO runs (id, name, kind, status, config, created_at, step, last_seq)"
                     " VALUES (?, ?, 'gan', ?, '{}', ?, ?, ?)",
                     (run_id, run_id, status, T0, last_step, max(f["seq"] for f, _ in frames)))
        for key, points in steps_of.items():
            conn.execute("INSERT INTO metric_keys VALUES (?, ?)", (run_id, key))
            for i, lo in enumerate(range(0, len(points), 40)):
                part = points[lo : lo + 40]
                s = np.array([p[0] for p in part], dtype="<i8")
                t = np.array([p[1] for p in part], dtype="<f8")
                v = np.array([p[2] for p in part], dtype="<f8")
                chunk = conn.execute(
                    "INSERT INTO metric_chunks (run_id, key, first_step, last_step, n, steps, times, vals)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, key, int(s.min()), int(s.max()), len(part), s.tobytes(), t.tobytes(), v.tobytes()),
                ).lastrowid
                if i % 2 == 0:
                    conn.execute("INSERT INTO metric_summaries VALUES (?, ?)",
                                 (chunk, ms.summary_blob(*ms.summarize(s.astype(np.int64), t, v))))
    conn.commit()
    conn.close()


def expected_csv(frames: list[Frame]) -> str:
    """The CSV export of these frames' metrics, computed from the frames alone."""
    rows: dict[int, dict[str, Any]] = {}
    for frame, _ in frames:
        if frame["type"] != "metrics":
            continue
        times = frame.get("time") or [None] * len(frame["step"])
        for i, step in enumerate(frame["step"]):
            row = rows.setdefault(step, {})
            if times[i] is not None:
                row["time"] = times[i]
            for key, values in frame["data"].items():
                row[key] = values[i]
    keys = sorted({k for row in rows.values() for k in row} - {"time"})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "time", *keys])
    for step in sorted(rows):
        writer.writerow([step, *("" if rows[step].get(c) is None else repr(rows[step][c]) for c in ["time", *keys])])
    return out.getvalue()


def test_a_file_of_schema_2_opens_reads_and_drops_and_continues_in_schema_3(db_path: Path) -> None:
    scratch = Store(db_path.with_name("scratch.db_path"))  # only to make the frames the way a server would
    scratch.start()
    ended = a_real_run(scratch, "old-ended")
    live = a_real_run(scratch, "old-live")
    scratch.close()
    write_schema_2(db_path, {"old-ended": ("completed", ended), "old-live": ("running", live)})

    store = Store(db_path)  # not started yet: upgraded, nothing dropped
    try:
        assert count(db_path, "PRAGMA user_version") == 3
        assert count(db_path, "SELECT COUNT(*) FROM pragma_table_info('metric_chunks') WHERE name = 'axis_id'") == 1
        for run_id, frames in (("old-ended", ended), ("old-live", live)):
            assert store.frames_after(run_id, 0, limit=10_000) == [(f["seq"], text) for f, text in frames]
            assert "".join(store.export_csv(run_id)) == expected_csv(frames)
            history = store.metric_history(run_id, ["loss/d", "eval/modes"], 10_000)
            wanted = {k: [(s, v) for f, _ in frames if f["type"] == "metrics" and k in f["data"]
                          for s, v in zip(f["step"], f["data"][k], strict=True)] for k in ("loss/d", "eval/modes")}
            assert {k: list(zip(h["step"], h["value"], strict=True)) for k, h in history.items()} == wanted
        before = every_view(store, "old-ended")

        # Started, it drops the ended run's frames, rebuilding them from chunks of schema 2.
        store.start()
        assert store.wait_dropped()
        assert metrics_frames(db_path, "old-ended") == 0 and metrics_frames(db_path, "old-live") > 0
        assert every_view(store, "old-ended") == before

        # The live run goes on in schema 3: small frames after old chunks, merged with them on the way.
        more = [metrics("old-live", 1000 + i, [200 + i], {"loss/d": [i / 8], "loss/g": [None]})
                for i in range(2 * COMPACT_AFTER)]
        for frame in more:
            store.append("old-live", [frame])
            assert store.wait_flushed()
        assert count(db_path, "SELECT COUNT(*) FROM metric_chunks WHERE run_id = 'old-live' AND key = 'loss/d'") < 8
        assert "".join(store.export_csv("old-live")) == expected_csv(live + more)
        before_live = every_view(store, "old-live")
        store.update_run("old-live", status="completed")
        assert store.wait_dropped()
        assert metrics_frames(db_path, "old-live") == 0
        assert every_view(store, "old-live") == before_live
    finally:
        store.close()


# ---------------------------------------------------------------------------- through the app and a real server


def _channel(client: TestClient, created: dict[str, Any]) -> Any:
    return client.websocket_connect("ws://127.0.0.1:8000" + created["channel"],
                                    headers={"Authorization": f"Bearer {created['token']}"})


SOURCE = {"origin": "script", "host": "box", "script": "train.py"}


def _acked(ws: Any, seq: int) -> None:
    """Read the channel until the server has acknowledged ``seq`` (committed)."""
    while (message := ws.receive_json()).get("type") != "ack" or message["seq"] < seq:
        pass


def _interrupted(client: TestClient, run_id: str) -> None:
    wait_for(lambda: client.get(f"/api/runs/{run_id}").json()["status"] == "interrupted", 30, 0.05,
             what="the run to be interrupted")


def _stream(client: TestClient, run_id: str, since: int, n: int) -> list[str]:
    """The raw texts of ``n`` frames of the run's websocket from ``since``."""
    with client.websocket_connect(f"ws://127.0.0.1:8000/ws/runs/{run_id}?since={since}") as ws:
        return [ws.receive_text() for _ in range(n)]


def _script_frames(first: int, steps: range) -> list[dict[str, Any]]:
    """What a script sends: its own seqs, no run (the server sets it)."""
    out: list[dict[str, Any]] = []
    for i, lo in enumerate(range(steps.start, steps.stop, 4)):
        part = list(range(lo, min(lo + 4, steps.stop)))
        out.append({"type": "metrics", "seq": first + 2 * i, "step": part, "time": [T0 + s for s in part],
                    "data": {"loss": [s / 3 for s in part], "acc": [None if s % 5 == 0 else s / 7 for s in part]}})
        out.append({"type": "hist", "seq": first + 2 * i + 1, "step": part[-1], "key": "hist/x", "edges": [0, 1],
                    "counts": [part[-1]]})
    return out


def test_a_scripts_run_interrupted_resumed_and_ended_backfills_the_same_bytes(tmp_path: Path) -> None:
    """Through the app (real store, manager, websockets): a script's run is interrupted (its frames dropped), comes
    back and logs steps it had logged before, ends. A client reading the run from seq 0 or from the middle gets the
    bytes it got while the run was live, at every stage."""
    settings = Settings(data_dir=tmp_path, client_grace_s=0.3, _env_file=None)
    db = tmp_path / "gradwatch.db"
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        created = client.post("/api/client/runs", json={"name": "mine", "config": {}, "source": SOURCE}).json()
        run_id = created["run"]["id"]
        first = _script_frames(1, range(1, 101))
        with _channel(client, created) as ws:
            assert ws.receive_json()["type"] == "hello"
            ws.send_text(json.dumps({"type": "frames", "frames": first}))
            _acked(ws, len(first))
            live = _stream(client, run_id, 0, len(first))
        _interrupted(client, run_id)
        wait_for(lambda: metrics_frames(db, run_id) == 0, 30, 0.05, what="the drop")
        total = len(first) + 1  # the server's "interrupted" frame
        after_drop = _stream(client, run_id, 0, total)
        assert after_drop[: len(first)] == live
        assert _stream(client, run_id, 17, total - 17) == after_drop[17:]
        history = client.get(f"/api/runs/{run_id}/metrics", params={"max_points": 10_000}).json()["metrics"]
        assert history["loss"]["value"] == [s / 3 for s in range(1, 101)]
        assert history["acc"]["value"] == [None if s % 5 == 0 else s / 7 for s in range(1, 101)]

        again = _script_frames(len(first) + 1, range(81, 121))  # restarted from a checkpoint at step 80
        with _channel(client, created) as ws:
            assert ws.receive_json()["type"] == "hello"
            ws.send_text(json.dumps({"type": "frames", "frames": again}))
            _acked(ws, len(first) + len(again))
            resumed = _stream(client, run_id, 0, total + 1 + len(again))
        assert resumed[:total] == after_drop
        _interrupted(client, run_id)
        # Its last metrics frame is the one before last (a hist frame ends what the script sent).
        wait_for(lambda: count(db, "SELECT COUNT(*) FROM frames_compacted WHERE run_id = ? AND through_seq >= ?",
                               run_id, total + len(again)), 30, 0.05, what="the second drop")
        final = _stream(client, run_id, 0, len(resumed) + 1)
        assert final[: len(resumed)] == resumed
        # Kept as text: the frames of steps 81-100, logged twice (each would be rebuilt with the other's points).
        assert metrics_frames(db, run_id) == 10
        assert _stream(client, run_id, 150, len(final) - 150) == final[150:]
        history = client.get(f"/api/runs/{run_id}/metrics", params={"max_points": 10_000}).json()["metrics"]
        assert history["loss"]["step"] == [*range(1, 81), *(s for s in range(81, 101) for _ in (0, 1)),
                                           *range(101, 121)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("storage-data")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.xdist_group("live-server")
def test_a_real_runs_backfill_and_history_after_the_drop_are_what_its_live_stream_was(server: LiveServer) -> None:
    """A real worker's run: the raw text of every frame as the websocket sent it live, then after the run ended and
    its metrics frames were dropped, from seq 0 and from the middle; the HTTP history equals the live values."""
    with server.client() as http:
        run = http.post("/api/runs", json=config(TINY_GAN, train__steps=120)).json()

    def replay(since: int) -> list[str]:
        """Every frame's text from ``since`` until the server closes the stream (the run has ended)."""
        out: list[str] = []
        with server.stream(run["id"], since=since) as ws, contextlib.suppress(Exception):
            while True:
                out.append(str(ws.recv(timeout=300)))
        return out

    live = replay(0)  # opened while the run is queued or starting: all of it live
    frames = [json.loads(text) for text in live]
    assert frames[-1]["type"] == "status" and frames[-1]["status"] == "completed"
    db = server.data_dir / "gradwatch.db"
    n_metrics = sum(1 for f in frames if f["type"] == "metrics")
    wait_for(lambda: count(db, "SELECT COUNT(*) FROM metric_frames WHERE run_id = ?", run["id"]) == n_metrics, 60,
             0.1, what="the ended run's metrics frames to be dropped")
    assert metrics_frames(db, run["id"]) == 0
    assert replay(0) == live
    middle = frames[len(frames) // 2]["seq"]
    assert replay(middle) == [text for text, f in zip(live, frames, strict=True) if f["seq"] > middle]
    with server.client() as http:
        history = http.get(f"/api/runs/{run['id']}/metrics", params={"max_points": 100_000}).json()["metrics"]
    for key in ("loss/d", "grad/g_norm", "d/fake_prob"):
        sent = [(s, v) for f in frames if f["type"] == "metrics" and key in f["data"]
                for s, v in zip(f["step"], f["data"][key], strict=True)]
        assert list(zip(history[key]["step"], history[key]["value"], strict=True)) == sent, key
