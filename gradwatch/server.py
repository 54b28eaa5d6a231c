"""Finding the server and creating a run on it: the client's only plain-HTTP calls.

The order a script looks for its server (SPEC §8): the ``server`` argument,
then ``$GRADWATCH_URL``, then ``http://127.0.0.1:8000`` if a gradwatch answers
there; the token likewise from ``token`` or ``$GRADWATCH_TOKEN``. Requests go
direct, never through an HTTP proxy from the environment (the server is
usually on this machine or this network, and a proxy would see the token).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

URL_ENV = "GRADWATCH_URL"
TOKEN_ENV = "GRADWATCH_TOKEN"
DEFAULT_SERVER = "http://127.0.0.1:8000"
PROBE_TIMEOUT_S = 0.5
REQUEST_TIMEOUT_S = 10.0

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(Exception):
    """The server answered, and said no (a 4xx with its reason): retrying will not help."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


def normalize(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url


def configured_server(server: str | None) -> str | None:
    """The server the user named (argument, then environment), or None."""
    named = server or os.environ.get(URL_ENV)
    return normalize(named) if named else None


def configured_token(token: str | None) -> str | None:
    return token or os.environ.get(TOKEN_ENV) or None


def answers(base: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if a gradwatch server answers at ``base`` (one that wants a token counts: it is there)."""
    try:
        with _opener.open(urllib.request.Request(f"{base}/api"), timeout=timeout) as response:
            body = json.loads(response.read(4096) or b"{}")
            return isinstance(body, dict) and body.get("name") == "gradwatch"
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except (OSError, ValueError):
        return False


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read(65536) or b"{}")
    except ValueError:
        return exc.reason or "error"
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # a 422: one line per field
        return "; ".join(f"{'.'.join(str(p) for p in err.get('loc', [])[1:])}: {err.get('msg')}" for err in detail)
    return str(detail or exc.reason)


def post_json(base: str, path: str, body: dict[str, Any], token: str | None,
              timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """POST JSON and return the JSON answer; ``ServerError`` on a 4xx, ``OSError`` when unreachable or 5xx."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{base}{path}", data=json.dumps(body, allow_nan=False).encode(),
                                     headers=headers, method="POST")
    try:
        with _opener.open(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500:
            detail = _detail(exc)
            if exc.code == 401:
                detail = (f"the server at {base} needs its access token: pass token=... to gradwatch.init, "
                          f"or set {TOKEN_ENV} ({detail})")
            raise ServerError(exc.code, detail) from exc
        raise OSError(f"{base}{path}: HTTP {exc.code}") from exc


def create_run(base: str, token: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /api/client/runs``: the run (created, or found by its uid) and its channel token."""
    return post_json(base, "/api/client/runs", body, token)


def websocket_url(base: str, path: str) -> str:
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"
