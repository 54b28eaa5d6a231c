"""The metric store: every run's scalar history, columnar, in the server's SQLite file (schema 3).

Why it exists: a chart of a million steps, or the CSV of a run, must not re-parse millions of JSON numbers out of
the frames. So the values of each ``metrics`` frame are also kept as little-endian arrays that numpy reads as they
are. Five tables hold it:

* ``metric_axes``: the steps (int64) and times (float64) of a stretch of points, once for all the keys that were
  logged together (a frame's keys share its ``step`` and ``time`` lists). Before schema 3 every key's chunk carried
  its own copy: 16 of the 25.5 bytes a value cost on disk (bench/storage.py).
* ``metric_chunks``: per key, the values (float64, NaN for ``null``) of one stretch, and the axis row they align
  with (``axis_id``). A chunk written before schema 3 has no axis and keeps its steps and times in its own
  ``steps`` and ``times`` columns; a new chunk leaves those empty. Both kinds are read alike
  (:func:`decode_chunks`), so an older file opens without being rewritten. Frames committed together make one
  chunk per key; a key's newest small chunks are merged again once enough accumulate (:func:`compact_tails`),
  so a million-step history is a hundred-odd rows however small the frames were. A trigger deletes an axis
  with the last chunk that uses it.
* ``metric_summaries``: per chunk, the few points a downsampled chart cannot do without (each block of
  SUMMARY_BLOCK points' finite minimum and maximum, the ends, where each run of nulls starts and stops; see
  :func:`summary_index`). A chart of a long history reads these instead of the chunks. They have a table of
  their own because SQLite reaches a column stored after a row's large blobs only by walking their overflow
  pages; a trigger drops a chunk's summary with the chunk.
* ``metric_keys``: each run's keys, so that listing them needs no scan.
* ``metric_frames`` (with ``metric_layouts`` and ``frames_compacted``): the ``metrics`` frames of an ended run
  that are no longer kept as text, because this store holds them. Until a run ends each frame is on disk twice,
  as its JSON text (for websocket backfill) and here; afterwards the text is dropped and backfill rebuilds it
  from here (:func:`synthesize`), byte for byte. A frame is dropped only once the text rebuilt from the store
  equals the stored text exactly (:func:`drop_slice`), so whatever a sender put in a frame that this store
  cannot give back (an extra field, an integer value, a step twice) keeps the frame. What is kept per dropped
  frame is its seq, its step range and its layout (top-level field order and data key order, shared by the
  run's frames). New points that fall in a dropped frame's step range (a script's run that came back and
  logged those steps again) would change what it rebuilds to, so such frames get their text back first
  (:func:`restore_frames`).

Everything here runs inside a transaction the caller (app.store.Store) opened, on its connection: these are
functions of a connection, not a second owner of the file.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
from tsdownsample import MinMaxLTTBDownsampler

logger = logging.getLogger(__name__)

Float64Array = npt.NDArray[np.float64]
Int64Array = npt.NDArray[np.int64]
IndexArray = npt.NDArray[np.intp]
#: One key's points, ordered by step: steps, times (NaN where unknown), values (NaN for null).
Series = tuple[Int64Array, Float64Array, Float64Array]

#: Blobs are written with an explicit byte order so a database file can move between machines.
STEP_DTYPE: Final = np.dtype("<i8")
FLOAT_DTYPE: Final = np.dtype("<f8")
#: Metrics of consecutive frames committed together are merged into one chunk per key, up to this many
#: points: fewer, larger rows make a full-history read one short query.
CHUNK_MAX_POINTS: Final = 8192
#: Once this many partly filled chunks have been added to one key, the writer merges the key's newest
#: partly filled chunks: a slow run that logs a few steps per frame would otherwise spread a long
#: history over hundreds of thousands of rows, and every chart query would pay for it.
COMPACT_AFTER: Final = 32
#: How many chunk rows the CSV export reads per query; bounds its memory whatever the run's length.
EXPORT_WINDOW_CHUNKS: Final = 256
#: Points per block of a chunk summary: each block keeps its finite minimum and maximum.
SUMMARY_BLOCK: Final = 64
#: MinMaxLTTB keeps the extremes of ``minmax_ratio * n_out`` buckets before LTTB picks (tsdownsample's default).
MINMAX_RATIO: Final = 4
#: SQLite's largest integer: an open end of a step range.
MAX_SQL_INT: Final = 2**63 - 1
#: A drop slice reads ``metrics`` frames until their text adds up to this much: one slice is one write
#: transaction, and the writer thread serves other runs' frames between slices.
DROP_SLICE_BYTES: Final = 1 << 20
#: ...and at most this many frames (a run of one-step frames).
DROP_SLICE_FRAMES: Final = 2048
#: Rebuilt frames are made in groups of about this many values: enough to read each chunk once for many frames,
#: few enough that a catch-up capped at a megabyte does not rebuild ten times what it sends.
SYNTH_GROUP_VALUES: Final = 1 << 17
#: The wire format of frames (trainer.telemetry.frame_to_json): what a rebuilt frame must equal byte for byte.
_FRAME_SEPARATORS: Final = (",", ":")
#: The top-level fields a droppable ``metrics`` frame may have; any other field keeps the frame's text.
_FRAME_FIELDS: Final = frozenset({"type", "run", "seq", "step", "time", "data"})
_SQL_VARS: Final = 500  # ids per "IN (...)" query, well under SQLite's limit of bound parameters
_CSV_ROWS_PER_PIECE: Final = 2048
_SUMMARY_POINT_BYTES: Final = STEP_DTYPE.itemsize + 2 * FLOAT_DTYPE.itemsize
_DOWNSAMPLER: Final = MinMaxLTTBDownsampler()

#: The tables of schema 3 (a file of schema 2 has metric_chunks, metric_summaries and metric_keys already;
#: :func:`create_schema` adds the rest). New files get ``axis_id`` before the blobs, so reading it never walks a
#: blob's overflow pages; an upgraded file has it last, and the covering index below answers for it there.
_TABLES: Final = """
CREATE TABLE IF NOT EXISTS metric_chunks (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    first_step INTEGER NOT NULL,
    last_step INTEGER NOT NULL,
    n INTEGER NOT NULL,
    axis_id INTEGER,
    steps BLOB NOT NULL,
    times BLOB NOT NULL,
    vals BLOB NOT NULL
);
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

