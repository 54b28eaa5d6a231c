"""The app factory, in process: routes, OpenAPI and docs served without a CDN, error shapes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import worker_url
from app.settings import Settings


def test_openapi_lists_the_spec_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/presets", "/api/runs", "/api/sweeps", "/api/runs/{run_id}", "/api/runs/{run_id}/stop",
                 "/api/runs/{run_id}/control", "/api/runs/{run_id}/metrics", "/api/runs/{run_id}/metrics.csv"):
        assert path in paths, path


def test_docs_page_and_its_assets_come_from_the_app_itself(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)""", page.text) + re.findall(r"url: ?'([^']+)'", page.text)
    assert urls and all(not u.startswith(("http://", "https://", "//")) for u in urls), urls
    for asset in ("/static/docs/swagger-ui-bundle.js", "/static/docs/swagger-ui.css"):
        assert asset in page.text
        assert client.get(asset).status_code == 200


def test_validation_errors_name_the_field_even_for_nan(client: TestClient) -> None:
    response = client.post("/api/runs", content=b'{"gan": {"lr_d": NaN}}', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "gan", "lr_d"]]
    response = client.post("/api/runs/abc/control", json={"lr_d": 2.0})
    assert response.status_code == 404  # the run is checked before the change
    assert client.get("/api/runs/abc").json() == {"detail": "no run 'abc'"}


@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1", "ws://127.0.0.1:8000"), ("0.0.0.0", "ws://127.0.0.1:8000"), ("localhost", "ws://127.0.0.1:8000"),
    ("::", "ws://[::1]:8000"), ("::1", "ws://[::1]:8000"), ("192.168.1.5", "ws://192.168.1.5:8000"),
])
def test_workers_reach_the_server_where_it_listens(tmp_path: Path, host: str, expected: str) -> None:
    token = "k" + "x7" * 20
    settings = Settings(data_dir=tmp_path, host=host, port=8000, token=token, _env_file=None)  # type: ignore[call-arg]
    assert worker_url(settings) == expected
