"""Persistence for the server: runs, every websocket frame, and columnar metric history.

One SQLite file in WAL mode holds four things:

* ``runs``: one row per run (:class:`RunRecord`), written synchronously. These
  writes are rare and small, so they go through their own lock-guarded
  connection instead of waiting behind the frame queue.
* ``frames``: every frame of every run as its JSON text, keyed by ``(run_id, seq)``,
  so a websocket client reconnecting with ``?since=SEQ`` can be backfilled. Two more indexes, by
  ``type`` and (for ``hist`` frames) by histogram key, let a reloading page fetch its alerts and its
  newest histograms (:meth:`Store.events`) without reading every frame of a long run; a file written
  before they existed gets them built once, when it is opened.
* ``metric_chunks``: the same ``metrics`` frames again, but columnar: per key, the
  steps (int64), times (float64) and values (float64, NaN for ``null``) of a
  stretch of steps as raw little-endian blobs. Charts and CSV export read these
  blobs straight into numpy instead of re-parsing millions of JSON numbers.
  Frames committed together are merged into one chunk per key, and a key's
  newest small chunks are merged again once enough accumulate, so that a
  million-step history is a hundred-odd rows however small the frames were.
  ``metric_keys`` lists each run's keys so that listing them needs no scan.
* ``metric_summaries``: per chunk, the few points a downsampled chart of a long history cannot do
  without (each block of SUMMARY_BLOCK points' finite minimum and maximum, the chunk's ends, where
  each run of nulls starts and stops; see :func:`_summary_index`). A chart query over a long history
  reads these instead of the full chunks, a few percent of the bytes. They live in a table of their own
  because SQLite reaches a column stored after a row's 200 kB of chunk blobs only by walking those
  blobs' overflow pages; a trigger drops a chunk's summary with the chunk, whoever deletes it, so a
  file stays consistent under older gradwatch versions too. A chunk without a summary (written before
  summaries existed) is summarized from its full blobs when read.

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

import csv
import io
import json
import logging
import math
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
import numpy.typing as npt
from tsdownsample import MinMaxLTTBDownsampler

logger = logging.getLogger(__name__)

RUN_STATUSES = ("queued", "running", "completed", "stopped", "failed", "interrupted")
TERMINAL_STATUSES = frozenset({"completed", "stopped", "failed", "interrupted"})

#: Chunk blobs are written with an explicit byte order so a database file can move between machines.
_STEP_DTYPE: Final = np.dtype("<i8")
_FLOAT_DTYPE: Final = np.dtype("<f8")

#: The writer commits at most this many frames in one transaction, so that one flood of frames cannot
#: hold the write lock (and delay the first on_commit) for long.
MAX_BATCH_FRAMES: Final = 4096
#: ...and stops collecting queued work after this long, for the same reason.
MAX_BATCH_SECONDS: Final = 0.05
#: Metrics of consecutive frames committed together are merged into one chunk per key, up to this many
#: points: fewer, larger rows make a full-history read one short query.
CHUNK_MAX_POINTS: Final = 8192
#: Once this many partly filled chunks have been added to one key, the writer merges the key's newest
#: partly filled chunks: a slow run that logs a few steps per frame would otherwise spread a long
#: history over hundreds of thousands of rows, and every chart query would pay for it.
COMPACT_AFTER: Final = 32
#: How many chunk rows the CSV export reads per query; bounds its memory whatever the run's length.
EXPORT_WINDOW_CHUNKS: Final = 256
#: CSV rows formatted per yielded text piece.
_CSV_ROWS_PER_PIECE: Final = 2048
_BUSY_TIMEOUT_MS: Final = 30_000
_LOCKED_RETRIES: Final = 10
_SCHEMA_VERSION: Final = 2
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

_DOWNSAMPLER: Final = MinMaxLTTBDownsampler()
#: SQLite's largest integer: an open end of a step range.
_MAX_SQL_INT: Final = 2**63 - 1
#: MinMaxLTTB keeps the extremes of ``minmax_ratio * n_out`` buckets before LTTB picks (tsdownsample's default).
_MINMAX_RATIO: Final = 4
#: Points per block of a chunk summary: each block keeps its finite minimum and maximum.
SUMMARY_BLOCK: Final = 64
_SUMMARY_POINT_BYTES: Final = _STEP_DTYPE.itemsize + 2 * _FLOAT_DTYPE.itemsize

_INSERT_CHUNK: Final = (
    "INSERT INTO metric_chunks (run_id, key, first_step, last_step, n, steps, times, vals)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SUMMARY: Final = "INSERT OR REPLACE INTO metric_summaries (chunk_id, summary) VALUES (?, ?)"
#: Each chunk's summary, or (only where it has none) its full blobs: CASE leaves the blobs unread otherwise.
_SELECT_SUMMARIES: Final = (
    "SELECT s.summary,"
    " CASE WHEN s.summary IS NULL THEN c.steps END AS steps,"
    " CASE WHEN s.summary IS NULL THEN c.times END AS times,"
    " CASE WHEN s.summary IS NULL THEN c.vals END AS vals"
    " FROM metric_chunks AS c LEFT JOIN metric_summaries AS s ON s.chunk_id = c.id"
    " WHERE c.run_id = ? AND c.key = ? ORDER BY c.first_step, c.id"
)

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

CREATE TABLE IF NOT EXISTS metric_chunks (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    first_step INTEGER NOT NULL,
    last_step INTEGER NOT NULL,
    n INTEGER NOT NULL,
    steps BLOB NOT NULL,
    times BLOB NOT NULL,
    vals BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_key ON metric_chunks (run_id, key, first_step);
CREATE INDEX IF NOT EXISTS chunks_by_step ON metric_chunks (run_id, first_step);

CREATE TABLE IF NOT EXISTS metric_summaries (
    chunk_id INTEGER PRIMARY KEY,
    summary BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS metric_summaries_on_delete AFTER DELETE ON metric_chunks
BEGIN
    DELETE FROM metric_summaries WHERE chunk_id = OLD.id;
END;
CREATE TRIGGER IF NOT EXISTS metric_summaries_on_update AFTER UPDATE OF steps, times, vals ON metric_chunks
BEGIN
    DELETE FROM metric_summaries WHERE chunk_id = OLD.id;
END;

CREATE TABLE IF NOT EXISTS metric_keys (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
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

Float64Array = npt.NDArray[np.float64]
Int64Array = npt.NDArray[np.int64]
IndexArray = npt.NDArray[np.intp]


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


def _nan_to_none(values: Iterable[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


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


_QueueItem = _Append | _Flush | _Stop | _Resume


@dataclass
class _Series:
    """Pieces of one key's history (steps, times, values), concatenated when they are written or emitted."""

    steps: list[Int64Array] = field(default_factory=list)
    times: list[Float64Array] = field(default_factory=list)
    values: list[Float64Array] = field(default_factory=list)


