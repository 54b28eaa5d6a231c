"""Request guard for the dashboard: Host, Origin and access token, for HTTP requests and websocket upgrades alike.

Launching a run executes code on the host (SPEC §7), so every request passes three checks, in this order:

1. Host header against the names this server answers to: defeats DNS rebinding, where a hostile page makes the
   browser send same-origin requests to 127.0.0.1 under the attacker's own domain name.
2. Origin / Sec-Fetch-Site on websocket upgrades and state-changing methods: defeats cross-site request forgery
   and cross-site websocket hijacking. Browsers apply no same-origin policy to websockets and Starlette's CORS
   middleware only handles HTTP, which is why this is one pure ASGI middleware covering both scope types.
3. The access token, when one is configured.

Refusals are JSON ``{"detail": ...}`` for HTTP; a websocket upgrade is refused by closing before accepting, which
the server turns into an HTTP 403 on the handshake. The inner app never sees a refused request.
"""

from __future__ import annotations

import hmac
import html
import logging
import re
from urllib.parse import quote, unquote_plus, urlsplit

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.settings import LOOPBACK_HOSTS, WILDCARD_HOSTS, Settings, normalize_host

TOKEN_COOKIE = "gradwatch_token"
TOKEN_QUERY_PARAM = "token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_EXEMPT_PREFIXES = ("/ws/worker/", "/static/")

# RFC 6455: a close frame's reason is at most 123 bytes of UTF-8.
_MAX_CLOSE_REASON_BYTES = 123
# Refusal messages quote what the client sent; a bound keeps a hostile header from bloating responses and logs.
_MAX_ECHO_CHARS = 200
_WS_POLICY_VIOLATION = 1008
_UNAUTHORIZED_DETAIL = "missing or invalid access token: send 'Authorization: Bearer <token>'"


class _Refusal(Exception):
    """Raised by a check to stop the request; carries what the HTTP answer would be."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def _echo(value: str) -> str:
    return repr(value if len(value) <= _MAX_ECHO_CHARS else value[:_MAX_ECHO_CHARS] + "...")


def _hostname(host_header: str) -> str | None:
    """The host part of a Host header ("[::1]:8000" -> "::1", "Localhost:80" -> "localhost"); ``None`` if malformed."""
    value = host_header.strip()
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        port = rest.removeprefix(":") if rest.startswith(":") else None
        if rest and port is None:
            return None
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        # More than one colon and no brackets is an IPv6 literal without a port (not valid in a Host header, but
        # unambiguous); normalize_host refuses anything else.
        host, port = value, None
    if port is not None and not (port.isascii() and port.isdigit()):
        return None
    try:
        return normalize_host(host)
    except ValueError:
        return None


def host_allowed(host_header: str | None, settings: Settings) -> bool:
    """Whether a request with this Host header may reach the app (DNS rebinding guard)."""
    if not host_header:
        return False
    hostname = _hostname(host_header)
    if hostname is None:
        return False
    if settings.host in WILDCARD_HOSTS and not settings.allowed_hosts:
        # Bound to every interface with no names configured, the server has no list of the names it is reached by
        # (LAN IPs, DHCP names, container aliases), so it cannot enforce one. Such a bind always has a token
        # (Settings refuses it otherwise), and a rebinding page cannot know the token, so the token guards.
        return True
    allowed = LOOPBACK_HOSTS | set(settings.allowed_hosts) | {settings.host}
    if settings.public_host is not None:  # the name remote workers (a Ray cluster's nodes) reach the server by
        allowed |= {settings.public_host}
    return hostname in allowed - WILDCARD_HOSTS


def is_same_origin(origin: str, host: str) -> bool:
    """Whether an ``Origin`` header names the site the request was sent to.

    Same origin means an http(s) origin whose host[:port] equals the request's Host header. The scheme is not compared
    with the request's own: behind a TLS-terminating proxy a same-origin https page reaches the server over http.
    ``Origin: null`` (sandboxed frames, file: pages, cross-origin redirects) is never same-origin.
    """
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    if parts.scheme not in {"http", "https"} or parts.path or parts.query or parts.fragment:
        return False
    if not parts.netloc or "@" in parts.netloc:
        return False
    return parts.netloc.lower() == host.strip().lower()


def _single_header(headers: Headers, name: str) -> str | None:
    """One header's value; a repeated security header is ambiguous (proxies may pick either), so it is refused."""
    values = headers.getlist(name)
    if len(values) > 1:
        raise _Refusal(400, f"more than one {name!r} header")
    return values[0] if values else None


