"""Run-table changes pushed to browsers: the runs page listens here instead of polling the table.

The store tells :class:`Changes` the id of every run whose row it committed a change to (created, status, step,
name/tags/notes, deleted), from whichever thread wrote it: the writer thread advances steps thousands of times a
second, so :meth:`Changes.notify` only marks the change and, once per burst, schedules one wake-up on the event loop.
Each listener (``GET /api/runs/changes``, server-sent events) then sends one ``runs`` event naming the runs that
changed, at most one every :data:`MIN_INTERVAL_S`; the browser re-fetches its page of the table.

Shutdown: uvicorn lets a streaming response run until it ends and only then runs the app's lifespan shutdown, so
an open event stream would hold the server for its whole graceful-shutdown timeout. ``gradwatch serve`` therefore
calls :meth:`Changes.close_soon` the moment it is asked to exit (``app.cli``'s uvicorn server, from its signal
handler); :meth:`Changes.close` (the lifespan shutdown) ends them too, for servers run any other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator

#: A listener gets at most one event per this many seconds, however fast runs change (a training run's step
#: advances many times a second).
MIN_INTERVAL_S = 0.5
#: A comment line this often keeps proxies and the browser from timing out an idle stream.
KEEPALIVE_S = 15.0


class Changes:
    """Coalesced notifications of run-row changes, fanned out to any number of async listeners."""

    def __init__(self) -> None:
        self.version = 0
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._scheduled = False
        self._recent: list[tuple[int, frozenset[str]]] = []  # (version, ids) of the last few flushes
        self._event = asyncio.Event()
        self.listeners = 0

    def start(self) -> None:
        """Bind to the running loop (notifications come from any thread and wake it)."""
        self._loop = asyncio.get_running_loop()

    def close(self) -> None:
        """End every stream (idempotent; on the event loop)."""
        self.closed = True
        self._event.set()

    def close_soon(self) -> None:
        """End every stream, from any thread or a signal handler: the server was asked to exit."""
        loop = self._loop
        if loop is None or self.closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed already
            loop.call_soon_threadsafe(self.close)

    def notify(self, run_id: str) -> None:
        """A run's row changed (any thread, never blocks)."""
        loop = self._loop
        if loop is None or self.closed:
            return
        with self._lock:
            self._pending.add(run_id)
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            ids, self._pending, self._scheduled = frozenset(self._pending), set(), False
        self.version += 1
        self._recent = [*self._recent[-63:], (self.version, ids)]
        event, self._event = self._event, asyncio.Event()
        event.set()

    def since(self, version: int) -> frozenset[str] | None:
        """The runs changed after ``version``, or None when that is too far back to say (the listener reloads all)."""
        if self._recent and self._recent[0][0] > version + 1:
            return None
        return frozenset().union(*(ids for v, ids in self._recent if v > version))

    async def wait(self, version: int, timeout: float) -> bool:
        """Wait until a change newer than ``version`` (True) or ``timeout`` (False); returns at once once closed."""
        if self.version > version or self.closed:
            return self.version > version
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        return self.version > version

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events: ``runs`` events with ``{"version", "runs": [ids] | null}``, comments to keep alive."""
        self.listeners += 1
        try:
            seen = self.version
            yield f"retry: 2000\nevent: hello\ndata: {json.dumps({'version': seen})}\n\n"
            while not self.closed:
                if not await self.wait(seen, KEEPALIVE_S):
                    if not self.closed:
                        yield ": keep-alive\n\n"
                    continue
                ids = self.since(seen)
                seen = self.version
                body = {"version": seen, "runs": sorted(ids) if ids is not None else None}
                yield f"event: runs\ndata: {json.dumps(body)}\n\n"
                # Coalesce: whatever changes in the next moment goes out as one event.
                await asyncio.sleep(MIN_INTERVAL_S)
        finally:
            self.listeners -= 1

