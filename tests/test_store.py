"""The SQLite store: runs, frame backfill, columnar metric history and CSV export, on real files."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.store import COMPACT_AFTER, SUMMARY_BLOCK, RunRecord, Store, _select_points
from bench.history import full_reads

Frame = tuple[dict[str, Any], str]
T0 = 1_764_000_000.0


def make_run(run_id: str, created_at: float = 1.0, status: str = "queued", **fields: Any) -> RunRecord:
    return RunRecord(
        id=run_id,
        name=f"run {run_id}",
        kind="gan",
        status=status,
        config={"kind": "gan", "train": {"steps": 100, "seed": 0}},
        created_at=created_at,
        **fields,
    )


def frame(run: str, seq: int, frame_type: str = "status", /, **fields: Any) -> Frame:
    body = {"type": frame_type, "run": run, "seq": seq, **fields}
    return body, json.dumps(body, allow_nan=False)


def metrics(run: str, seq: int, steps: list[int], data: dict[str, list[float | None]]) -> Frame:
    """A SPEC §4 metrics frame; non-finite values must already be None, as the worker sends them."""
    return frame(run, seq, "metrics", step=steps, time=[T0 + s / 10 for s in steps], data=data)


def raw_count(path: Path, sql: str, *params: Any) -> int:
    """Count through a connection of our own: what another process would see."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(sql, params).fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "gradwatch.sqlite"  # the store creates the parent folders


# ---------------------------------------------------------------------------- runs


def test_runs_round_trip_update_list_and_filter(store: Store) -> None:
    full = make_run(
        "a",
        created_at=10.5,
        status="running",
        started_at=11.25,
        sweep_id="sw1",
        device="cuda:0",
        pid=4242,
        pid_started=11.0,
        token_hash="ab" * 32,
        resume_from={"run": "z", "checkpoint": "step-100.pt"},
    )
    store.insert_run(full)
    assert store.get_run("a") == full
    assert store.get_run("missing") is None

    alert = {"step": 7, "kind": "diverged", "message": "x"}
    updated = store.update_run("a", status="failed", ended_at=20.0, error="diverged", last_alert=alert)
    assert updated.status == "failed" and updated.error == "diverged" and updated.ended_at == 20.0
    assert updated.last_alert == alert
    assert updated.config == full.config and updated.device == "cuda:0"
    assert store.get_run("a") == updated

    store.insert_run(make_run("b", created_at=30.0))
    store.insert_run(make_run("c", created_at=20.0, status="completed"))
    store.insert_run(make_run("d", created_at=30.0, status="running"))  # same time as "b": id breaks the tie
    assert [r.id for r in store.list_runs()] == ["b", "d", "c", "a"]
    assert [r.id for r in store.list_runs(["running", "completed"])] == ["d", "c"]
    assert [r.id for r in store.list_runs(["queued"])] == ["b"]
    assert store.list_runs([]) == []


def test_update_run_rejects_unknown_fields_runs_and_statuses(store: Store) -> None:
    store.insert_run(make_run("a"))
    with pytest.raises(ValueError, match="bogus"):
        store.update_run("a", status="running", bogus=1)
    with pytest.raises(ValueError, match="id"):
        store.update_run("a", id="b")
    with pytest.raises(ValueError, match="status"):
        store.update_run("a", status="exploded")
    with pytest.raises(KeyError):
        store.update_run("nope", status="running")
    with pytest.raises(ValueError, match="already exists"):
        store.insert_run(make_run("a"))
    assert store.get_run("a") == make_run("a")  # nothing above changed it


def test_delete_run_removes_its_frames_and_history_only(store: Store, db_path: Path) -> None:
    for run_id in ("gone", "kept"):
        store.insert_run(make_run(run_id))
        store.append(run_id, [metrics(run_id, 1, [1, 2], {"loss/d": [0.5, 0.25]}), frame(run_id, 2)])
    assert store.wait_flushed()
    store.delete_run("gone")

    assert store.get_run("gone") is None
    assert store.frames_after("gone", 0) == []
    assert store.metric_keys("gone") == []
    assert store.metric_history("gone", None, 10) == {}
    for table in ("frames", "metric_chunks", "metric_keys"):
        assert raw_count(db_path, f"SELECT COUNT(*) FROM {table} WHERE run_id = ?", "gone") == 0
        assert raw_count(db_path, f"SELECT COUNT(*) FROM {table} WHERE run_id = ?", "kept") > 0
    assert store.metric_history("kept", None, 10)["loss/d"]["value"] == [0.5, 0.25]


# ---------------------------------------------------------------------------- frames


