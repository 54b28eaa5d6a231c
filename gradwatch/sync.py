"""``gradwatch sync DIR``: upload a run folder — a script's offline run, or a ``gradwatch train --out`` run.

The folder's frames become a run on the server with their whole history and
artifacts, through the same channel a live script uses. The run is found again
by the folder's uid (``run.json``, or ``.gradwatch-sync.json`` that the first
sync writes into a ``gradwatch train`` folder): a second sync of the same
folder uploads nothing new and makes no second run, and a sync that was
interrupted continues where the server's acknowledgements stopped.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from gradwatch import server as srv
from gradwatch.channel import Channel, SpoolOutbox
from gradwatch.folder import EVENTS, read_meta
from gradwatch.source import script_source
from trainer.files import atomic_write

SYNC_STATE = ".gradwatch-sync.json"
TERMINAL = ("completed", "stopped", "failed")


class SyncError(Exception):
    """The folder cannot be uploaded; the message says why."""


def _folder_request(folder: Path) -> dict[str, Any]:
    """The ``POST /api/client/runs`` body that describes the folder's run."""
    meta = read_meta(folder)
    if meta is not None and isinstance(meta.get("uid"), str):  # a script's run (gradwatch.init)
        source = {**(meta.get("source") or {}), "origin": "sync"}
        return {"name": meta.get("name") or None, "kind": meta.get("kind", "custom"),
                "config": meta.get("config") or {}, "source": source, "uid": meta["uid"]}
    try:  # a `gradwatch train --out DIR` run: its config.json is a full run config
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    state_path = folder / SYNC_STATE
    try:
        uid = json.loads(state_path.read_text(encoding="utf-8"))["uid"]
    except (OSError, ValueError, KeyError, TypeError):
        uid = uuid.uuid4().hex
        atomic_write(state_path, (json.dumps({"uid": uid}) + "\n").encode())
    source = script_source(origin="sync", folder=folder.resolve())
    source["script"] = "gradwatch train"
    source["argv"] = []
    source.pop("git", None)  # the syncing shell's repository says nothing about the run
    kind = config.get("kind") if config.get("kind") in ("gan", "vae") else "custom"
    return {"name": config.get("name") or folder.resolve().name, "kind": kind, "config": config,
            "source": source, "uid": uid}


def sync(folder: str | Path, *, server: str | None = None, token: str | None = None, progress: bool = True,
         timeout_s: float | None = None) -> dict[str, Any]:
    """Upload ``folder``; returns ``{"run": id, "url": ..., "uploaded": frames sent now, "frames": total}``."""
    folder = Path(folder)
    if not (folder / EVENTS).is_file():
        raise SyncError(f"{folder} has no {EVENTS}: not a gradwatch run folder")
    base = srv.configured_server(server) or srv.DEFAULT_SERVER
    outbox = SpoolOutbox(folder / EVENTS, renumber=True, max_backlog_bytes=1 << 62)
    total = outbox.last_seq()
    body = _folder_request(folder)
    try:
        created = srv.create_run(base, srv.configured_token(token), body)
    except srv.ServerError as exc:
        raise SyncError(f"the server at {base} refused the run: {exc.detail}") from None
    except OSError as exc:
        raise SyncError(f"cannot reach a gradwatch server at {base}: {exc}") from None
    run_id, url = created["run"]["id"], f"{base}{created['url']}"
    received = int(created["received"])
    result = {"run": run_id, "url": url, "uploaded": 0, "frames": total}
    if received >= total:
        outbox.close()
        return result  # everything is there already: syncing again changes nothing
    channel = Channel(lambda: (srv.websocket_url(base, created["channel"]), str(created["token"])), outbox, folder,
                      orphan_timeout_s=timeout_s if timeout_s is not None else 120.0)
    refused: list[int] = []
    channel.on_refused = refused.append
    channel.start()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=received, unit="frame", file=sys.stderr, desc=f"sync → run {run_id}")
    try:
        while channel.alive and channel.acked < total:
            time.sleep(0.1)
            if bar is not None:
                bar.n = max(channel.acked, received)
                bar.refresh()
    finally:
        drained = channel.close(drain_timeout_s=0 if not channel.alive else 10.0)
        outbox.close()
        if bar is not None:
            bar.close()
    if refused:
        raise SyncError(f"the server refused the upload of run {run_id} (HTTP {refused[0]})")
    if not drained:
        raise SyncError(f"the server at {base} went away during the sync; run it again to continue")
    result["uploaded"] = total - received
    return result
