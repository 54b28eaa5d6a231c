"""The websocket fan-out (app/hub.py): the ring, publishing to slow clients, and Hub.serve over a real socket.

Hub.serve is driven through a tiny Starlette app (one websocket route) and Starlette's TestClient, backed by a
real Store on tmp_path. TestClient runs the app on its own event loop in another thread, so every hub call made
from a test goes through ``client.portal`` and runs on that loop, as it does in the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocket

from app.hub import Client, Hub, Topic
from app.store import TERMINAL_STATUSES, RunRecord, Store
from trainer.telemetry import frame_to_json

RUN = "run0"
RESYNC = (-1, "")
#: How long a single websocket receive may wait before the test fails instead of hanging.
RECEIVE_TIMEOUT_S = 2.0
#: How long Hub.serve may keep the app's event loop busy before the watchdog unsticks it and fails the test.
FREEZE_TIMEOUT_S = 0.8


def text(seq: int) -> str:
    """A frame's JSON text; the same length for every seq below 1000, so ring sizes are easy to reason about."""
    return frame_to_json({"type": "metrics", "run": RUN, "seq": seq, "pad": f"{seq:03d}"})


def make_run(status: str) -> RunRecord:
    return RunRecord(id=RUN, name="r", kind="gan", status=status, config={}, created_at=1.0)


def store_frames(store: Store, seqs: range) -> None:
    store.append(RUN, [({"type": "metrics", "run": RUN, "seq": s}, text(s)) for s in seqs])


# ----------------------------------------------------------------------------- Topic


def test_add_keeps_the_ring_under_ring_bytes() -> None:
    size = len(text(1))
    topic = Topic(ring_bytes=3 * size + 1)
    for seq in range(1, 11):
        topic.add(seq, text(seq))
        assert topic.size <= topic.ring_bytes
        assert topic.size == sum(len(t) for _, t in topic.frames)
        assert topic.head == seq
    assert [seq for seq, _ in topic.frames] == [8, 9, 10]  # the newest that fit, in order


def test_add_always_keeps_the_newest_frame_even_when_it_alone_is_too_big() -> None:
    topic = Topic(ring_bytes=10)
    topic.add(1, "abcd")
    topic.add(2, "x" * 50)
    assert list(topic.frames) == [(2, "x" * 50)]
    assert topic.size == 50
    topic.add(3, "y" * 60)
    assert list(topic.frames) == [(3, "y" * 60)]
    assert (topic.size, topic.head) == (60, 3)


def ring_4_to_8() -> Topic:
    topic = Topic(ring_bytes=5 * len(text(1)))
    for seq in range(1, 9):
        topic.add(seq, text(seq))
    assert [seq for seq, _ in topic.frames] == [4, 5, 6, 7, 8]
    return topic


@pytest.mark.parametrize("since", [3, 4, 5, 7])
def test_after_returns_exactly_the_frames_after_since_when_the_ring_covers_them(since: int) -> None:
    assert ring_4_to_8().after(since) == [(s, text(s)) for s in range(since + 1, 9)]


@pytest.mark.parametrize("since", [8, 9, 1000])
def test_after_is_empty_at_or_past_head(since: int) -> None:
    assert ring_4_to_8().after(since) == []


@pytest.mark.parametrize("since", [0, 1, 2])
def test_after_is_none_when_the_ring_no_longer_holds_since_plus_one(since: int) -> None:
    assert ring_4_to_8().after(since) is None


def test_after_on_a_new_topic_is_empty() -> None:
    assert Topic(ring_bytes=100).after(0) == []


def test_after_is_none_when_the_ring_is_empty_but_head_is_ahead() -> None:
    topic = Topic(ring_bytes=100)
    topic.head = 5  # what Hub.serve does for a run whose frames are only in the store
    assert topic.after(0) is None


# ----------------------------------------------------------------------------- publish / close


