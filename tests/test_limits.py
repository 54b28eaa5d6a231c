"""The request-body limit in process (app/limits.py, issue 12 item 3): where exactly it falls, and that it covers
every body-carrying route without getting in the way of websockets. The real server's memory under a 192 MiB body,
and the header and connection limits, are in tests/test_limits_live.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

LIMIT = 256 << 10  # the smallest max_body_bytes the settings allow


@pytest.fixture
def small(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(Settings(data_dir=tmp_path, max_body_bytes=LIMIT, _env_file=None))
    with TestClient(app, base_url="http://127.0.0.1:8000") as test_client:
        yield test_client


def _script_run_body(size: int) -> bytes:
    """A script-run request of exactly ``size`` bytes (its free-form config padded), so the edge is exact."""
    skeleton = json.dumps({"name": "edge", "config": {"pad": ""}}).encode()
    body = json.dumps({"name": "edge", "config": {"pad": "x" * (size - len(skeleton))}}).encode()
    assert len(body) == size
    return body


def test_a_body_at_the_limit_reaches_the_app_and_one_byte_more_is_a_413_naming_the_limit(small: TestClient) -> None:
    at_limit = small.post("/api/client/runs", content=_script_run_body(LIMIT),
                          headers={"content-type": "application/json"})
    # The app read it and refused it for its own reason (a script's config is at most 64 KiB), not the edge.
    assert at_limit.status_code == 422 and "config" in at_limit.text
    over = small.post("/api/client/runs", content=_script_run_body(LIMIT + 1),
                      headers={"content-type": "application/json"})
    assert over.status_code == 413
    detail = over.json()["detail"]
    assert str(LIMIT) in detail and "max_body_bytes" in detail
    # Websocket messages have their own limit (1009 past MAX_MESSAGE_BYTES); the body limit leaves them alone.
    created = small.post("/api/client/runs", json={"name": "ws"}).json()
    with small.websocket_connect("ws://127.0.0.1:8000" + created["channel"],
                                 headers={"Authorization": f"Bearer {created['token']}"}) as ws:
        assert ws.receive_json()["type"] == "hello"
        ws.send_text(json.dumps({"type": "frames", "frames": [
            {"type": "status", "seq": 1, "status": "running", "pad": "x" * (LIMIT * 2)}]}))
        assert ws.receive_json()["type"] == "ack"


@pytest.mark.parametrize("path", ["/api/runs", "/api/sweeps", "/api/client/runs", "/api/runs/abc/control"])
def test_a_streamed_body_over_the_limit_is_a_413_on_every_route(small: TestClient, path: str) -> None:
    """Chunked, so there is no Content-Length to refuse up front: the middleware counts what the app receives.
    Whitespace is valid JSON: without the limit the app would read it all and then act on ``{}``."""
    def body() -> Iterator[bytes]:
        yield b"{"
        for _ in range(64):
            yield b" " * (16 << 10)
        yield b"}"

    response = small.post(path, content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    assert "max_body_bytes" in response.json()["detail"]
    assert small.get("/api/runs").json() == []
