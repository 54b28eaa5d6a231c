"""The run's end of the authenticated channel to a gradwatch server (protocol: :mod:`gradwatch.protocol`).

One implementation for everything that streams a run: a worker the server
launched (``app.worker``), a user's own script (:mod:`gradwatch.client`) and
``gradwatch sync`` (:mod:`gradwatch.sync`). They differ only in where frames
wait for their acknowledgement — the *outbox*:

- :class:`MemoryOutbox` for a server-launched worker, which the server
  restarts or ends if it dies, so keeping frames in memory is enough;
- :class:`SpoolOutbox` for a script or a sync, whose frames are the run's
  ``events.jsonl`` on the user's disk: the server may be down for an hour and
  the script may outlive it; nothing waits in memory but a list of offsets.

The channel thread owns the websocket: frames go out in seq order, batched,
and leave the outbox only when the server acknowledges them *after its
database commit*; each sample or checkpoint file is uploaded, in chunks,
just before the frame that names it. On reconnect the server's ``hello``
says the last seq it has and the channel resends the rest, so a dropped
connection or a restarted server loses nothing. Control and stop messages are
handed to callbacks; the caller applies them between two training steps.
"""

from __future__ import annotations

import array
import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from gradwatch.protocol import ARTIFACT_FRAMES, CHUNK_BYTES, MAX_MESSAGE_BYTES, encode_chunk
from trainer.telemetry import frame_to_json

log = logging.getLogger("gradwatch.channel")

Frame = dict[str, Any]
#: Largest ``frames`` message: a quarter of the server's websocket message cap, envelope included.
MAX_BATCH_BYTES = MAX_MESSAGE_BYTES // 4
#: A single frame larger than this can never be delivered (the server closes the channel on it, again and again):
#: it is replaced by an alert with the same seq, so the stream stays gapless and says what was lost.
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES - 4096
MAX_BATCH_FRAMES = 512
#: How long a finished run waits for the server to acknowledge its last frames.
DRAIN_S = 30.0
#: A folder here makes every channel record, per frame, when it was queued, sent and acknowledged (a file per run
#: and process, JSON lines): how ``bench/freshness.py`` splits a step's latency into the worker's and the server's part.
TRACE_ENV = "GRADWATCH_TRACE_FRAMES"


class Outbox(Protocol):
    """Frames appended in seq order (1, 2, 3, ...), kept until acknowledged."""

    def last_seq(self) -> int:
        """The highest seq appended so far (0 for none)."""
        ...

    def read(self, first: int, max_frames: int, max_bytes: int) -> list[tuple[Frame, str]]:
        """Frames from seq ``first`` on, in order, as (frame, JSON text); at least one if any is there."""
        ...

    def release(self, upto: int, *, collect: bool) -> list[Frame]:
        """Forget frames up to seq ``upto`` (acknowledged); returns the artifact frames among them if ``collect``."""
        ...


class MemoryOutbox:
    """Frames in memory: a worker's outbox (the server ends the run if the worker dies)."""

    def __init__(self) -> None:
        self._items: collections.deque[tuple[Frame, str]] = collections.deque()
        self._last = 0
        self.bytes = 0  # JSON text held: what a bound on the backlog counts

    def __len__(self) -> int:
        return len(self._items)

    def append(self, frame: Frame, text: str) -> None:
        self._items.append((frame, text))
        self._last = int(frame["seq"])
        self.bytes += len(text)

    def last_seq(self) -> int:
        return self._last

    def read(self, first: int, max_frames: int, max_bytes: int) -> list[tuple[Frame, str]]:
        out: list[tuple[Frame, str]] = []
        size = 0
        for item in self._items:
            if item[0]["seq"] < first:
                continue
            out.append(item)
            size += len(item[1])
            if len(out) >= max_frames or size >= max_bytes:
                break
        return out

    def release(self, upto: int, *, collect: bool) -> list[Frame]:
        done = []
        while self._items and self._items[0][0]["seq"] <= upto:
            frame, text = self._items.popleft()
            self.bytes -= len(text)
            if collect and frame["type"] in ARTIFACT_FRAMES:
                done.append(frame)
        return done