def drain(queue: asyncio.Queue[tuple[int, str]]) -> list[tuple[int, str]]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def test_publish_to_a_full_queue_leaves_one_resync_marker_and_counts_the_drop(store: Store) -> None:
    async def scenario() -> None:
        hub = Hub(store, queue_frames=2)
        slow = Client(asyncio.Queue(2))
        fast = Client(asyncio.Queue(100))
        hub.topic(RUN).clients.update({slow, fast})
        hub.publish(RUN, 1, text(1))
        hub.publish(RUN, 2, text(2))
        assert slow.queue.full() and slow.dropped_frames == 0

        # publish is synchronous: it cannot wait for room, so the one thing it must not do is raise QueueFull.
        hub.publish(RUN, 3, text(3))
        assert slow.dropped_frames >= 2
        assert drain(slow.queue) == [RESYNC]

        hub.publish(RUN, 4, text(4))
        hub.publish(RUN, 5, text(5))
        hub.publish(RUN, 6, text(6))  # full again: [resync, 5] is replaced by a single marker
        assert drain(slow.queue) == [RESYNC]
        assert slow.dropped_frames >= 4

        # A neighbour with room is not affected by the slow client.
        assert drain(fast.queue) == [(s, text(s)) for s in range(1, 7)]
        assert fast.dropped_frames == 0
        topic = hub.topic(RUN)
        assert topic.head == 6 and [s for s, _ in topic.frames] == [1, 2, 3, 4, 5, 6]

    asyncio.run(scenario())


def test_publish_to_a_queue_of_one_never_raises(store: Store) -> None:
    async def scenario() -> None:
        hub = Hub(store, queue_frames=1)
        client = Client(asyncio.Queue(1))
        hub.topic(RUN).clients.add(client)
        for seq in range(1, 50):
            hub.publish(RUN, seq, text(seq))
            assert client.queue.qsize() == 1
        assert drain(client.queue) == [RESYNC]
        assert client.dropped_frames > 0

    asyncio.run(scenario())


def test_publish_without_subscribers_only_fills_the_ring(store: Store) -> None:
    hub = Hub(store, ring_bytes=2 * len(text(1)))
    for seq in range(1, 6):
        hub.publish(RUN, seq, text(seq))
    topic = hub.topics[RUN]
    assert topic.head == 5 and [s for s, _ in topic.frames] == [4, 5] and not topic.closed


def test_close_topic_marks_closed_and_wakes_subscribers(store: Store) -> None:
    async def scenario() -> None:
        hub = Hub(store, queue_frames=2)
        idle = Client(asyncio.Queue(2))
        full = Client(asyncio.Queue(1))
        hub.topic(RUN).clients.update({idle, full})
        full.queue.put_nowait((7, "x"))
        hub.close_topic(RUN)  # a full queue must not make it raise
        assert hub.topics[RUN].closed
        assert drain(idle.queue) == [RESYNC]
        assert drain(full.queue) == [(7, "x")]

    asyncio.run(scenario())


def test_close_topic_of_a_run_never_published_creates_it_closed(store: Store) -> None:
    async def scenario() -> None:
        hub = Hub(store)
        hub.close_topic("other")
        assert hub.topics["other"].closed

    asyncio.run(scenario())


def test_forget_drops_the_topic_and_closes_it_for_its_subscribers(store: Store) -> None:
    async def scenario() -> None:
        hub = Hub(store)
        client = Client(asyncio.Queue(4))
        topic = hub.topic(RUN)
        topic.clients.add(client)
        hub.forget(RUN)
        assert RUN not in hub.topics and topic.closed
        assert drain(client.queue) == [RESYNC]
        hub.forget(RUN)  # twice is fine

    asyncio.run(scenario())


def test_frame_to_json_refuses_nan() -> None:
    assert json.loads(frame_to_json({"seq": 1, "v": 0.5})) == {"seq": 1, "v": 0.5}
    with pytest.raises(ValueError):
        frame_to_json({"seq": 1, "v": float("nan")})


