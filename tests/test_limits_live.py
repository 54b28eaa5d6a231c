"""The HTTP and websocket edge of a real ``gradwatch serve``, probed with real sockets (issue 12, items 3 and 4, and
its "then cover" list): request bodies, half-sent and oversized headers, the connection cap, dead websocket peers,
oversized websocket messages and huge forms.

One server per module (per xdist worker), its limits set short through the environment so that each test waits
seconds, not the defaults' tens of seconds. Bounds on time are generous (a busy 2-core machine), and each is far
below what the unguarded server takes, which is never. Memory is the server's peak RSS (``VmHWM``, reset before
each measurement where the kernel allows), because a buffered body is freed again before any later sample.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from gradwatch.protocol import MAX_MESSAGE_BYTES
from tests.live_server import LiveServer, wait_for

HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 16
PING_S = 1.0
#: Far beyond each short limit above and far below the unguarded server, which holds on for ever (or 40 s of pings).
CLOSE_BOUND_S = 15.0
MiB = 1 << 20


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("limits-data"), env={
        "GRADWATCH_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "GRADWATCH_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "GRADWATCH_WS_PING_INTERVAL_S": str(PING_S),
        "GRADWATCH_WS_PING_TIMEOUT_S": str(PING_S),
    }).start()
    try:
        yield srv
    finally:
        srv.stop()


def _address(srv: LiveServer) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _script_run(srv: LiveServer) -> dict[str, Any]:
    """A script's run: a run and a channel token without starting any worker process."""
    with srv.client() as http:
        response = http.post("/api/client/runs", json={"name": "edge"})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def _reset_peak_rss(pid: int) -> None:
    with contextlib.suppress(OSError):  # Linux >= 4.0 resets VmHWM to the current RSS; otherwise the peak stays
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took; fails at ``timeout``."""
    start = time.monotonic()
    data = b""
    sock.settimeout(0.5)
    while time.monotonic() - start < timeout:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - start
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
    raise AssertionError(f"the server still held the connection after {timeout} s; it sent {data[:200]!r}")


def _read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length, leaving the connection open."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {raw!r}"
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _status_and_body(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


# --- raw websocket client: what a peer that never answers, or sends too much, looks like on the wire ---------------


def _ws_connect(srv: LiveServer, path: str, token: str | None = None) -> tuple[socket.socket, bytes]:
    """A completed websocket handshake on a plain socket; the socket and whatever followed the 101 response."""
    host, port = _address(srv)
    sock = socket.create_connection((host, port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, f"closed during the handshake: {response!r}"
        response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


def _client_frame_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """A client frame's header with an all-zero mask (RFC 6455 allows any key), so the payload goes as it is."""
    first = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        size = bytes([0x80 | length])
    elif length < 1 << 16:
        size = bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        size = bytes([0x80 | 127]) + struct.pack("!Q", length)
    return first + size + b"\0\0\0\0"


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each complete unmasked frame in ``data``."""
    frames = []
    while len(data) >= 2:
        opcode, length, offset = data[0] & 0x0F, data[1] & 0x7F, 2
        if length == 126:
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < offset + length:
            break
        frames.append((opcode, data[offset:offset + length]))
        data = data[offset + length:]
    return frames


def _close_code(frames: list[tuple[int, bytes]]) -> int | None:
    closes = [payload for opcode, payload in frames if opcode == 0x8]
    return struct.unpack("!H", closes[0][:2])[0] if closes and len(closes[0]) >= 2 else None


# --- item 3: request bodies -----------------------------------------------------------------------------------------


def test_a_body_over_max_body_bytes_gets_a_413_and_the_server_never_holds_it(edge: LiveServer) -> None:
    """Issue 12, item 3: a 300 MiB JSON POST took the server from 256 to 1,152 MiB before its 422."""
    assert edge.proc is not None
    pid = edge.proc.pid

    def spaces(total: int) -> Iterator[bytes]:  # valid JSON whitespace: without the limit the app reads it all
        yield b"{"
        for _ in range(total // MiB):
            yield b" " * MiB
        yield b"}"

    with edge.client() as http:
        runs_before = len(http.get("/api/runs").json())
        _reset_peak_rss(pid)
        before = _peak_rss(pid)
        declared = http.post("/api/runs", content=spaces(64 * MiB),
                             headers={"content-type": "application/json", "content-length": str(64 * MiB + 2)})
        streamed = http.post("/api/runs", content=spaces(128 * MiB), headers={"content-type": "application/json"})
        grown = _peak_rss(pid) - before
        for response in (declared, streamed):
            assert response.status_code == 413, response.text[:300]
            detail = response.json()["detail"]
            assert "max_body_bytes" in detail and str(MiB) in detail
        assert "content-length" not in streamed.request.headers  # the second one really was chunked
        assert len(http.get("/api/runs").json()) == runs_before  # the app never ran either request
    assert grown < 48 * MiB, f"the server's peak RSS grew by {grown / MiB:.0f} MiB over 192 MiB of refused bodies"


# --- item 4: headers and connections --------------------------------------------------------------------------------


def test_half_sent_requests_are_closed_after_header_timeout_s_and_a_slow_body_is_not(edge: LiveServer) -> None:
    """Issue 12, item 4: 300 half-sent requests were all still held after 21 s (uvicorn has no header timeout)."""
    host, port = _address(edge)
    # Headers complete at once, body after more than the header timeout: the body is the app's to time, so this
    # request is answered.
    body = json.dumps({"name": "slow body"}).encode()
    with socket.create_connection((host, port), timeout=10) as slow_body:
        slow_body.sendall(f"POST /api/client/runs HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(HEADER_TIMEOUT_S * 2.5)
        slow_body.sendall(body)
        answer = slow_body.recv(65536)
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]

    half_sent = [socket.create_connection((host, port), timeout=10) for _ in range(20)]
    silent = [socket.create_connection((host, port), timeout=10) for _ in range(10)]
    trickle = socket.create_connection((host, port), timeout=10)
    # A kept-alive connection's next request gets its own deadline, from its first byte.
    kept_alive = half_sent[0]
    kept_alive.sendall(f"GET /api HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    first = _read_response(kept_alive)
    assert first.startswith(b"HTTP/1.1 200"), first[:200]
    for sock in half_sent:
        sock.sendall(f"GET /api/runs HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: ".encode())
    try:
        # A slowloris adds a byte now and then: the deadline counts from the connection, not from the last byte.
        start = time.monotonic()
        trickle.sendall(b"GET /api/runs HTTP/1.1\r\n")
        trickle.setblocking(False)
        while time.monotonic() - start < CLOSE_BOUND_S:
            try:
                trickle.send(b"x")
            except OSError:
                break  # closed by the server
            if select.select([trickle], [], [], 0.2)[0]:
                break
        else:
            raise AssertionError(f"a slowloris sending a byte every 0.2 s was still held after {CLOSE_BOUND_S} s")
        trickle.setblocking(True)
        answered = [_read_until_closed(sock, CLOSE_BOUND_S)[0] for sock in half_sent]
        for raw in answered:
            status, detail = _status_and_body(raw)
            assert status == 408 and "header_timeout_s" in detail["detail"]
        for sock in silent:  # a connection that sent nothing (a browser's spare one) is closed without a word
            assert _read_until_closed(sock, CLOSE_BOUND_S)[0] == b""
    finally:
        for sock in [*half_sent, *silent, trickle]:
            sock.close()
    with edge.client() as http:
        assert http.get("/api/runs").status_code == 200


def test_request_headers_over_max_header_bytes_get_a_431(edge: LiveServer) -> None:
    host, port = _address(edge)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(f"GET /api/runs HTTP/1.1\r\nHost: {host}:{port}\r\nX-Big: ".encode())
        sent = 0
        # 8 KiB at a time, stopping once the answer is there: what the server closes on is then all read, and the
        # 431 is not lost to a reset. Ending the headers on the last piece sends a complete request in the end.
        while not select.select([sock], [], [], 0.05 if sent <= 64 << 10 else CLOSE_BOUND_S)[0]:
            assert sent <= 128 << 10, "headers twice max_header_bytes were accepted"
            sock.sendall(b"a" * (8 << 10) + (b"\r\n\r\n" if sent >= 120 << 10 else b""))
            sent += 8 << 10
        status, detail = _status_and_body(_read_until_closed(sock, CLOSE_BOUND_S)[0])
    assert status == 431 and "max_header_bytes" in detail["detail"]


def test_connections_past_max_connections_get_a_503_and_are_closed(edge: LiveServer) -> None:
    """Issue 12, item 4 ("no connection cap") and the cover list: extra connections refused cleanly, websocket
    upgrades included, and the slots come back once the connections close."""
    run_id = _script_run(edge)["run"]["id"]
    refused: list[InvalidStatus] = []
    with contextlib.ExitStack() as opened:
        accepted = 0
        for _ in range(MAX_CONNECTIONS + 4):
            try:
                opened.enter_context(edge.stream(run_id))
                accepted += 1
            except InvalidStatus as exc:
                refused.append(exc)
        assert refused, f"all {accepted} websockets were accepted; the cap is {MAX_CONNECTIONS}"
        assert accepted <= MAX_CONNECTIONS
        for refusal in refused:
            assert refusal.response.status_code == 503
            assert "max_connections" in json.loads(refusal.response.body or b"{}")["detail"]
        with httpx.Client(base_url=edge.url, timeout=10) as fresh:
            response = fresh.get("/api/runs")
        assert response.status_code == 503 and response.headers["connection"] == "close"
        assert "max_connections" in response.json()["detail"]

    def answers() -> bool:
        with httpx.Client(base_url=edge.url, timeout=10) as fresh:
            return fresh.get("/api/runs").status_code == 200

    wait_for(answers, CLOSE_BOUND_S, what="the closed websockets' slots to be free again")


# --- websockets -----------------------------------------------------------------------------------------------------


def test_a_websocket_peer_that_never_answers_pings_is_closed_and_a_live_one_is_not(edge: LiveServer) -> None:
    """A dashboard tab whose machine vanished (no FIN, no pong) would otherwise hold its connection and its place
    in the run's fan-out until TCP itself gives up, which can take many minutes."""
    run_id = _script_run(edge)["run"]["id"]
    dead, _ = _ws_connect(edge, f"/ws/runs/{run_id}")
    with edge.stream(run_id) as live, dead:  # websockets answers pings by itself
        data, _took = _read_until_closed(dead, CLOSE_BOUND_S)
        frames = _server_frames(data)
        assert any(opcode == 0x9 for opcode, _ in frames), f"no ping before the close: {frames}"
        assert _close_code(frames) == 1011  # keepalive ping timeout
        time.sleep(3 * 2 * PING_S)  # three more ping rounds (interval and timeout)
        live.ping().wait(10)  # the peer that answers is still served
        assert live.close_code is None


