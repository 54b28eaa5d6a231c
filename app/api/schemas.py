"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.store import RunRecord
from gradwatch.protocol import ARTIFACT_NAME
from trainer.config import RunConfig

MAX_SWEEP_RUNS = 64


class ResumeFrom(BaseModel):
    """A checkpoint of an earlier run, addressed by run and name (never by path)."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(..., pattern=r"^[0-9a-f]{1,64}$", description="Id of the run that wrote the checkpoint.")
    checkpoint: str = Field(..., pattern=ARTIFACT_NAME.pattern, description="Checkpoint name, e.g. step_00001000.pt.")


class RunRequest(RunConfig):
    """A run config, optionally continuing from a checkpoint of another run."""

    resume_from: ResumeFrom | None = Field(None, description="Continue from this checkpoint as a new run.")

    def run_config(self) -> RunConfig:
        return RunConfig.model_validate(self.model_dump(mode="json", exclude={"resume_from"}))


class SweepRequest(BaseModel):
    """A base config and, per dotted field, the values to try: every combination runs, same seed."""

    model_config = ConfigDict(extra="forbid")

    base: RunConfig
    vary: dict[str, list[Any]] = Field(..., min_length=1, max_length=8)

    @field_validator("vary")
    @classmethod
    def _bounded(cls, vary: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in vary.items():
            if not 1 <= len(values) <= 16:
                raise ValueError(f"{key}: give between 1 and 16 values")
        total = 1
        for values in vary.values():
            total *= len(values)
        if total > MAX_SWEEP_RUNS:
            raise ValueError(f"the sweep would launch {total} runs; at most {MAX_SWEEP_RUNS}")
        return vary

    def combinations(self) -> list[dict[str, Any]]:
        keys = list(self.vary)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.vary.values())]


#: The largest free-form config a script may attach to its run (JSON text).
MAX_SCRIPT_CONFIG_BYTES = 64 << 10
_SHORT = 500


class GitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    commit: str = Field(..., pattern=r"^[0-9a-f]{7,64}$")
    branch: str | None = Field(None, max_length=_SHORT)
    dirty: bool = False


class ScriptSource(BaseModel):
    """Where a script's run comes from, shown in the run's header."""

    model_config = ConfigDict(extra="forbid")

    origin: Literal["script", "sync"] = Field("script", description="a live script, or a folder uploaded later")
    host: str | None = Field(None, max_length=255)
    script: str | None = Field(None, max_length=_SHORT, description="the script's file name, or <notebook>")
    argv: list[str] = Field(default_factory=list, max_length=64)
    git: GitInfo | None = None
    python: str | None = Field(None, max_length=64)
    pid: int | None = Field(None, ge=0, le=2**31)
    gradwatch: str | None = Field(None, max_length=64, description="the client's version")
    project: str | None = Field(None, max_length=200)
    folder: str | None = Field(None, max_length=_SHORT, description="the run's local folder on that host")

    @field_validator("argv")
    @classmethod
    def _short_args(cls, argv: list[str]) -> list[str]:
        return [arg[:_SHORT] for arg in argv]


class ScriptRunRequest(BaseModel):
    """A run a user's own script (or ``gradwatch sync``) streams: the Python client's first call."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    kind: Literal["gan", "vae", "custom"] = Field("custom", description="set again when the script watches a model")
    config: dict[str, Any] = Field(default_factory=dict, description="the script's own settings, free-form")
    source: ScriptSource = Field(default_factory=ScriptSource)
    uid: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{8,64}$",
                            description="the script's own id for the run: the same uid again returns the same run")

    @field_validator("config")
    @classmethod
    def _bounded_json(cls, config: dict[str, Any]) -> dict[str, Any]:
        try:
            text = json.dumps(config, allow_nan=False)
        except ValueError as exc:
            raise ValueError("must be JSON without NaN or infinity") from exc
        if len(text) > MAX_SCRIPT_CONFIG_BYTES:
            raise ValueError(f"is {len(text)} bytes as JSON; at most {MAX_SCRIPT_CONFIG_BYTES}")
        return config


MAX_TAGS = 32
MAX_TAG_CHARS = 40
MAX_NAME_CHARS = 200
MAX_NOTES_CHARS = 10_000
#: A tag: letters, digits and ``-_.:/+``, with spaces only inside (stripped at the ends before the check).
TAG_PATTERN = re.compile(r"[\w\-.:/+]+(?: +[\w\-.:/+]+)*")


def _control_free(text: str, *, newlines: bool = False) -> bool:
    allowed = {"\n", "\r", "\t"} if newlines else set()
    # Cs: a lone surrogate (JSON's "\ud800") is not text at all, and SQLite could not store it as UTF-8.
    return not any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") and ch not in allowed for ch in text)


