"""Persistence for the server: runs, every websocket frame, and (through app.metricstore) the metric history.

One SQLite file in WAL mode holds three things:

* ``runs``: one row per run (:class:`RunRecord`), written synchronously. These
  writes are rare and small, so they go through their own lock-guarded
  connection instead of waiting behind the frame queue.
* ``frames``: every frame of every run as its JSON text, keyed by ``(run_id, seq)``,
  so a websocket client reconnecting with ``?since=SEQ`` can be backfilled. Two more indexes, by
  ``type`` and (for ``hist`` frames) by histogram key, let a reloading page fetch its alerts and its
  newest histograms (:meth:`Store.events`) without reading every frame of a long run; a file written
  before they existed gets them built once, when it is opened.
* the metric store (app/metricstore.py): the values of the ``metrics`` frames again, columnar, which the
  charts and the CSV export read. Once a run has ended, the ``metrics`` frames that the metric store can
  give back exactly are dropped from ``frames`` (a background job of the writer thread, one short
  transaction per slice), and :meth:`Store.frames_after` rebuilds them from it: a client sees the same
  bytes, and an ended run's metrics are on disk once instead of twice (bench/storage.py). A file made by
  schema 3 is in ``auto_vacuum = INCREMENTAL`` mode, so the pages those frames freed go back to the file
  system (beyond KEEP_FREE_BYTES kept for the next writes); an older file keeps them for its next writes.

Frames arrive from training workers at thousands of steps per second, and the
event loop that receives them must never wait on disk. :meth:`Store.append` only
enqueues; one writer thread owning its own connection groups whatever is queued
into a single transaction. WAL lets readers (per-thread connections) run while
that thread writes. Every write transaction starts with ``BEGIN IMMEDIATE`` so
that two writers queue on SQLite's busy handler rather than failing with a lock
upgrade error, which is what keeps the run-table connection and the writer
thread from ever deadlocking.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

import numpy as np

from app import metricstore as ms
from app.metricstore import (  # noqa: F401  (names tests and benchmarks read from here)
    CHUNK_MAX_POINTS,
    COMPACT_AFTER,
    EXPORT_WINDOW_CHUNKS,
    SUMMARY_BLOCK,
    Float64Array,
    IndexArray,
    Int64Array,
    Series,
)
from app.metricstore import select_points as _select_points
from app.metricstore import summary_suffices as _summary_suffices

logger = logging.getLogger(__name__)

RUN_STATUSES = ("queued", "running", "completed", "stopped", "failed", "interrupted")
TERMINAL_STATUSES = frozenset({"completed", "stopped", "failed", "interrupted"})

#: The writer commits at most this many frames in one transaction, so that one flood of frames cannot
#: hold the write lock (and delay the first on_commit) for long.
MAX_BATCH_FRAMES: Final = 4096
#: ...and stops collecting queued work after this long, for the same reason.
MAX_BATCH_SECONDS: Final = 0.05
#: While appends keep coming, the writer still drops one slice of an ended run's frames (or hands back one slice of
#: free pages) at least this often.
DROP_EVERY_S: Final = 0.25
#: Free pages (those dropped frames left) beyond this much go back to the file system, RECLAIM_PAGES a transaction
#: (``PRAGMA incremental_vacuum``; files made before schema 3 lack the auto_vacuum mode it needs and keep their free
#: pages for later writes instead). What is kept is where the next runs' frames go without growing the file.
KEEP_FREE_BYTES: Final = 16 << 20
RECLAIM_PAGES: Final = 256
_BUSY_TIMEOUT_MS: Final = 30_000
_LOCKED_RETRIES: Final = 10
#: 3: steps and times once per group of keys (metric_axes), and ended runs' metrics frames kept only in the
#: metric store (app/metricstore.py). A file of schema 1 or 2 is upgraded in place when opened.
_SCHEMA_VERSION: Final = 3

#: Columns added after schema 1, added in place to an older database (``ALTER TABLE ... ADD COLUMN``).
_ADDED_RUN_COLUMNS: Final = {
    "source": "TEXT",
    "controls": "TEXT",
    "seq_offset": "INTEGER NOT NULL DEFAULT 0",
    "uid": "TEXT",
    "placement": "TEXT",
    "tags": "TEXT",
    "notes": "TEXT",
    "dataset_name": "TEXT",
    "gan_loss": "TEXT",
}
#: What the runs table's search reads out of a run's config, kept in columns of their own by these triggers (a search
#: used to parse every row's config JSON: 43 ms at 10,000 runs, bench/runs_table.py). Not RunRecord fields: the
#: config stays the one source, and SQL keeps the copies in step with it whoever writes the row.
_SEARCH_COLUMNS_SQL: Final = """
CREATE TRIGGER IF NOT EXISTS runs_search_on_insert AFTER INSERT ON runs BEGIN
    UPDATE runs SET dataset_name = json_extract(NEW.config, '$.data.name'),
                    gan_loss = CASE WHEN NEW.kind = 'gan' THEN json_extract(NEW.config, '$.gan.g_loss') END
    WHERE id = NEW.id;
END;
CREATE TRIGGER IF NOT EXISTS runs_search_on_update AFTER UPDATE OF config, kind ON runs BEGIN
    UPDATE runs SET dataset_name = json_extract(NEW.config, '$.data.name'),
                    gan_loss = CASE WHEN NEW.kind = 'gan' THEN json_extract(NEW.config, '$.gan.g_loss') END
    WHERE id = NEW.id;