class SpoolOutbox:
    """A run's ``events.jsonl`` as the outbox: frame ``n`` is line ``n``; only line offsets live in memory.

    The writer appends lines itself (the file is also the run's local record)
    and then calls :meth:`note`. ``renumber`` makes a frame's seq its line number
    whatever the file says, for folders written by something else (a
    ``gradwatch train --out`` folder resumed into the same file restarts its
    seq at 1). ``max_backlog_bytes`` bounds what may wait unacknowledged: past
    it :meth:`has_room` says no and the writer drops frames (and says so).
    """

    def __init__(self, path: Path, *, renumber: bool = False, max_backlog_bytes: int = 1 << 30) -> None:
        self.path = path
        self.renumber = renumber
        self.max_backlog_bytes = max_backlog_bytes
        self._offsets = array.array("q")  # start offset of each frame not yet acknowledged...
        self._base = 1  # ...the first of which has this seq
        self._end = 0  # offset just past the last noted line
        self._fd: int | None = None
        if path.exists():
            self._scan()

    def _scan(self) -> None:
        """Index the lines already in the file (a folder to sync, or a spool left by a script that died)."""
        offset = 0
        with open(self.path, "rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # a line cut short by a crash: not a frame
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)
        self._end = offset

    def note(self, offset: int, length: int) -> None:
        """The writer has appended one frame's line (``length`` bytes, newline included) at ``offset``."""
        self._offsets.append(offset)
        self._end = offset + length

    def has_room(self) -> bool:
        backlog = self._end - self._offsets[0] if self._offsets else 0
        return backlog < self.max_backlog_bytes

    def last_seq(self) -> int:
        return self._base + len(self._offsets) - 1

    def read(self, first: int, max_frames: int, max_bytes: int) -> list[tuple[Frame, str]]:
        index = max(first - self._base, 0)
        if index >= len(self._offsets):
            return []
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out: list[tuple[Frame, str]] = []
        size = 0
        while index < len(self._offsets) and len(out) < max_frames and (not out or size < max_bytes):
            start = self._offsets[index]
            end = self._offsets[index + 1] if index + 1 < len(self._offsets) else self._end
            text = os.pread(self._fd, end - start, start).decode("utf-8").strip()
            seq = self._base + index
            if self.renumber or text.startswith(_ARTIFACT_PREFIXES):
                frame = json.loads(text)
                if frame.get("seq") != seq:
                    frame["seq"] = seq
                    text = frame_to_json(frame)
            else:
                # The run's own writer put "type" first: parsing every metrics frame again here would cost the
                # training loop's process (the GIL) for nothing, since only artifact frames need their fields.
                frame = {"type": _frame_type(text), "seq": seq}
            out.append((frame, text))
            size += len(text)
            index += 1
        return out

    def release(self, upto: int, *, collect: bool) -> list[Frame]:
        count = min(max(upto - self._base + 1, 0), len(self._offsets))
        if count == 0:
            return []
        done = ([frame for frame, _ in self.read(self._base, count, 1 << 62) if frame.get("type") in ARTIFACT_FRAMES]
                if collect else [])
        del self._offsets[:count]
        self._base += count
        return done

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_ARTIFACT_PREFIXES = tuple(f'{{"type":"{kind}"' for kind in ARTIFACT_FRAMES)


def _frame_type(text: str) -> str:
    """The type of a frame written by :func:`~trainer.telemetry.frame_to_json` with ``type`` first."""
    if text.startswith('{"type":"'):
        end = text.find('"', 9)
        if end > 9:
            return text[9:end]
    frame_type: str = json.loads(text).get("type", "")
    return frame_type


def _too_large(frame: Frame, size: int) -> str:
    """The alert that stands in for a frame too large to deliver, under the same seq."""
    step = frame.get("step")
    if isinstance(step, list):  # a metrics frame: its newest step
        step = step[-1] if step else None
    return frame_to_json({"type": "alert", "run": frame.get("run"), "seq": frame["seq"], "step": step,
                          "kind": "frame_too_large",
                          "message": f"a {frame.get('type')} frame of {size:,} bytes was too large to send"})