@dataclass
class _RunBatch:
    """What one write transaction learned about one run."""

    last_seq: int = 0
    step: int | None = None
    series: dict[str, _Series] = field(default_factory=dict)

    def add_metrics(self, frame: dict[str, Any]) -> None:
        """Split a columnar ``metrics`` frame into per-key arrays; malformed keys are skipped, not fatal."""
        try:
            steps = np.asarray(frame.get("step"), dtype=np.int64)
        except (TypeError, ValueError):
            logger.warning("metrics frame seq=%s has a malformed step list; metrics not indexed", frame.get("seq"))
            return
        if steps.ndim != 1 or steps.size == 0:
            return
        try:
            times = np.asarray(frame.get("time"), dtype=np.float64)
        except (TypeError, ValueError):
            times = np.empty(0)
        if times.shape != steps.shape:
            # Keep the values: a chart is still useful without wall-clock times.
            times = np.full(steps.shape, np.nan)
        data = frame.get("data")
        if not isinstance(data, dict):
            return
        for key, raw in data.items():
            try:
                # dtype=float64 turns JSON nulls (None) into NaN.
                values = np.asarray(raw, dtype=np.float64)
            except (TypeError, ValueError):
                logger.warning("metrics frame seq=%s: key %r is not numeric; skipped", frame.get("seq"), key)
                continue
            if values.shape != steps.shape:
                logger.warning("metrics frame seq=%s: key %r is not aligned with step; skipped", frame.get("seq"), key)
                continue
            values = np.where(np.isfinite(values), values, np.nan)
            series = self.series.setdefault(str(key), _Series())
            series.steps.append(steps)
            series.times.append(times)
            series.values.append(values)