def _check_host(headers: Headers, settings: Settings) -> str:
    host = _single_header(headers, "host")
    if not host:
        raise _Refusal(403, "missing Host header")
    if not host_allowed(host, settings):
        shown = _hostname(host) or host
        raise _Refusal(403, f"Host header {_echo(shown)} is not allowed; add it to allowed_hosts")
    return host


def _check_origin(headers: Headers, host: str) -> None:
    # Both headers are checked when both are present: an honest browser never sends a same-origin Origin with a
    # cross-site Sec-Fetch-Site, so the combination can only be refused. Clients that send neither (curl, scripts,
    # workers) are not browsers and cannot be driven by a hostile page, so they pass.
    origin = _single_header(headers, "origin")
    if origin is not None and not is_same_origin(origin, host):
        raise _Refusal(403, f"cross-origin request refused: Origin {_echo(origin)} is not this site ({_echo(host)})")
    site = _single_header(headers, "sec-fetch-site")
    if site is not None and site.strip().lower() not in {"same-origin", "none"}:
        raise _Refusal(403, f"cross-site request refused: Sec-Fetch-Site is {_echo(site)}")


def _matches(candidate: str, expected: bytes) -> bool:
    # Bytes, not str: compare_digest raises on non-ASCII str, and a client chooses what it sends.
    return hmac.compare_digest(candidate.encode("utf-8"), expected)


def _presented_token_ok(headers: Headers, expected: bytes) -> bool:
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and _matches(credentials.strip(), expected):
            return True
    cookie = headers.get("cookie")
    if cookie is not None:
        value = cookie_parser(cookie).get(TOKEN_COOKIE)
        if value is not None and _matches(value, expected):
            return True
    return False


def _query_without_token(query_string: bytes) -> tuple[list[str], str]:
    """The ``token`` values in a raw query string, and the rest of the query kept byte for byte."""
    tokens: list[str] = []
    kept: list[str] = []
    for part in query_string.decode("latin-1").split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if unquote_plus(key) == TOKEN_QUERY_PARAM:
            tokens.append(unquote_plus(value))
        else:
            kept.append(part)
    return tokens, "&".join(kept)


def _token_login_redirect(scope: Scope, token: str, remaining_query: str) -> Response:
    """303 to the same page without ``token`` in the URL, setting the cookie the browser will send from now on.

    The Location is relative ("./name?rest"): it resolves against the URL the browser actually used, so it stays
    right behind a reverse proxy that strips a path prefix, and starting with "./" it can never be read as another
    host ("//evil.example/") or a scheme ("javascript:").
    """
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else quote(scope["path"])
    location = "./" + path.rsplit("/", 1)[-1]
    if remaining_query:
        location += "?" + remaining_query
    cookie = f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
    if scope.get("scheme") == "https":
        cookie += "; Secure"
    # no-store: the response pairs a URL that held the token with the cookie; nothing of it belongs in a cache.
    headers = {"location": location, "set-cookie": cookie, "cache-control": "no-store"}
    return Response(status_code=303, headers=headers | {"referrer-policy": "no-referrer"})


