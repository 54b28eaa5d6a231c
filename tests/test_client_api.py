"""``POST /api/client/runs`` and a script's run on the worker channel, in process (real store and manager)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store import Store

SOURCE = {"origin": "script", "host": "box", "script": "train.py", "argv": ["--lr", "1"],
          "git": {"commit": "a" * 40, "branch": "main", "dirty": True}, "python": "3.11.7", "pid": 42}


def create(client: TestClient, **body: Any) -> Any:
    return client.post("/api/client/runs", json={"name": "mine", "config": {"lr": 0.1}, "source": SOURCE, **body})


def test_a_script_run_is_created_running_with_its_own_token_and_found_again_by_uid(client: TestClient) -> None:
    first = create(client, uid="uid-0123456789")
    assert first.status_code == 201
    body = first.json()
    run = body["run"]
    assert run["status"] == "running" and run["kind"] == "custom" and run["device"] == "script"
    assert run["source"]["git"]["commit"] == "a" * 40 and run["config"] == {"lr": 0.1} and run["controls"] == []
    assert body["channel"] == f"/ws/worker/{run['id']}" and body["url"] == f"/runs/{run['id']}"
    assert len(body["token"]) >= 32 and body["created"] and body["received"] == 0
    again = create(client, uid="uid-0123456789")
    assert again.status_code == 200 and again.json()["run"]["id"] == run["id"] and not again.json()["created"]
    assert again.json()["token"] != body["token"]  # a fresh token: the old one no longer opens the channel
    assert len(client.get("/api/runs").json()) == 1


@pytest.mark.parametrize(("body", "field"), [
    ({"uid": "short"}, "uid"),
    ({"uid": "../../etc/passwd"}, "uid"),
    ({"config": {"big": "x" * 70_000}}, "config"),
    ({"kind": "diffusion"}, "kind"),
    ({"source": {**SOURCE, "git": {"commit": "not-a-sha"}}}, "commit"),
    ({"source": {**SOURCE, "shell": "rm -rf /"}}, "shell"),
    ({"name": "n" * 201}, "name"),
    ({"surprise": 1}, "surprise"),
])
def test_a_bad_script_run_request_is_a_422_naming_the_field(client: TestClient, body: dict[str, Any],
                                                            field: str) -> None:
    answer = create(client, **body)
    assert answer.status_code == 422
    assert any(field in ".".join(str(p) for p in err["loc"]) for err in answer.json()["detail"]), answer.json()
    assert client.get("/api/runs").json() == []


def test_a_config_with_nan_is_refused(client: TestClient) -> None:
    answer = client.post("/api/client/runs", content=b'{"config": {"lr": NaN}}',
                         headers={"Content-Type": "application/json"})
    assert answer.status_code == 422


def test_a_script_run_needs_the_servers_token_when_it_has_one(tmp_path: Path) -> None:
    token = "kq3ZpV8wXr2mN7bT1yLc5dFh9sGj4aQe"
    app = create_app(Settings(data_dir=tmp_path, token=token, _env_file=None))  # type: ignore[call-arg]
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert create(client).status_code == 401
        assert create(client, uid=None).status_code == 401
        assert client.post("/api/client/runs", json={}, headers={"Authorization": f"Bearer {token}"}
                           ).status_code == 201


def _channel(client: TestClient, created: dict[str, Any]) -> Any:
    return client.websocket_connect("ws://127.0.0.1:8000" + created["channel"],
                                    headers={"Authorization": f"Bearer {created['token']}"})


def _frames(*frames: dict[str, Any]) -> str:
    return json.dumps({"type": "frames", "frames": list(frames)})


def test_a_script_registers_its_controls_and_the_others_are_refused(client: TestClient) -> None:
    created = create(client).json()
    run_id = created["run"]["id"]
    with _channel(client, created) as ws:
        assert ws.receive_json() == {"type": "hello", "ack": 0, "max_artifact_bytes": 1 << 30}
        ws.send_text(_frames({"type": "status", "seq": 1, "status": "running", "step": 0},
                             {"type": "capabilities", "seq": 2, "kind": "gan", "controls": ["g_loss", "lr_g"]}))
        assert ws.receive_json() == {"type": "ack", "seq": 2}
        detail = client.get(f"/api/runs/{run_id}").json()
        assert detail["kind"] == "gan" and detail["controls"] == ["g_loss", "lr_g"]
        refused = client.post(f"/api/runs/{run_id}/control", json={"lr_d": 0.1})
        assert refused.status_code == 409 and "lr_d" in refused.json()["detail"]
        assert client.post(f"/api/runs/{run_id}/stop").status_code == 409  # it never asked about stop
        assert client.post(f"/api/runs/{run_id}/control", json={"g_loss": "saturating"}).status_code == 200
        assert ws.receive_json() == {"type": "control", "changes": {"g_loss": "saturating"}}
        ws.send_text(_frames({"type": "status", "seq": 3, "status": "completed", "error": None, "step": 0}))
        assert ws.receive_json() == {"type": "ack", "seq": 3}
    assert client.get(f"/api/runs/{run_id}").json()["status"] == "completed"


def test_artifact_urls_are_the_servers_whatever_the_script_wrote(client: TestClient) -> None:
    created = create(client).json()
    run_id = created["run"]["id"]
    with _channel(client, created) as ws:
        ws.receive_json()
        ws.send_text(_frames({"type": "sample", "seq": 1, "step": 5, "name": "step_00000005.png",
                              "url": "http://evil.example/x.png"}))
        ws.receive_json()
    frames = client.get(f"/api/runs/{run_id}/events").json()["frames"]
    assert frames[0]["url"] == f"/api/runs/{run_id}/samples/step_00000005.png"


def test_a_script_run_resumed_from_is_a_422_not_a_500(client: TestClient) -> None:
    created = create(client).json()
    answer = client.post("/api/runs", json={"resume_from": {"run": created["run"]["id"],
                                                            "checkpoint": "step_00000001.pt"}})
    assert answer.status_code == 422 and "checkpoint" in json.dumps(answer.json())


def test_a_database_of_schema_1_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "gradwatch.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
            config TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, ended_at REAL,
            step INTEGER NOT NULL DEFAULT 0, error TEXT, sweep_id TEXT, device TEXT, pid INTEGER, pid_started REAL,
            token_hash TEXT, last_alert TEXT, resume_from TEXT, last_seq INTEGER NOT NULL DEFAULT 0);
        INSERT INTO runs (id, name, kind, status, config, created_at) VALUES ('old', 'old run', 'gan', 'completed',
            '{}', 1.0);
        PRAGMA user_version = 1;
    """)
    conn.close()
    store = Store(path)
    try:
        old = store.get_run("old")
        assert old is not None and old.source is None and old.seq_offset == 0 and not old.external
    finally:
        store.close()