CREATE TABLE IF NOT EXISTS metric_axes (
    id INTEGER PRIMARY KEY,
    steps BLOB NOT NULL,
    times BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS metric_layouts (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    layout TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS layouts_by_run ON metric_layouts (run_id);
CREATE TABLE IF NOT EXISTS metric_frames (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    layout_id INTEGER NOT NULL,
    first_step INTEGER NOT NULL,
    last_step INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS metric_frames_by_step ON metric_frames (run_id, last_step);
CREATE TABLE IF NOT EXISTS frames_compacted (
    run_id TEXT PRIMARY KEY,
    through_seq INTEGER NOT NULL
) WITHOUT ROWID;
"""
#: What needs ``axis_id``, made once the column exists in an upgraded file too. The covering index answers every
#: query about a key's chunks (which ones, their spans, their axes) without reading a chunk row.
_AXIS_SCHEMA: Final = """
DROP INDEX IF EXISTS chunks_by_key;
CREATE INDEX IF NOT EXISTS chunks_by_key_span ON metric_chunks (run_id, key, first_step, last_step, n, axis_id);
CREATE INDEX IF NOT EXISTS chunks_by_axis ON metric_chunks (axis_id) WHERE axis_id IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS metric_axes_on_delete AFTER DELETE ON metric_chunks WHEN OLD.axis_id IS NOT NULL
BEGIN
    DELETE FROM metric_axes WHERE id = OLD.axis_id
        AND NOT EXISTS (SELECT 1 FROM metric_chunks WHERE axis_id = OLD.axis_id);
END;
"""
#: Every table holding one run's metric history or dropped frames, for deleting a run.
RUN_TABLES: Final = ("metric_chunks", "metric_keys", "metric_frames", "metric_layouts", "frames_compacted")

_INSERT_CHUNK: Final = (
    "INSERT INTO metric_chunks (run_id, key, first_step, last_step, n, axis_id, steps, times, vals)"
    " VALUES (?, ?, ?, ?, ?, ?, x'', x'', ?)"
)
_INSERT_SUMMARY: Final = "INSERT OR REPLACE INTO metric_summaries (chunk_id, summary) VALUES (?, ?)"
#: Each chunk's summary, or (only where it has none) its full blobs: CASE leaves the blobs unread otherwise.
SELECT_SUMMARIES: Final = (
    "SELECT s.summary, c.axis_id,"
    " CASE WHEN s.summary IS NULL THEN c.steps END AS steps,"
    " CASE WHEN s.summary IS NULL THEN c.times END AS times,"
    " CASE WHEN s.summary IS NULL THEN c.vals END AS vals"
    " FROM metric_chunks AS c LEFT JOIN metric_summaries AS s ON s.chunk_id = c.id"
    " WHERE c.run_id = ? AND c.key = ? ORDER BY c.first_step, c.id"
)


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the metric tables, or bring a file of schema 2 up to schema 3 in place.

    The upgrade only adds: a column (``axis_id``, NULL on every old chunk, which keeps its own steps and times),
    tables and indexes. No chunk is rewritten, so opening a large old file costs an index build, not a copy.
    """
    conn.executescript(_TABLES)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(metric_chunks)")}
    if "axis_id" not in columns:
        conn.execute("ALTER TABLE metric_chunks ADD COLUMN axis_id INTEGER")
    conn.executescript(_AXIS_SCHEMA)


# ---------------------------------------------------------------------------- writing points


@dataclass
class Pieces:
    """Pieces of one key's history (steps, times, values), concatenated when they are written or emitted.

    Keys of one frame share that frame's ``steps`` and ``times`` arrays (the same objects), which is how
    :func:`insert_points` knows they can share one axis row.
    """

    steps: list[Int64Array] = field(default_factory=list)
    times: list[Float64Array] = field(default_factory=list)
    values: list[Float64Array] = field(default_factory=list)


def add_frame_points(series: dict[str, Pieces], frame: Mapping[str, Any]) -> None:
    """Split a columnar ``metrics`` frame into per-key arrays in ``series``; malformed keys are skipped, not fatal."""
    try:
        steps = np.asarray(frame.get("step"), dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
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
        pieces = series.setdefault(str(key), Pieces())
        pieces.steps.append(steps)
        pieces.times.append(times)
        pieces.values.append(values)


def insert_points(conn: sqlite3.Connection, run_id: str, series: Mapping[str, Pieces]) -> dict[str, list[int]]:
    """Insert new points of a run's keys as chunks; returns each key's new chunk sizes.

    Keys whose pieces came from the same frames (the same step and time arrays) share one axis row per chunk:
    that sharing is the point of schema 3.
    """
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = {}
    for key, pieces in series.items():
        if pieces.steps:
            ident = (tuple(id(a) for a in pieces.steps), tuple(id(a) for a in pieces.times))
            groups.setdefault(ident, []).append(key)
    sizes: dict[str, list[int]] = {}
    for keys in groups.values():
        first = series[keys[0]]
        values = {key: np.concatenate(series[key].values) for key in keys}
        sizes.update(_insert_group(conn, run_id, np.concatenate(first.steps), np.concatenate(first.times), values))
    return sizes


def _insert_group(conn: sqlite3.Connection, run_id: str, steps: Int64Array, times: Float64Array,
                  values: Mapping[str, Float64Array]) -> dict[str, list[int]]:
    """Chunks of at most CHUNK_MAX_POINTS for keys aligned with ``steps``/``times``, one axis row per chunk."""
    sizes: dict[str, list[int]] = {key: [] for key in values}
    for lo in range(0, steps.size, CHUNK_MAX_POINTS):
        s = steps[lo : lo + CHUNK_MAX_POINTS]
        t = times[lo : lo + CHUNK_MAX_POINTS]
        axis_id = conn.execute(
            "INSERT INTO metric_axes (steps, times) VALUES (?, ?)",
            (s.astype(STEP_DTYPE).tobytes(), t.astype(FLOAT_DTYPE).tobytes()),
        ).lastrowid
        # min/max rather than first/last: the readers rely on no step of a chunk lying before first_step.
        first, last = int(s.min()), int(s.max())
        for key, column in values.items():
            v = column[lo : lo + CHUNK_MAX_POINTS]
            chunk_id = conn.execute(
                _INSERT_CHUNK, (run_id, key, first, last, int(s.size), axis_id, v.astype(FLOAT_DTYPE).tobytes())
            ).lastrowid
            conn.execute(_INSERT_SUMMARY, (chunk_id, summary_blob(*summarize(s, t, v))))
            sizes[key].append(int(s.size))
    return sizes


def compact_tails(conn: sqlite3.Connection, run_id: str, keys: Iterable[str]) -> None:
    """Merge each key's newest run of partly filled chunks into full ones (inside the caller's transaction).

    Only the trailing run is touched, so merged chunks never overlap older full ones in step order. Keys whose
    tails use the same axis rows (logged together) are merged together and share the merged axes.
    """
    shared: dict[tuple[int, ...], list[tuple[str, list[int]]]] = {}
    alone: list[tuple[str, list[int]]] = []
    for key in keys:
        # Sizes first, blobs only for the chunks that will be merged: the full chunk that ends the tail
        # would otherwise be read for nothing.
        meta = conn.execute(
            "SELECT id, n, axis_id FROM metric_chunks WHERE run_id = ? AND key = ?"
            " ORDER BY first_step DESC, id DESC LIMIT ?",
            (run_id, key, 4 * COMPACT_AFTER),
        ).fetchall()
        tail: list[tuple[int, int | None]] = []
        for chunk_id, n, axis_id in meta:
            if n >= CHUNK_MAX_POINTS:
                break
            tail.append((int(chunk_id), None if axis_id is None else int(axis_id)))
        if len(tail) < 2:
            continue
        tail.reverse()  # oldest first: (first_step, id) order
        ids = [chunk_id for chunk_id, _ in tail]
        axes = [axis_id for _, axis_id in tail]
        if all(axis_id is not None for axis_id in axes):
            shared.setdefault(tuple(a for a in axes if a is not None), []).append((key, ids))
        else:
            alone.append((key, ids))
    for axis_ids, members in shared.items():
        loaded = load_axes(conn, axis_ids, {})
        steps = np.concatenate([loaded[a][0] for a in axis_ids])
        times = np.concatenate([loaded[a][1] for a in axis_ids])
        order = _sort_order(steps)
        if order is not None:
            steps, times = steps[order], times[order]
        values: dict[str, Float64Array] = {}
        for key, ids in members:
            vals = _load_values(conn, ids)
            merged = np.concatenate([vals[i] for i in ids])
            values[key] = merged if order is None else merged[order]
            _delete_chunks(conn, ids)
        _insert_group(conn, run_id, steps, times, values)
    for key, ids in alone:  # a tail with chunks of schema 2 in it: merged on its own, into the new layout
        rows = _rows_by_id(conn, ids)
        steps, times, merged = decode_chunks(conn, rows)
        _delete_chunks(conn, ids)
        _insert_group(conn, run_id, steps, times, {key: merged})


def _delete_chunks(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    # The triggers drop their summaries and the axes no other chunk uses.
    for part in _batches(ids):
        conn.execute(f"DELETE FROM metric_chunks WHERE id IN ({_marks(part)})", part)


# ---------------------------------------------------------------------------- reading points


def load_axes(conn: sqlite3.Connection, ids: Iterable[int],
              cache: dict[int, tuple[Int64Array, Float64Array]]) -> dict[int, tuple[Int64Array, Float64Array]]:
    """The axis rows ``ids`` as (steps, times) arrays, read once each into ``cache`` (returned)."""
    missing = sorted({int(i) for i in ids} - cache.keys())
    for part in _batches(missing):
        for axis_id, steps, times in conn.execute(
            f"SELECT id, steps, times FROM metric_axes WHERE id IN ({_marks(part)})", part
        ):
            cache[int(axis_id)] = (_int_blob(steps), _float_blob(times))
    return cache


def decode_chunks(conn: sqlite3.Connection, rows: Sequence[sqlite3.Row],
                  axes: dict[int, tuple[Int64Array, Float64Array]] | None = None) -> Series:
    """Chunk rows (columns ``axis_id``, ``steps``, ``times``, ``vals``) as one series ordered by step.

    A chunk of schema 3 takes its steps and times from its axis row (read once per call, or once per ``axes``
    cache); one of schema 2 from its own columns.
    """
    if not rows:
        return _empty()
    cache = load_axes(conn, (r["axis_id"] for r in rows if r["axis_id"] is not None), {} if axes is None else axes)
    steps_parts: list[Int64Array] = []
    times_parts: list[Float64Array] = []
    for r in rows:
        if r["axis_id"] is None:
            steps_parts.append(_int_blob(r["steps"]))
            times_parts.append(_float_blob(r["times"]))
        else:
            steps_parts.append(cache[int(r["axis_id"])][0])
            times_parts.append(cache[int(r["axis_id"])][1])
    steps = np.concatenate(steps_parts)
    times = np.concatenate(times_parts)
    values = np.concatenate([_float_blob(r["vals"]) for r in rows])
    order = _sort_order(steps)
    if order is not None:
        # Rows come ordered by their smallest step; only out-of-order steps within a run need this.
        steps, times, values = steps[order], times[order], values[order]
    return steps, times, values


def key_series(conn: sqlite3.Connection, run_id: str, key: str) -> Series:
    """Every point of one key, ordered by step."""
    rows = conn.execute(
        "SELECT axis_id, steps, times, vals FROM metric_chunks WHERE run_id = ? AND key = ? ORDER BY first_step, id",
        (run_id, key),
    ).fetchall()
    return decode_chunks(conn, rows)


def chunks_by_id(conn: sqlite3.Connection, ids: Sequence[int]) -> Series:
    """The points of the chunks ``ids``, ordered by step."""
    return decode_chunks(conn, _rows_by_id(conn, ids))


def _rows_by_id(conn: sqlite3.Connection, ids: Sequence[int]) -> list[sqlite3.Row]:
    rows: list[sqlite3.Row] = []
    for part in _batches(ids):
        rows += conn.execute(
            f"SELECT id, first_step, axis_id, steps, times, vals FROM metric_chunks WHERE id IN ({_marks(part)})", part
        ).fetchall()
    return sorted(rows, key=lambda r: (int(r["first_step"]), int(r["id"])))


def _load_values(conn: sqlite3.Connection, ids: Sequence[int]) -> dict[int, Float64Array]:
    out: dict[int, Float64Array] = {}
    for part in _batches(ids):
        for chunk_id, vals in conn.execute(f"SELECT id, vals FROM metric_chunks WHERE id IN ({_marks(part)})", part):
            out[int(chunk_id)] = _float_blob(vals)
    return out


def summary_series(conn: sqlite3.Connection, run_id: str, key: str, within: tuple[int, int] | None = None) -> Series:
    """The key's chunk summaries concatenated in step order (chunks must not overlap in steps); ``within``:
    only the chunks that lie wholly inside those steps. A chunk without a summary is summarized from its points."""
    parts: list[Series] = []
    query: str = SELECT_SUMMARIES
    params: tuple[str | int, ...] = (run_id, key)
    if within is not None:
        query = SELECT_SUMMARIES.replace(" ORDER BY", " AND c.first_step >= ? AND c.last_step <= ? ORDER BY")
        params = (run_id, key, *within)
    axes: dict[int, tuple[Int64Array, Float64Array]] = {}
    for row in conn.execute(query, params).fetchall():
        if row["summary"] is not None:
            parts.append(summary_from_blob(row["summary"]))
        else:  # written before summaries existed: summarize it now
            parts.append(summarize(*decode_chunks(conn, [row], axes)))
    if not parts:
        return _empty()
    steps = np.concatenate([p[0] for p in parts])
    times = np.concatenate([p[1] for p in parts])
    values = np.concatenate([p[2] for p in parts])
    return drop_null_continuations(steps, times, values)


# ---------------------------------------------------------------------------- summaries and downsampling


def summary_index(values: Float64Array) -> IndexArray:
    """Indices (ascending) of the points of a step-ordered stretch that a downsampled chart needs.

    Kept: both ends; in each block of SUMMARY_BLOCK points, the first index of its finite minimum and
    of its finite maximum; the first point of every run of nulls and the first point after it. Across
    stretches summarized apart and concatenated in step order, the nulls whose predecessor in the
    concatenation is not null are then exactly the starts of the null runs of the whole series, so
    :func:`select_points` treats nulls on a summary as it does on the full series, and every
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


def summarize(steps: Int64Array, times: Float64Array, values: Float64Array) -> Series:
    """The summary points (see :func:`summary_index`) of one chunk, ordered by step."""
    order = _sort_order(steps)
    if order is not None:  # the same order the full read gives this chunk's points
        steps, times, values = steps[order], times[order], values[order]
    keep = summary_index(values)
    return steps[keep], times[keep], values[keep]


def summary_blob(steps: Int64Array, times: Float64Array, values: Float64Array) -> bytes:
    """Steps, then times, then values of the summary points, little-endian, one after the other."""
    return (
        steps.astype(STEP_DTYPE).tobytes() + times.astype(FLOAT_DTYPE).tobytes() + values.astype(FLOAT_DTYPE).tobytes()
    )


def summary_from_blob(blob: bytes) -> Series:
    m = len(blob) // _SUMMARY_POINT_BYTES
    steps = np.frombuffer(blob, dtype=STEP_DTYPE, count=m).astype(np.int64, copy=False)
    times = np.frombuffer(blob, dtype=FLOAT_DTYPE, count=m, offset=8 * m).astype(float, copy=False)
    values = np.frombuffer(blob, dtype=FLOAT_DTYPE, count=m, offset=16 * m).astype(float, copy=False)
    return steps, times, values


def summary_suffices(chunks: Sequence[sqlite3.Row], max_points: int) -> bool:
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
    return blocks >= MINMAX_RATIO * max_points


def drop_null_continuations(steps: Int64Array, times: Float64Array, values: Float64Array) -> Series:
    """Drop summary nulls that follow another null (a run continued across chunks), but never the last point."""
    null = np.isnan(values)
    if not bool(null.any()):
        return steps, times, values
    keep = np.ones(values.size, dtype=bool)
    keep[1:] = ~(null[1:] & null[:-1])
    keep[-1] = True
    return steps[keep], times[keep], values[keep]


def select_points(steps: Int64Array, values: Float64Array, max_points: int) -> IndexArray:
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


def nan_to_none(values: Iterable[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


# ---------------------------------------------------------------------------- CSV export


def export_csv(conn: sqlite3.Connection, run_id: str, window_chunks: int) -> Iterator[str]:
    """The run's full history as CSV text pieces, ``window_chunks`` chunk rows per query (see Store.export_csv).

    Walks the chunks in order of their first step. Once every chunk that starts before step S has been read,
    the rows before S are complete and are emitted; later points wait for the next window, so memory is
    bounded by a window, not by the run. The caller holds one read transaction on ``conn`` throughout.
    """
    keys = [str(r[0]) for r in conn.execute("SELECT key FROM metric_keys WHERE run_id = ? ORDER BY key", (run_id,))]
    column = {key: i for i, key in enumerate(keys)}
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(["step", "time", *keys])
    yield header.getvalue()

    pending: dict[int, Pieces] = {}
    after: tuple[int, int] = (-(2**63), 0)
    while True:
        rows = conn.execute(
            "SELECT id, key, first_step, axis_id, steps, times, vals FROM metric_chunks"
            " WHERE run_id = ? AND (first_step, id) > (?, ?) ORDER BY first_step, id LIMIT ?",
            (run_id, after[0], after[1], window_chunks),
        ).fetchall()
        axes = load_axes(conn, (r["axis_id"] for r in rows if r["axis_id"] is not None), {})
        for row in rows:
            col = column.get(str(row["key"]))
            if col is None:  # cannot happen within one snapshot: keys and chunks commit together
                continue
            pieces = pending.setdefault(col, Pieces())
            if row["axis_id"] is None:
                pieces.steps.append(_int_blob(row["steps"]))
                pieces.times.append(_float_blob(row["times"]))
            else:
                steps, times = axes[int(row["axis_id"])]
                pieces.steps.append(steps)
                pieces.times.append(times)
            pieces.values.append(_float_blob(row["vals"]))
        done = len(rows) < window_chunks
        if rows:
            after = (int(rows[-1]["first_step"]), int(rows[-1]["id"]))
        # Unread chunks all start at or after after[0], so every step before it is complete.
        yield from _csv_rows(pending, len(keys), None if done else after[0])
        if done:
            return


def _csv_rows(pending: dict[int, Pieces], n_keys: int, boundary: int | None) -> Iterator[str]:
    """Emit the rows of ``pending`` with step < ``boundary`` (all if None); keep the rest in ``pending``."""
    ready: dict[int, Series] = {}
    for col, pieces in list(pending.items()):
        if not pieces.steps:
            continue
        steps = np.concatenate(pieces.steps)
        times = np.concatenate(pieces.times)
        values = np.concatenate(pieces.values)
        now = np.ones(steps.shape, dtype=bool) if boundary is None else steps < boundary
        ready[col] = (steps[now], times[now], values[now])
        later = ~now
        pending[col] = Pieces([steps[later]], [times[later]], [values[later]]) if later.any() else Pieces()
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


# ---------------------------------------------------------------------------- metrics frames held by the store


class Layout(NamedTuple):
    """What a rebuilt frame needs besides its numbers: its top-level field order and its data keys' order."""

    fields: tuple[str, ...]
    keys: tuple[str, ...]

    def text(self) -> str:
        return json.dumps({"fields": self.fields, "keys": self.keys}, separators=_FRAME_SEPARATORS)

    @classmethod
    def from_text(cls, text: str) -> Layout:
        raw = json.loads(text)
        return cls(tuple(raw["fields"]), tuple(raw["keys"]))


class DroppedFrame(NamedTuple):
    """A ``metrics`` frame kept only in the metric store: seq, layout, and its steps (``n`` of them, in
    ``first_step``..``last_step``, strictly increasing)."""

    seq: int
    layout_id: int
    first_step: int
    last_step: int
    n: int


def has_dropped(conn: sqlite3.Connection, run_id: str) -> bool:
    """Whether any frame of the run is kept only here (then its seqs must not be stored again)."""
    return conn.execute("SELECT 1 FROM metric_frames WHERE run_id = ? LIMIT 1", (run_id,)).fetchone() is not None


def is_dropped(conn: sqlite3.Connection, run_id: str, seq: int) -> bool:
    row = conn.execute("SELECT 1 FROM metric_frames WHERE run_id = ? AND seq = ?", (run_id, seq)).fetchone()
    return row is not None


def dropped_after(conn: sqlite3.Connection, run_id: str, since: int, limit: int) -> list[DroppedFrame]:
    """The run's dropped frames with seq > ``since``, ascending, at most ``limit``."""
    rows = conn.execute(
        "SELECT seq, layout_id, first_step, last_step, n FROM metric_frames WHERE run_id = ? AND seq > ?"
        " ORDER BY seq LIMIT ?",
        (run_id, since, limit),
    )
    return [DroppedFrame(*(int(v) for v in row)) for row in rows]


def load_layouts(conn: sqlite3.Connection, run_id: str) -> dict[int, Layout]:
    return {int(i): Layout.from_text(str(text))
            for i, text in conn.execute("SELECT id, layout FROM metric_layouts WHERE run_id = ?", (run_id,))}


def frame_groups(frames: Sequence[DroppedFrame], layouts: Mapping[int, Layout],
                 max_values: int = SYNTH_GROUP_VALUES) -> Iterator[list[DroppedFrame]]:
    """``frames`` cut into consecutive groups of about ``max_values`` values each (at least one frame a group)."""
    group: list[DroppedFrame] = []
    size = 0
    for frame in frames:
        group.append(frame)
        size += frame.n * len(layouts[frame.layout_id].keys)
        if size >= max_values:
            yield group
            group, size = [], 0
    if group:
        yield group


def synthesize(conn: sqlite3.Connection, run_id: str, frames: Sequence[DroppedFrame],
               layouts: Mapping[int, Layout]) -> list[str]:
    """The texts of dropped ``metrics`` frames, rebuilt from the store as the worker's frames were written.

    Each key's chunks are read once for all of ``frames`` (pass frames of nearby steps together: one group of
    :func:`frame_groups`), and only the chunks that overlap some frame's steps.
    """
    points = _FramePoints(conn, run_id, frames, layouts)
    return [_frame_text(run_id, frame, layouts[frame.layout_id], points) for frame in frames]


class _FramePoints:
    """The points of the keys that a few dropped frames need, each chunk read once."""

    def __init__(self, conn: sqlite3.Connection, run_id: str, frames: Sequence[DroppedFrame],
                 layouts: Mapping[int, Layout]) -> None:
        self.conn, self.run_id = conn, run_id
        self.series: dict[str, Series] = {}
        self.axes: dict[int, tuple[Int64Array, Float64Array]] = {}
        spans: dict[str, list[tuple[int, int]]] = {}
        for frame in frames:
            for key in layouts[frame.layout_id].keys:
                spans.setdefault(key, []).append((frame.first_step, frame.last_step))
        for key, wanted in spans.items():
            self.series[key] = self._read(key, wanted)

    def _read(self, key: str, wanted: list[tuple[int, int]]) -> Series:
        lo = min(first for first, _ in wanted)
        hi = max(last for _, last in wanted)
        meta = self.conn.execute(
            "SELECT id, first_step, last_step FROM metric_chunks WHERE run_id = ? AND key = ? AND first_step <= ?"
            " AND last_step >= ? ORDER BY first_step, id",
            (self.run_id, key, hi, lo),
        ).fetchall()
        ids = [int(chunk_id) for chunk_id, first, last in meta
               if any(first <= w_last and last >= w_first for w_first, w_last in wanted)]
        rows = _rows_by_id(self.conn, ids)
        return decode_chunks(self.conn, rows, self.axes)

    def slice(self, key: str, first: int, last: int) -> Series:
        steps, times, values = self.series[key]
        lo = int(np.searchsorted(steps, first, side="left"))
        hi = int(np.searchsorted(steps, last, side="right"))
        return steps[lo:hi], times[lo:hi], values[lo:hi]


def _frame_text(run_id: str, frame: DroppedFrame, layout: Layout, points: _FramePoints) -> str:
    """One rebuilt frame: the fields in the layout's order, the numbers as the wire format writes them."""
    columns = [points.slice(key, frame.first_step, frame.last_step) for key in layout.keys]
    steps, times, _ = columns[0]
    values: dict[str, Any] = {
        "type": "metrics",
        "run": run_id,
        "seq": frame.seq,
        "step": steps.tolist(),
        "time": _json_floats(times),
        "data": {key: _json_floats(column[2]) for key, column in zip(layout.keys, columns, strict=True)},
    }
    return json.dumps({name: values[name] for name in layout.fields}, allow_nan=False, separators=_FRAME_SEPARATORS)


def _json_floats(values: Float64Array) -> list[float | None]:
    out: list[float | None] = values.tolist()
    if bool(np.isnan(values).any()):
        out = nan_to_none(values.tolist())
    return out


def _candidate(run_id: str, seq: int, body: str) -> tuple[Layout, int, int, int, list[int]] | None:
    """A stored ``metrics`` frame that the store could give back: its layout, step range and steps; else None.

    Only the shape is checked here; :func:`drop_slice` then compares the rebuilt text with ``body``.
    """
    try:
        frame = json.loads(body)
    except ValueError:
        return None
    if not isinstance(frame, dict) or not {"type", "seq", "step", "data"} <= set(frame) <= _FRAME_FIELDS:
        return None
    if frame["type"] != "metrics" or frame["seq"] != seq or frame.get("run", run_id) != run_id:
        return None
    steps, data = frame["step"], frame["data"]
    if not isinstance(steps, list) or not steps or not isinstance(data, dict) or not data:
        return None
    if not all(type(s) is int for s in steps) or any(b <= a for a, b in itertools.pairwise(steps)):
        return None
    if steps[0] < -(2**63) or steps[-1] >= 2**63:  # what int64 cannot hold never reached the store
        return None
    return Layout(tuple(frame), tuple(str(k) for k in data)), steps[0], steps[-1], len(steps), steps


def drop_slice(conn: sqlite3.Connection, run_id: str) -> tuple[int, bool]:
    """Drop the next slice of an ended run's ``metrics`` frames that the store holds; inside the caller's write
    transaction, so a crash leaves each frame either as text or as a ``metric_frames`` row, never neither.

    Returns (frames dropped, whether more frames wait). Frames are examined in seq order from the run's
    ``frames_compacted`` mark on; one that cannot be rebuilt exactly keeps its text and is not examined again.
    """
    row = conn.execute("SELECT through_seq FROM frames_compacted WHERE run_id = ?", (run_id,)).fetchone()
    through = 0 if row is None else int(row[0])
    cursor = conn.execute(
        "SELECT seq, body FROM frames WHERE run_id = ? AND type = 'metrics' AND seq > ? ORDER BY seq LIMIT ?",
        (run_id, through, DROP_SLICE_FRAMES),
    )
    read: list[tuple[int, str]] = []
    size = 0
    for seq, body in cursor:
        read.append((int(seq), str(body)))
        size += len(body)
        if size >= DROP_SLICE_BYTES:
            break
    cursor.close()
    if not read:
        return 0, False
    more = size >= DROP_SLICE_BYTES or len(read) == DROP_SLICE_FRAMES
    layouts = load_layouts(conn, run_id)
    layout_ids = {layout: i for i, layout in layouts.items()}
    candidates: list[tuple[DroppedFrame, str, list[int]]] = []
    for seq, body in read:
        found = _candidate(run_id, seq, body)
        if found is None:
            continue
        layout, first, last, n, steps = found
        if layout not in layout_ids:
            layout_id = int(conn.execute("INSERT INTO metric_layouts (run_id, layout) VALUES (?, ?)",
                                         (run_id, layout.text())).lastrowid or 0)
            layout_ids[layout] = layout_id
            layouts[layout_id] = layout
        candidates.append((DroppedFrame(seq, layout_ids[layout], first, last, n), body, steps))
    dropped: list[DroppedFrame] = []
    frames = [frame for frame, _, _ in candidates]
    by_seq = {frame.seq: (body, steps) for frame, body, steps in candidates}
    for group in frame_groups(frames, layouts):
        points = _FramePoints(conn, run_id, group, layouts)
        for frame in group:
            body, steps = by_seq[frame.seq]
            layout = layouts[frame.layout_id]
            # Every key must have exactly this frame's steps in its range, not only the first (whose steps the
            # text shows): then nothing but this frame's own points can ever be rebuilt into it.
            want = np.asarray(steps, dtype=np.int64)
            if not all(np.array_equal(points.slice(key, frame.first_step, frame.last_step)[0], want)
                       for key in layout.keys):
                continue
            if _frame_text(run_id, frame, layout, points) == body:
                dropped.append(frame)
    if dropped:
        conn.executemany(
            "INSERT INTO metric_frames (run_id, seq, layout_id, first_step, last_step, n) VALUES (?, ?, ?, ?, ?, ?)",
            [(run_id, *frame) for frame in dropped],
        )
        conn.executemany("DELETE FROM frames WHERE run_id = ? AND seq = ?", [(run_id, f.seq) for f in dropped])
    conn.execute(
        "INSERT INTO frames_compacted (run_id, through_seq) VALUES (?, ?)"
        " ON CONFLICT (run_id) DO UPDATE SET through_seq = excluded.through_seq",
        (run_id, read[-1][0]),
    )
    return len(dropped), more


def restore_frames(conn: sqlite3.Connection, run_id: str, lo: int, hi: int) -> int:
    """Give back their text to the run's dropped frames whose steps meet ``lo``..``hi`` (inside the caller's write
    transaction, before it stores new points there); returns how many.

    New points in a dropped frame's step range would otherwise be rebuilt into it. A restored frame is examined
    again when the run ends again.
    """
    rows = conn.execute(
        "SELECT seq, layout_id, first_step, last_step, n FROM metric_frames WHERE run_id = ? AND last_step >= ?"
        " AND first_step <= ? ORDER BY seq",
        (run_id, lo, hi),
    ).fetchall()
    if not rows:
        return 0
    frames = [DroppedFrame(*(int(v) for v in row)) for row in rows]
    layouts = load_layouts(conn, run_id)
    for group in frame_groups(frames, layouts):
        texts = synthesize(conn, run_id, group, layouts)
        conn.executemany(
            "INSERT OR IGNORE INTO frames (run_id, seq, type, body) VALUES (?, ?, 'metrics', ?)",
            [(run_id, frame.seq, text) for frame, text in zip(group, texts, strict=True)],
        )
    conn.executemany("DELETE FROM metric_frames WHERE run_id = ? AND seq = ?", [(run_id, f.seq) for f in frames])
    conn.execute("UPDATE frames_compacted SET through_seq = MIN(through_seq, ?) WHERE run_id = ?",
                 (frames[0].seq - 1, run_id))
    logger.info("run %s: %d metrics frames stored as text again (new points in their steps)", run_id, len(frames))
    return len(frames)


# ---------------------------------------------------------------------------- helpers


def _empty() -> Series:
    return np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.float64)


def _int_blob(blob: bytes) -> Int64Array:
    return np.frombuffer(blob, dtype=STEP_DTYPE).astype(np.int64, copy=False)


def _float_blob(blob: bytes) -> Float64Array:
    return np.frombuffer(blob, dtype=FLOAT_DTYPE).astype(np.float64, copy=False)


def _sort_order(steps: Int64Array) -> IndexArray | None:
    """The stable order that sorts ``steps``, or None when they are sorted already (the common case)."""
    if steps.size > 1 and bool(np.any(np.diff(steps) < 0)):
        return np.argsort(steps, kind="stable")
    return None


def _batches(ids: Sequence[int]) -> Iterator[list[int]]:
    for lo in range(0, len(ids), _SQL_VARS):
        yield list(ids[lo : lo + _SQL_VARS])


def _marks(items: Sequence[Any]) -> str:
    return ", ".join("?" for _ in items)