class SecurityMiddleware:
    """Pure ASGI middleware applying the Host, Origin and token checks to "http" and "websocket" scopes.

    ``exempt_prefixes`` skip only the token check: the worker channel authenticates with its own per-run token and
    static assets are public, but both still get the Host and Origin checks.
    """

    def __init__(
        self, app: ASGIApp, settings: Settings, exempt_prefixes: tuple[str, ...] = DEFAULT_EXEMPT_PREFIXES
    ) -> None:
        self.app = app
        self.settings = settings
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in {"http", "websocket"}:
            await self.app(scope, receive, send)  # lifespan: nothing to guard
            return
        try:
            response = self._check(scope)
        except _Refusal as refusal:
            await self._refuse(scope, receive, send, refusal)
            return
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> Response | None:
        """Raise ``_Refusal`` to refuse, return a response to answer in the app's place, ``None`` to pass through."""
        headers = Headers(scope=scope)
        host = _check_host(headers, self.settings)
        is_websocket = scope["type"] == "websocket"
        if is_websocket or scope["method"] not in SAFE_METHODS:
            _check_origin(headers, host)
        token = self.settings.token_value()
        if token is None or self._is_exempt(scope):
            return None
        expected = token.encode("utf-8")
        if not is_websocket and scope["method"] == "GET":
            # Only a top-level GET may log in by URL: that is what a browser opening the printed link sends. A
            # token in any other request's URL would just leak into logs and history, so there it is ignored.
            query_tokens, remaining = _query_without_token(scope.get("query_string", b""))
            if query_tokens:
                if not all(_matches(candidate, expected) for candidate in query_tokens):
                    raise _Refusal(401, _UNAUTHORIZED_DETAIL, {"www-authenticate": "Bearer"})
                return _token_login_redirect(scope, token, remaining)
        if not _presented_token_ok(headers, expected):
            raise _Refusal(401, _UNAUTHORIZED_DETAIL, {"www-authenticate": "Bearer"})
        return None

    def _is_exempt(self, scope: Scope) -> bool:
        # The path as routed (root_path stripped), so a prefix means the same thing as in the app's own routes.
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path + "/"):
            path = path[len(root_path) :]
        return path.startswith(self.exempt_prefixes)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, refusal: _Refusal) -> None:
        if scope["type"] == "http":
            response: Response
            if _navigation(scope):
                response = HTMLResponse(_refusal_page(refusal), refusal.status_code, headers=refusal.headers)
            else:
                response = JSONResponse({"detail": refusal.detail}, refusal.status_code, headers=refusal.headers)
            await response(scope, receive, send)
            return
        # ASGI: the first websocket event is the connect; closing in answer to it, before any accept, makes the
        # server reject the handshake with 403. A client that already left needs no answer.
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        reason = refusal.detail.encode("utf-8")[:_MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")
        await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION, "reason": reason})


_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s\"]*")


class RedactTokenFilter(logging.Filter):
    """Keeps the access token out of uvicorn's access log, which prints each request line verbatim.

    Opening ``/?token=…`` is how a browser logs in (SPEC §7); the log file would otherwise hold the token
    for anyone who can read it. The value is replaced, the line kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "token=" in a for a in record.args):
            record.args = tuple(_TOKEN_IN_QUERY.sub(r"\1[hidden]", a) if isinstance(a, str) else a
                                for a in record.args)
        elif isinstance(record.msg, str) and "token=" in record.msg:
            record.msg = _TOKEN_IN_QUERY.sub(r"\1[hidden]", record.msg)
        return True


def _navigation(scope: Scope) -> bool:
    """A browser opening a page (not a script, not htmx): it gets a readable page instead of JSON."""
    headers = Headers(scope=scope)
    return scope["method"] == "GET" and "text/html" in headers.get("accept", "") and "hx-request" not in headers


def _refusal_page(refusal: _Refusal) -> str:
    hint = ("<p>Open the address <code>gradwatch serve</code> printed, the one ending in "
            "<code>/?token=…</code>, once: the browser then keeps the token in a cookie.</p>"
            if refusal.status_code == 401 else "")
    return (f"<!doctype html><meta charset=utf-8><title>{refusal.status_code} · gradwatch</title>"
            f"<body style='font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;line-height:1.5'>"
            f"<h1>{refusal.status_code}</h1><p>{html.escape(refusal.detail)}</p>{hint}</body>")
