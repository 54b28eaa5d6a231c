"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.protocol import ARTIFACT_NAME
from app.store import RunRecord
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
    steps_per_s: float | None = Field(
        None, description="Training steps per second over the last ~10 s; null unless the run is training."
    )

    @classmethod
    def of(cls, rec: RunRecord, steps_per_s: float | None = None) -> RunSummary:
        """The summary of a stored run; the rate is the manager's to know (it is not stored)."""
        fields = {k: getattr(rec, k) for k in cls.model_fields if k != "steps_per_s"}
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


class SweepOut(BaseModel):
    id: str
    runs: list[RunDetail]
