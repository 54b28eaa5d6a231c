"""``GET /api/runs/{id}/events``: what a reloading page needs besides the charts, through the real app."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from app.store import Store
from tests.test_store import _restore_run


def test_events_default_to_the_runs_last_seq_and_keep_the_stored_text(client: TestClient) -> None:
    store: Store = client.app.state.store  # type: ignore[attr-defined]
    texts = _restore_run(store)
    response = client.get("/api/runs/r/events")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["run"] == "r" and body["until"] == client.get("/api/runs/r").json()["last_seq"] == 18
    assert [f["seq"] for f in body["frames"]] == [1, 6, 7, 10, 12, 13, 14, 15, 17, 18]
    assert "metrics" not in {f["type"] for f in body["frames"]}
    assert [f for f in body["frames"] if f["type"] == "hist"] == [json.loads(texts[10]), json.loads(texts[14])]
    # The stored frames are spliced in as they are, not re-serialised.
    for seq in (1, 6, 17):
        assert texts[seq] in response.text


def test_events_until_picks_the_hists_of_that_moment(client: TestClient) -> None:
    store: Store = client.app.state.store  # type: ignore[attr-defined]
    _restore_run(store)
    body = client.get("/api/runs/r/events", params={"until": 12}).json()
    assert body["until"] == 12
    frames = body["frames"]
    assert [f["seq"] for f in frames] == [1, 6, 7, 9, 10, 11, 12]
    assert {f["type"] for f in frames} == {"status", "alert", "sample", "hist", "dldh", "control"}
    assert client.get("/api/runs/r/events", params={"until": 0}).json() == {"run": "r", "until": 0, "frames": []}


def test_events_refuse_a_negative_until_and_an_unknown_run(client: TestClient) -> None:
    store: Store = client.app.state.store  # type: ignore[attr-defined]
    _restore_run(store)
    for bad in (-1, 2**63, "x"):  # 2**63 would overflow SQLite's integers: a 422, not a 500
        response = client.get("/api/runs/r/events", params={"until": bad})
        assert response.status_code == 422, bad
        assert response.json()["detail"][0]["loc"] == ["query", "until"]
    response = client.get("/api/runs/nope/events")
    assert response.status_code == 404 and response.json() == {"detail": "no run 'nope'"}
    assert "/api/runs/{run_id}/events" in client.get("/openapi.json").json()["paths"]