def _chunk_rows(
    run_id: str, key: str, steps: Int64Array, times: Float64Array, values: Float64Array
) -> Iterator[tuple[tuple[Any, ...], bytes]]:
    """``metric_chunks`` rows for one key's points, at most CHUNK_MAX_POINTS each, with their summary blobs."""
    for lo in range(0, steps.size, CHUNK_MAX_POINTS):
        s = steps[lo : lo + CHUNK_MAX_POINTS]
        t = times[lo : lo + CHUNK_MAX_POINTS]
        v = values[lo : lo + CHUNK_MAX_POINTS]
        row = (
            run_id,
            key,
            # min/max rather than first/last: the readers rely on no step of a chunk lying before first_step.
            int(s.min()),
            int(s.max()),
            int(s.size),
            s.astype(_STEP_DTYPE).tobytes(),
            t.astype(_FLOAT_DTYPE).tobytes(),
            v.astype(_FLOAT_DTYPE).tobytes(),
        )
        yield row, _summary_blob(*_summarize(s, t, v))


def _insert_chunks(
    conn: sqlite3.Connection, run_id: str, key: str, steps: Int64Array, times: Float64Array, values: Float64Array
) -> list[int]:
    """Insert one key's points as chunks with their summaries; returns the chunk sizes."""
    sizes: list[int] = []
    for row, summary in _chunk_rows(run_id, key, steps, times, values):
        chunk_id = conn.execute(_INSERT_CHUNK, row).lastrowid
        conn.execute(_INSERT_SUMMARY, (chunk_id, summary))
        sizes.append(int(row[4]))
    return sizes