def test_an_oversized_websocket_message_is_closed_1009_and_the_server_memory_stays_flat(edge: LiveServer) -> None:
    """On the worker channel, where the large messages legitimately go: a message over MAX_MESSAGE_BYTES, whether
    one frame or many fragments, ends the connection with 1009 and is never held whole."""
    assert edge.proc is not None
    pid = edge.proc.pid
    created = _script_run(edge)
    path, token = created["channel"], created["token"]
    fragment = 256 << 10
    _reset_peak_rss(pid)
    before = _peak_rss(pid)
    for _ in range(4):
        # One frame announcing 64 MiB: refused from its header alone.
        sock, _ = _ws_connect(edge, path, token)
        with sock:
            sock.sendall(_client_frame_header(0x1, 64 * MiB) + b" " * 1024)
            assert _close_code(_server_frames(_read_until_closed(sock, CLOSE_BOUND_S)[0])) == 1009
        # Fragments under the limit each, over it together: refused at the fragment that crosses it. Sent one at
        # a time, stopping once the server has answered, so the close is read rather than lost to a reset.
        sock, data = _ws_connect(edge, path, token)
        with sock:
            sent = 0
            while _close_code(_server_frames(data)) is None:
                if select.select([sock], [], [], 0)[0]:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    continue
                if sent > MAX_MESSAGE_BYTES:  # the crossing fragment is out: nothing more is sent, the answer is read
                    break
                sock.sendall(_client_frame_header(0x1 if sent == 0 else 0x0, fragment, fin=False) + b" " * fragment)
                sent += fragment
            # The close may come after other bytes (a ping): read to the end rather than judge by the first chunk.
            data += _read_until_closed(sock, CLOSE_BOUND_S)[0]
            assert _close_code(_server_frames(data)) == 1009, "the server accepted more than the message limit"
    grown = _peak_rss(pid) - before
    assert grown < 64 * MiB, f"the server's peak RSS grew by {grown / MiB:.0f} MiB over 8 refused messages"
    with edge.client() as http:
        assert http.get("/api/runs").status_code == 200


# --- forms ----------------------------------------------------------------------------------------------------------


def test_a_form_with_10000_fields_is_a_4xx(edge: LiveServer) -> None:
    """10,000 empty fields fit in 30 KB, under the form's 64 KiB size limit: only the field count can refuse them."""
    run_id = _script_run(edge)["run"]["id"]
    headers = {"content-type": "application/x-www-form-urlencoded", "origin": edge.url}
    with edge.client() as http:
        for path in ("/ui/runs", f"/ui/runs/{run_id}/control"):
            response = http.post(path, content=b"a=&" * 10_000, headers=headers)
            assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
        assert http.get("/api/runs").status_code == 200
