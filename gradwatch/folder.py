"""A script's run on its own disk, and the thread that uploads it.

The folder has the layout of ``gradwatch train --out DIR`` (SPEC §5):
``events.jsonl`` (every SPEC §4 frame, one per line, frame n on line n),
``samples/``, ``checkpoints/``, plus ``run.json`` (name, config, source and
the run's ``uid``, which makes uploading it again find the same run).

The folder *is* the spool: a frame is written to ``events.jsonl`` before it
is sent, and the uploader (:class:`Uploader`, a :class:`~gradwatch.channel.Channel`
over a :class:`~gradwatch.channel.SpoolOutbox`) sends whatever the server has
not acknowledged, from the file. So a server that goes away for an hour, or a
script that starts before its server, loses nothing; and an offline run is the
same folder with no uploader, for ``gradwatch sync`` to send later.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from gradwatch import server as srv
from gradwatch.channel import Channel, Frame, SpoolOutbox
from trainer.files import atomic_write
from trainer.telemetry import frame_to_json

log = logging.getLogger("gradwatch")

META = "run.json"
EVENTS = "events.jsonl"
#: Frames that may wait unacknowledged on disk while the server is away; past it new frames are dropped (and the
#: run says how many when the server is back), so a script left running for days cannot fill the disk.
MAX_BACKLOG_BYTES = 1 << 30


class RunFolder:
    """Writes one run's frames and artifacts; ``emit`` is all the rest of the client needs."""

    def __init__(self, path: Path, run_id: str, *, max_backlog_bytes: int = MAX_BACKLOG_BYTES) -> None:
        self.path = path
        self.run_id = run_id
        for sub in ("samples", "checkpoints"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        self.outbox = SpoolOutbox(path / EVENTS, max_backlog_bytes=max_backlog_bytes)
        self.seq = self.outbox.last_seq()
        self._fh = open(path / EVENTS, "ab")  # noqa: SIM115 - open for the run's lifetime, closed by close()
        self.cond: threading.Condition = threading.Condition()
        self.bounded = False  # only an uploading run has a backlog to bound
        self.dropped = 0

    def emit(self, frame_type: str, **fields: Any) -> Frame | None:
        """Append one frame (the next seq) to ``events.jsonl``; None if the backlog bound dropped it."""
        with self.cond:
            if self.bounded and not self.outbox.has_room():
                self.dropped += 1
                return None
            frame: Frame = {"type": frame_type, "run": self.run_id, "seq": self.seq + 1, **fields}
            data = (frame_to_json(frame) + "\n").encode()
            offset = self._fh.tell()
            self._fh.write(data)
            self._fh.flush()
            self.outbox.note(offset, len(data))
            self.seq += 1
            self.cond.notify_all()
        return frame

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write(self.path / META, (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode())

    def close(self) -> None:
        with self.cond:
            self._fh.close()
        self.outbox.close()


def read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


class Uploader:
    """Creates the run on the server (when the server is there) and streams the folder to it.

    ``body`` is the ``POST /api/client/runs`` request. Nothing here blocks the script: creation is retried by the
    channel thread with back-off, and frames wait in the folder meanwhile.
    """

    def __init__(self, folder: RunFolder, base: str, token: str | None, body: dict[str, Any], *,
                 outbox: SpoolOutbox | None = None) -> None:
        self.base = base
        self.token = token
        self.body = body
        self.created: dict[str, Any] | None = None
        self.on_created: list[Any] = []
        self._complained = False
        self.channel = Channel(self._endpoint, outbox or folder.outbox, folder.path, orphan_timeout_s=None,
                               delete_acked_artifacts=False)
        folder.cond = self.channel.lock  # one lock for the writer and the channel thread reading the same file
        folder.bounded = True

    def create(self) -> dict[str, Any]:
        """Create (or find, by uid) the run now; ``ServerError`` if refused, ``OSError`` if unreachable."""
        created = srv.create_run(self.base, self.token, self.body)
        self.created = created
        for callback in self.on_created:
            try:
                callback(created)
            except Exception:  # a callback's bug must not stop the upload; say it, though
                log.exception("gradwatch: on_created callback failed")
        return created

    def _endpoint(self) -> tuple[str, str]:
        if self.created is None:
            try:
                self.create()
            except srv.ServerError as exc:
                if not self._complained:
                    log.error("gradwatch: the server at %s refused the run: %s (retrying)", self.base, exc.detail)
                    self._complained = True
                raise OSError(str(exc)) from exc
        assert self.created is not None
        return srv.websocket_url(self.base, self.created["channel"]), str(self.created["token"])

    def start(self) -> None:
        self.channel.start()

    @property
    def run_url(self) -> str | None:
        return f"{self.base}{self.created['url']}" if self.created else None
