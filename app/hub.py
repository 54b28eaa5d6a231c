"""Websocket fan-out: every browser watching a run gets every frame, in order.

Each run has a :class:`Topic`: the newest frames in a byte-bounded ring and
the set of subscribed clients. Each client has one bounded queue and one
sender task. Publishing never waits: a full queue is emptied and replaced by
a resync marker, and the sender then fills the gap from the ring or, further
back, from the store. So a client that cannot keep up falls behind on its
own, never slows the worker or its neighbours, and costs bounded memory; if
a single send cannot complete within the deadline, the client is dropped
with close code 4008 and told the seq to resume from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app.store import Store

log = logging.getLogger("gradwatch.hub")

#: Close code for a client dropped for being too slow (4000–4999 are the application's).
CLOSE_TOO_SLOW = 4008
#: A catch-up from the store reads at most this much per batch, whatever the frames' size.
CATCH_UP_BYTES = 1 << 20
#: Close code for a run that does not exist.
CLOSE_UNKNOWN_RUN = 4404

_RESYNC = (-1, "")


@dataclass(eq=False)  # identity hashing: clients live in a set
class Client:
    """One websocket subscriber: a bounded queue between publisher and sender."""

    queue: asyncio.Queue[tuple[int, str]]
    dropped_frames: int = 0


@dataclass
class Topic:
    """One run's recent frames and its subscribers."""

    ring_bytes: int
    frames: deque[tuple[int, str]] = field(default_factory=deque)
    size: int = 0
    head: int = 0  # highest seq published
    closed: bool = False  # the run has ended: no frame will follow ``head``
    clients: set[Client] = field(default_factory=set)

    def add(self, seq: int, text: str) -> None:
        self.frames.append((seq, text))
        self.size += len(text)
        self.head = seq
        # Keep at least the newest frame so a client can always resume from the ring.
        while self.size > self.ring_bytes and len(self.frames) > 1:
            _, old = self.frames.popleft()
            self.size -= len(old)

    def after(self, since: int) -> list[tuple[int, str]] | None:
        """Frames with seq > since if the ring still holds all of them, else None."""
        if since >= self.head:
            return []
        if not self.frames or self.frames[0][0] > since + 1:
            return None  # the ring never held, or no longer holds, since + 1: the store has it
        return [item for item in self.frames if item[0] > since]