END;
"""
#: A hist frame's histogram key, for the partial index that finds each key's newest frame without reading
#: every body. ``json_valid`` first: json_extract raises on malformed JSON, and an index expression that
#: raises would make the insert (and with it the writer's whole batch) fail.
_HIST_KEY: Final = "json_extract(CASE WHEN json_valid(body) THEN body END, '$.key')"
#: Frame kinds :meth:`Store.events` returns in full, newest EVENTS_CAP of them; ``hist`` and ``dldh`` come
#: as the newest frame per key only, and ``metrics`` not at all (the chart history serves those).
EVENT_TYPES: Final = ("status", "alert", "control", "sample", "checkpoint")
#: At most this many frames of EVENT_TYPES in one :meth:`Store.events` answer (the newest): a run of
#: millions of steps with frequent samples must not turn a page load into megabytes of JSON.
EVENTS_CAP: Final = 5000
_SELECT_NEWEST_OF_TYPE: Final = (
    "SELECT seq, body FROM frames WHERE run_id = ? AND type = ? AND seq <= ? ORDER BY seq DESC LIMIT ?"
)
#: The newest hist frame at or before :until of every key: walk the distinct keys with one index seek each
#: (a recursive skip scan), then one seek per key for its newest seq. Reads a few index pages and the
#: chosen bodies, however many histograms the run has; the expressions must read exactly as in the index.
_SELECT_LATEST_HISTS: Final = f"""
WITH RECURSIVE keys(k) AS (
    SELECT (SELECT MIN({_HIST_KEY}) FROM frames WHERE run_id = :run AND type = 'hist')
    UNION ALL
    SELECT (SELECT MIN({_HIST_KEY}) FROM frames WHERE run_id = :run AND type = 'hist' AND {_HIST_KEY} > keys.k)
    FROM keys WHERE keys.k IS NOT NULL
)
SELECT f.seq, f.body FROM keys JOIN frames AS f ON f.run_id = :run AND f.seq = (
    SELECT MAX(seq) FROM frames WHERE run_id = :run AND type = 'hist' AND {_HIST_KEY} = keys.k AND seq <= :until
)
WHERE keys.k IS NOT NULL
"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    sweep_id TEXT,
    device TEXT,
    pid INTEGER,
    pid_started REAL,
    token_hash TEXT,
    last_alert TEXT,
    resume_from TEXT,
    last_seq INTEGER NOT NULL DEFAULT 0,
    source TEXT,
    controls TEXT,
    seq_offset INTEGER NOT NULL DEFAULT 0,
    uid TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at DESC, id);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);