# ----------------------------------------------------------------------------- Hub.serve over a websocket


def tiny_app(hub: Hub, store: Store, before_serve: Callable[[], Awaitable[None]] | None = None) -> Starlette:
    """One websocket route that does what app/api/stream.py does, minus the dependencies and the middleware."""
    tasks: set[asyncio.Task[None]] = set()

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        since = int(ws.query_params.get("since", "0"))
        rec = await asyncio.to_thread(store.get_run, RUN)
        assert rec is not None
        if before_serve is not None:
            task = asyncio.create_task(before_serve())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await hub.serve(ws, RUN, since, head=rec.last_seq, ended=rec.status in TERMINAL_STATUSES)

    return Starlette(routes=[WebSocketRoute("/ws", endpoint)])


def url(since: int) -> str:
    return f"ws://127.0.0.1:8000/ws?since={since}"


async def _next_message(ws: WebSocketTestSession) -> dict[str, Any]:
    with anyio.fail_after(RECEIVE_TIMEOUT_S):
        message: dict[str, Any] = await ws._send_rx.receive()
    return message


def receive(ws: WebSocketTestSession) -> dict[str, Any]:
    """The next message the server sent, or a failure (not a hang) if none comes within RECEIVE_TIMEOUT_S."""
    return ws.portal.call(_next_message, ws)


def receive_frames(ws: WebSocketTestSession, n: int) -> list[int]:
    seqs = []
    for _ in range(n):
        message = receive(ws)
        assert message["type"] == "websocket.send", f"expected a frame, got {message}"
        seqs.append(int(json.loads(message["text"])["seq"]))
    return seqs


def assert_normal_close(ws: WebSocketTestSession) -> None:
    message = receive(ws)
    assert message["type"] == "websocket.close", f"expected the close, got {message}"
    assert message["code"] == 1000


async def _wait_subscribed(hub: Hub) -> None:
    with anyio.fail_after(RECEIVE_TIMEOUT_S):
        while not hub.topic(RUN).clients:
            await asyncio.sleep(0.001)


@contextlib.contextmanager
def freeze_watchdog(hub: Hub) -> Iterator[threading.Event]:
    """Turns a Hub.serve that monopolises the event loop into a test failure instead of a hung session.

    If the test is still running after FREEZE_TIMEOUT_S, it puts a far-future frame in the ring from this
    thread, so that Topic.after returns None and _catch_up falls back to the store and finishes; the event is
    set, and the caller asserts it never was.
    """
    fired = threading.Event()

    def unstick() -> None:
        fired.set()
        topic = hub.topics.get(RUN)
        if topic is not None:
            topic.frames.append((1 << 62, ""))

    timer = threading.Timer(FREEZE_TIMEOUT_S, unstick)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


@pytest.mark.parametrize("since", [0, 2])
def test_ended_run_from_the_store_is_replayed_then_closed(store: Store, since: int) -> None:
    store.insert_run(make_run("completed"))
    store_frames(store, range(1, 6))
    assert store.wait_flushed(5.0)
    hub = Hub(store)
    with TestClient(tiny_app(hub, store)) as client, freeze_watchdog(hub) as frozen:
        with client.websocket_connect(url(since)) as ws:
            assert receive_frames(ws, 5 - since) == list(range(since + 1, 6))
            assert_normal_close(ws)
        assert not frozen.is_set(), "Hub.serve froze the event loop"


def test_ended_run_with_since_at_head_is_closed_at_once(store: Store) -> None:
    store.insert_run(make_run("completed"))
    store_frames(store, range(1, 6))
    assert store.wait_flushed(5.0)
    hub = Hub(store)
    with TestClient(tiny_app(hub, store)) as client, freeze_watchdog(hub) as frozen:
        with client.websocket_connect(url(5)) as ws:
            assert_normal_close(ws)
        assert not frozen.is_set()