class Hub:
    """Topics by run id; publish from the event loop, serve clients as tasks."""

    def __init__(self, store: Store, *, queue_frames: int = 256, ring_bytes: int = 8 << 20,
                 send_timeout_s: float = 10.0, linger_s: float = 30.0) -> None:
        self.store = store
        self.queue_frames = queue_frames
        self.ring_bytes = ring_bytes
        self.send_timeout_s = send_timeout_s
        # An ended run's ring is kept this long (its last frames may still be on their way to the
        # store), then dropped: its history is served from the store, and memory stays bounded
        # by the runs that are live, not by every run the server has ever seen.
        self.linger_s = linger_s
        self.topics: dict[str, Topic] = {}

    def topic(self, run_id: str) -> Topic:
        topic = self.topics.get(run_id)
        if topic is None:
            topic = self.topics[run_id] = Topic(self.ring_bytes)
        return topic

    def publish(self, run_id: str, seq: int, text: str) -> None:
        """Called once per accepted frame, in seq order; never blocks."""
        topic = self.topic(run_id)
        if seq <= topic.head:
            return  # resent after the store lost it (app.store.Store.append): subscribers have it already
        topic.add(seq, text)
        for client in topic.clients:
            try:
                client.queue.put_nowait((seq, text))
            except asyncio.QueueFull:
                # Too far behind: drop its backlog; the sender refills it from the ring or the store.
                client.dropped_frames += client.queue.qsize()
                while not client.queue.empty():
                    client.queue.get_nowait()
                client.queue.put_nowait(_RESYNC)

    def close_topic(self, run_id: str) -> None:
        """The run has ended: subscribers get what is left, then a normal close."""
        topic = self.topic(run_id)
        topic.closed = True
        for client in topic.clients:
            with contextlib.suppress(asyncio.QueueFull):
                client.queue.put_nowait(_RESYNC)
        self._reap_later(run_id)

    def reopen_topic(self, run_id: str) -> None:
        """A script's run that was interrupted came back: frames follow again (new subscribers stay open)."""
        topic = self.topics.get(run_id)
        if topic is not None:
            topic.closed = False

    def _reap_later(self, run_id: str) -> None:
        asyncio.get_running_loop().call_later(self.linger_s, self._reap, run_id)

    def _reap(self, run_id: str) -> None:
        topic = self.topics.get(run_id)
        if topic is not None and topic.closed and not topic.clients:
            del self.topics[run_id]

    def forget(self, run_id: str) -> None:
        topic = self.topics.pop(run_id, None)
        if topic is not None:
            topic.closed = True
            for client in topic.clients:
                with contextlib.suppress(asyncio.QueueFull):
                    client.queue.put_nowait(_RESYNC)

    async def serve(self, ws: WebSocket, run_id: str, since: int, *, head: int, ended: bool) -> None:
        """Stream frames after ``since`` to an accepted websocket until the run ends or the client leaves.

        ``head`` and ``ended`` describe a run that has no live topic yet (one
        that finished before this server started): its frames come from the store.
        """
        topic = self.topic(run_id)
        if not topic.frames and head > topic.head:
            topic.head = head
            topic.closed = topic.closed or ended
        client = Client(asyncio.Queue(self.queue_frames))
        topic.clients.add(client)  # subscribe first, so nothing published during backfill is missed
        last = since
        receiver = asyncio.create_task(_drain_incoming(ws))
        try:
            last = await self._catch_up(ws, run_id, topic, last, topic.head)
            while not (topic.closed and last >= topic.head):
                getter = asyncio.create_task(client.queue.get())
                done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if receiver in done:
                    getter.cancel()
                    return  # the client went away
                seq, text = getter.result()
                if seq == _RESYNC[0] or seq > last + 1:
                    last = await self._catch_up(ws, run_id, topic, last, topic.head)
                    continue
                if seq <= last:
                    continue
                await self._send(ws, text, last)
                last = seq
            await ws.close(code=1000, reason="run ended")
        except _TooSlow:
            log.info("run %s: dropping a client stuck for %.0f s at seq %d (%d frames refilled for it before)",
                     run_id, self.send_timeout_s, last, client.dropped_frames)
            await close_quietly(ws, CLOSE_TOO_SLOW, f"client too slow: reconnect with ?since={last}")
        except (WebSocketDisconnect, RuntimeError):
            return  # closed under us
        finally:
            topic.clients.discard(client)
            receiver.cancel()
            if topic.closed and not topic.clients:
                self._reap_later(run_id)

    async def _catch_up(self, ws: WebSocket, run_id: str, topic: Topic, last: int, upto: int) -> int:
        """Send every frame in (last, upto], from the ring when it still holds them, else the store."""
        while last < upto:
            batch = topic.after(last)
            if batch is None:
                rows = await asyncio.to_thread(self.store.frames_after, run_id, last, 500, CATCH_UP_BYTES)
                if not rows or rows[0][0] != last + 1:
                    # Not committed yet (the writer batches): wait for it, then look again.
                    await asyncio.to_thread(self.store.wait_flushed, 5.0)
                    rows = await asyncio.to_thread(self.store.frames_after, run_id, last, 500, CATCH_UP_BYTES)
                    if not rows or rows[0][0] != last + 1:
                        return last  # a gap we cannot fill (deleted run): stop trying
                batch = rows
            if not batch:
                return last  # nothing newer anywhere: never spin without awaiting
            for seq, text in batch:
                if seq <= last:
                    continue
                if seq > upto:
                    break
                await self._send(ws, text, last)
                last = seq
            upto = max(upto, topic.head)
        return last

    async def _send(self, ws: WebSocket, text: str, last: int) -> None:
        try:
            await asyncio.wait_for(ws.send_text(text), self.send_timeout_s)
        except TimeoutError as exc:
            raise _TooSlow from exc


class _TooSlow(Exception):
    pass


async def _drain_incoming(ws: WebSocket) -> None:
    """Read (and ignore) whatever the client sends, text or binary, so its close is noticed promptly."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass


async def close_quietly(ws: WebSocket, code: int, reason: str) -> None:
    """Close a websocket that may already be gone, waiting at most 2 s, whatever happens."""
    if ws.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code=code, reason=reason), 2.0)