class RunMetaPatch(BaseModel):
    """What a user may change of any run, whatever its status: its name, its tags, its notes."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description=f"1 to {MAX_NAME_CHARS} characters after trimming, no control "
                                                "characters")
    tags: list[str] | None = Field(None, description=f"at most {MAX_TAGS}, each 1 to {MAX_TAG_CHARS} characters: "
                                                     "letters, digits, -_.:/+ and inner spaces; repeats (ignoring "
                                                     "case) are dropped")
    notes: str | None = Field(None, description=f"free text, at most {MAX_NOTES_CHARS:,} characters")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is None:
            raise ValueError("must be a string (a run always has a name)")
        name = name.strip()
        if not 1 <= len(name) <= MAX_NAME_CHARS:
            raise ValueError(f"must be 1 to {MAX_NAME_CHARS} characters after trimming spaces")
        if not _control_free(name):
            raise ValueError("must not contain control characters")
        return name

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str] | None) -> list[str] | None:
        if tags is None:
            raise ValueError("must be a list of strings (send [] to remove every tag)")
        kept: dict[str, str] = {}
        for raw in tags:
            tag = raw.strip()
            if not 1 <= len(tag) <= MAX_TAG_CHARS:
                raise ValueError(f"each tag must be 1 to {MAX_TAG_CHARS} characters; got {len(tag)}")
            if not TAG_PATTERN.fullmatch(tag):
                raise ValueError(f"tag {tag[:MAX_TAG_CHARS]!r}: use letters, digits, -_.:/+ and spaces inside")
            kept.setdefault(tag.casefold(), tag)
        if len(kept) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags; got {len(kept)}")
        return list(kept.values())

    @field_validator("notes")
    @classmethod
    def _notes(cls, notes: str | None) -> str | None:
        if notes is None:
            raise ValueError('must be a string (send "" to clear the notes)')
        if len(notes) > MAX_NOTES_CHARS:
            raise ValueError(f"at most {MAX_NOTES_CHARS:,} characters; got {len(notes):,}")
        if not _control_free(notes, newlines=True):
            raise ValueError("must not contain control characters other than line breaks and tabs")
        return notes

    def changes(self) -> dict[str, Any]:
        """The fields the request set, as store columns."""
        return self.model_dump(exclude_unset=True)


class RunSummary(BaseModel):
    id: str
    name: str
    kind: str
    status: str
    step: int
    created_at: float
    started_at: float | None
    ended_at: float | None
    error: str | None
    sweep_id: str | None
    device: str | None
    last_alert: dict[str, Any] | None
    last_seq: int
    source: dict[str, Any] | None = Field(None, description="for a script's run: where it comes from")
    controls: list[str] | None = Field(None, description="for a script's run: the live controls it registered")
    placement: dict[str, Any] | None = Field(
        None, description="for a run on a Ray cluster: the actor, the resources asked for, and 'waiting_for' while "
        "queued or the node ('node_id', 'node_ip', 'hostname', 'gpu_ids') once placed",
    )
    steps_per_s: float | None = Field(
        None, description="Training steps per second over the last ~10 s; null unless the run is training."
    )
    tags: list[str] = Field(default_factory=list, description="the user's labels (PATCH /api/runs/{id})")
    notes: str = Field("", description="the user's notes about the run")

    @classmethod
    def of(cls, rec: RunRecord, steps_per_s: float | None = None) -> RunSummary:
        """The summary of a stored run; the rate is the manager's to know (it is not stored)."""
        fields = {k: getattr(rec, k) for k in cls.model_fields if k != "steps_per_s"}
        fields["tags"], fields["notes"] = rec.tags or [], rec.notes or ""
        return cls.model_validate({**fields, "steps_per_s": steps_per_s})


class Artifact(BaseModel):
    name: str
    step: int | None
    size: int
    url: str


class RunDetail(RunSummary):
    config: dict[str, Any]
    resume_from: dict[str, Any] | None
    samples: list[Artifact]
    checkpoints: list[Artifact]


class ScriptRunOut(BaseModel):
    run: RunDetail
    token: str = Field(..., description="the run's channel token (shown once; only its hash is kept)")
    channel: str = Field(..., description="the websocket path the script streams to")
    url: str = Field(..., description="the run's page")
    created: bool = Field(..., description="false when the uid named a run that already existed")
    received: int = Field(..., description="how many of the script's frames the server has stored")


class SweepOut(BaseModel):
    id: str
    runs: list[RunDetail]
