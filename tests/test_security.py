"""SecurityMiddleware: Host, Origin / Sec-Fetch-Site and token checks on HTTP requests and websocket upgrades.

Each refusal test drives a tiny Starlette app whose routes answer 200 (or accept the websocket), so a test can only
pass if the middleware itself refused the request.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Message, Scope
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.security import TOKEN_COOKIE, SecurityMiddleware, host_allowed, is_same_origin
from app.settings import Settings

TOKEN = "Zq3v-8mW.kP_2rT~9sLd0bXeYfHjNcGu4A"
BASE = "http://127.0.0.1:8000"
SAME_ORIGIN = "http://127.0.0.1:8000"
UNAUTHORIZED = "missing or invalid access token: send 'Authorization: Bearer <token>'"
STATE_CHANGING = ["POST", "PUT", "PATCH", "DELETE"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("GRADWATCH_"):
            monkeypatch.delenv(name)


@pytest.fixture
def make_settings(tmp_path: Path) -> Any:
    def make(**kwargs: Any) -> Settings:
        return Settings(data_dir=tmp_path, _env_file=None, **kwargs)

    return make


async def _read(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"read {request.url.path}")


async def _write(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{request.method} done")


async def _stream(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(f"hello {websocket.url.path}")
    await websocket.close()


def build_app(settings: Settings, lifespan_log: list[str] | None = None) -> ASGIApp:
    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if lifespan_log is not None:
            lifespan_log.append("startup")
        yield

    inner = Starlette(
        routes=[
            Route("/", _read),
            Route("/api/runs", _read, methods=["GET"]),
            Route("/api/runs", _write, methods=STATE_CHANGING),
            Route("/static/app.js", _read),
            WebSocketRoute("/ws/runs/1", _stream),
            WebSocketRoute("/ws/worker/1", _stream),
        ],
        lifespan=lifespan,
    )
    return SecurityMiddleware(inner, settings)


@pytest.fixture
def client(make_settings: Any) -> Iterator[TestClient]:
    """No token configured: isolates the Host and Origin checks."""
    with TestClient(build_app(make_settings()), base_url=BASE) as c:
        yield c


@pytest.fixture
def token_client(make_settings: Any) -> Iterator[TestClient]:
    with TestClient(build_app(make_settings(token=TOKEN)), base_url=BASE, follow_redirects=False) as c:
        yield c


def ws_url(client: TestClient, path: str) -> str:
    # websocket_connect joins relative paths onto ws://testserver, not onto the client's base_url.
    scheme = "wss" if client.base_url.scheme == "https" else "ws"
    return f"{scheme}://{client.base_url.netloc.decode()}{path}"


def ws_refused(client: TestClient, path: str, reason: str, headers: dict[str, str] | None = None) -> None:
    """Assert the upgrade is refused with 1008, by the check whose message contains ``reason``."""
    url = ws_url(client, path)
    with pytest.raises(WebSocketDisconnect) as exc, client.websocket_connect(url, headers=headers or {}):
        pass
    assert exc.value.code == 1008
    assert reason in exc.value.reason


def ws_accepted(client: TestClient, path: str, headers: dict[str, str] | None = None) -> None:
    with client.websocket_connect(ws_url(client, path), headers=headers or {}) as ws:
        assert ws.receive_text() == f"hello {path}"


def run_raw(app: ASGIApp, scope: Scope) -> list[Message]:
    """Drive the middleware with a hand-made scope, for requests an HTTP client will not produce."""
    sent: list[Message] = []
    first = (
        {"type": "http.request", "body": b"", "more_body": False}
        if scope["type"] == "http"
        else {"type": "websocket.connect"}
    )
    events = [first]

    async def receive() -> Message:
        return events.pop(0) if events else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return sent


def raw_scope(headers: list[tuple[bytes, bytes]], *, path: str = "/", method: str = "GET",
              query: bytes = b"", kind: str = "http") -> Scope:
    scope: Scope = {"type": kind, "path": path, "raw_path": path.encode(), "root_path": "", "scheme": "http",
                    "query_string": query, "headers": headers, "client": ("127.0.0.1", 5000),
                    "server": ("127.0.0.1", 8000)}
    if kind == "http":
        scope.update(http_version="1.1", method=method)
    return scope


# --- helpers --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("https://dash.example.org", "dash.example.org", True),
        ("http://LOCALHOST:8000", "localhost:8000", True),
        ("http://[::1]:8000", "[::1]:8000", True),
        ("http://127.0.0.1:9999", "127.0.0.1:8000", False),
        ("http://127.0.0.1", "127.0.0.1:8000", False),
        ("http://evil.example", "127.0.0.1:8000", False),
        ("http://127.0.0.1:8000.evil.example", "127.0.0.1:8000", False),
        ("http://user@127.0.0.1:8000", "127.0.0.1:8000", False),
        ("http://127.0.0.1:8000/path", "127.0.0.1:8000", False),
        ("ftp://127.0.0.1:8000", "127.0.0.1:8000", False),
        ("null", "127.0.0.1:8000", False),
        ("", "127.0.0.1:8000", False),
    ],
)
def test_is_same_origin(origin: str, host: str, same: bool) -> None:
    assert is_same_origin(origin, host) is same


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        ("127.0.0.1:8000", True),
        ("localhost", True),
        ("[::1]:8000", True),
        ("[::1]", True),
        ("LocalHost.:8000", True),
        (None, False),
        ("", False),
        ("evil.example", False),
        ("localhost.evil.example", False),
        ("localhost:abc", False),
        ("[::1", False),
        ("[::1]junk", False),
        ("0.0.0.0:8000", False),
    ],
)
def test_host_allowed_on_loopback(make_settings: Any, header: str | None, allowed: bool) -> None:
    assert host_allowed(header, make_settings()) is allowed


# --- Host -----------------------------------------------------------------------------------------------------------


def test_foreign_host_is_refused_even_for_reads(client: TestClient) -> None:
    response = client.get("/", headers={"host": "evil.example:8000"})
    assert response.status_code == 403
    assert response.json() == {"detail": "Host header 'evil.example' is not allowed; add it to allowed_hosts"}


def test_foreign_host_is_refused_for_websockets(client: TestClient) -> None:
    ws_refused(client, "/ws/runs/1", "Host header 'evil.example'", headers={"host": "evil.example"})


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "[::1]"])
def test_loopback_host_names_pass(client: TestClient, host: str) -> None:
    response = client.get("/", headers={"host": host})
    assert response.status_code == 200
    assert response.text == "read /"


def test_missing_host_is_refused(make_settings: Any) -> None:
    sent = run_raw(build_app(make_settings()), raw_scope([]))
    assert sent[0]["status"] == 403
    assert b"missing Host header" in sent[1]["body"]


def test_repeated_host_header_is_refused(make_settings: Any) -> None:
    sent = run_raw(build_app(make_settings()), raw_scope([(b"host", b"localhost"), (b"host", b"evil.example")]))
    assert sent[0]["status"] == 400


def test_allowed_hosts_extend_the_loopback_names(make_settings: Any) -> None:
    with TestClient(build_app(make_settings(allowed_hosts=["dash.example.org"])), base_url=BASE) as c:
        assert c.get("/", headers={"host": "dash.example.org"}).status_code == 200
        assert c.get("/", headers={"host": "localhost:8000"}).status_code == 200
        assert c.get("/", headers={"host": "other.example"}).status_code == 403


def test_bind_address_is_an_allowed_host(make_settings: Any) -> None:
    app = build_app(make_settings(host="192.168.1.5", token=TOKEN))
    auth = {"authorization": f"Bearer {TOKEN}"}
    with TestClient(app, base_url="http://192.168.1.5:8000") as c:
        assert c.get("/", headers=auth).status_code == 200
        assert c.get("/", headers={**auth, "host": "evil.example"}).status_code == 403


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_wildcard_bind_without_allowed_hosts_accepts_any_host(make_settings: Any, bind: str) -> None:
    app = build_app(make_settings(host=bind, token=TOKEN))
    auth = {"authorization": f"Bearer {TOKEN}"}
    with TestClient(app, base_url="http://gpu-box.lan:8000") as c:
        assert c.get("/", headers=auth).status_code == 200
        ws_accepted(c, "/ws/runs/1", headers=auth)
        # The token still guards.
        assert c.get("/").status_code == 401


def test_wildcard_bind_with_allowed_hosts_enforces_them(make_settings: Any) -> None:
    app = build_app(make_settings(host="0.0.0.0", token=TOKEN, allowed_hosts=["dash.example.org"]))
    auth = {"authorization": f"Bearer {TOKEN}"}
    with TestClient(app, base_url="http://dash.example.org") as c:
        assert c.get("/", headers=auth).status_code == 200
        assert c.get("/", headers={**auth, "host": "gpu-box.lan"}).status_code == 403
        assert c.get("/", headers={**auth, "host": "0.0.0.0:8000"}).status_code == 403


# --- Origin / Sec-Fetch-Site ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", STATE_CHANGING)
def test_cross_site_state_change_is_refused(client: TestClient, method: str) -> None:
    response = client.request(method, "/api/runs", headers={"origin": "http://evil.example"})
    assert response.status_code == 403
    assert "Origin 'http://evil.example'" in response.json()["detail"]


@pytest.mark.parametrize("origin", [SAME_ORIGIN, "https://127.0.0.1:8000"])
def test_same_origin_post_passes(client: TestClient, origin: str) -> None:
    response = client.post("/api/runs", headers={"origin": origin, "sec-fetch-site": "same-origin"})
    assert response.status_code == 200
    assert response.text == "POST done"


@pytest.mark.parametrize("origin", ["null", "http://127.0.0.1:9999", "http://localhost:8000"])
def test_other_origins_on_the_same_machine_are_refused(client: TestClient, origin: str) -> None:
    # "localhost:8000" is not the Host the request was sent to ("127.0.0.1:8000"): a different origin to a browser.
    assert client.post("/api/runs", headers={"origin": origin}).status_code == 403


@pytest.mark.parametrize("site", ["cross-site", "same-site", "Cross-Site"])
def test_cross_site_fetch_metadata_is_refused(client: TestClient, site: str) -> None:
    response = client.post("/api/runs", headers={"sec-fetch-site": site})
    assert response.status_code == 403
    assert "Sec-Fetch-Site" in response.json()["detail"]


@pytest.mark.parametrize("site", ["same-origin", "none"])
def test_same_origin_fetch_metadata_passes(client: TestClient, site: str) -> None:
    assert client.post("/api/runs", headers={"sec-fetch-site": site}).status_code == 200


def test_cross_site_fetch_metadata_is_refused_even_with_same_origin_header(client: TestClient) -> None:
    headers = {"origin": SAME_ORIGIN, "sec-fetch-site": "cross-site"}
    assert client.post("/api/runs", headers=headers).status_code == 403


def test_clients_without_browser_headers_pass(client: TestClient) -> None:
    assert client.post("/api/runs").status_code == 200


def test_reads_with_foreign_origin_pass(client: TestClient) -> None:
    headers = {"origin": "http://evil.example", "sec-fetch-site": "cross-site"}
    assert client.get("/api/runs", headers=headers).status_code == 200
    assert client.head("/api/runs", headers=headers).status_code == 200
    assert client.options("/api/runs", headers=headers).status_code != 403


def test_repeated_origin_header_is_refused(make_settings: Any) -> None:
    headers = [(b"host", b"127.0.0.1:8000"), (b"origin", SAME_ORIGIN.encode()), (b"origin", b"http://evil.example")]
    sent = run_raw(build_app(make_settings()), raw_scope(headers, path="/api/runs", method="POST"))
    assert sent[0]["status"] == 400


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"origin": "http://evil.example"}, "Origin 'http://evil.example'"),
        ({"origin": "null"}, "Origin 'null'"),
        ({"sec-fetch-site": "cross-site"}, "Sec-Fetch-Site"),
    ],
)
def test_cross_site_websocket_is_refused(client: TestClient, headers: dict[str, str], reason: str) -> None:
    ws_refused(client, "/ws/runs/1", reason, headers=headers)


def test_same_origin_websocket_is_accepted(client: TestClient) -> None:
    ws_accepted(client, "/ws/runs/1", headers={"origin": SAME_ORIGIN, "sec-fetch-site": "same-origin"})
    ws_accepted(client, "/ws/runs/1")


# --- token ----------------------------------------------------------------------------------------------------------


def test_missing_token_is_401_with_challenge(token_client: TestClient) -> None:
    for response in (token_client.get("/api/runs"), token_client.post("/api/runs")):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {"detail": UNAUTHORIZED}


def test_a_browser_without_the_token_gets_a_page_saying_how_to_log_in(token_client: TestClient) -> None:
    page = token_client.get("/", headers={"accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
    assert "/?token=" in page.text and "<h1>401</h1>" in page.text
    # Scripts and htmx fragments keep the JSON shape of every other error.
    for headers in ({"accept": "application/json"}, {"accept": "text/html", "hx-request": "true"}):
        refused = token_client.get("/", headers=headers)
        assert refused.status_code == 401 and "detail" in refused.json()


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_bearer_token_passes(token_client: TestClient, scheme: str) -> None:
    headers = {"authorization": f"{scheme} {TOKEN}"}
    assert token_client.get("/api/runs", headers=headers).status_code == 200
    assert token_client.post("/api/runs", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "authorization", [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN, "Bearer", "Bearer "]
)
def test_wrong_bearer_token_is_401(token_client: TestClient, authorization: str) -> None:
    assert token_client.get("/api/runs", headers={"authorization": authorization}).status_code == 401


def test_non_ascii_token_is_401_not_a_crash(make_settings: Any) -> None:
    # hmac.compare_digest raises TypeError on non-ASCII str; a client must not be able to turn that into a 500.
    headers = [(b"host", b"127.0.0.1:8000"), (b"authorization", "Bearer é".encode()),
               (b"cookie", f"{TOKEN_COOKIE}=é".encode())]
    sent = run_raw(build_app(make_settings(token=TOKEN)), raw_scope(headers, path="/api/runs"))
    assert sent[0]["status"] == 401


def test_cookie_token_passes(token_client: TestClient) -> None:
    headers = {"cookie": f"theme=dark; {TOKEN_COOKIE}={TOKEN}"}
    assert token_client.get("/api/runs", headers=headers).status_code == 200
    assert token_client.post("/api/runs", headers=headers).status_code == 200


def test_wrong_cookie_token_is_401(token_client: TestClient) -> None:
    assert token_client.get("/api/runs", headers={"cookie": f"{TOKEN_COOKIE}=nope"}).status_code == 401
    assert token_client.get("/api/runs", headers={"cookie": f"other={TOKEN}"}).status_code == 401


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"/?token={TOKEN}", "/"),
        (f"/api/runs?a=1&token={TOKEN}&b=x%20y+z", "/api/runs?a=1&b=x%20y+z"),
        (f"/api/runs?token={TOKEN}&token={TOKEN}", "/api/runs"),
    ],
)
def test_query_token_logs_in_with_cookie_and_redirects_without_it(
    token_client: TestClient, url: str, expected: str
) -> None:
    response = token_client.get(url)
    assert response.status_code == 303
    assert urljoin(BASE + url, response.headers["location"]) == BASE + expected
    assert response.headers["set-cookie"] == f"{TOKEN_COOKIE}={TOKEN}; HttpOnly; SameSite=Strict; Path=/"
    assert response.headers["cache-control"] == "no-store"
    # The browser follows the redirect with the cookie it was just given.
    follow = token_client.get(expected, headers={"cookie": f"{TOKEN_COOKIE}={TOKEN}"})
    assert follow.status_code == 200


def test_query_token_cookie_is_secure_over_https(make_settings: Any) -> None:
    app = build_app(make_settings(token=TOKEN, allowed_hosts=["dash.example.org"]))
    with TestClient(app, base_url="https://dash.example.org", follow_redirects=False) as c:
        response = c.get(f"/?token={TOKEN}")
    assert response.status_code == 303
    assert response.headers["set-cookie"] == f"{TOKEN_COOKIE}={TOKEN}; HttpOnly; SameSite=Strict; Path=/; Secure"


def test_query_token_redirect_stays_on_this_site(make_settings: Any) -> None:
    """A path like "//evil.example/x" must not become a protocol-relative Location (an open redirect)."""
    scope = raw_scope([(b"host", b"127.0.0.1:8000")], path="//evil.example/x", query=f"token={TOKEN}".encode())
    sent = run_raw(build_app(make_settings(token=TOKEN)), scope)
    assert sent[0]["status"] == 303
    location = dict(sent[0]["headers"])[b"location"].decode()
    assert urlsplit(urljoin(BASE + "//evil.example/x", location)).netloc == "127.0.0.1:8000"


@pytest.mark.parametrize("query", ["token=wrong", f"token={TOKEN}&token=wrong", "token="])
def test_wrong_query_token_is_401(token_client: TestClient, query: str) -> None:
    response = token_client.get(f"/?{query}")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "set-cookie" not in response.headers


def test_query_token_does_not_authenticate_state_changes(token_client: TestClient) -> None:
    # Only the browser's first GET may carry the token in its URL; anywhere else it would just leak into logs.
    assert token_client.post(f"/api/runs?token={TOKEN}").status_code == 401


def test_websocket_without_token_is_refused(token_client: TestClient) -> None:
    ws_refused(token_client, "/ws/runs/1", "access token")
    ws_refused(token_client, f"/ws/runs/1?token={TOKEN}", "access token")
    ws_refused(token_client, "/ws/runs/1", "access token", headers={"authorization": "Bearer wrong-token"})


def test_websocket_with_bearer_or_cookie_is_accepted(token_client: TestClient) -> None:
    ws_accepted(token_client, "/ws/runs/1", headers={"authorization": f"Bearer {TOKEN}"})
    ws_accepted(token_client, "/ws/runs/1", headers={"cookie": f"{TOKEN_COOKIE}={TOKEN}", "origin": SAME_ORIGIN})


def test_exempt_prefixes_skip_only_the_token(token_client: TestClient) -> None:
    assert token_client.get("/static/app.js").status_code == 200
    ws_accepted(token_client, "/ws/worker/1")
    # Host and Origin checks still apply there.
    assert token_client.get("/static/app.js", headers={"host": "evil.example"}).status_code == 403
    ws_refused(token_client, "/ws/worker/1", "Host header", headers={"host": "evil.example"})
    ws_refused(token_client, "/ws/worker/1", "Origin", headers={"origin": "http://evil.example"})


def test_exemption_is_a_path_prefix_not_a_substring(token_client: TestClient) -> None:
    assert token_client.get("/api/runs/static/app.js").status_code == 401
    assert token_client.get("/staticx/app.js").status_code == 401


def test_lifespan_passes_through(make_settings: Any) -> None:
    log: list[str] = []
    with TestClient(build_app(make_settings(), lifespan_log=log), base_url=BASE):
        pass
    assert log == ["startup"]


def test_healthz_needs_no_token_and_says_nothing_else(make_settings: Any) -> None:
    """A container's HEALTHCHECK has no token; what it may read is that the server is up, and no more."""
    from app.main import create_app

    with TestClient(create_app(make_settings(token=TOKEN)), base_url=BASE) as client:
        response = client.get("/healthz")
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        assert client.get("/api").status_code == 401 and client.get("/api/runs").status_code == 401
        spec = client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
        assert spec.status_code == 200 and "/healthz" not in spec.text
