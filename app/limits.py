"""Limits at the HTTP edge: request bodies, slow or oversized request headers, and open connections.

Each limit bounds what one peer can make the server hold before anything else has looked at the request: the
access token is only checked once the headers are complete (``app/security.py``), so off loopback these limits are
all that stands between an unauthenticated peer and the server's memory and file descriptors.

- :class:`BodyLimitMiddleware` refuses request bodies over ``max_body_bytes`` with a 413: up front from
  ``Content-Length``, or while a chunked body streams in, counted as it is received and never buffered. A 300 MiB
  JSON POST used to be read whole before the 422 that refused it (issue 12, item 3).
- :class:`GuardedHttpProtocol` is uvicorn's HTTP protocol with three more checks: a connection whose request
  headers are not complete ``header_timeout_s`` after it opened (or after the request's first byte, on a kept-alive
  connection) is closed, headers over ``max_header_bytes`` get a 431, and connections past ``max_connections``
  get a 503, plain requests and websocket upgrades alike. uvicorn has no timeout before the first request (300
  half-sent requests were all still held after 21 s, issue 12 item 4), and its ``limit_concurrency`` lets
  websocket upgrades through uncounted.

Refusals are JSON ``{"detail": ...}`` naming the limit and its setting, as every other error of the API is.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from typing import Any, ClassVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import Settings

logger = logging.getLogger("gradwatch.limits")


def _json_body(detail: str) -> bytes:
    return json.dumps({"detail": detail}).encode("utf-8")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.3g} MiB" if size >= 1 << 20 else f"{size / 1024:.3g} KiB"


class BodyLimitMiddleware:
    """Pure ASGI middleware: a request body over ``max_body_bytes`` gets a 413 and is never held in memory.

    A declared ``Content-Length`` over the limit is refused before the app runs. A body without one (chunked) is
    counted as the app receives it: on the chunk that crosses the limit the middleware answers the 413 itself and
    tells the app the client has gone (``http.disconnect``), so whatever the app reads the body with (FastAPI's
    JSON parsing, a form reader) stops there and nothing it answers afterwards is sent. The rest of the body is
    discarded by the server as it arrives; the connection stays usable, so the client reads the 413 rather than a
    reset.

    ``exempt_prefixes`` are paths that may carry larger bodies; today none do (artifacts travel on the worker's
    websocket in chunks, bounded by the websocket message limit and ``max_artifact_bytes``).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, exempt_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.exempt_prefixes = exempt_prefixes

    @property
    def detail(self) -> str:
        return (f"request body too large: at most {self.max_body_bytes} bytes ({_mib(self.max_body_bytes)}) "
                f"accepted (server setting max_body_bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send)
            return
        received = 0
        refused = False
        response_started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    refused = True
                    if not response_started:
                        await self._refuse(send)
                    else:  # the app answered before reading all of it: the answer is cut short instead
                        logger.warning("request body over max_body_bytes after the response started")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return  # the 413 is the answer; the app's reaction to the "disconnect" is not
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # The app saw a client that went away mid-body (Starlette's ClientDisconnect): expected, answered.
            logger.debug("app raised after its request body was refused", exc_info=True)

    async def _refuse(self, send: Send) -> None:
        body = _json_body(self.detail)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode("ascii"))]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser refuses a malformed one before the app ever runs
    return None


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header size and a connection cap; the limits are class
    attributes, set by :func:`guarded_http_protocol` from the settings. httptools, not h11: it is what uvicorn's
    "auto" has always picked here (``uvicorn[standard]`` installs it), so the server keeps the parser it had.

    Deadline: armed when the connection opens, and again when a kept-alive connection starts its next request;
    disarmed once the request's headers are complete (the body is the app's to time). Idle kept-alive connections
    are uvicorn's own ``timeout_keep_alive``. A peer that sent nothing is closed silently (browsers open spare
    connections they may never use); one that sent part of a request gets a 408 first.

    Cap: decided when the connection opens, counting every open connection, websockets included (uvicorn keeps
    them all in one set). A connection past the cap is not dropped unanswered: its request gets a 503 and the
    connection is closed, so a client sees why rather than a hang or a reset.
    """

    header_timeout_s: ClassVar[float] = 10.0
    max_header_bytes: ClassVar[int] = 64 << 10
    max_connections: ClassVar[int] = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_tail = b""
        self._over_capacity = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._over_capacity = True
            self.app = _over_capacity_app(self._capacity_detail())
            logger.warning("connection over max_connections=%d: its request gets a 503", self.max_connections)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers:
            # Measured here, before parsing: httptools keeps a header that is still arriving in its own buffer, and
            # a whole request often comes in one read, headers, body and all, so only the blank line that ends the
            # headers tells them apart. The last bytes of the previous read find one split across two reads.
            seen = self._header_tail + data
            ends = [i + len(mark) for mark in (b"\r\n\r\n", b"\n\n") if (i := seen.find(mark)) != -1]
            size = self._header_bytes + (min(ends) - len(self._header_tail) if ends else len(data))
            if size > self.max_header_bytes:
                self._answer_and_close(431, f"request headers over {self.max_header_bytes} bytes "
                                            f"(server setting max_header_bytes)")
                return
            self._header_bytes = size
            self._header_tail = seen[-3:]
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:  # a kept-alive connection's next request: its own deadline
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._disarm_header_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # Whatever this connection sends next is the next request's head, to be measured from its first byte.
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_tail = b""

    def handle_websocket_upgrade(self) -> None:
        if self._over_capacity:
            self._answer_and_close(503, self._capacity_detail())
            return
        super().handle_websocket_upgrade()

    def _capacity_detail(self) -> str:
        return (f"too many open connections: at most {self.max_connections} "
                f"(server setting max_connections); try again shortly")

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_timed_out(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or not self._awaiting_headers:
            return
        if self._header_bytes == 0:
            self.transport.close()
            return
        self._answer_and_close(408, f"request headers not complete within {self.header_timeout_s:g} s "
                                    f"(server setting header_timeout_s)")

    def _answer_and_close(self, status: int, detail: str) -> None:
        """Written raw: there is no request (or no app) to answer through, and the connection ends here."""
        self._disarm_header_deadline()
        body = _json_body(detail)
        head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def _over_capacity_app(detail: str) -> ASGIApp:
    body = _json_body(detail)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # connection: close makes uvicorn close the connection once answered, freeing the slot it holds.
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode("ascii")), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})

    return app


def guarded_http_protocol(settings: Settings) -> type[GuardedHttpProtocol]:
    """The protocol class to give uvicorn (``Config(http=...)``), carrying this server's limits."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "header_timeout_s": settings.header_timeout_s,
        "max_header_bytes": settings.max_header_bytes,
        "max_connections": settings.max_connections,
    })
