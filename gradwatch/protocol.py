"""The worker ↔ server channel: message shapes shared by both ends.

One websocket per run (``/ws/worker/{run_id}``, ``Authorization: Bearer
<run token>``). Text messages are JSON; artifacts travel as binary messages
in bounded chunks so that neither end ever holds a whole checkpoint in one
websocket message (uvicorn caps message size, and a cap is what we want).

Worker → server
    ``{"type": "frames", "frames": [...]}``  SPEC §4 frames in seq order
    binary ``MAGIC | u32 header length | header JSON | payload``  one chunk of
    one artifact; header ``{"kind", "name", "offset", "total"}``
Server → worker
    ``{"type": "hello", "ack": N}``  the highest seq the server has stored:
    the worker resends everything after it
    ``{"type": "ack", "seq": N}``  frames up to N are committed
    ``{"type": "control", "changes": {...}}``  a validated live change
    ``{"type": "stop"}``  finish the step, final checkpoint, end ``stopped``
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"GWA1"
CHUNK_BYTES = 1 << 20
#: The largest websocket message the server accepts (``gradwatch serve`` sets uvicorn's ``ws_max_size`` to it);
#: senders keep every message under it.
MAX_MESSAGE_BYTES = 4 << 20
ARTIFACT_KINDS = ("samples", "checkpoints")
#: The frame types that announce an artifact, and the folder (kind) it lives in.
ARTIFACT_FRAMES = {"sample": "samples", "checkpoint": "checkpoints"}
# Artifact names are ours (step_00000020.png), never a client's path: one
# path component, no leading dot, nothing that a filesystem interprets.
ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LEN = struct.Struct(">I")


class ProtocolError(ValueError):
    """A message that does not follow the channel protocol."""


@dataclass(frozen=True)
class ArtifactChunk:
    kind: str
    name: str
    offset: int
    total: int
    payload: bytes

    @property
    def last(self) -> bool:
        return self.offset + len(self.payload) >= self.total


def valid_artifact(kind: str, name: str) -> bool:
    return kind in ARTIFACT_KINDS and bool(ARTIFACT_NAME.fullmatch(name)) and ".." not in name


def artifact_url(run_id: str, kind: str, name: str) -> str:
    """Where the server serves a run's artifact: the one place this URL is spelled."""
    return f"/api/runs/{run_id}/{kind}/{name}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def encode_chunk(kind: str, name: str, offset: int, total: int, payload: bytes) -> bytes:
    header = json.dumps({"kind": kind, "name": name, "offset": offset, "total": total}).encode()
    return MAGIC + _LEN.pack(len(header)) + header + payload


def decode_chunk(message: bytes) -> ArtifactChunk:
    """Parse and check one binary message; raises ProtocolError on anything odd."""
    if not message.startswith(MAGIC) or len(message) < len(MAGIC) + _LEN.size:
        raise ProtocolError("binary message is not an artifact chunk")
    (size,) = _LEN.unpack_from(message, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if size > 4096 or start + size > len(message):
        raise ProtocolError("artifact chunk header is malformed")
    try:
        header: Any = json.loads(message[start:start + size])
        kind, name, offset, total = header["kind"], header["name"], header["offset"], header["total"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"artifact chunk header is malformed: {exc}") from exc
    if not (isinstance(kind, str) and isinstance(name, str) and _is_int(offset) and _is_int(total)):
        raise ProtocolError("artifact chunk header is malformed: offset and total must be integers")
    chunk = ArtifactChunk(kind, name, offset, total, message[start + size:])
    if not valid_artifact(chunk.kind, chunk.name):
        raise ProtocolError(f"artifact {chunk.kind}/{chunk.name} is not an allowed name")
    if chunk.offset < 0 or chunk.total < 0 or chunk.offset + len(chunk.payload) > chunk.total:
        raise ProtocolError("artifact chunk offsets are inconsistent")
    return chunk