CREATE TABLE IF NOT EXISTS frames (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX IF NOT EXISTS frames_by_type ON frames (run_id, type, seq);
""" + f"CREATE INDEX IF NOT EXISTS frames_hist_key ON frames (run_id, {_HIST_KEY}, seq) WHERE type = 'hist';\n"


@dataclass
class RunRecord:
    """One run as the server tracks it; the row of the ``runs`` table."""

    id: str
    name: str
    kind: str  # "gan" | "vae"
    status: str  # one of RUN_STATUSES
    config: dict[str, Any]  # the full run config as a JSON-able dict
    created_at: float  # unix seconds
    started_at: float | None = None
    ended_at: float | None = None
    step: int = 0  # last training step seen
    error: str | None = None
    sweep_id: str | None = None
    device: str | None = None  # "cpu" or "cuda:N" once placed
    pid: int | None = None
    pid_started: float | None = None  # psutil create_time of the worker, to detect pid reuse
    token_hash: str | None = None  # sha256 hex of the per-run worker token
    last_alert: dict[str, Any] | None = None  # {"step", "kind", "message"} of the newest alert frame
    resume_from: dict[str, Any] | None = None  # {"run": id, "checkpoint": name}
    last_seq: int = 0  # highest frame seq stored for this run
    # A run streamed by a user's own script or `gradwatch sync` (gradwatch.client), not launched by the server:
    # {"origin": "script"|"sync", "host", "script", "git": {...}, ...}; None for a launched run.
    source: dict[str, Any] | None = None
    controls: list[str] | None = None  # the live controls its script registered; None: all (a launched run)
    # Frames the server itself wrote into a script's stream (an "interrupted", then a "running" when it came back):
    # the script numbers its frames 1, 2, 3, ... and the server stores frame n at seq n + seq_offset.
    seq_offset: int = 0
    uid: str | None = None  # the script's own id for the run: creating it again returns this run
    # Where a run on a Ray cluster is (app.ray_backend): {"backend": "ray", "actor", "resources"} once handed to Ray,
    # "waiting_for" while Ray has no room for it, then "node_id", "node_ip", "hostname" once a node took it.
    placement: dict[str, Any] | None = None
    tags: list[str] | None = None  # the user's labels (PATCH /api/runs/{id}); None on a run never tagged
    notes: str | None = None  # the user's free text about the run

    @property
    def external(self) -> bool:
        """Streamed from outside (a script, a sync) rather than launched by the server."""
        return self.source is not None


_RUN_COLUMNS: Final = tuple(f.name for f in fields(RunRecord))
_UPDATABLE: Final = frozenset(_RUN_COLUMNS) - {"id"}
_JSON_COLUMNS: Final = frozenset({"config", "last_alert", "resume_from", "source", "controls", "placement", "tags"})
#: Status filter "active" of :meth:`Store.page_runs`: the runs that are not over yet.
ACTIVE_STATUSES: Final = ("queued", "running")


def _to_db(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS and value is not None:
        # allow_nan=False: a NaN in a config would come back as invalid JSON for the browser.
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    if column == "status" and value not in RUN_STATUSES:
        raise ValueError(f"unknown run status {value!r}; expected one of {', '.join(RUN_STATUSES)}")
    return value


def _record_from_row(row: sqlite3.Row) -> RunRecord:
    values = {c: (json.loads(row[c]) if c in _JSON_COLUMNS and row[c] is not None else row[c]) for c in _RUN_COLUMNS}
    return RunRecord(**values)


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, its own ``%`` and ``_`` taken literally (ESCAPE '\\')."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _run_filters(query: str, status: str, kind: str, tag: str, sweep: str) -> tuple[list[str], list[Any]]:
    """The WHERE terms (joined with AND) and their parameters of :meth:`Store.page_runs`."""
    where: list[str] = []
    params: list[Any] = []
    if status == "active":
        where.append(f"status IN ({', '.join('?' for _ in ACTIVE_STATUSES)})")
        params += ACTIVE_STATUSES
    elif status:
        where.append("status = ?")
        params.append(status)
    if kind:
        where.append("kind = ?")
        params.append(kind)
    if sweep:
        where.append("sweep_id = ?")
        params.append(sweep)
    if tag:
        # Tags are a JSON list of strings; json_each reads them one by one, so a tag never matches across two.
        where.append("EXISTS (SELECT 1 FROM json_each(runs.tags) WHERE lower(json_each.value) = lower(?))")
        params.append(tag)
    text = query.strip()
    if text:
        pattern = _like(text)
        # LIKE is case-insensitive for ASCII; the plain columns first (SQLite stops at the first true term), the
        # tags' JSON is read only for rows they did not match. The dataset and loss are copies of the config's
        # (_SEARCH_COLUMNS_SQL), so no row's config is parsed.
        where.append(
            "(name LIKE :p ESCAPE '\\' OR id LIKE :p ESCAPE '\\' OR dataset_name LIKE :p ESCAPE '\\'"
            " OR gan_loss LIKE :p ESCAPE '\\'"
            " OR EXISTS (SELECT 1 FROM json_each(runs.tags) WHERE json_each.value LIKE :p ESCAPE '\\'))".replace(
                ":p", "?"))
        params += [pattern] * 5
    return where, params




@dataclass
class _Append:
    run_id: str
    frames: list[tuple[dict[str, Any], str]]
    on_commit: Callable[[int], None] | None
    max_seq: int
    on_failure: Callable[[int, str], None] | None = None

    @property
    def first_seq(self) -> int:
        return min(int(frame["seq"]) for frame, _ in self.frames)


@dataclass
class _Resume:
    """Queue marker: frames of ``run_id`` after this one are stored again (see :meth:`Store.resume`)."""

    run_id: str


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


class _Stop:
    """Queue sentinel: the writer commits what it collected before it, then exits."""


@dataclass
class _Drop:
    """Queue marker: drop the ended run's metrics frames that the metric store holds (see :meth:`Store.update_run`)."""

    run_id: str


class _ScanEnded:
    """Queue marker: find the ended runs whose metrics frames are still kept twice (at start, after a crash)."""


@dataclass
class _Idle:
    """Queue marker: set once the queue before it is committed and no dropping is left to do."""

    done: threading.Event = field(default_factory=threading.Event)


_QueueItem = _Append | _Flush | _Stop | _Resume | _Drop | _ScanEnded | _Idle


@dataclass
class _RunBatch:
    """What one write transaction learned about one run."""

    ended: bool = False  # its status is terminal: metrics frames stored now are to be dropped too
    has_dropped: bool = False  # some of its frames are kept only in the metric store
    last_seq: int = 0
    step: int | None = None
    new_metrics: bool = False
    series: dict[str, ms.Pieces] = field(default_factory=dict)


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions. Readers then never hold a snapshot open between
    # statements (which would stop WAL checkpoints), and writers say BEGIN IMMEDIATE themselves.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _max_step(steps: Any) -> int | None:
    """Largest step of a metrics frame, or None when the list is empty or malformed (its row is still stored)."""
    try:
        return max((int(step) for step in steps), default=None)
    except (TypeError, ValueError):
        return None


def _merged(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive step ranges, overlapping ones merged, ascending."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself after some errors (SQLITE_FULL, for one); a second ROLLBACK would then
    # raise and hide the original error.
    if conn.in_transaction:
        conn.execute("ROLLBACK")



class Store:
    """The server's SQLite store. See the module docstring for the layout and the threading model."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._runs_lock = threading.Lock()
        self._runs_conn = _connect(self.path)
        if self._runs_conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
            # A new file: let it hand free pages back (see KEEP_FREE_BYTES). Only possible before its first table.
            self._runs_conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        # journal_mode is a property of the file and persists; set it before any other connection exists.
        mode = self._runs_conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            self._runs_conn.close()
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        with self._runs_lock:
            version = int(self._runs_conn.execute("PRAGMA user_version").fetchone()[0])
            if version > _SCHEMA_VERSION:
                self._runs_conn.close()
                raise RuntimeError(f"{self.path} was written by a newer gradwatch (schema {version})")
            self._runs_conn.executescript(_SCHEMA)
            ms.create_schema(self._runs_conn)
            present = {row[1] for row in self._runs_conn.execute("PRAGMA table_info(runs)")}
            for column, decl in _ADDED_RUN_COLUMNS.items():
                if column not in present:
                    self._runs_conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {decl}")
            self._runs_conn.executescript(_SEARCH_COLUMNS_SQL)
            if "gan_loss" not in present:  # the copies, for the runs written before the triggers existed
                self._runs_conn.execute(
                    "UPDATE runs SET dataset_name = json_extract(config, '$.data.name'),"
                    " gan_loss = CASE WHEN kind = 'gan' THEN json_extract(config, '$.gan.g_loss') END")
            self._runs_conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS runs_by_uid ON runs (uid) WHERE uid IS NOT NULL")
            # The runs table's sweep groups read a sweep's members; filtered pages keep the newest-first order.
            self._runs_conn.execute(
                "CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs (sweep_id) WHERE sweep_id IS NOT NULL")
            self._runs_conn.execute("CREATE INDEX IF NOT EXISTS runs_by_kind ON runs (kind, created_at DESC, id)")
            self._runs_conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        self._write_conn = _connect(self.path)
        self._queue: queue.SimpleQueue[_QueueItem] = queue.SimpleQueue()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._drained = threading.Event()  # set once close() has committed the queue
        # Runs whose frames could not be stored (disk full), each with the first seq lost: nothing after it is
        # stored either, so the stream never has a hole a later acknowledgement would cover. Writer thread only.
        self._broken: dict[str, int] = {}
        # Partly filled chunks added per (run, key) since its last compaction; touched by the writer only.
        self._small_chunks: dict[tuple[str, str], int] = {}
        # Ended runs whose metrics frames are still to be dropped (ms.drop_slice), in order; writer thread only.
        self._to_drop: dict[str, None] = {}
        self._idle_waiters: list[_Idle] = []  # wait_dropped() callers, told once no background work is left
        self._reclaim = False  # free pages may be over KEEP_FREE_BYTES: hand them back
        self._last_drop = 0.0
        #: Told the id of every run whose row changed (created, updated, deleted, or its step advanced), after the
        #: change is committed, from whichever thread made it (app.changes.Changes.notify is thread-safe).
        self.on_change: Callable[[str], None] | None = None

    def _changed(self, run_id: str) -> None:
        listener = self.on_change
        if listener is not None:
            try:
                listener(run_id)
            except Exception:
                logger.exception("store: change listener failed for run %s", run_id)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the writer thread; frames appended before this wait in the queue until it runs."""
        with self._state_lock:
            if self._closed:
                raise RuntimeError("store is closed")
            if self._thread is not None:
                return
            # First thing: the ended runs a previous server left with their metrics frames kept twice (it stopped,
            # or crashed, before it had dropped them all).
            self._queue.put(_ScanEnded())
            self._thread = threading.Thread(target=self._writer_loop, name="gradwatch-store-writer", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Commit everything queued, stop the writer and close every connection. Safe to call twice."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_Stop())
            thread.join()
        # Whatever is left was queued after the stop sentinel, or the writer never started: commit it here.
        leftovers: list[_QueueItem] = []
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._process([item for item in leftovers if not isinstance(item, _Stop)])
        # What is left to drop is found again by the next start (_ScanEnded): nothing is lost by stopping here.
        for waiter in self._idle_waiters + [item for item in leftovers if isinstance(item, _Idle)]:
            waiter.done.set()
        self._idle_waiters.clear()
        self._drained.set()
        self._write_conn.close()
        with self._runs_lock:
            self._runs_conn.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection: WAL readers never block the writer, nor each other."""
        if self._closed:
            raise RuntimeError("store is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    # ------------------------------------------------------------------ runs

    def insert_run(self, run: RunRecord) -> None:
        """Add a run; ``ValueError`` if its id is taken or its status unknown."""
        values = [_to_db(c, getattr(run, c)) for c in _RUN_COLUMNS]
        placeholders = ", ".join("?" for _ in _RUN_COLUMNS)
        with self._runs_lock:
            if self._closed:
                raise RuntimeError("store is closed")
            try:
                self._runs_conn.execute(f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({placeholders})", values)
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"run {run.id!r} already exists") from exc
        self._changed(run.id)

    def update_run(self, run_id: str, **fields: Any) -> RunRecord:
        """Set some fields of a run and return the updated record.

        ``ValueError`` for a name that is not a :class:`RunRecord` field (or is ``id``), ``KeyError`` for
        an unknown run.
        """
        unknown = sorted(set(fields) - _UPDATABLE)
        if unknown:
            raise ValueError(f"cannot update run field(s): {', '.join(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = [_to_db(name, value) for name, value in fields.items()]
        # One transaction so the record returned is exactly the one this update produced.
        with self._runs_transaction() as conn:
            if fields:
                conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", [*values, run_id])
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(run_id)
        if fields:
            self._changed(run_id)
        if fields.get("status") in TERMINAL_STATUSES:
            self._request_drop(run_id)
        return _record_from_row(row)

    def get_run(self, run_id: str) -> RunRecord | None:
        row = self._reader().execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else _record_from_row(row)

    def run_by_uid(self, uid: str) -> RunRecord | None:
        """The run a script created under its own id ``uid``, if any."""
        row = self._reader().execute("SELECT * FROM runs WHERE uid = ?", (uid,)).fetchone()
        return None if row is None else _record_from_row(row)

    def list_runs(self, statuses: Iterable[str] | None = None) -> list[RunRecord]:
        """Runs newest first (``created_at`` descending, then ``id``), optionally only those in ``statuses``."""
        sql = "SELECT * FROM runs"
        params: list[str] = []
        if statuses is not None:
            params = list(dict.fromkeys(statuses))
            if not params:
                return []
            sql += f" WHERE status IN ({', '.join('?' for _ in params)})"
        sql += " ORDER BY created_at DESC, id"
        return [_record_from_row(row) for row in self._reader().execute(sql, params).fetchall()]

    def page_runs(self, query: str = "", status: str = "", kind: str = "", tag: str = "", sweep: str = "",
                  limit: int | None = 50, offset: int = 0) -> tuple[list[RunRecord], int]:
        """One page of the runs table, newest first, and how many runs match in all; filtered in SQL.

        ``query`` matches, case-insensitively and as a substring, a run's name, id, any tag, its dataset or (GAN
        runs) its generator loss. ``status`` is one of RUN_STATUSES or ``"active"`` (queued or running); ``tag``
        matches one tag exactly but for case; ``sweep`` a sweep id. Empty strings filter nothing.
        """
        where, params = _run_filters(query, status, kind, tag, sweep)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        conn = self._reader()
        total = int(conn.execute(f"SELECT COUNT(*) FROM runs{clause}", params).fetchone()[0])
        rows = conn.execute(f"SELECT * FROM runs{clause} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                            [*params, -1 if limit is None else max(0, limit), max(0, offset)]).fetchall()
        return [_record_from_row(row) for row in rows], total

    def sweep_runs(self, sweep_ids: Iterable[str]) -> dict[str, list[RunRecord]]:
        """Every run of each sweep, newest first (a sweep has at most a few dozen)."""
        ids = list(dict.fromkeys(sweep_ids))
        if not ids:
            return {}
        sql = (f"SELECT * FROM runs WHERE sweep_id IN ({', '.join('?' for _ in ids)})"
               " ORDER BY created_at DESC, id")
        out: dict[str, list[RunRecord]] = {sweep_id: [] for sweep_id in ids}
        for row in self._reader().execute(sql, ids).fetchall():
            rec = _record_from_row(row)
            out[str(rec.sweep_id)].append(rec)
        return out

    def delete_run(self, run_id: str) -> None:
        """Remove the run row, its frames and its metric history in one transaction (no-op if unknown)."""
        with self._runs_transaction() as conn:
            for table in ("frames", *ms.RUN_TABLES):
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        self._changed(run_id)

    @contextmanager
    def _runs_transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the run-table connection, committed or rolled back as a whole."""
        with self._runs_lock:
            if self._closed:
                raise RuntimeError("store is closed")
            conn = self._runs_conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise

    # ------------------------------------------------------------------ frames

    def append(
        self,
        run_id: str,
        frames: Sequence[tuple[dict[str, Any], str]],
        on_commit: Callable[[int], None] | None = None,
        on_failure: Callable[[int, str], None] | None = None,
    ) -> None:
        """Queue frames of one run (in seq order) for the writer thread; returns at once.

        Each item is the frame as emitted and its JSON text; the text is what backfill replays, the dict
        is what the metric history is built from. A seq already stored is dropped silently, together with
        its metrics. After the transaction holding these frames commits, ``on_commit`` is called on the
        writer thread with the highest seq of this call (not called for an empty call, nor when the run
        does not exist: frames of an unknown or deleted run are dropped with a warning, so a run deleted
        while its last frames were queued leaves nothing behind).

        If the frames cannot be stored (the disk is full, say), ``on_failure`` is called on the writer thread with
        the first seq of this call and the reason, and no frame of the run is stored after that, whatever is
        queued behind, until :meth:`resume`: the sender resends from that seq, and the stream has no hole.
        """
        items = list(frames)
        if not items:
            return
        max_seq = max(int(frame["seq"]) for frame, _ in items)
        # Under the state lock so that close() either sees this item in the queue or we see it closed:
        # nothing can slip in after close() has drained the queue.
        with self._state_lock:
            if self._closed:
                raise RuntimeError("store is closed")
            self._queue.put(_Append(run_id, items, on_commit, max_seq, on_failure))

    def resume(self, run_id: str) -> None:
        """Store a run's frames again after a failure: frames appended after this call are written (those queued
        before it are still refused, being from a sender that will resend them)."""
        with self._state_lock:
            if not self._closed:
                self._queue.put(_Resume(run_id))

    def wait_flushed(self, timeout: float = 10.0) -> bool:
        """Block until everything appended before this call is committed; ``False`` on timeout."""
        with self._state_lock:
            if self._closed:
                done = self._drained  # close() commits the whole queue
            elif self._thread is None:
                return self._queue.empty()
            else:
                marker = _Flush()
                self._queue.put(marker)
                done = marker.done
        return done.wait(timeout)

    def wait_dropped(self, timeout: float = 60.0) -> bool:
        """Block until everything appended before this call is committed, no ended run has metrics frames left
        to drop and no free pages beyond KEEP_FREE_BYTES are left to hand back (the writer's background work, see
        :meth:`update_run`); ``False`` on timeout. For tests and benchmarks: nothing else needs it to have
        happened."""
        with self._state_lock:
            if self._closed:
                return self._drained.wait(timeout)
            if self._thread is None:
                return self._queue.empty()
            marker = _Idle()
            self._queue.put(marker)
        return marker.done.wait(timeout)

    def _request_drop(self, run_id: str) -> None:
        """The run has ended: have the writer drop, in the background, its metrics frames the metric store holds."""
        with self._state_lock:
            if not self._closed:
                self._queue.put(_Drop(run_id))

    def frames_after(self, run_id: str, since: int, limit: int = 1000,
                     max_bytes: int | None = None) -> list[tuple[int, str]]:
        """Committed frames with ``seq > since`` as ``(seq, json text)``, ascending, at most ``limit``.

        ``max_bytes`` stops once the texts add up to that much (always at least one frame): a
        client catching up holds the batch in memory, and 500 large frames for each of 20
        lagging clients was most of the server's memory (bench/throughput.py).

        An ended run's ``metrics`` frames come rebuilt from the metric store (their text was dropped; see
        app/metricstore.py), the same bytes as the text it had. One read transaction: the writer dropping
        frames meanwhile cannot make a frame appear twice or not at all.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            dropped = ms.dropped_after(conn, run_id, since, limit)
            cursor = conn.execute(
                "SELECT seq, body FROM frames WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, since, limit))
            try:
                return self._merge_rebuilt(conn, run_id, cursor, dropped, limit, max_bytes)
            finally:
                cursor.close()
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    @staticmethod
    def _merge_rebuilt(conn: sqlite3.Connection, run_id: str, stored: Iterable[tuple[int, str]],
                       dropped: list[ms.DroppedFrame], limit: int, max_bytes: int | None) -> list[tuple[int, str]]:
        """Stored texts (ascending) and dropped frames rebuilt from the metric store, merged by seq.

        Dropped frames are rebuilt a group at a time (each chunk read once per group), and no further ahead
        than the byte cap needs; stored texts are read one by one for the same reason.
        """
        layouts = ms.load_layouts(conn, run_id) if dropped else {}
        rebuilt: dict[int, str] = {}
        rows = iter(stored)
        row = next(rows, None)
        at = 0
        out: list[tuple[int, str]] = []
        size = 0
        while len(out) < limit:
            if row is not None and (at >= len(dropped) or int(row[0]) < dropped[at].seq):
                seq, text = int(row[0]), str(row[1])
                row = next(rows, None)
            elif at < len(dropped):
                seq = dropped[at].seq
                if seq not in rebuilt:
                    budget = ms.SYNTH_GROUP_VALUES if max_bytes is None else max(1, (max_bytes - size) // 16)
                    group = next(ms.frame_groups(dropped[at:], layouts, min(budget, ms.SYNTH_GROUP_VALUES)))
                    rebuilt.update(zip([f.seq for f in group], ms.synthesize(conn, run_id, group, layouts),
                                       strict=True))
                text = rebuilt.pop(seq)
                at += 1
            else:
                break
            out.append((seq, text))
            size += len(text)
            if max_bytes is not None and size >= max_bytes:
                break
        return out

    def events(self, run_id: str, until: int, *, cap: int = EVENTS_CAP) -> list[tuple[int, str]]:
        """What a page needs, besides the metric history, to show a run as of ``until``: ``(seq, text)`` ascending.

        A browser that reloads draws the charts from :meth:`metric_history` and then follows the
        websocket from ``until``; everything else up to ``until`` comes from here: every frame of
        EVENT_TYPES (the newest ``cap`` of them), and of the kinds that only ever replace the previous
        one on screen, the newest ``hist`` frame per histogram key and the newest ``dldh`` frame. A
        long run has thousands of those; the page would draw only the last. One read transaction, so
        the answer is one consistent snapshot even while the writer commits.
        """
        if cap < 1:
            raise ValueError("cap must be at least 1")
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            kept: list[tuple[int, str]] = []
            for kind in EVENT_TYPES:  # one index range per kind: the newest come first, LIMIT stops early
                kept += [(int(seq), str(body)) for seq, body in
                         conn.execute(_SELECT_NEWEST_OF_TYPE, (run_id, kind, until, cap))]
            kept = sorted(kept, key=lambda item: item[0])[-cap:]
            latest = [*conn.execute(_SELECT_LATEST_HISTS, {"run": run_id, "until": until}),
                      *conn.execute(_SELECT_NEWEST_OF_TYPE, (run_id, "dldh", until, 1))]
            kept += [(int(seq), str(body)) for seq, body in latest]
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        return sorted(kept, key=lambda item: item[0])

    def last_seq(self, run_id: str) -> int:
        """Highest committed seq of the run (0 when none, or for an unknown run)."""
        row = self._reader().execute("SELECT last_seq FROM runs WHERE id = ?", (run_id,)).fetchone()
        return 0 if row is None else int(row[0])

    # ------------------------------------------------------------------ writer thread

    def _writer_loop(self) -> None:
        while True:
            batch, stop = self._collect(block=not self._background)
            self._process(batch)
            if stop:
                return
            # Dropping an ended run's frames, then handing back the pages they freed, is background work: a slice
            # whenever nothing is queued, and while appends keep coming, still one every DROP_EVERY_S.
            if self._background and (not batch or time.monotonic() - self._last_drop >= DROP_EVERY_S):
                if self._to_drop:
                    self._drop_one_slice()
                else:
                    self._reclaim_slice()
            if not self._background and self._idle_waiters:
                for waiter in self._idle_waiters:
                    waiter.done.set()
                self._idle_waiters.clear()

    @property
    def _background(self) -> bool:
        return bool(self._to_drop) or self._reclaim

    def _collect(self, block: bool = True) -> tuple[list[_QueueItem], bool]:
        """Block for one item (or, with ``block`` false, take none if none is queued), then take whatever else is
        already queued, within the batch limits.

        There is no deliberate linger: with WAL and synchronous=NORMAL a commit does not fsync, so a lone
        frame is committed at once (low latency for live clients), while under load the queue fills during
        each commit and batches grow by themselves.
        """
        try:
            first = self._queue.get() if block else self._queue.get_nowait()
        except queue.Empty:
            return [], False
        batch: list[_QueueItem] = [first]
        if isinstance(first, _Stop):
            return [], True
        n_frames = len(first.frames) if isinstance(first, _Append) else 0
        deadline = time.monotonic() + MAX_BATCH_SECONDS
        while n_frames < MAX_BATCH_FRAMES and time.monotonic() < deadline:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Stop):
                return batch, True
            batch.append(item)
            if isinstance(item, _Append):
                n_frames += len(item.frames)
        return batch, False

    def _process(self, batch: list[_QueueItem]) -> None:
        appends: list[_Append] = []
        for item in batch:
            if isinstance(item, _Append):
                appends.append(item)
            elif isinstance(item, _Resume):  # in queue order: the appends before it are judged as before it
                self._store_appends(appends)
                appends = []
                self._broken.pop(item.run_id, None)
            elif isinstance(item, _Drop):
                self._to_drop[item.run_id] = None
            elif isinstance(item, _ScanEnded):
                self._scan_ended()
            elif isinstance(item, _Idle):
                self._idle_waiters.append(item)
        self._store_appends(appends)
        for marker in batch:
            if isinstance(marker, _Flush):
                marker.done.set()

    def _scan_ended(self) -> None:
        """Queue every ended run that still has metrics frames not yet examined for dropping."""
        terminal = sorted(TERMINAL_STATUSES)
        try:
            rows = self._write_conn.execute(
                f"SELECT r.id FROM runs AS r WHERE r.status IN ({', '.join('?' for _ in terminal)}) AND EXISTS ("
                " SELECT 1 FROM frames AS f WHERE f.run_id = r.id AND f.type = 'metrics' AND f.seq > COALESCE("
                "  (SELECT c.through_seq FROM frames_compacted AS c WHERE c.run_id = r.id), 0))"
                " ORDER BY r.created_at", terminal).fetchall()
        except sqlite3.Error as exc:
            logger.warning("store: could not look for ended runs' frames to drop: %s", exc)
            return
        for (run_id,) in rows:
            self._to_drop[str(run_id)] = None
        self._reclaim = True  # pages a previous server freed and did not hand back

    def _drop_one_slice(self) -> None:
        """One slice of the first queued run's drop (ms.drop_slice), in one write transaction."""
        run_id = next(iter(self._to_drop))
        self._last_drop = time.monotonic()
        conn = self._write_conn
        more = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is not None and str(row[0]) in TERMINAL_STATUSES:  # a run that came back keeps its frames
                    _, more = ms.drop_slice(conn, run_id)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except Exception as exc:  # the disk, most likely: the frames stay as they are, the next start tries again
            logger.warning("store: could not drop run %s's metrics frames: %s", run_id, exc)
            more = False
        if not more:
            self._to_drop.pop(run_id, None)
            self._reclaim = True

    def _reclaim_slice(self) -> None:
        """Hand back to the file system up to RECLAIM_PAGES free pages beyond KEEP_FREE_BYTES, in one transaction."""
        self._last_drop = time.monotonic()
        conn = self._write_conn
        try:
            if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:  # not incremental: a file before schema 3
                self._reclaim = False
                return
            page = int(conn.execute("PRAGMA page_size").fetchone()[0])
            spare = int(conn.execute("PRAGMA freelist_count").fetchone()[0]) - KEEP_FREE_BYTES // page
            if spare <= 0:
                self._reclaim = False
                return
            # executescript steps the pragma to the end (a plain execute frees one page); its own transaction.
            conn.executescript(f"PRAGMA incremental_vacuum({min(spare, RECLAIM_PAGES)});")
        except sqlite3.Error as exc:
            logger.warning("store: could not hand free pages back: %s", exc)
            self._reclaim = False

    def _store_appends(self, appends: list[_Append]) -> None:
        live = [item for item in appends if not self._refused(item)]
        committed: list[_Append] = []
        if live:
            try:
                committed = self._commit_patiently(live)
            except Exception as exc:
                # One bad append must not cost everyone else their frames: retry them one by one.
                logger.warning("store: batch of %d appends failed (%s); retrying them one by one", len(live), exc)
                for item in live:
                    if self._refused(item):
                        continue
                    try:
                        committed.extend(self._commit([item]))
                    except Exception as item_exc:
                        self._fail(item, item_exc)
        for run_id in dict.fromkeys(item.run_id for item in committed):
            self._changed(run_id)  # its step and last_seq moved
        for item in committed:
            if item.on_commit is not None:
                try:
                    item.on_commit(item.max_seq)
                except Exception:
                    logger.exception("store: on_commit callback for run %s failed", item.run_id)

    def _refused(self, item: _Append) -> bool:
        """True (and the sender told) for frames of a run broken by an earlier failure: they wait for a resend."""
        first = self._broken.get(item.run_id)
        if first is None:
            return False
        self._tell_failure(item, f"frames from seq {first} on could not be stored")
        return True

    def _fail(self, item: _Append, exc: Exception) -> None:
        self._broken[item.run_id] = item.first_seq
        if isinstance(exc, sqlite3.Error | OSError):  # the disk, not a bug: say so without a traceback
            logger.error("store: could not store frames %d-%d of run %s: %s; refusing the run's frames until its "
                         "sender resends them", item.first_seq, item.max_seq, item.run_id, exc)
        else:
            logger.exception("store: could not store frames %d-%d of run %s", item.first_seq, item.max_seq,
                             item.run_id)
        self._tell_failure(item, str(exc))

    @staticmethod
    def _tell_failure(item: _Append, reason: str) -> None:
        if item.on_failure is not None:
            try:
                item.on_failure(item.first_seq, reason)
            except Exception:
                logger.exception("store: on_failure callback for run %s failed", item.run_id)

    def _commit_patiently(self, appends: list[_Append]) -> list[_Append]:
        """:meth:`_commit`, retried while another connection holds the write lock.

        ``busy_timeout`` already waits 30 s; a run-table write that takes longer (deleting a huge run)
        must delay frames, not lose them, so a lock timeout is retried a few more times.
        """
        attempt = 1
        while True:
            try:
                return self._commit(appends)
            except sqlite3.OperationalError as exc:
                if attempt >= _LOCKED_RETRIES or "locked" not in str(exc):
                    raise
                attempt += 1
                logger.warning("store: database still locked after %d s; retrying", _BUSY_TIMEOUT_MS // 1000)

    def _commit(self, appends: list[_Append]) -> list[_Append]:
        """Write the appends in one transaction; returns those whose run exists (the ones stored)."""
        conn = self._write_conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            runs: dict[str, _RunBatch | None] = {}
            stored: list[_Append] = []
            for item in appends:
                if item.run_id not in runs:
                    row = conn.execute("SELECT status FROM runs WHERE id = ?", (item.run_id,)).fetchone()
                    runs[item.run_id] = None if row is None else _RunBatch(
                        ended=str(row[0]) in TERMINAL_STATUSES, has_dropped=ms.has_dropped(conn, item.run_id))
                run = runs[item.run_id]
                if run is None:
                    logger.warning("store: %d frames for unknown run %s dropped", len(item.frames), item.run_id)
                    continue
                for frame, text in item.frames:
                    seq = int(frame["seq"])
                    kind = str(frame.get("type", ""))
                    run.last_seq = max(run.last_seq, seq)
                    if run.has_dropped and ms.is_dropped(conn, item.run_id, seq):
                        continue  # stored already, as points of the metric store: a resend
                    cursor = conn.execute(
                        "INSERT OR IGNORE INTO frames (run_id, seq, type, body) VALUES (?, ?, ?, ?)",
                        (item.run_id, seq, kind, text),
                    )
                    if kind != "metrics":
                        continue
                    top = _max_step(frame.get("step"))
                    if top is not None:
                        run.step = top if run.step is None else max(run.step, top)
                    if cursor.rowcount == 1:  # only newly stored frames feed the history: no doubled points
                        run.new_metrics = True
                        ms.add_frame_points(run.series, frame)
                stored.append(item)
            for run_id, run in runs.items():
                if run is None:
                    continue
                if run.has_dropped and run.series:
                    # Dropped frames whose steps the new points fall in get their text back first (they would be
                    # rebuilt with the new points in them otherwise).
                    spans = {id(p): (int(p.min()), int(p.max())) for ps in run.series.values() for p in ps.steps}
                    for lo, hi in _merged(spans.values()):
                        ms.restore_frames(conn, run_id, lo, hi)
                due: list[str] = []
                for key, sizes in ms.insert_points(conn, run_id, run.series).items():
                    small = self._small_chunks.get((run_id, key), 0) + sum(n < CHUNK_MAX_POINTS for n in sizes)
                    if small >= COMPACT_AFTER:
                        due.append(key)
                        small = 0
                    self._small_chunks[(run_id, key)] = small
                if due:
                    ms.compact_tails(conn, run_id, due)
                conn.executemany(
                    "INSERT OR IGNORE INTO metric_keys (run_id, key) VALUES (?, ?)", ((run_id, k) for k in run.series)
                )
                conn.execute(
                    "UPDATE runs SET last_seq = MAX(last_seq, ?), step = MAX(step, COALESCE(?, step)) WHERE id = ?",
                    (run.last_seq, run.step, run_id),
                )
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        for run_id, run in runs.items():
            if run is not None and run.ended and run.new_metrics:
                self._to_drop[run_id] = None  # frames that came after the run's end (its last flush, say)
        return stored

    # ------------------------------------------------------------------ metric history

    def metric_keys(self, run_id: str) -> list[str]:
        rows = self._reader().execute("SELECT key FROM metric_keys WHERE run_id = ? ORDER BY key", (run_id,))
        return [str(row[0]) for row in rows]

    def _series(self, conn: sqlite3.Connection, run_id: str, key: str) -> Series:
        """Every point of the key (the full read a chart falls back on)."""
        return ms.key_series(conn, run_id, key)

    def _summary_series(self, conn: sqlite3.Connection, run_id: str, key: str,
                        within: tuple[int, int] | None = None) -> Series:
        return ms.summary_series(conn, run_id, key, within)

    def _range_series(self, conn: sqlite3.Connection, run_id: str, key: str, start: int, end: int,
                      max_points: int) -> Series:
        """The points a zoomed chart (steps ``start`` to ``end``, inclusive) is chosen from.

        Narrow ranges come back in full. For a wide one the chunks that lie wholly inside it stand in by their
        summaries, as for the whole run (:meth:`_history_points`), and only the one or two chunks cut by its ends
        are read in full and cut to it: half of a 1M-step run then costs about what the whole run costs.
        """
        chunks = conn.execute(
            "SELECT id, first_step, last_step, n FROM metric_chunks WHERE run_id = ? AND key = ? AND first_step <= ?"
            " AND last_step >= ? ORDER BY first_step, id",
            (run_id, key, end, start),
        ).fetchall()
        inner = [c for c in chunks if int(c["first_step"]) >= start and int(c["last_step"]) <= end]
        if _summary_suffices(chunks, max_points) and _summary_suffices(inner, max_points):
            cut = [int(c["id"]) for c in chunks if not (int(c["first_step"]) >= start and int(c["last_step"]) <= end)]
            parts = [self._summary_series(conn, run_id, key, (start, end))]
            if cut:
                parts.append(ms.chunks_by_id(conn, cut))
            steps, times, values = (np.concatenate([p[i] for p in parts]) for i in range(3))
            order = np.argsort(steps, kind="stable")
            steps, times, values = steps[order], times[order], values[order]
            inside = (steps >= start) & (steps <= end)
            if int(inside.sum()) >= ms.MINMAX_RATIO * max_points:
                return ms.drop_null_continuations(steps[inside], times[inside], values[inside])
        ids = [int(c["id"]) for c in chunks]
        steps, times, values = ms.chunks_by_id(conn, ids)
        inside = (steps >= start) & (steps <= end)
        return steps[inside], times[inside], values[inside]

    def _history_points(
        self, conn: sqlite3.Connection, run_id: str, key: str, max_points: int,
        span: tuple[int, int] | None = None,
    ) -> Series:
        """The points a ``max_points`` chart of the key is chosen from: its summaries where they suffice.

        Downsampling the summaries keeps what downsampling the full series keeps: both ends, every null
        run's start (:func:`app.metricstore.summary_index`), and the extremes of every block, so of every
        MinMaxLTTB bucket and of the whole series (:func:`app.metricstore.summary_suffices`). Histories too
        short for that, keys whose chunks overlap in steps, and summaries too sparse to fill the chart (mostly
        null keys) are read in full. One read transaction, so that the writer merging chunks meanwhile changes nothing.

        A ``span`` (first step, last step) is a zoomed chart: every point inside it, from the chunks that overlap
        it (a chunk's summary thins it for the whole run's view; a zoom wants the detail).
        """
        conn.execute("BEGIN")
        try:
            if span is not None:
                return self._range_series(conn, run_id, key, *span, max_points)
            chunks = conn.execute(
                "SELECT first_step, last_step, n FROM metric_chunks WHERE run_id = ? AND key = ?"
                " ORDER BY first_step, id",
                (run_id, key),
            ).fetchall()
            if _summary_suffices(chunks, max_points):
                summary = self._summary_series(conn, run_id, key)
                if summary[0].size >= ms.MINMAX_RATIO * max_points:
                    return summary
            return self._series(conn, run_id, key)
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def metric_history(
        self, run_id: str, keys: Sequence[str] | None, max_points: int, *,
        start: int | None = None, end: int | None = None,
    ) -> dict[str, dict[str, list[Any]]]:
        """``{key: {"step", "time", "value"}}`` ordered by step, at most ``max_points`` points per key.

        Keys that do not exist are left out (all keys when ``keys`` is None). Longer histories are
        downsampled keeping extremes and both ends (see :func:`app.metricstore.select_points`); NaN comes back as
        None.
        ``start`` and ``end`` (inclusive; either may be left open) narrow it to the steps a zoomed chart shows:
        at full resolution when they hold at most ``max_points`` points, else downsampled the same way.
        """
        if max_points < 2:
            raise ValueError("max_points must be at least 2")
        if start is not None and end is not None and start > end:
            raise ValueError("start must not be after end")
        span = None if start is None and end is None else (start or 0, ms.MAX_SQL_INT if end is None else end)
        existing = self.metric_keys(run_id)
        known = set(existing)
        wanted = existing if keys is None else [k for k in dict.fromkeys(keys) if k in known]
        conn = self._reader()
        out: dict[str, dict[str, list[Any]]] = {}
        for key in wanted:
            steps, times, values = self._history_points(conn, run_id, key, max_points, span)
            picked = _select_points(steps, values, max_points)
            out[key] = {
                "step": steps[picked].tolist(),
                "time": ms.nan_to_none(times[picked].tolist()),
                "value": ms.nan_to_none(values[picked].tolist()),
            }
        return out

    def export_csv(self, run_id: str, *, window_chunks: int = EXPORT_WINDOW_CHUNKS) -> Iterator[str]:
        """The full, un-downsampled history as CSV text pieces: ``step,time,<keys sorted>``, one row per step.

        A cell is empty where the key has no value at that step (evaluation keys, for instance) or the
        value was null. ``window_chunks`` bounds how many chunk rows are held at once.
        """
        if window_chunks < 1:
            raise ValueError("window_chunks must be at least 1")
        if self._closed:
            raise RuntimeError("store is closed")
        return self._export(run_id, window_chunks)

    def _export(self, run_id: str, window_chunks: int) -> Iterator[str]:
        """:func:`app.metricstore.export_csv` in a read transaction of its own.

        The export runs in one read transaction on a connection of its own: the writer may merge chunks
        of a live run meanwhile, and without a fixed snapshot the paging could skip or repeat points.
        The generator may be resumed on different threads (Starlette iterates a sync body in its
        threadpool), which is safe because only this generator ever uses that connection.
        """
        conn = _connect(self.path)
        with self._readers_lock:
            self._readers.append(conn)
        try:
            conn.execute("PRAGMA query_only = ON")
            conn.execute("BEGIN")
            yield from ms.export_csv(conn, run_id, window_chunks)
        finally:
            with self._readers_lock:
                if conn in self._readers:
                    self._readers.remove(conn)
            conn.close()