def test_live_frames_follow_the_backfill_in_order_without_duplicates(store: Store) -> None:
    store.insert_run(make_run("running"))
    store_frames(store, range(1, 6))
    assert store.wait_flushed(5.0)
    # The ring holds two frames: 1..5 must come from the store, the rest from the ring and the queue.
    hub = Hub(store, ring_bytes=2 * len(text(1)))
    published_during_backfill: list[int] = []

    async def publish_while_backfilling() -> None:
        # Runs as soon as serve has subscribed and awaits its first store read: frames 6 and 7 then reach the
        # client both through its queue and through the catch-up, and must be sent once.
        await _wait_subscribed(hub)
        for seq in (6, 7):
            hub.publish(RUN, seq, text(seq))
            store_frames(store, range(seq, seq + 1))
            published_during_backfill.append(seq)

    def publish(seqs: range) -> None:
        for seq in seqs:
            hub.publish(RUN, seq, text(seq))
            store_frames(store, range(seq, seq + 1))

    with TestClient(tiny_app(hub, store, publish_while_backfilling)) as client, freeze_watchdog(hub) as frozen:
        client.portal.call(publish, range(1, 6))  # the live ring of the running run, as the manager fills it
        with client.websocket_connect(url(0)) as ws:
            received = receive_frames(ws, 7)
            assert published_during_backfill == [6, 7]
            client.portal.call(publish, range(8, 9))
            received += receive_frames(ws, 1)
            client.portal.call(publish, range(9, 11))
            received += receive_frames(ws, 2)
            client.portal.call(hub.close_topic, RUN)
            assert_normal_close(ws)  # nothing (no duplicate) between the last frame and the close
        assert not frozen.is_set()
    assert received == list(range(1, 11))


def test_a_queued_frame_after_a_gap_makes_serve_fill_the_gap_first(store: Store) -> None:
    store.insert_run(make_run("running"))
    hub = Hub(store)

    def publish_past_the_queue() -> None:
        topic = hub.topic(RUN)
        for seq in (1, 2):
            topic.add(seq, text(seq))  # in the ring, but never put in the client's queue
        hub.publish(RUN, 3, text(3))  # the queue holds 3 alone, with no resync marker before it

    with TestClient(tiny_app(hub, store)) as client, freeze_watchdog(hub) as frozen:
        with client.websocket_connect(url(0)) as ws:
            client.portal.call(_wait_subscribed, hub)
            client.portal.call(publish_past_the_queue)
            assert receive_frames(ws, 3) == [1, 2, 3]
            client.portal.call(hub.close_topic, RUN)
            assert_normal_close(ws)
        assert not frozen.is_set()


@pytest.mark.parametrize("ring", ["ring", "store"])
def test_overflowed_client_still_gets_every_frame_in_order(store: Store, ring: str) -> None:
    store.insert_run(make_run("running"))
    # "ring": the ring holds all ten frames; "store": only the newest, so the gap is filled from the store.
    hub = Hub(store, queue_frames=2, ring_bytes=(1 << 20) if ring == "ring" else 1)

    def flood() -> list[int]:
        for seq in range(1, 11):
            hub.publish(RUN, seq, text(seq))
            store_frames(store, range(seq, seq + 1))
        return [c.dropped_frames for c in hub.topic(RUN).clients]

    with TestClient(tiny_app(hub, store)) as client, freeze_watchdog(hub) as frozen:
        with client.websocket_connect(url(0)) as ws:
            client.portal.call(_wait_subscribed, hub)
            dropped = client.portal.call(flood)  # ten frames in one go on the app's loop, before the client reads
            assert len(dropped) == 1 and dropped[0] > 0, "the flood did not overflow the client's queue"
            assert receive_frames(ws, 10) == list(range(1, 11))
            client.portal.call(hub.close_topic, RUN)
            assert_normal_close(ws)
        assert not frozen.is_set()
    assert not hub.topic(RUN).clients  # the finished client unsubscribed
