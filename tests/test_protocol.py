"""The worker ↔ server artifact chunk format (app/protocol.py): round trip, and every malformed message refused."""

from __future__ import annotations

import json
import struct

import pytest

from gradwatch.protocol import (
    ARTIFACT_KINDS,
    MAGIC,
    ArtifactChunk,
    ProtocolError,
    decode_chunk,
    encode_chunk,
    valid_artifact,
)

_LEN = struct.Struct(">I")


def raw_message(header: bytes, payload: bytes = b"", *, magic: bytes = MAGIC, length: int | None = None) -> bytes:
    """A binary message built by hand, so that each part can be wrong on its own."""
    size = len(header) if length is None else length
    return magic + _LEN.pack(size) + header + payload


def header_bytes(**fields: object) -> bytes:
    base: dict[str, object] = {"kind": "checkpoints", "name": "step_00000020.pt", "offset": 0, "total": 4}
    base.update(fields)
    return json.dumps(base).encode()


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_round_trip_keeps_every_field(kind: str) -> None:
    # The payload holds the magic, braces and NULs: only the header length may delimit it.
    payload = MAGIC + b'{"kind": "x"}\x00\xff' + bytes(range(256))
    message = encode_chunk(kind, "step_00000020.png", 1024, 1024 + len(payload) + 7, payload)
    chunk = decode_chunk(message)
    assert chunk == ArtifactChunk(kind, "step_00000020.png", 1024, 1024 + len(payload) + 7, payload)
    assert message.startswith(MAGIC)


def test_round_trip_of_an_empty_artifact() -> None:
    chunk = decode_chunk(encode_chunk("samples", "empty.json", 0, 0, b""))
    assert (chunk.offset, chunk.total, chunk.payload) == (0, 0, b"")
    assert chunk.last


def test_round_trip_of_the_longest_allowed_name() -> None:
    name = "a" * 128
    assert decode_chunk(encode_chunk("samples", name, 0, 1, b"x")).name == name


def test_decoded_chunk_is_immutable() -> None:
    chunk = decode_chunk(encode_chunk("samples", "a.png", 0, 1, b"x"))
    with pytest.raises(AttributeError):
        chunk.offset = 5  # type: ignore[misc]


def test_protocol_error_is_a_value_error() -> None:
    # The manager's worker channel catches ValueError to close a misbehaving worker with 1002.
    assert issubclass(ProtocolError, ValueError)


# ----------------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"GWA",
        MAGIC,  # no length at all
        MAGIC + b"\x00\x00",  # half a length
        b"GWA2" + _LEN.pack(2) + b"{}",
        b"XXXX" + _LEN.pack(len(header_bytes())) + header_bytes() + b"abcd",
        b"gwa1" + _LEN.pack(len(header_bytes())) + header_bytes() + b"abcd",
    ],
    ids=["empty", "short-magic", "magic-only", "half-length", "next-version", "other-magic", "lowercase-magic"],
)
def test_refuses_what_is_not_a_chunk(message: bytes) -> None:
    with pytest.raises(ProtocolError, match="not an artifact chunk"):
        decode_chunk(message)


def test_refuses_a_truncated_header() -> None:
    header = header_bytes()
    message = raw_message(header[:10], length=len(header))  # the length promises more than arrived
    with pytest.raises(ProtocolError, match="malformed"):
        decode_chunk(message)


def test_header_length_one_past_the_message_is_refused() -> None:
    header = header_bytes(total=0)
    assert decode_chunk(raw_message(header)).total == 0
    with pytest.raises(ProtocolError, match="malformed"):
        decode_chunk(raw_message(header, length=len(header) + 1))


def test_header_of_4096_bytes_is_accepted_and_4097_refused() -> None:
    compact = header_bytes(total=1)
    at_limit = compact + b" " * (4096 - len(compact))  # trailing whitespace is still valid JSON
    assert len(at_limit) == 4096
    assert decode_chunk(raw_message(at_limit, b"x")).payload == b"x"
    with pytest.raises(ProtocolError, match="malformed"):
        decode_chunk(raw_message(at_limit + b" ", b"x"))


