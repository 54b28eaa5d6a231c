"""A training worker: one process per run, talking to the server over one websocket.

The server starts ``python -m app.worker`` with the run's token in the
environment (never on the command line, where ``ps`` would show it). The
trainer runs on the main thread; a channel thread owns the connection:

- frames go out in seq order, batched, and stay in the outbox until the
  server acknowledges them as committed, so a dropped connection or a
  restarted server loses nothing: on reconnect the server says what it
  has (``hello``) and the worker resends the rest;
- each sample or checkpoint file is uploaded, in chunks, just before the
  frame that announces it, so the frame never points at a missing file, and
  deleted locally once acknowledged;
- control and stop messages are handed to the trainer, which applies them
  between two steps; ``SIGINT`` stops the run the same way, while ``SIGTERM``
  (a server shutting down) stops it hurried: the final checkpoint only, and at
  most 2 s spent on delivering what is left, so the server can exit in time;
- reconnects back off exponentially; a worker that cannot reach any server
  for ``orphan_timeout_s`` stops itself (final checkpoint kept locally),
  so a server killed with ``kill -9`` leaves no process behind for long.

Nothing here imports the web server: a worker on another host needs only
this module, the trainer and ``websockets``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from app.protocol import CHUNK_BYTES, encode_chunk
from trainer.files import atomic_write
from trainer.telemetry import frame_to_json

log = logging.getLogger("gradwatch.worker")

TOKEN_ENV = "GRADWATCH_RUN_TOKEN"
MAX_BATCH_BYTES = 4 << 20
ARTIFACT_FRAMES = {"sample": "samples", "checkpoint": "checkpoints"}
#: How long a finished run waits for the server to acknowledge its last frames...
DRAIN_S = 30.0
#: ...and how long when it was terminated: the server is going away, and keeps the final checkpoint from disk.
SHUTDOWN_DRAIN_S = 2.0


class WorkerChannel:
    """The worker's end of the channel; ``send_frame`` is the trainer's sink."""

    def __init__(self, url: str, token: str, out_dir: Path, *, orphan_timeout_s: float = 120.0) -> None:
        self.url = url
        self.token = token
        self.out_dir = out_dir
        self.orphan_timeout_s = orphan_timeout_s
        self.on_control: Callable[[dict[str, Any]], object] = lambda changes: None
        self.on_stop: Callable[[], None] = lambda: None
        self._cond = threading.Condition()
        self._outbox: collections.deque[tuple[dict[str, Any], str]] = collections.deque()
        self._send_from = 1  # seq of the first frame not yet sent on the current connection
        self._closing = False
        self._gave_up = False
        self._refused = False
        self._thread = threading.Thread(target=self._run, name="gradwatch-channel", daemon=True)

    # -- trainer side ------------------------------------------------------------
    def send_frame(self, frame: dict[str, Any]) -> None:
        text = frame_to_json(frame)
        with self._cond:
            self._outbox.append((frame, text))
            self._cond.notify_all()

    def start(self) -> None:
        self._thread.start()

    def close(self, drain_timeout_s: float = DRAIN_S) -> bool:
        """Wait until every frame is acknowledged (or time runs out); True if all were."""
        deadline = time.monotonic() + drain_timeout_s
        with self._cond:
            while self._outbox and not self._gave_up and not self._refused:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.2))
            drained = not self._outbox
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
        return drained

    # -- channel thread ---------------------------------------------------------
    def _run(self) -> None:
        delay = 0.05
        last_contact = time.monotonic()
        while not self._closing:
            try:
                headers = {"Authorization": f"Bearer {self.token}"}
                with connect(self.url, additional_headers=headers, proxy=None, open_timeout=5,
                             max_size=1 << 20, compression=None) as ws:
                    delay = 0.05
                    self._session(ws)
                    last_contact = time.monotonic()
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403, 404):
                    # The server no longer knows this run (deleted, or ended while we were away).
                    log.error("server refused the channel (HTTP %s); stopping", status)
                    self._refuse()
                    return
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
                log.warning("channel down: %s", exc)
            else:
                last_contact = time.monotonic()
            if self._closing:
                return
            if time.monotonic() - last_contact > self.orphan_timeout_s:
                log.error("no server for %.0f s; stopping the run", self.orphan_timeout_s)
                self._gave_up = True
                self.on_stop()
                with self._cond:
                    self._cond.notify_all()
                return
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _refuse(self) -> None:
        self._refused = True
        self.on_stop()
        with self._cond:
            self._cond.notify_all()

    def _session(self, ws: ClientConnection) -> None:
        hello = json.loads(ws.recv(timeout=10))
        if hello.get("type") != "hello":
            raise ConnectionError(f"unexpected first message {hello!r}")
        ack = int(hello["ack"])
        self._ack(ack)
        with self._cond:
            self._send_from = ack + 1  # everything after what the server has, again if need be
        receiver = threading.Thread(target=self._receive, args=(ws,), daemon=True)
        receiver.start()
        while receiver.is_alive():
            with self._cond:
                while not self._unsent() and not self._closing and receiver.is_alive():
                    self._cond.wait(0.1)
                if self._closing:
                    return
                pending = [item for item in self._outbox if item[0]["seq"] >= self._send_from]
            if pending:
                self._send_pending(ws, pending)
        receiver.join()

    def _unsent(self) -> bool:
        return bool(self._outbox) and self._outbox[-1][0]["seq"] >= self._send_from

    def _send_pending(self, ws: ClientConnection, pending: list[tuple[dict[str, Any], str]]) -> None:
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
                batch, size = [], 0

        for frame, text in pending:
            kind = ARTIFACT_FRAMES.get(frame["type"])
            if kind is not None:
                flush()
                self._upload(ws, kind, str(frame["name"]))
            batch.append(text)
            size += len(text)
            last = int(frame["seq"])
            if size >= MAX_BATCH_BYTES or len(batch) >= 512:
                flush()
        flush()

    def _upload(self, ws: ClientConnection, kind: str, name: str) -> None:
        path = self.out_dir / kind / name
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
        done: list[dict[str, Any]] = []
        with self._cond:
            while self._outbox and self._outbox[0][0]["seq"] <= seq:
                done.append(self._outbox.popleft()[0])
            self._cond.notify_all()
        for frame in done:
            kind = ARTIFACT_FRAMES.get(frame["type"])
            if kind is not None:
                (self.out_dir / kind / str(frame["name"])).unlink(missing_ok=True)


def fetch_resume_checkpoint(server: str, run_id: str, token: str, target: Path) -> Path:
    """Download the run's starting checkpoint (HTTP, run token), so a worker needs no shared disk."""
    base = server.replace("ws://", "http://", 1).replace("wss://", "https://", 1).rstrip("/")
    request = urllib.request.Request(f"{base}/worker/runs/{run_id}/resume",
                                     headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy, like the channel
    with opener.open(request, timeout=60) as response:
        atomic_write(target, lambda fh: shutil.copyfileobj(response, fh))
    return target


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.worker", description="One gradwatch training run.")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--server", required=True, help="ws://host:port of the gradwatch server")
    parser.add_argument("--config", required=True, type=Path, help="run config JSON")
    parser.add_argument("--work-dir", required=True, type=Path, help="local folder for artifacts before upload")
    parser.add_argument("--cache-dir", type=Path, help="where the digits classifier is cached")
    parser.add_argument("--resume", type=Path, help="checkpoint to continue from (a local file)")
    parser.add_argument("--resume-from-server", action="store_true",
                        help="fetch the checkpoint to continue from from the server")
    parser.add_argument("--orphan-timeout", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--nice", type=int, default=0, choices=range(20), metavar="0-19",
                        help="niceness added to the training thread, not to the channel thread that streams")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        log.error("%s is not set", TOKEN_ENV)
        return 2

    import torch

    from trainer.config import RunConfig
    from trainer.loop import RunOptions, make_trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    url = f"{args.server.rstrip('/')}/ws/worker/{args.run_id}"
    channel = WorkerChannel(url, token, args.work_dir, orphan_timeout_s=args.orphan_timeout)
    channel.start()
    if args.nice:
        # On Linux niceness is per thread: the channel thread, started above, keeps normal priority so frames leave
        # on time, while training and the torch threads it starts later yield the CPU to the server and the stream.
        with contextlib.suppress(OSError):
            os.nice(args.nice)
    status = "failed"
    try:
        cfg = RunConfig.model_validate_json(args.config.read_text(encoding="utf-8"))
        resume = args.resume
        if args.resume_from_server:
            resume = fetch_resume_checkpoint(args.server, args.run_id, token, args.work_dir / "resume.pt")
        options = RunOptions(out_dir=args.work_dir, sink=channel.send_frame, run_id=args.run_id,
                             resume_from=resume,
                             artifact_url=lambda kind, name: f"/api/runs/{args.run_id}/{kind}/{name}")
        if args.cache_dir is not None:
            options.cache_dir = args.cache_dir
        trainer = make_trainer(cfg, options)
    except Exception as exc:  # the run never started: say why on the channel, as its only frame
        log.exception("could not start the run")
        channel.send_frame({"type": "status", "run": args.run_id, "seq": 1, "status": "failed",
                            "error": f"{type(exc).__name__}: {exc}", "step": 0})
        channel.close()
        return 1

    channel.on_control = trainer.control
    channel.on_stop = trainer.request_stop

    terminated = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        # SIGINT is a stop like the dashboard's Stop button (the server sends it when the channel is down).
        # SIGTERM comes from a server shutting down, or from whoever manages this host: nobody will acknowledge
        # much more and we may be killed if we dawdle, so write the final checkpoint and go.
        if signum == signal.SIGTERM:
            terminated.set()
        trainer.request_stop(hurry=terminated.is_set())

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        status = trainer.run()
    finally:
        drain = SHUTDOWN_DRAIN_S if terminated.is_set() else DRAIN_S
        if not channel.close(drain_timeout_s=drain):
            log.error("some frames were never acknowledged by the server")
    return 0 if status in ("completed", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