class FrameTrace:
    """When each frame was queued, sent and acknowledged, on the wall clock its steps' ``time`` uses.

    One JSON line per frame once the server acknowledges it: ``seq``, ``type``, ``steps`` (how many a
    metrics frame carries), ``oldest`` and ``newest`` (their ``time``), ``queued`` (handed to the
    channel), ``sent`` (written to the websocket, the first time) and ``acked`` (the acknowledgement,
    which the server sends after its database commit, read). Off unless :data:`TRACE_ENV` names a folder;
    the costs are then a dict entry per frame and a line written per acknowledged frame.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._open: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self._fh: Any = None

    @classmethod
    def from_env(cls) -> FrameTrace | None:
        folder = os.environ.get(TRACE_ENV)
        return cls(Path(folder)) if folder else None

    def queued(self, frame: Frame, now: float) -> None:
        times = frame.get("time") if frame.get("type") == "metrics" else None
        record: dict[str, Any] = {"run": frame.get("run"), "seq": frame["seq"], "type": frame.get("type"),
                                  "steps": len(times) if times else 0, "oldest": min(times) if times else None,
                                  "newest": max(times) if times else None, "queued": now, "sent": None}
        self._open[int(frame["seq"])] = record

    def sent(self, upto: int, now: float) -> None:
        for seq, record in self._open.items():
            if seq > upto:
                break
            if record["sent"] is None:
                record["sent"] = now

    def acked(self, upto: int, now: float) -> None:
        while self._open:
            seq, record = next(iter(self._open.items()))
            if seq > upto:
                break
            del self._open[seq]
            if self._fh is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.folder / f"{record['run']}-{os.getpid()}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            self._fh.write(json.dumps({**record, "acked": now}) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


Endpoint = Callable[[], tuple[str, str]]


class Channel:
    """The channel thread and its outbox. ``send_frame`` never blocks on the network.

    ``endpoint`` gives the websocket URL and the run token; it may raise
    ``OSError`` (a script's run not created yet because the server is away):
    the channel backs off and asks again. ``artifact_dir`` holds
    ``samples/`` and ``checkpoints/``; with ``delete_acked_artifacts`` a file is
    removed once the server has it (a worker's scratch folder), otherwise kept
    (a script's run folder is the user's record). ``orphan_timeout_s``: give
    up (and call ``on_stop``) after that long without a server; None: never.
    """

    def __init__(self, endpoint: Endpoint, outbox: Outbox, artifact_dir: Path, *,
                 orphan_timeout_s: float | None = 120.0, delete_acked_artifacts: bool = False,
                 max_backlog_bytes: int | None = None) -> None:
        self.endpoint = endpoint
        self.outbox = outbox
        self.artifact_dir = artifact_dir
        self.orphan_timeout_s = orphan_timeout_s
        self.delete_acked_artifacts = delete_acked_artifacts
        self.on_control: Callable[[dict[str, Any]], object] = lambda changes: None
        self.on_stop: Callable[[], None] = lambda: None
        # Called on the channel thread whenever it wakes while connected (a frame queued, an acknowledgement read,
        # or the time it last asked for come): the producer may queue frames from here (a worker's telemetry flush,
        # trainer.telemetry.flush_when_due) and returns the seconds after which to be called again (None: no wish).
        self.on_wake: Callable[[], float | None] | None = None
        self.on_refused: Callable[[int], None] | None = None  # default: on_stop
        # A memory outbox holding more than max_backlog_bytes unacknowledged (the server is away, or cannot store
        # them) calls this once, with the bytes held: the run stops rather than grow without end.
        self.max_backlog_bytes = max_backlog_bytes
        self.on_backlog_full: Callable[[int], None] = lambda held: self.on_stop()
        self._backlog_full = False
        self.acked = 0
        self.connected = False
        self.max_artifact_bytes: int | None = None  # the server's cap, told in its hello
        self._cond = threading.Condition()
        self._send_from = 1  # seq of the first frame not yet sent on the current connection
        self._closing = False
        self._gave_up = False
        self._refused = False
        self._trace = FrameTrace.from_env()
        self._thread = threading.Thread(target=self._run, name="gradwatch-channel", daemon=True)

    # -- producer side -----------------------------------------------------------
    def send_frame(self, frame: Frame) -> None:
        """Queue a frame (memory outbox)."""
        text = frame_to_json(frame)
        with self._cond:
            if self._trace is not None:
                self._trace.queued(frame, time.time())
            self.outbox.append(frame, text)  # type: ignore[attr-defined]
            self._cond.notify_all()
            held = getattr(self.outbox, "bytes", 0)
            full = self.max_backlog_bytes is not None and held > self.max_backlog_bytes and not self._backlog_full
            self._backlog_full = self._backlog_full or full
        if full:
            log.error("%d bytes of frames not acknowledged by the server, over the bound of %d: stopping the run",
                      held, self.max_backlog_bytes)
            self.on_backlog_full(held)

    @property
    def lock(self) -> threading.Condition:
        """Held (and notified) by a spool outbox's writer while it appends: the channel thread never reads a
        half-noted frame, and wakes when there is one."""
        return self._cond

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once the channel gave up (no server) or the server refused it (run deleted)."""
        return not (self._gave_up or self._refused)

    def pending(self) -> int:
        with self._cond:
            return self.outbox.last_seq() - self.acked

    def idle(self) -> bool:
        """Nothing in flight: connected, and every frame queued so far acknowledged by the server.

        What a producer asks before sending a frame early (:class:`~trainer.telemetry.MetricBuffer`): at most one
        batch is then on its way at a time, and frames grow while the server is slow to commit them. Asked once
        per training step, so it reads two integers without the lock: a stale answer only moves a flush by a step.
        """
        return self.connected and self.outbox.last_seq() <= self.acked

    def close(self, drain_timeout_s: float = DRAIN_S) -> bool:
        """Wait until every frame is acknowledged (or time runs out); True if all were."""
        deadline = time.monotonic() + drain_timeout_s
        with self._cond:
            while self.outbox.last_seq() > self.acked and not self._gave_up and not self._refused:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.2))
            drained = self.outbox.last_seq() <= self.acked
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if self._trace is not None:
            with self._cond:
                self._trace.close()
        return drained

    # -- channel thread ---------------------------------------------------------
    def _run(self) -> None:
        delay = 0.05
        last_contact = time.monotonic()
        while not self._closing:
            try:
                url, token = self.endpoint()
                with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None,
                             open_timeout=5, max_size=1 << 20, compression=None) as ws:
                    delay = 0.05
                    self._session(ws)
                    last_contact = time.monotonic()
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403, 404):
                    # The server no longer knows this run (deleted, or ended while we were away).
                    log.error("server refused the channel (HTTP %s); giving up", status)
                    self._refuse(status)
                    return
                log.warning("channel refused (HTTP %s); retrying", status)
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError, ValueError) as exc:
                log.debug("channel down: %s", exc)
            else:
                last_contact = time.monotonic()
            finally:
                self.connected = False
            if self._closing:
                return
            if self.orphan_timeout_s is not None and time.monotonic() - last_contact > self.orphan_timeout_s:
                log.error("no server for %.0f s; stopping the run", self.orphan_timeout_s)
                self._gave_up = True
                self.on_stop()
                with self._cond:
                    self._cond.notify_all()
                return
            with self._cond:
                self._cond.wait(delay)  # close() wakes us at once
            delay = min(delay * 2, 2.0)

    def _refuse(self, status: int) -> None:
        self._refused = True
        (self.on_refused or (lambda _status: self.on_stop()))(status)
        with self._cond:
            self._cond.notify_all()

    def _session(self, ws: ClientConnection) -> None:
        hello = json.loads(ws.recv(timeout=10))
        if hello.get("type") != "hello":
            raise ConnectionError(f"unexpected first message {hello!r}")
        ack = int(hello["ack"])
        limit = hello.get("max_artifact_bytes")
        self.max_artifact_bytes = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
        self._ack(ack)
        self.connected = True
        with self._cond:
            self._send_from = ack + 1  # everything after what the server has, again if need be
        if hello.get("stop"):
            self.on_stop()  # a stop pressed while we were away
        receiver = threading.Thread(target=self._receive, args=(ws,), daemon=True)
        receiver.start()
        while receiver.is_alive():
            wake_in = self._wake()  # outside the lock: the producer's frames come in through send_frame
            with self._cond:
                if self.outbox.last_seq() < self._send_from and not self._closing and receiver.is_alive():
                    self._cond.wait(0.1 if wake_in is None else min(0.1, max(wake_in, 0.0002)))
                if self._closing:
                    return
                pending = (self.outbox.read(self._send_from, MAX_BATCH_FRAMES, MAX_BATCH_BYTES)
                           if self.outbox.last_seq() >= self._send_from else [])
            if pending:
                self._send_pending(ws, pending)
        receiver.join()

    def _wake(self) -> float | None:
        hook = self.on_wake
        if hook is None:
            return None
        try:
            return hook()
        except Exception:
            # The producer's own thread still flushes on its deadline: log, and leave it to that.
            log.exception("the channel's wake hook failed; it is not called again")
            self.on_wake = None
            return None

    def _send_pending(self, ws: ClientConnection, pending: list[tuple[Frame, str]]) -> None:
        batch: list[str] = []
        size = 0
        last = 0

        def flush() -> None:
            nonlocal batch, size
            if batch:
                ws.send('{"type":"frames","frames":[' + ",".join(batch) + "]}")
                with self._cond:
                    # By seq, not by count: acks may remove frames from the outbox meanwhile.
                    self._send_from = max(self._send_from, last + 1)
                    if self._trace is not None:
                        self._trace.sent(last, time.time())
                batch, size = [], 0

        for frame, text in pending:
            if len(text) > MAX_FRAME_BYTES:
                log.error("frame %s (%s) is %d bytes, over the server's message cap: sent as an alert instead",
                          frame["seq"], frame["type"], len(text))
                text = _too_large(frame, len(text))
            kind: str | None = ARTIFACT_FRAMES.get(frame["type"])
            if kind is not None:
                file_size = self._artifact_size(kind, str(frame["name"]))
                cap = self.max_artifact_bytes
                if cap is not None and file_size is not None and file_size > cap:
                    text, kind = self._over_cap(frame, kind, file_size), None
            if kind is not None:
                flush()
                self._upload(ws, kind, str(frame["name"]))
            if batch and size + len(text) + len(batch) + 32 > MAX_BATCH_BYTES:
                flush()  # before, not after: the message must stay under the cap with this frame in it
            batch.append(text)
            size += len(text)
            last = int(frame["seq"])
            if len(batch) >= MAX_BATCH_FRAMES:
                flush()
        flush()

    def _artifact_size(self, kind: str, name: str) -> int | None:
        try:
            return (self.artifact_dir / kind / name).stat().st_size
        except OSError:
            return None

    def _over_cap(self, frame: Frame, kind: str, size: int) -> str:
        """An artifact over the server's cap is not sent (it stays where it was written): an alert says so instead."""
        where = self.artifact_dir / kind / str(frame["name"])
        log.error("%s is %d bytes, over the server's max_artifact_bytes (%s): kept in %s, not uploaded",
                  frame["name"], size, self.max_artifact_bytes, where)
        return frame_to_json({"type": "alert", "run": frame.get("run"), "seq": frame["seq"], "step": frame.get("step"),
                              "kind": "artifact_too_large",
                              "message": f"{frame['name']} ({size:,} bytes) is over the server's max_artifact_bytes "
                                         f"({self.max_artifact_bytes:,}); it stays in {where}"})

    def _upload(self, ws: ClientConnection, kind: str, name: str) -> None:
        path = self.artifact_dir / kind / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return  # already uploaded and removed, or pruned before it could go: the frame goes anyway
        for offset in range(0, max(len(data), 1), CHUNK_BYTES):
            ws.send(encode_chunk(kind, name, offset, len(data), data[offset:offset + CHUNK_BYTES]))

    def _receive(self, ws: ClientConnection) -> None:
        try:
            for message in ws:
                if isinstance(message, bytes):
                    continue
                msg = json.loads(message)
                if msg.get("type") == "ack":
                    self._ack(int(msg["seq"]))
                elif msg.get("type") == "control":
                    try:
                        self.on_control(msg["changes"])
                    except ValueError as exc:
                        log.warning("control refused: %s", exc)
                elif msg.get("type") == "stop":
                    self.on_stop()
        except ConnectionClosed:
            pass
        finally:
            with self._cond:
                self._cond.notify_all()

    def _ack(self, seq: int) -> None:
        """Forget frames up to ``seq``; their artifacts are on the server now."""
        with self._cond:
            done = self.outbox.release(seq, collect=self.delete_acked_artifacts) if seq > self.acked else []
            if self._trace is not None and seq > self.acked:
                self._trace.acked(seq, time.time())
            self.acked = max(self.acked, seq)
            self._cond.notify_all()
        if self.delete_acked_artifacts:
            for frame in done:
                kind = ARTIFACT_FRAMES.get(frame["type"])
                if kind is not None:
                    (self.artifact_dir / kind / str(frame["name"])).unlink(missing_ok=True)
