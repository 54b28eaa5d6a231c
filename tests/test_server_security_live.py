"""SPEC §7 on a real server: token off loopback, Host and Origin checks on HTTP and websockets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.live_server import ROOT, TINY_GAN, LiveServer, config, wait_status

pytestmark = pytest.mark.xdist_group("live-security")


def test_off_loopback_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GRADWATCH_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                           "--data-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "token" in done.stderr and "serving on" not in done.stderr
    for weak in ("changethis", "short-token"):
        done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--token", weak,
                               "--port", "0", "--data-dir", str(tmp_path)], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0 and "token" in done.stderr


def test_token_host_and_origin_guard_a_real_server(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data", "--host", "0.0.0.0", "--token", "generate").start()
    try:
        match = re.search(r"\?token=(\S+)", "".join(server.log))
        assert match, "a generated token is printed at start"
        token = match.group(1)
        url = server.url.replace("0.0.0.0", "127.0.0.1")
        with httpx.Client(base_url=url, timeout=30) as anonymous:
            response = anonymous.get("/api/runs")
            assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
            assert anonymous.post("/api/runs", json=TINY_GAN).status_code == 401
            # The browser's way in: ?token= once, then an HttpOnly, SameSite=Strict cookie.
            login = anonymous.get("/", params={"token": token}, follow_redirects=False)
            assert login.status_code == 303
            cookie = login.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert anonymous.get("/api/runs").status_code == 200  # the cookie jar now holds it
        server.token = token
        with server.client() as http:
            assert http.get("/api/runs").status_code == 200
            foreign = http.post("/api/runs", json=TINY_GAN, headers={"Origin": "http://evil.example"})
            assert foreign.status_code == 403
            rebinding = http.get("/api/runs", headers={"Host": "evil.example"})
            assert rebinding.status_code in (200, 403)  # wildcard bind: the token, not the Host, guards
            run = http.post("/api/runs", json=config(TINY_GAN, train__steps=20), headers={"Origin": url})
            assert run.status_code == 201, run.text
            wait_status(http, run.json()["id"], {"completed"})
        ws_url = f"{server.ws_url.replace('0.0.0.0', '127.0.0.1')}/ws/runs/{run.json()['id']}"
        auth = {"Authorization": f"Bearer {token}"}
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url, additional_headers=auth, origin="http://evil.example", proxy=None)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url, proxy=None)
        assert refused.value.response.status_code == 403
        with connect(ws_url, additional_headers=auth, proxy=None) as ws:
            assert '"seq":1' in str(ws.recv(timeout=10))
        # The worker channel and the worker's checkpoint download take their run's own token, nothing else.
        worker_url = ws_url.replace("/ws/runs/", "/ws/worker/")
        for headers in ({}, auth, {"Authorization": "Bearer " + "x" * 43}):
            with pytest.raises(InvalidStatus):
                connect(worker_url, additional_headers=headers, proxy=None)
            resume = httpx.get(f"{url}/worker/runs/{run.json()['id']}/resume", headers=headers)
            assert resume.status_code == 401
    finally:
        server.stop()


def test_loopback_server_refuses_foreign_host_and_cross_site_writes(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data", "--allowed-hosts", "dash.example,other.example").start()
    try:
        with server.client() as http:
            assert http.get("/api/runs", headers={"Host": "evil.example"}).status_code == 403  # DNS rebinding
            assert http.get("/api/runs", headers={"Host": "dash.example:8000"}).status_code == 200  # a proxy's name
            assert http.post("/api/runs", json=TINY_GAN, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
            assert http.get("/api/runs").json() == []  # nothing was launched by the refused requests
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{server.ws_url}/ws/runs/x", origin="http://evil.example", proxy=None)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
    finally:
        server.stop()