def test_frames_after_returns_the_exact_text_after_since(store: Store) -> None:
    store.insert_run(make_run("r"))
    sent = [frame("r", seq, "alert", step=seq, kind="diverged", message=f"é {seq}  spaced") for seq in range(1, 11)]
    store.append("r", sent[:4])
    store.append("r", sent[4:])
    assert store.wait_flushed()
    texts = {f["seq"]: text for f, text in sent}
    assert store.frames_after("r", 0) == [(seq, texts[seq]) for seq in range(1, 11)]
    assert store.frames_after("r", 4) == [(seq, texts[seq]) for seq in range(5, 11)]
    assert store.frames_after("r", 4, limit=3) == [(5, texts[5]), (6, texts[6]), (7, texts[7])]
    assert store.frames_after("r", 10) == []
    assert store.frames_after("other", 0) == []
    # A byte budget stops the batch once it is reached, but never returns nothing while frames remain.
    size = len(texts[5])
    assert [seq for seq, _ in store.frames_after("r", 4, max_bytes=2 * size)] == [5, 6]
    assert [seq for seq, _ in store.frames_after("r", 4, max_bytes=1)] == [5]


def test_duplicate_seqs_are_dropped_with_their_metrics(store: Store, db_path: Path) -> None:
    store.insert_run(make_run("r"))
    first = [metrics("r", seq, [3 * seq - 2, 3 * seq - 1, 3 * seq], {"loss/d": [seq] * 3}) for seq in range(1, 11)]
    # Same seqs again with different content: a resent batch must not overwrite or double anything.
    again = [metrics("r", seq, [3 * seq], {"loss/d": [-1.0], "other": [1.0]}) for seq in range(1, 11)]
    store.append("r", first)
    assert store.wait_flushed()
    store.append("r", again)
    store.append("r", first)  # and a duplicate inside the same write batch
    assert store.wait_flushed()

    assert raw_count(db_path, "SELECT COUNT(*) FROM frames WHERE run_id = 'r'") == 10
    assert [text for _, text in store.frames_after("r", 0)] == [text for _, text in first]
    assert raw_count(db_path, "SELECT SUM(n) FROM metric_chunks WHERE run_id = 'r'") == 30
    assert store.metric_keys("r") == ["loss/d"]
    history = store.metric_history("r", None, 1000)["loss/d"]
    assert history["step"] == list(range(1, 31))
    assert history["value"] == [float((i + 2) // 3) for i in range(1, 31)]


def test_on_commit_reports_the_highest_seq_once_others_can_read_it(store: Store, db_path: Path) -> None:
    store.insert_run(make_run("r"))
    seen: list[tuple[int, int, int, bool]] = []
    done = threading.Event()

    def on_commit(seq: int) -> None:
        visible = raw_count(db_path, "SELECT COUNT(*) FROM frames WHERE run_id = 'r' AND seq <= ?", seq)
        committed_seq = raw_count(db_path, "SELECT last_seq FROM runs WHERE id = 'r'")
        seen.append((seq, visible, committed_seq, threading.current_thread() is threading.main_thread()))
        if seq == 8:
            done.set()

    store.append("r", [frame("r", seq) for seq in range(1, 6)], on_commit=on_commit)
    store.append("r", [frame("r", seq) for seq in range(6, 9)], on_commit=on_commit)
    assert done.wait(10)
    assert [s[0] for s in seen] == [5, 8]
    for seq, visible, committed_seq, on_main in seen:
        assert visible == seq
        assert committed_seq >= seq
        assert not on_main  # it runs on the writer thread


def test_runs_last_seq_and_step_follow_appended_frames(store: Store) -> None:
    store.insert_run(make_run("r"))
    store.append(
        "r",
        [
            metrics("r", 1, [1, 2, 3, 4], {"loss/d": [1.0, 1.0, 1.0, 1.0]}),
            metrics("r", 2, [5, 6, 7, 8], {"loss/d": [1.0, 1.0, 1.0, 1.0]}),
            frame("r", 3, "hist", step=8, key="hist/real_logit", edges=[0.0, 1.0], counts=[3]),
            frame("r", 4, "alert", step=8, kind="gradient_collapse", message="G gradient vanished"),
        ],
    )
    assert store.wait_flushed()
    run = store.get_run("r")
    assert run is not None and run.last_seq == 4 and run.step == 8
    assert store.last_seq("r") == 4
    assert store.last_seq("unknown") == 0

    store.append("r", [metrics("r", 2, [2], {"loss/d": [0.0]})])  # a stale duplicate lowers nothing
    assert store.wait_flushed()
    run = store.get_run("r")
    assert run is not None and run.last_seq == 4 and run.step == 8


def test_frames_of_an_unknown_run_are_dropped_and_not_acknowledged(store: Store) -> None:
    store.insert_run(make_run("r"))
    calls: list[int] = []
    store.append("ghost", [frame("ghost", 1)], on_commit=calls.append)
    store.append("r", [frame("r", 1)], on_commit=calls.append)
    assert store.wait_flushed()
    assert calls == [1]
    assert store.frames_after("ghost", 0) == []
    assert store.frames_after("r", 0) == [(1, frame("r", 1)[1])]


def test_a_malformed_key_loses_only_itself(store: Store) -> None:
    store.insert_run(make_run("r"))
    bad = frame("r", 1, "metrics", step=[1, 2], time=[T0, T0 + 1], data={"ok": [1.0, 2.0], "short": [1.0]})
    store.append("r", [bad, metrics("r", 2, [3], {"ok": [3.0]})])
    assert store.wait_flushed()
    assert [seq for seq, _ in store.frames_after("r", 0)] == [1, 2]
    assert store.metric_keys("r") == ["ok"]
    assert store.metric_history("r", None, 10)["ok"]["value"] == [1.0, 2.0, 3.0]


def _restore_run(store: Store, run_id: str = "r") -> dict[int, str]:
    """A run with every kind of frame, several hists per key and dldh frames; returns seq → stored text."""
    sent = [
        frame(run_id, 1, "status", status="running", error=None, step=0),
        metrics(run_id, 2, [1, 2], {"loss/d": [1.0, 0.5]}),
        frame(run_id, 3, "hist", step=2, key="hist/real_logit", edges=[0.0, 1.0], counts=[64]),
        frame(run_id, 4, "hist", step=2, key="hist/fake_logit", edges=[0.0, 1.0], counts=[64]),
        frame(run_id, 5, "dldh", step=2, h=[-1.0], saturating=[0.27], non_saturating=[0.73]),
        frame(run_id, 6, "alert", step=2, kind="gradient_collapse", message="G gradient vanished"),
        frame(run_id, 7, "sample", step=2, name="step_00000002.png", url="samples/step_00000002.png"),
        metrics(run_id, 8, [3, 4], {"loss/d": [0.25, 0.125]}),
        frame(run_id, 9, "hist", step=4, key="hist/real_logit", edges=[0.0, 2.0], counts=[64]),
        frame(run_id, 10, "hist", step=4, key="hist/fake_logit", edges=[0.0, 2.0], counts=[64]),
        frame(run_id, 11, "dldh", step=4, h=[-2.0], saturating=[0.12], non_saturating=[0.88]),
        frame(run_id, 12, "control", step=4, changes={"g_loss": "non_saturating"}),
        frame(run_id, 13, "checkpoint", step=4, name="step_00000004.pt", url="checkpoints/step_00000004.pt"),
        frame(run_id, 14, "hist", step=6, key="hist/real_logit", edges=[0.0, 3.0], counts=[64]),
        frame(run_id, 15, "alert", step=6, kind="diverged", message="non-finite loss at step 6"),
        metrics(run_id, 16, [5, 6], {"loss/d": [None, None]}),
        frame(run_id, 17, "dldh", step=6, h=[None], saturating=[None], non_saturating=[None]),
        frame(run_id, 18, "status", status="failed", error="diverged", step=6),
    ]
    store.insert_run(make_run(run_id))
    store.append(run_id, sent)
    assert store.wait_flushed()
    return {f["seq"]: text for f, text in sent}


def test_events_keep_every_event_but_only_the_newest_hist_per_key_and_dldh(store: Store) -> None:
    texts = _restore_run(store)
    other = _restore_run(store, "other")  # another run's frames never leak in
    assert store.events("r", 18) == [(seq, texts[seq]) for seq in (1, 6, 7, 10, 12, 13, 14, 15, 17, 18)]
    # As of seq 12: step 4's histograms and dldh, nothing later; metrics never.
    assert store.events("r", 12) == [(seq, texts[seq]) for seq in (1, 6, 7, 9, 10, 11, 12)]
    assert store.events("r", 4) == [(seq, texts[seq]) for seq in (1, 3, 4)]
    assert store.events("r", 0) == []
    assert store.events("r", 10**9) == store.events("r", 18)
    assert [seq for seq, _ in store.events("other", 18)] == [1, 6, 7, 10, 12, 13, 14, 15, 17, 18]
    assert store.events("other", 18)[0][1] == other[1]
    assert store.events("unknown", 18) == []


def test_events_cap_keeps_the_newest_events_and_still_the_latest_hists(store: Store) -> None:
    texts = _restore_run(store)
    # The three newest of status/alert/control/sample/checkpoint, plus the newest hist per key and dldh.
    assert store.events("r", 18, cap=3) == [(seq, texts[seq]) for seq in (10, 13, 14, 15, 17, 18)]
    with pytest.raises(ValueError, match="cap"):
        store.events("r", 18, cap=0)


def test_a_hist_frame_whose_text_is_not_json_is_stored_and_skipped_by_events(store: Store) -> None:
    # The hist-key index parses bodies; a body it cannot parse must not fail the writer's transaction.
    texts = _restore_run(store)
    bad = frame("r", 19, "hist", step=8, key="hist/real_logit", edges=[0.0], counts=[])[0]
    store.append("r", [(bad, "{not json"), frame("r", 20, "alert", step=8, kind="x", message="after")])
    assert store.wait_flushed()
    assert [seq for seq, _ in store.frames_after("r", 18)] == [19, 20]
    assert [seq for seq, _ in store.events("r", 20)] == [1, 6, 7, 10, 12, 13, 14, 15, 17, 18, 20]
    assert store.events("r", 20)[6] == (14, texts[14])


def test_events_read_indexes_not_every_frame(store: Store, db_path: Path) -> None:
    # A long run has tens of thousands of hist frames: the newest per key must come from index seeks.
    from app.store import _SELECT_LATEST_HISTS, _SELECT_NEWEST_OF_TYPE

    conn = sqlite3.connect(db_path)
    try:
        plans = [" ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
                 for sql, params in ((_SELECT_LATEST_HISTS, {"run": "r", "until": 5}),
                                     (_SELECT_NEWEST_OF_TYPE, ("r", "alert", 5, 10)))]
    finally:
        conn.close()
    assert "frames_hist_key" in plans[0] and "SCAN frames" not in plans[0], plans[0]
    assert "frames_by_type" in plans[1] and "SCAN frames" not in plans[1], plans[1]


def test_a_file_from_before_the_frame_indexes_gets_them_when_opened(db_path: Path) -> None:
    first = Store(db_path)
    first.start()
    texts = _restore_run(first)
    first.close()
    conn = sqlite3.connect(db_path)
    conn.execute("DROP INDEX frames_by_type")
    conn.execute("DROP INDEX frames_hist_key")
    conn.close()
    reopened = Store(db_path)
    try:
        indexes = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name IN (?, ?)"
        assert raw_count(db_path, indexes, "frames_by_type", "frames_hist_key") == 2
        assert reopened.events("r", 12) == [(seq, texts[seq]) for seq in (1, 6, 7, 9, 10, 11, 12)]
    finally:
        reopened.close()


def test_run_table_writes_interleave_with_the_writer_without_deadlock(store: Store) -> None:
    store.insert_run(make_run("r", status="running"))
    errors: list[BaseException] = []

    def poke() -> None:
        try:
            for i in range(200):
                store.update_run("r", pid=i, error=f"e{i}")
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    worker = threading.Thread(target=poke)
    worker.start()
    for seq in range(1, 201):
        store.append("r", [metrics("r", seq, [seq], {"loss/d": [0.5]})])
    worker.join(60)
    assert not worker.is_alive() and errors == []
    assert store.wait_flushed()
    run = store.get_run("r")
    assert run is not None and run.pid == 199 and run.last_seq == 200 and run.step == 200


def test_the_writer_waits_out_another_writer_instead_of_dropping_frames(store: Store, db_path: Path) -> None:
    store.insert_run(make_run("r"))
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        store.append("r", [frame("r", 1), frame("r", 2)])
        assert not store.wait_flushed(timeout=0.5)
        assert store.frames_after("r", 0) == []
        other.execute("COMMIT")
    finally:
        other.close()
    assert store.wait_flushed()
    assert [seq for seq, _ in store.frames_after("r", 0)] == [1, 2]


# ---------------------------------------------------------------------------- metric history


def test_history_is_exact_below_max_points_with_none_for_non_finite(store: Store) -> None:
    store.insert_run(make_run("r"))
    store.append(
        "r",
        [
            metrics("r", 1, [1, 2, 3], {"loss/d": [0.75, None, 0.5], "grad/g_norm": [1e-30, 2.5, 3.0]}),
            frame("r", 2),
            metrics("r", 3, [4], {"eval/modes": [7]}),  # a key missing from some frames
            # Infinity slipping through from a careless producer is stored as a null too.
            ({"type": "metrics", "seq": 4, "step": [5], "time": [T0], "data": {"loss/d": [math.inf]}}, "{}"),
        ],
    )
    assert store.wait_flushed()
    assert store.metric_keys("r") == ["eval/modes", "grad/g_norm", "loss/d"]
    history = store.metric_history("r", None, 10)
    assert history["loss/d"] == {
        "step": [1, 2, 3, 5],
        "time": [T0 + 0.1, T0 + 0.2, T0 + 0.3, T0],
        "value": [0.75, None, 0.5, None],
    }
    assert history["grad/g_norm"]["value"] == [1e-30, 2.5, 3.0]
    assert history["eval/modes"] == {"step": [4], "time": [T0 + 0.4], "value": [7.0]}
    assert set(store.metric_history("r", ["loss/d", "nope"], 10)) == {"loss/d"}
    assert store.metric_history("r", [], 10) == {}
    json.dumps(history, allow_nan=False)
    with pytest.raises(ValueError):
        store.metric_history("r", None, 1)


def test_history_downsamples_a_million_points_keeping_extremes_and_ends(store: Store) -> None:
    n, per_frame = 1_000_000, 10_000
    steps = np.arange(1, n + 1)
    values = np.sin(steps / 5_000.0) + np.random.default_rng(0).normal(0.0, 0.1, n)
    spike, dip = 123_457, 876_543
    values[spike - 1] = 50.0
    values[dip - 1] = -50.0
    store.insert_run(make_run("r"))
    for seq, lo in enumerate(range(0, n, per_frame), start=1):
        s = steps[lo : lo + per_frame].tolist()
        body = {
            "type": "metrics",
            "run": "r",
            "seq": seq,
            "step": s,
            "time": [T0 + x / 10 for x in s],
            "data": {"loss/d": values[lo : lo + per_frame].tolist(), "loss/g": (-values[lo : lo + per_frame]).tolist()},
        }
        store.append("r", [(body, json.dumps({"seq": seq}))])  # the store never parses the text
    assert store.wait_flushed(60)

    history = store.metric_history("r", ["loss/d"], 2_000)
    assert list(history) == ["loss/d"]
    got = history["loss/d"]
    assert 1_000 < len(got["step"]) <= 2_000
    assert got["step"][0] == 1 and got["step"][-1] == n
    assert got["step"] == sorted(set(got["step"]))
    picked = dict(zip(got["step"], got["value"], strict=True))
    assert picked[spike] == 50.0 and picked[dip] == -50.0
    assert all(v == values[s - 1] for s, v in picked.items())
    assert all(t == T0 + s / 10 for s, t in zip(got["step"], got["time"], strict=True))


def test_downsampled_history_with_nulls_keeps_ends_and_is_strict_json(store: Store) -> None:
    n = 10_000
    values: list[float | None] = [math.sin(i / 100) for i in range(n)]
    for i in [0, 1, *range(3_000, 4_000), n - 1]:  # nulls at both ends and a long stretch in between
        values[i] = None
    values[5_000] = 9.0
    store.insert_run(make_run("r"))
    store.append("r", [metrics("r", 1, list(range(1, n + 1)), {"k": values})])
    assert store.wait_flushed()

    for max_points in (2, 3, 4, 7, 100):
        got = store.metric_history("r", None, max_points)["k"]
        json.dumps(got, allow_nan=False)
        assert len(got["step"]) <= max_points
        assert got["step"][0] == 1 and got["step"][-1] == n
        assert got["value"][0] is None and got["value"][-1] is None
    got = store.metric_history("r", None, 100)["k"]
    assert any(3_001 <= s <= 4_000 and v is None for s, v in zip(got["step"], got["value"], strict=True))
    assert 9.0 in got["value"]
    assert all(v is None or v == values[s - 1] for s, v in zip(got["step"], got["value"], strict=True))


def test_small_frames_are_merged_into_few_chunks(store: Store, db_path: Path) -> None:
    store.insert_run(make_run("r"))
    frames = 4 * COMPACT_AFTER
    for seq in range(1, frames + 1):  # one tiny frame per transaction: the slow-trainer case
        store.append("r", [metrics("r", seq, [2 * seq - 1, 2 * seq], {"loss/d": [seq, -seq]})])
        assert store.wait_flushed()
    assert raw_count(db_path, "SELECT COUNT(*) FROM metric_chunks WHERE run_id = 'r'") < COMPACT_AFTER
    got = store.metric_history("r", None, 10_000)["loss/d"]
    assert got["step"] == list(range(1, 2 * frames + 1))
    assert got["value"] == [float(s if i % 2 == 0 else -s) for i, s in enumerate(np.repeat(range(1, frames + 1), 2))]


def _append_series(store: Store, run: str, steps: np.ndarray, data: dict[str, list[float | None]]) -> None:
    """One key set's points, 10,000 steps per frame, one frame per transaction."""
    store.insert_run(make_run(run))
    per_frame = 10_000
    for seq, lo in enumerate(range(0, steps.size, per_frame), start=1):
        part = {k: v[lo : lo + per_frame] for k, v in data.items()}
        store.append(run, [metrics(run, seq, steps[lo : lo + per_frame].tolist(), part)])
        assert store.wait_flushed(60)


class _ReadSpy:
    """Records how many points each chart query downsampled from, and whether it read any key in full."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.points: list[int] = []
        self.full_reads = 0
        history_points, series = Store._history_points, Store._series

        def spy_history(store: Store, *args: Any) -> Any:
            out = history_points(store, *args)
            self.points.append(int(out[0].size))
            return out

        def spy_series(store: Store, *args: Any) -> Any:
            self.full_reads += 1
            return series(store, *args)

        monkeypatch.setattr(Store, "_history_points", spy_history)
        monkeypatch.setattr(Store, "_series", spy_series)


def _check_picked(got: dict[str, list[Any]], steps: np.ndarray, values: list[float | None], max_points: int) -> None:
    json.dumps(got, allow_nan=False)
    assert len(got["step"]) <= max_points
    assert got["step"][0] == int(steps[0]) and got["step"][-1] == int(steps[-1])
    assert got["step"] == sorted(set(got["step"]))
    at = {int(s): i for i, s in enumerate(steps)}
    assert all(values[at[s]] == v for s, v in zip(got["step"], got["value"], strict=True))
    assert all(t == T0 + s / 10 for s, t in zip(got["step"], got["time"], strict=True))


def test_long_history_is_downsampled_from_chunk_summaries_keeping_extremes(
    store: Store, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, max_points = 200_000, 500
    steps = np.arange(1, n + 1)
    values = np.sin(steps / 3_000.0) + np.random.default_rng(1).normal(0.0, 0.1, n)
    spike, dip = 54_321, 187_654
    values[spike - 1] = 50.0
    values[dip - 1] = -50.0
    _append_series(store, "r", steps, {"loss/d": values.tolist()})
    assert raw_count(db_path, "SELECT COUNT(*) FROM metric_summaries") == raw_count(
        db_path, "SELECT COUNT(*) FROM metric_chunks"
    )
    assert n // SUMMARY_BLOCK >= 4 * max_points  # long enough for the summary path

    spy = _ReadSpy(monkeypatch)
    got = store.metric_history("r", None, max_points)["loss/d"]
    assert spy.full_reads == 0 and len(spy.points) == 1
    assert max_points < spy.points[0] <= 3 * n // SUMMARY_BLOCK  # a few points per block, not all 200,000
    _check_picked(got, steps, values.tolist(), max_points)
    assert len(got["step"]) > max_points // 2
    picked = dict(zip(got["step"], got["value"], strict=True))
    assert picked[spike] == 50.0 and picked[dip] == -50.0

    # A chart fine enough that the blocks would be coarser than its buckets reads every point, as before.
    fine = store.metric_history("r", None, n // SUMMARY_BLOCK)["loss/d"]
    assert spy.full_reads == 1 and spy.points[-1] == n
    assert fine["step"] == [int(steps[i]) for i in _select_points(steps, values, n // SUMMARY_BLOCK)]


def test_summary_path_with_nulls_keeps_ends_and_every_null_run_start(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, max_points = 200_000, 600
    steps = np.arange(1, n + 1)
    full = np.cos(steps / 1_000.0)
    null_at = [0, 1, *range(8_100, 8_300), *range(16_380, 16_390), *range(100_000, 130_000), n - 2, n - 1]
    null_at += list(range(150_000, 170_000, 97))  # many one-point gaps: more starts than a quarter of the budget
    full[null_at] = np.nan
    full[77_777] = 9.0
    values: list[float | None] = [None if math.isnan(v) else v for v in full.tolist()]
    _append_series(store, "r", steps, {"k": values})

    spy = _ReadSpy(monkeypatch)
    got = store.metric_history("r", None, max_points)["k"]
    assert spy.full_reads == 0 and spy.points[0] < n // 10
    _check_picked(got, steps, values, max_points)
    assert got["value"][0] is None and got["value"][-1] is None
    assert 9.0 in got["value"]
    # Nulls are chosen exactly as from the full series: every run start (here thinned evenly) and the ends.
    expected = _select_points(steps, full, max_points)
    assert [s for s, v in zip(got["step"], got["value"], strict=True) if v is None] == [
        int(steps[i]) for i in expected if math.isnan(full[i])
    ]


def test_chunks_without_summaries_give_the_same_history(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 200_000
    steps = np.arange(1, n + 1)
    values = np.random.default_rng(2).normal(0.0, 1.0, n)
    values[123] = 40.0
    gappy: list[float | None] = [None if i % 1_000 < 3 else float(v) for i, v in enumerate(values)]
    store = Store(db_path)
    store.start()
    try:
        _append_series(store, "r", steps, {"a": values.tolist(), "b": gappy})
        store.append("r", [metrics("r", 10_000, [n + 1, n + 2], {"short": [1.0, None]})])
        assert store.wait_flushed()
        before = [store.metric_history("r", None, m) for m in (2, 500, 2_000)]
    finally:
        store.close()

    # A file written before summaries existed: its chunks have none.
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("DELETE FROM metric_summaries")
        conn.commit()
    finally:
        conn.close()

    reopened = Store(db_path)
    reopened.start()
    try:
        spy = _ReadSpy(monkeypatch)
        assert [reopened.metric_history("r", None, m) for m in (2, 500, 2_000)] == before
        assert before[1]["a"]["value"][before[1]["a"]["step"].index(124)] == 40.0
        assert before[1]["short"] == {
            "step": [n + 1, n + 2],
            "time": [T0 + (n + 1) / 10, T0 + (n + 2) / 10],
            "value": [1.0, None],
        }
        assert spy.full_reads > 0  # the short key (and the finest chart) are read in full
        # New points get summaries again; old chunks merged with them too.
        reopened.append("r", [metrics("r", 10_001, [n + 3], {"a": [0.5]})])
        assert reopened.wait_flushed()
        assert raw_count(db_path, "SELECT COUNT(*) FROM metric_summaries") >= 1
    finally:
        reopened.close()


def test_overlapping_chunks_are_read_in_full(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 200_000
    store.insert_run(make_run("r"))
    # Two interleaved halves, committed apart: chunks that overlap in steps.
    evens, odds = np.arange(2, n + 1, 2), np.arange(1, n, 2)
    for seq, part in enumerate((evens, odds), start=1):
        store.append("r", [metrics("r", seq, part.tolist(), {"k": (part % 7).astype(float).tolist()})])
        assert store.wait_flushed(60)
    spy = _ReadSpy(monkeypatch)
    got = store.metric_history("r", None, 400)["k"]
    assert spy.full_reads == 1 and spy.points == [n]
    steps = np.arange(1, n + 1)
    assert got["step"] == [int(steps[i]) for i in _select_points(steps, (steps % 7).astype(float), 400)]


def test_summaries_follow_their_chunks_through_merges_and_deletes(store: Store, db_path: Path) -> None:
    store.insert_run(make_run("r"))
    for seq in range(1, 2 * COMPACT_AFTER + 1):
        store.append("r", [metrics("r", seq, [seq], {"loss/d": [seq / 3]})])
        assert store.wait_flushed()
    chunks = raw_count(db_path, "SELECT COUNT(*) FROM metric_chunks")
    assert chunks < COMPACT_AFTER
    assert raw_count(db_path, "SELECT COUNT(*) FROM metric_summaries") == chunks
    assert (
        raw_count(db_path, "SELECT COUNT(*) FROM metric_summaries WHERE chunk_id NOT IN (SELECT id FROM metric_chunks)")
        == 0
    )
    store.delete_run("r")
    assert raw_count(db_path, "SELECT COUNT(*) FROM metric_summaries") == 0


# ---------------------------------------------------------------------------- CSV export


def _interleaved_run(store: Store) -> dict[int, dict[str, float | None]]:
    """Loss keys every step, an evaluation key every fifth step, one committed transaction per frame."""
    rng = random.Random(0)
    expected: dict[int, dict[str, float | None]] = {}
    store.insert_run(make_run("r"))
    seq = 0
    for block in range(6):
        steps = list(range(block * 5 + 1, block * 5 + 6))
        loss_d = [rng.random() * 10 ** rng.randint(-300, 300) for _ in steps]
        loss_g: list[float | None] = [rng.uniform(-1, 1) / 3 for _ in steps]
        if block == 1:
            loss_g[2] = None
        seq += 1
        store.append("r", [metrics("r", seq, steps, {"loss/d": loss_d, "loss/g": loss_g})])
        seq += 1
        store.append("r", [frame("r", seq, "sample", step=steps[-1], url="/x.png")])
        for step, d, g in zip(steps, loss_d, loss_g, strict=True):
            expected[step] = {"loss/d": d, "loss/g": g}
        seq += 1
        modes = float(rng.randint(0, 8))
        store.append("r", [metrics("r", seq, [steps[-1]], {"eval/modes": [modes]})])
        expected[steps[-1]]["eval/modes"] = modes
        assert store.wait_flushed()
    return expected


def test_export_csv_has_one_row_per_step_with_sparse_cells_and_exact_floats(store: Store) -> None:
    expected = _interleaved_run(store)
    text = "".join(store.export_csv("r"))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["step", "time", "eval/modes", "loss/d", "loss/g"]
    assert [int(r[0]) for r in rows[1:]] == sorted(expected)
    for row in rows[1:]:
        step = int(row[0])
        assert float(row[1]) == T0 + step / 10
        for key, cell in zip(rows[0][2:], row[2:], strict=True):
            want = expected[step].get(key)
            if want is None:
                assert cell == ""  # no value at this step, or a null
            else:
                assert float(cell) == want
    assert rows[3][2] == "" and rows[8][4] == ""  # step 3 has no eval value; step 8's loss/g was null
    assert rows[5][2] != "" and rows[4][2] == ""


def test_export_csv_streams_the_same_text_in_any_window(store: Store) -> None:
    _interleaved_run(store)
    whole = list(store.export_csv("r"))
    for window in (1, 2, 3, 5):
        pieces = list(store.export_csv("r", window_chunks=window))
        assert "".join(pieces) == "".join(whole)
        assert len(pieces) > 2  # header, then several windows: streamed, not one string
    assert list(store.export_csv("nothing")) == ["step,time\n"]


# ---------------------------------------------------------------------------- durability


def test_a_reopened_store_sees_everything_committed_in_wal_mode(db_path: Path) -> None:
    first = Store(db_path)
    first.start()
    first.insert_run(make_run("r", status="running"))
    sent = [metrics("r", 1, [1, 2], {"loss/d": [0.5, None]}), frame("r", 2, "status", status="completed", error=None)]
    first.append("r", sent)
    assert first.wait_flushed()
    first.update_run("r", status="completed", ended_at=5.0)
    before = ("".join(first.export_csv("r")), first.metric_history("r", None, 10), first.get_run("r"))
    first.close()
    first.close()  # idempotent

    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()

    second = Store(db_path)
    try:
        run = second.get_run("r")
        assert run is not None and run.status == "completed" and run.last_seq == 2 and run.step == 2
        assert second.frames_after("r", 0) == [(f["seq"], text) for f, text in sent]
        assert ("".join(second.export_csv("r")), second.metric_history("r", None, 10), run) == before
    finally:
        second.close()


def test_close_commits_frames_still_queued(db_path: Path) -> None:
    running = Store(db_path)
    running.start()
    running.insert_run(make_run("a"))
    for seq in range(1, 301):
        running.append("a", [metrics("a", seq, [seq], {"loss/d": [seq / 7]})])
    running.close()  # no wait_flushed: close() itself must drain the queue
    with pytest.raises(RuntimeError):
        running.append("a", [frame("a", 301)])

    never_started = Store(db_path)
    never_started.insert_run(make_run("b"))
    never_started.append("b", [frame("b", 1), frame("b", 2)])
    never_started.close()

    reopened = Store(db_path)
    try:
        assert [seq for seq, _ in reopened.frames_after("a", 0)] == list(range(1, 301))
        assert reopened.last_seq("a") == 300
        assert reopened.metric_history("a", None, 1_000)["loss/d"]["value"] == [s / 7 for s in range(1, 301)]
        assert [seq for seq, _ in reopened.frames_after("b", 0)] == [1, 2]
    finally:
        reopened.close()


def test_frames_that_cannot_be_stored_leave_no_hole_a_later_acknowledgement_would_cover(store: Store) -> None:
    """Issue 12, item 8: with the disk full, a dropped frame was later covered by the ack of a higher seq, and the
    sender forgot it: a permanent gap. SQLite's own "database or disk is full" (max_page_count) stands in for it."""
    store.insert_run(make_run("r"))
    acks: list[int] = []
    failures: list[tuple[int, str]] = []
    big = "x" * 50_000

    def send(first: int, last: int) -> None:
        store.append("r", [frame("r", seq, "alert", message=big) for seq in range(first, last + 1)],
                     on_commit=acks.append, on_failure=lambda seq, why: failures.append((seq, why)))

    send(1, 2)
    assert store.wait_flushed()
    pages = store._write_conn.execute("PRAGMA page_count").fetchone()[0]
    store._write_conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
    send(3, 4)
    assert store.wait_flushed()
    store._write_conn.execute("PRAGMA max_page_count = 1000000")  # space again, but 3-4 were lost
    send(5, 6)  # queued behind the failure: storing these would leave 3-4 a hole
    assert store.wait_flushed()
    assert acks == [2]
    assert [seq for seq, _ in failures] == [3, 5] and "full" in failures[0][1]
    assert [seq for seq, _ in store.frames_after("r", 0)] == [1, 2]
    store.resume("r")  # the sender reconnected and resends from 3
    send(3, 6)
    assert store.wait_flushed()
    assert acks == [2, 6]
    assert [seq for seq, _ in store.frames_after("r", 0)] == [1, 2, 3, 4, 5, 6]


def test_a_step_range_is_read_at_full_resolution_where_the_whole_run_is_thinned(store: Store) -> None:
    """A zoomed chart: every point of the range when it fits in max_points, so a one-step excursion the whole
    run's thinned view left out is there, with its exact value; a wider range is thinned within the range."""
    n, per_frame = 200_000, 5_000
    steps = np.arange(1, n + 1)
    values = np.sin(steps / 3_000.0) + np.random.default_rng(0).normal(0.0, 0.1, n)
    values[77_776], values[88_887] = 50.0, -50.0  # steps 77,777 and 88,888
    store.insert_run(make_run("r"))
    for seq, lo in enumerate(range(0, n, per_frame), start=1):
        s = steps[lo : lo + per_frame].tolist()
        store.append("r", [metrics("r", seq, s, {"loss/d": values[lo : lo + per_frame].tolist()})])
        # Each frame committed on its own: how many frames one write takes (the machine's speed) decides the
        # chunks' sizes, and with them whether any chunk lies wholly inside the range read below.
        assert store.wait_flushed(60)

    whole = store.metric_history("r", ["loss/d"], 2_000)["loss/d"]
    hidden = next(s for s in range(100_000, n) if s not in set(whole["step"]))  # a step the thinned view dropped
    zoom = store.metric_history("r", ["loss/d"], 2_000, start=hidden - 600, end=hidden + 600)["loss/d"]
    assert zoom["step"] == list(range(hidden - 600, hidden + 601))
    assert zoom["value"] == values[hidden - 601 : hidden + 600].tolist()
    assert zoom["time"] == [T0 + s / 10 for s in zoom["step"]]

    wide = store.metric_history("r", ["loss/d"], 1_000, start=50_001, end=150_000)["loss/d"]
    assert wide["step"][0] == 50_001 and wide["step"][-1] == 150_000 and len(wide["step"]) <= 1_000
    picked = dict(zip(wide["step"], wide["value"], strict=True))
    assert picked[77_777] == 50.0 and picked[88_888] == -50.0  # its extremes kept

    # A range wide enough for the summaries (those of the chunks inside it, the cut ones read in full): the same
    # ends, extremes and exact values as reading every point of the range.
    summarized = store.metric_history("r", ["loss/d"], 100, start=50_001, end=150_000)["loss/d"]
    with full_reads():
        full = store.metric_history("r", ["loss/d"], 100, start=50_001, end=150_000)["loss/d"]
    assert summarized["step"][0] == full["step"][0] == 50_001 and summarized["step"][-1] == full["step"][-1] == 150_000
    picked = dict(zip(summarized["step"], summarized["value"], strict=True))
    assert picked[77_777] == 50.0 and picked[88_888] == -50.0 and len(summarized["step"]) <= 100
    assert all(v == values[s - 1] for s, v in picked.items())
    assert summarized != full  # (the two paths really differ: otherwise this checks nothing)
    assert store.metric_history("r", None, 10, start=n - 2)["loss/d"]["step"] == [n - 2, n - 1, n]  # open end
    assert store.metric_history("r", None, 10, end=3)["loss/d"]["step"] == [1, 2, 3]  # open start
    assert store.metric_history("r", None, 10, start=n + 1, end=n + 5)["loss/d"]["step"] == []
    with pytest.raises(ValueError, match="start must not be after end"):
        store.metric_history("r", None, 10, start=5, end=4)