def test_refuses_an_absurd_header_length_without_reading_it() -> None:
    message = raw_message(b"{}", length=0xFFFFFFFF)
    with pytest.raises(ProtocolError, match="malformed"):
        decode_chunk(message)


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b'{"kind": "samples", "name": "a.png", "offset": 0}',  # no total
        b'{"name": "a.png", "offset": 0, "total": 1}',  # no kind
        b'["samples", "a.png", 0, 1]',
        b'"samples"',
        b"null",
        b'{"kind": "samples", "name": "a.png", "offset": "zero", "total": 1}',
        b'{"kind": "samples", "name": "a.png", "offset": 0, "total": null}',
        b'{"kind": "samples", "name": "a.png", "offset": 1.9, "total": 4}',
        b'{"kind": "samples", "name": "a.png", "offset": true, "total": 4}',
        b'{"kind": "samples", "name": "a.png", "offset": 0, "total": 1',  # unterminated
        b"\xff\xfe{}",
    ],
    ids=["not-json", "no-total", "no-kind", "list", "string", "null", "text-offset", "null-total", "float-offset",
         "bool-offset", "unterminated",
         "bad-utf8"],
)
def test_refuses_a_malformed_header(header: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        decode_chunk(raw_message(header, b"x"))


# ----------------------------------------------------------------------------- names and kinds


@pytest.mark.parametrize(
    "name",
    [
        "a/b.png",
        "/etc/passwd",
        "..",
        "../x.pt",
        "a..b.pt",
        "step..png",
        ".hidden",
        ".tmp-123-step_1.pt",
        "x\x00.png",
        "\x00",
        "",
        "a\\b.png",
        "a b.png",
        "a:b.png",
        "-rf",
        "_x.png",
        "é.png",
        "a" * 129,
    ],
    ids=lambda name: repr(name)[:20],
)
def test_refuses_names_that_are_not_one_plain_component(name: str) -> None:
    assert not valid_artifact("samples", name)
    with pytest.raises(ProtocolError, match="not an allowed name"):
        decode_chunk(encode_chunk("samples", name, 0, 1, b"x"))


def test_refuses_a_name_ending_in_a_newline() -> None:
    assert not valid_artifact("samples", "step_00000020.png\n")
    with pytest.raises(ProtocolError):
        decode_chunk(encode_chunk("samples", "step_00000020.png\n", 0, 1, b"x"))


@pytest.mark.parametrize("kind", ["logs", "Samples", "checkpoint", "", "samples/..", "../samples"])
def test_refuses_an_unknown_kind(kind: str) -> None:
    assert not valid_artifact(kind, "a.png")
    with pytest.raises(ProtocolError, match="not an allowed name"):
        decode_chunk(encode_chunk(kind, "a.png", 0, 1, b"x"))


@pytest.mark.parametrize("name", ["step_00000020.png", "final.pt", "A-b_c.1.json", "0", "a" * 128, "field.2d.json"])
def test_valid_artifact_accepts_our_own_names(name: str) -> None:
    for kind in ARTIFACT_KINDS:
        assert valid_artifact(kind, name)


# ----------------------------------------------------------------------------- offsets


@pytest.mark.parametrize(
    ("offset", "total", "payload"),
    [
        (-1, 4, b"x"),
        (-4, 4, b"abcd"),
        (0, -1, b""),
        (0, 3, b"abcd"),  # payload past total
        (2, 5, b"abcd"),  # starts inside, ends past total
        (5, 4, b""),  # offset past total even with nothing in it
        (0, 0, b"x"),
    ],
)
def test_refuses_inconsistent_offsets(offset: int, total: int, payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="offsets are inconsistent"):
        decode_chunk(encode_chunk("checkpoints", "final.pt", offset, total, payload))


def test_payload_ending_exactly_at_total_is_accepted() -> None:
    chunk = decode_chunk(encode_chunk("checkpoints", "final.pt", 2, 6, b"abcd"))
    assert (chunk.offset, chunk.total, chunk.payload) == (2, 6, b"abcd")


# ----------------------------------------------------------------------------- last


@pytest.mark.parametrize(
    ("offset", "total", "payload", "last"),
    [
        (0, 4, b"abcd", True),
        (0, 5, b"abcd", False),
        (4, 8, b"abcd", True),
        (3, 8, b"abcd", False),
        (0, 0, b"", True),
        (8, 8, b"", True),
        (0, 8, b"", False),
    ],
)
def test_last_is_true_only_when_the_chunk_reaches_total(offset: int, total: int, payload: bytes, last: bool) -> None:
    assert ArtifactChunk("checkpoints", "final.pt", offset, total, payload).last is last
    assert decode_chunk(encode_chunk("checkpoints", "final.pt", offset, total, payload)).last is last


def test_chunks_of_a_split_artifact_reassemble_and_only_the_final_one_is_last() -> None:
    data = bytes(range(256)) * 40  # 10 240 bytes in chunks of 4096
    step = 4096
    chunks = [decode_chunk(encode_chunk("checkpoints", "final.pt", o, len(data), data[o:o + step]))
              for o in range(0, len(data), step)]
    assert [c.last for c in chunks] == [False, False, True]
    assert b"".join(c.payload for c in chunks) == data