def _summary_index(values: Float64Array) -> IndexArray:
    """Indices (ascending) of the points of a step-ordered stretch that a downsampled chart needs.

    Kept: both ends; in each block of SUMMARY_BLOCK points, the first index of its finite minimum and
    of its finite maximum; the first point of every run of nulls and the first point after it. Across
    stretches summarized apart and concatenated in step order, the nulls whose predecessor in the
    concatenation is not null are then exactly the starts of the null runs of the whole series, so
    :func:`_select_points` treats nulls on a summary as it does on the full series, and every
    block's extremes are there for MinMaxLTTB.
    """
    n = values.size
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return np.flatnonzero(keep)
    keep[0] = keep[-1] = True
    n_blocks = -(-n // SUMMARY_BLOCK)
    pad = n_blocks * SUMMARY_BLOCK - n
    starts = np.arange(0, n, SUMMARY_BLOCK)
    finite = np.isfinite(values)
    if bool(finite.all()):
        # Padding with the last value never wins over it: argmin/argmax return the first of equal values.
        padded = values if pad == 0 else np.concatenate([values, np.full(pad, values[-1])])
        blocks = padded.reshape(n_blocks, SUMMARY_BLOCK)
        keep[starts + blocks.argmin(axis=1)] = True
        keep[starts + blocks.argmax(axis=1)] = True
        return np.flatnonzero(keep)
    low = np.concatenate([np.where(finite, values, np.inf), np.full(pad, np.inf)]).reshape(n_blocks, SUMMARY_BLOCK)
    high = np.concatenate([np.where(finite, values, -np.inf), np.full(pad, -np.inf)]).reshape(n_blocks, SUMMARY_BLOCK)
    has_finite = np.concatenate([finite, np.zeros(pad, dtype=bool)]).reshape(n_blocks, SUMMARY_BLOCK).any(axis=1)
    keep[(starts + low.argmin(axis=1))[has_finite]] = True
    keep[(starts + high.argmax(axis=1))[has_finite]] = True
    null = ~finite
    keep[1:] |= null[1:] != null[:-1]  # where a null run starts, and the first point after it
    keep[0] = True
    return np.flatnonzero(keep)


def _summarize(
    steps: Int64Array, times: Float64Array, values: Float64Array
) -> tuple[Int64Array, Float64Array, Float64Array]:
    """The summary points (see :func:`_summary_index`) of one chunk, ordered by step."""
    if steps.size > 1 and bool(np.any(np.diff(steps) < 0)):
        order = np.argsort(steps, kind="stable")  # the same order the full read gives this chunk's points
        steps, times, values = steps[order], times[order], values[order]
    keep = _summary_index(values)
    return steps[keep], times[keep], values[keep]


def _summary_blob(steps: Int64Array, times: Float64Array, values: Float64Array) -> bytes:
    """Steps, then times, then values of the summary points, little-endian, one after the other."""
    return (
        steps.astype(_STEP_DTYPE).tobytes()
        + times.astype(_FLOAT_DTYPE).tobytes()
        + values.astype(_FLOAT_DTYPE).tobytes()
    )


def _summary_from_blob(blob: bytes) -> tuple[Int64Array, Float64Array, Float64Array]:
    m = len(blob) // _SUMMARY_POINT_BYTES
    steps = np.frombuffer(blob, dtype=_STEP_DTYPE, count=m).astype(np.int64, copy=False)
    times = np.frombuffer(blob, dtype=_FLOAT_DTYPE, count=m, offset=8 * m).astype(float, copy=False)
    values = np.frombuffer(blob, dtype=_FLOAT_DTYPE, count=m, offset=16 * m).astype(float, copy=False)
    return steps, times, values


def _summary_suffices(chunks: Sequence[sqlite3.Row], max_points: int) -> bool:
    """Whether chunk summaries can stand in for the full points of a key in a ``max_points`` chart.

    Chunks ordered by (first_step, id) must not overlap in steps, so that their summaries concatenate
    in step order; and there must be at least as many summary blocks as MinMaxLTTB has buckets, so
    every bucket sees the extremes of whole blocks (the full series' envelope) rather than a coarser one.
    """
    blocks = 0
    reached: int | None = None
    for row in chunks:
        if reached is not None and int(row["first_step"]) < reached:
            return False
        reached = int(row["last_step"]) if reached is None else max(reached, int(row["last_step"]))
        blocks += -(-int(row["n"]) // SUMMARY_BLOCK)
    return blocks >= _MINMAX_RATIO * max_points


def _drop_null_continuations(
    steps: Int64Array, times: Float64Array, values: Float64Array
) -> tuple[Int64Array, Float64Array, Float64Array]:
    """Drop summary nulls that follow another null (a run continued across chunks), but never the last point."""
    null = np.isnan(values)
    if not bool(null.any()):
        return steps, times, values
    keep = np.ones(values.size, dtype=bool)
    keep[1:] = ~(null[1:] & null[:-1])
    keep[-1] = True
    return steps[keep], times[keep], values[keep]


def _concat_chunks(rows: Sequence[sqlite3.Row]) -> tuple[Int64Array, Float64Array, Float64Array]:
    """Decode chunk rows (``steps``, ``times``, ``vals`` columns) into one series ordered by step."""
    if not rows:
        return np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.float64)
    steps = np.concatenate([np.frombuffer(r["steps"], dtype=_STEP_DTYPE) for r in rows]).astype(np.int64, copy=False)
    times = np.concatenate([np.frombuffer(r["times"], dtype=_FLOAT_DTYPE) for r in rows]).astype(float, copy=False)
    values = np.concatenate([np.frombuffer(r["vals"], dtype=_FLOAT_DTYPE) for r in rows]).astype(float, copy=False)
    if steps.size > 1 and bool(np.any(np.diff(steps) < 0)):
        # Rows come ordered by their smallest step; only out-of-order steps within a run need this.
        order = np.argsort(steps, kind="stable")
        steps, times, values = steps[order], times[order], values[order]
    return steps, times, values


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


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself after some errors (SQLITE_FULL, for one); a second ROLLBACK would then
    # raise and hide the original error.
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _select_points(steps: Int64Array, values: Float64Array, max_points: int) -> IndexArray:
    """Indices of at most ``max_points`` points to draw, first and last always among them.

    Finite points go through MinMaxLTTB, which keeps every bucket's extremes (a single spike in a
    million points survives). The downsampler cannot rank NaNs, so gaps are handled apart: each run of
    nulls keeps its first index (evenly thinned to a quarter of the budget when there are very many),
    so a chart still shows that a stretch was null instead of drawing a line across it.
    """
    n = values.size
    if n <= max_points:
        return np.arange(n, dtype=np.intp)
    finite = np.isfinite(values)
    # The common case, without copying a million points into a finite-only view; the Rust LTTB panics below 3.
    if max_points >= 3 and bool(finite.all()):
        return np.asarray(_DOWNSAMPLER.downsample(steps, values, n_out=max_points), dtype=np.intp)
    finite_idx = np.flatnonzero(finite)
    null_idx = np.flatnonzero(~finite)
    ends = np.array([i for i in (0, n - 1) if not finite[i]], dtype=np.intp)
    if null_idx.size:
        starts = null_idx[np.concatenate(([True], np.diff(null_idx) > 1))]
        cap = max_points // 4
        if starts.size > cap:
            starts = starts[np.unique(np.linspace(0, starts.size - 1, cap).round().astype(np.intp))]
        chosen_null = np.union1d(starts, ends).astype(np.intp)
    else:
        chosen_null = ends
    budget = max_points - chosen_null.size
    if finite_idx.size <= budget:
        chosen_finite = finite_idx
    elif budget >= 3:  # the Rust LTTB asserts n_out >= 3 (and panics, not raises, otherwise)
        picked = _DOWNSAMPLER.downsample(
            np.ascontiguousarray(steps[finite_idx]), np.ascontiguousarray(values[finite_idx]), n_out=budget
        )
        chosen_finite = finite_idx[np.asarray(picked, dtype=np.intp)]
    else:
        # Tiny budgets: the series' own end points first, then the outermost finite points.
        candidates = [i for i in (0, n - 1) if finite[i]] + [int(finite_idx[0]), int(finite_idx[-1])]
        chosen_finite = np.array(list(dict.fromkeys(candidates))[:budget], dtype=np.intp)
    return np.union1d(chosen_null, chosen_finite).astype(np.intp)


class Store:
    """The server's SQLite store. See the module docstring for the layout and the threading model."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._runs_lock = threading.Lock()
        self._runs_conn = _connect(self.path)
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
            for table in ("frames", "metric_chunks", "metric_keys"):
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

    def frames_after(self, run_id: str, since: int, limit: int = 1000,
                     max_bytes: int | None = None) -> list[tuple[int, str]]:
        """Committed frames with ``seq > since`` as ``(seq, json text)``, ascending, at most ``limit``.

        ``max_bytes`` stops once the texts add up to that much (always at least one frame): a
        client catching up holds the batch in memory, and 500 large frames for each of 20
        lagging clients was most of the server's memory (bench/throughput.py).
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        rows = self._reader().execute(
            "SELECT seq, body FROM frames WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?", (run_id, since, limit)
        )
        out: list[tuple[int, str]] = []
        size = 0
        for seq, body in rows:
            out.append((int(seq), str(body)))
            size += len(body)
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
            batch, stop = self._collect()
            self._process(batch)
            if stop:
                return

    def _collect(self) -> tuple[list[_QueueItem], bool]:
        """Block for one item, then take whatever else is already queued, within the batch limits.

        There is no deliberate linger: with WAL and synchronous=NORMAL a commit does not fsync, so a lone
        frame is committed at once (low latency for live clients), while under load the queue fills during
        each commit and batches grow by themselves.
        """
        batch: list[_QueueItem] = [self._queue.get()]
        if isinstance(batch[0], _Stop):
            return [], True
        n_frames = len(batch[0].frames) if isinstance(batch[0], _Append) else 0
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
        self._store_appends(appends)
        for marker in batch:
            if isinstance(marker, _Flush):
                marker.done.set()

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
            exists: dict[str, bool] = {}
            runs: dict[str, _RunBatch] = {}
            stored: list[_Append] = []
            for item in appends:
                if item.run_id not in exists:
                    exists[item.run_id] = (
                        conn.execute("SELECT 1 FROM runs WHERE id = ?", (item.run_id,)).fetchone() is not None
                    )
                if not exists[item.run_id]:
                    logger.warning("store: %d frames for unknown run %s dropped", len(item.frames), item.run_id)
                    continue
                run = runs.setdefault(item.run_id, _RunBatch())
                for frame, text in item.frames:
                    seq = int(frame["seq"])
                    kind = str(frame.get("type", ""))
                    cursor = conn.execute(
                        "INSERT OR IGNORE INTO frames (run_id, seq, type, body) VALUES (?, ?, ?, ?)",
                        (item.run_id, seq, kind, text),
                    )
                    run.last_seq = max(run.last_seq, seq)
                    if kind != "metrics":
                        continue
                    top = _max_step(frame.get("step"))
                    if top is not None:
                        run.step = top if run.step is None else max(run.step, top)
                    if cursor.rowcount == 1:  # only newly stored frames feed the history: no doubled points
                        run.add_metrics(frame)
                stored.append(item)
            for run_id, run in runs.items():
                for key, series in run.series.items():
                    sizes = _insert_chunks(
                        conn,
                        run_id,
                        key,
                        np.concatenate(series.steps),
                        np.concatenate(series.times),
                        np.concatenate(series.values),
                    )
                    small = self._small_chunks.get((run_id, key), 0) + sum(n < CHUNK_MAX_POINTS for n in sizes)
                    if small >= COMPACT_AFTER:
                        self._compact(conn, run_id, key)
                        small = 0
                    self._small_chunks[(run_id, key)] = small
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
        return stored

    def _compact(self, conn: sqlite3.Connection, run_id: str, key: str) -> None:
        """Merge the key's newest run of partly filled chunks into full ones (inside the caller's transaction).

        Only the trailing run is touched, so merged chunks never overlap older full ones in step order.
        """
        # Sizes first, blobs only for the chunks that will be merged: the full chunk that ends the tail
        # would otherwise be read for nothing.
        meta = conn.execute(
            "SELECT id, n FROM metric_chunks WHERE run_id = ? AND key = ? ORDER BY first_step DESC, id DESC LIMIT ?",
            (run_id, key, 4 * COMPACT_AFTER),
        )
        ids: list[int] = []
        for chunk_id, n in meta:
            if n >= CHUNK_MAX_POINTS:
                break
            ids.append(int(chunk_id))
        meta.close()
        if len(ids) < 2:
            return
        marks = ", ".join("?" for _ in ids)
        tail = conn.execute(
            f"SELECT id, steps, times, vals FROM metric_chunks WHERE id IN ({marks}) ORDER BY first_step, id", ids
        ).fetchall()
        steps, times, values = _concat_chunks(tail)
        conn.execute(f"DELETE FROM metric_chunks WHERE id IN ({marks})", ids)  # the trigger drops their summaries
        _insert_chunks(conn, run_id, key, steps, times, values)

    # ------------------------------------------------------------------ metric history

    def metric_keys(self, run_id: str) -> list[str]:
        rows = self._reader().execute("SELECT key FROM metric_keys WHERE run_id = ? ORDER BY key", (run_id,))
        return [str(row[0]) for row in rows]

    def _series(self, conn: sqlite3.Connection, run_id: str, key: str) -> tuple[Int64Array, Float64Array, Float64Array]:
        rows = conn.execute(
            "SELECT steps, times, vals FROM metric_chunks WHERE run_id = ? AND key = ? ORDER BY first_step, id",
            (run_id, key),
        ).fetchall()
        return _concat_chunks(rows)

    def _summary_series(
        self, conn: sqlite3.Connection, run_id: str, key: str, within: tuple[int, int] | None = None
    ) -> tuple[Int64Array, Float64Array, Float64Array]:
        """The key's chunk summaries concatenated in step order (chunks must not overlap in steps); ``within``:
        only the chunks that lie wholly inside those steps."""
        parts: list[tuple[Int64Array, Float64Array, Float64Array]] = []
        query: str = _SELECT_SUMMARIES
        params: tuple[str | int, ...] = (run_id, key)
        if within is not None:
            query = _SELECT_SUMMARIES.replace(" ORDER BY", " AND c.first_step >= ? AND c.last_step <= ? ORDER BY")
            params = (run_id, key, *within)
        for row in conn.execute(query, params):
            if row["summary"] is not None:
                parts.append(_summary_from_blob(row["summary"]))
            else:  # written before summaries existed: summarize it now
                parts.append(_summarize(*_concat_chunks([row])))
        if not parts:
            return np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.float64)
        steps = np.concatenate([p[0] for p in parts])
        times = np.concatenate([p[1] for p in parts])
        values = np.concatenate([p[2] for p in parts])
        return _drop_null_continuations(steps, times, values)

    def _range_series(
        self, conn: sqlite3.Connection, run_id: str, key: str, start: int, end: int, max_points: int
    ) -> tuple[Int64Array, Float64Array, Float64Array]:
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
                marks = ",".join("?" for _ in cut)
                query = f"SELECT steps, times, vals FROM metric_chunks WHERE id IN ({marks})"
                parts.append(_concat_chunks(conn.execute(query, cut).fetchall()))
            steps, times, values = (np.concatenate([p[i] for p in parts]) for i in range(3))
            order = np.argsort(steps, kind="stable")
            steps, times, values = steps[order], times[order], values[order]
            inside = (steps >= start) & (steps <= end)
            if int(inside.sum()) >= _MINMAX_RATIO * max_points:
                return _drop_null_continuations(steps[inside], times[inside], values[inside])
        full = conn.execute(
            "SELECT steps, times, vals FROM metric_chunks WHERE run_id = ? AND key = ? AND first_step <= ?"
            " AND last_step >= ? ORDER BY first_step, id",
            (run_id, key, end, start),
        ).fetchall()
        steps, times, values = _concat_chunks(full)
        inside = (steps >= start) & (steps <= end)
        return steps[inside], times[inside], values[inside]

    def _history_points(
        self, conn: sqlite3.Connection, run_id: str, key: str, max_points: int,
        span: tuple[int, int] | None = None,
    ) -> tuple[Int64Array, Float64Array, Float64Array]:
        """The points a ``max_points`` chart of the key is chosen from: its summaries where they suffice.

        Downsampling the summaries keeps what downsampling the full series keeps: both ends, every null
        run's start (:func:`_summary_index`), and the extremes of every block, so of every MinMaxLTTB
        bucket and of the whole series (:func:`_summary_suffices`). Histories too short for that, keys
        whose chunks overlap in steps, and summaries too sparse to fill the chart (mostly null keys) are
        read in full. One read transaction, so that the writer merging chunks meanwhile changes nothing.

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
                if summary[0].size >= _MINMAX_RATIO * max_points:
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
        downsampled keeping extremes and both ends (see :func:`_select_points`); NaN comes back as None.
        ``start`` and ``end`` (inclusive; either may be left open) narrow it to the steps a zoomed chart shows:
        at full resolution when they hold at most ``max_points`` points, else downsampled the same way.
        """
        if max_points < 2:
            raise ValueError("max_points must be at least 2")
        if start is not None and end is not None and start > end:
            raise ValueError("start must not be after end")
        span = None if start is None and end is None else (start or 0, _MAX_SQL_INT if end is None else end)
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
                "time": _nan_to_none(times[picked].tolist()),
                "value": _nan_to_none(values[picked].tolist()),
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
        """Walk the chunks in order of their first step, ``window_chunks`` rows per query.

        Once every chunk that starts before step S has been read, the rows before S are complete and are
        emitted; later points wait for the next window, so memory is bounded by a window, not by the run.
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
            keys = [
                str(r[0]) for r in conn.execute("SELECT key FROM metric_keys WHERE run_id = ? ORDER BY key", (run_id,))
            ]
            column = {key: i for i, key in enumerate(keys)}
            header = io.StringIO()
            csv.writer(header, lineterminator="\n").writerow(["step", "time", *keys])
            yield header.getvalue()

            pending: dict[int, _Series] = {}
            after: tuple[int, int] = (-(2**63), 0)
            while True:
                rows = conn.execute(
                    "SELECT id, key, first_step, steps, times, vals FROM metric_chunks"
                    " WHERE run_id = ? AND (first_step, id) > (?, ?) ORDER BY first_step, id LIMIT ?",
                    (run_id, after[0], after[1], window_chunks),
                ).fetchall()
                for row in rows:
                    col = column.get(str(row["key"]))
                    if col is None:  # cannot happen within one snapshot: keys and chunks commit together
                        continue
                    series = pending.setdefault(col, _Series())
                    series.steps.append(np.frombuffer(row["steps"], dtype=_STEP_DTYPE).astype(np.int64))
                    series.times.append(np.frombuffer(row["times"], dtype=_FLOAT_DTYPE).astype(np.float64))
                    series.values.append(np.frombuffer(row["vals"], dtype=_FLOAT_DTYPE).astype(np.float64))
                done = len(rows) < window_chunks
                if rows:
                    after = (int(rows[-1]["first_step"]), int(rows[-1]["id"]))
                # Unread chunks all start at or after after[0], so every step before it is complete.
                yield from _csv_rows(pending, len(keys), None if done else after[0])
                if done:
                    return
        finally:
            with self._readers_lock:
                if conn in self._readers:
                    self._readers.remove(conn)
            conn.close()


def _csv_rows(pending: dict[int, _Series], n_keys: int, boundary: int | None) -> Iterator[str]:
    """Emit the rows of ``pending`` with step < ``boundary`` (all if None); keep the rest in ``pending``."""
    ready: dict[int, tuple[Int64Array, Float64Array, Float64Array]] = {}
    for col, series in list(pending.items()):
        if not series.steps:
            continue
        steps = np.concatenate(series.steps)
        times = np.concatenate(series.times)
        values = np.concatenate(series.values)
        now = np.ones(steps.shape, dtype=bool) if boundary is None else steps < boundary
        ready[col] = (steps[now], times[now], values[now])
        later = ~now
        pending[col] = _Series([steps[later]], [times[later]], [values[later]]) if later.any() else _Series()
    if not ready:
        return
    all_steps = np.unique(np.concatenate([steps for steps, _, _ in ready.values()]))
    if all_steps.size == 0:
        return
    table = np.full((all_steps.size, n_keys), np.nan)
    row_times = np.full(all_steps.size, np.nan)
    for col, (steps, times, values) in ready.items():
        at = np.searchsorted(all_steps, steps)
        table[at, col] = values
        # Any key's time for a step will do (they come from the same frame), as long as it is known.
        known = ~np.isnan(times)
        row_times[at[known]] = times[known]
    for lo in range(0, all_steps.size, _CSV_ROWS_PER_PIECE):
        hi = lo + _CSV_ROWS_PER_PIECE
        columns = [
            [str(s) for s in all_steps[lo:hi].tolist()],
            _csv_cells(row_times[lo:hi]),
            *(_csv_cells(table[lo:hi, col]) for col in range(n_keys)),
        ]
        yield "".join(",".join(cells) + "\n" for cells in zip(*columns, strict=True))


def _csv_cells(values: Float64Array) -> list[str]:
    # repr() is the shortest text that float() reads back to the same double.
    return ["" if math.isnan(v) else repr(v) for v in values.tolist()]
