"""Runs, sweeps, live control, history and artifacts (SPEC §4)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError

from app.api.deps import ManagerDep, StoreDep
from app.api.schemas import (
    Artifact,
    ResumeFrom,
    RunDetail,
    RunMetaPatch,
    RunRequest,
    RunSummary,
    ScriptRunOut,
    ScriptRunRequest,
    SweepOut,
    SweepRequest,
)
from app.manager import RunError, RunManager
from app.store import RunRecord
from gradwatch.protocol import ARTIFACT_KINDS, artifact_url, valid_artifact
from trainer.checkpoint import load_checkpoint
from trainer.config import RunConfig
from trainer.files import is_temp_file

router = APIRouter(prefix="/api", tags=["runs"])

_STEP = re.compile(r"step_(\d+)")
_MEDIA = {".png": "image/png", ".json": "application/json", ".pt": "application/octet-stream"}


def artifacts_of(manager: RunManager, run_id: str, kind: str) -> list[Artifact]:
    folder = manager.run_dir(run_id) / kind
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.iterdir()):
        if (is_temp_file(path) or path.is_symlink() or not path.is_file()
                or not valid_artifact(kind, path.name)):
            continue  # only finished files the run itself wrote: no temp files, no links out
        match = _STEP.match(path.name)
        out.append(Artifact(name=path.name, step=int(match.group(1)) if match else None,
                            size=path.stat().st_size, url=artifact_url(run_id, kind, path.name)))
    return out


async def _detail(manager: RunManager, rec: RunRecord) -> RunDetail:
    samples, checkpoints = await asyncio.gather(
        asyncio.to_thread(artifacts_of, manager, rec.id, "samples"),
        asyncio.to_thread(artifacts_of, manager, rec.id, "checkpoints"),
    )
    summary = RunSummary.of(rec, manager.steps_per_s(rec.id)).model_dump()
    return RunDetail(**summary, config=rec.config, resume_from=rec.resume_from, samples=samples,
                     checkpoints=checkpoints)


def _body_error(exc: ValidationError, prefix: tuple[str | int, ...]) -> RequestValidationError:
    """Re-raise a nested model's errors as a 422 whose ``loc`` names the field from the body down."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    return RequestValidationError([{**err, "loc": ("body", *prefix, *err["loc"])} for err in errors])


def _field_error(loc: tuple[str | int, ...], message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": message}])


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


async def _resumed_config(manager: RunManager, request: RunRequest, resume: ResumeFrom) -> RunConfig:
    """The source run's config with the fields this request sets on top, checked against the checkpoint."""
    source = await asyncio.to_thread(manager.store.get_run, resume.run)
    if source is None:
        raise _field_error(("resume_from", "run"), f"no run {resume.run!r}")
    path = manager.run_dir(resume.run) / "checkpoints" / resume.checkpoint
    if not path.is_file():
        raise _field_error(("resume_from", "checkpoint"), f"run {resume.run} has no checkpoint {resume.checkpoint!r}")
    try:
        state = await asyncio.to_thread(load_checkpoint, path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise _field_error(("resume_from", "checkpoint"), f"cannot load it: {exc}") from exc
    if state.get("kind") not in ("gan", "vae") or not isinstance(state.get("config"), dict) or "step" not in state:
        raise _field_error(("resume_from", "checkpoint"), "is not the checkpoint of a run the server launched "
                                                          "(a script's checkpoints are the script's to load)")
    step = int(state["step"])
    changes = request.model_dump(mode="json", exclude_unset=True, exclude={"resume_from"})
    raw = _merge(state["config"], changes)
    if "name" not in changes:
        raw["name"] = f"{source.name} · resumed at step {step}"[:200]
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise _body_error(exc, ()) from exc
    if cfg.kind != state.get("kind"):
        raise _field_error(("kind",), f"the checkpoint is of a {state.get('kind')} run")
    if cfg.train.steps <= step:
        raise _field_error(("train", "steps"), f"must exceed the checkpoint's step {step}")
    return cfg


@router.post("/runs", status_code=201, response_model=RunDetail)
async def create_run(request: RunRequest, manager: ManagerDep) -> RunDetail:
    """Queue a run; it starts as soon as a worker slot on its device is free.

    With ``resume_from``, the new run continues the checkpoint's run: its
    config is the checkpointed one with the fields the body sets on top
    (typically ``train.steps``).
    """
    if request.resume_from is None:
        rec = await manager.submit(request.run_config())
    else:
        cfg = await _resumed_config(manager, request, request.resume_from)
        rec = await manager.submit(cfg, resume_from=request.resume_from.model_dump())
    return await _detail(manager, rec)


@router.post("/client/runs", status_code=201, response_model=ScriptRunOut)
async def create_script_run(request: ScriptRunRequest, manager: ManagerDep, response: Response) -> ScriptRunOut:
    """A run streamed by a user's own script (the ``gradwatch`` Python client) or by ``gradwatch sync``.

    Answers the run and its channel token; the script then streams on ``/ws/worker/{id}`` exactly as a
    launched worker does. With a ``uid`` seen before, the same run (200) with a fresh token: a resumed
    sync or a restarted script continues it.
    """
    rec, token, created = await manager.open_external(
        name=request.name or "", kind=request.kind, config=request.config,
        source=request.source.model_dump(mode="json", exclude_none=True), uid=request.uid)
    if not created:
        response.status_code = 200
    return ScriptRunOut(run=await _detail(manager, rec), token=token, channel=f"/ws/worker/{rec.id}",
                        url=f"/runs/{rec.id}", created=created, received=rec.last_seq - rec.seq_offset)


@router.post("/sweeps", status_code=201, response_model=SweepOut)
async def create_sweep(request: SweepRequest, manager: ManagerDep) -> SweepOut:
    """Launch every combination of ``vary`` over ``base``, all with the base's seed."""
    configs = []
    for combo in request.combinations():
        try:
            cfg = request.base.with_overrides(combo)
        except KeyError as exc:
            raise _field_error(("vary", str(exc.args[0])), "not a field of the run config") from exc
        except ValidationError as exc:
            key = next(iter(combo))
            raise _body_error(exc, ("vary", key)) from exc
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in combo.items())
        name = f"{request.base.name} · {label}" if request.base.name else label
        configs.append(cfg.with_overrides({"name": name[:200]}))
    sweep_id = uuid.uuid4().hex[:12]
    runs = [await _detail(manager, rec) for rec in await manager.submit_many(configs, sweep_id=sweep_id)]
    return SweepOut(id=sweep_id, runs=runs)


RunStatusFilter = Literal["queued", "running", "completed", "stopped", "failed", "interrupted", "active"]
RunKindFilter = Literal["gan", "vae", "custom"]


@router.get("/runs", response_model=list[RunSummary])
async def list_runs(
    store: StoreDep, manager: ManagerDep, response: Response,
    q: Annotated[str, Query(max_length=200, description="Substring of a name, id, tag, dataset or loss")] = "",
    status: Annotated[RunStatusFilter | None, Query(description="A status, or active (queued or running)")] = None,
    kind: Annotated[RunKindFilter | None, Query()] = None,
    tag: Annotated[str, Query(max_length=40, description="Runs with this tag (case ignored)")] = "",
    sweep: Annotated[str, Query(max_length=64, description="Runs of this sweep id")] = "",
    limit: Annotated[int | None, Query(ge=1, le=1000, description="At most this many runs (default: all)")] = None,
    offset: Annotated[int, Query(ge=0, le=2**53)] = 0,
) -> list[RunSummary]:
    """Runs newest first, filtered and paged in SQL as the runs table is; ``X-Total-Count`` says how many match."""
    records, total = await asyncio.to_thread(store.page_runs, q, status or "", kind or "", tag, sweep, limit, offset)
    response.headers["X-Total-Count"] = str(total)
    return [RunSummary.of(rec, manager.steps_per_s(rec.id)) for rec in records]


@router.get("/runs/{run_id}", response_model=RunDetail)
async def get_run(run_id: str, manager: ManagerDep) -> RunDetail:
    return await _detail(manager, await manager.get(run_id))


async def update_meta(manager: RunManager, run_id: str, patch: RunMetaPatch) -> RunRecord:
    """Rename, tag or annotate a run (any status, a script's run too); 404 for an unknown run."""
    await manager.get(run_id)
    changes = patch.changes()
    try:
        return await asyncio.to_thread(manager.store.update_run, run_id, **changes)
    except KeyError as exc:  # deleted in between
        raise RunError(404, f"no run {run_id!r}") from exc


@router.patch("/runs/{run_id}", response_model=RunDetail)
async def patch_run(run_id: str, patch: RunMetaPatch, manager: ManagerDep) -> RunDetail:
    """Change a run's ``name``, ``tags`` (the whole list) or ``notes``; fields left out stay as they are."""
    return await _detail(manager, await update_meta(manager, run_id, patch))


@router.post("/runs/{run_id}/stop", response_model=RunDetail, status_code=202)
async def stop_run(run_id: str, manager: ManagerDep) -> RunDetail:
    """Ask for a graceful stop: the worker ends the step, writes a final checkpoint, ends ``stopped``."""
    return await _detail(manager, await manager.stop(run_id))


@router.post("/runs/{run_id}/control")
async def control_run(run_id: str, manager: ManagerDep,
                      changes: Annotated[dict[str, Any], Body(examples=[{"g_loss": "non_saturating"}])]
                      ) -> dict[str, Any]:
    """Change ``g_loss``, ``lr_g`` or ``lr_d`` of a running GAN between two steps."""
    try:
        applied = await manager.control(run_id, changes)
    except ValidationError as exc:
        raise _body_error(exc, ()) from exc
    return {"run": run_id, "changes": applied}


@router.delete("/runs/{run_id}", status_code=204)
async def delete_run(run_id: str, manager: ManagerDep) -> Response:
    await manager.delete(run_id)
    return Response(status_code=204)


@router.get("/runs/{run_id}/metrics")
async def metrics(run_id: str, manager: ManagerDep, store: StoreDep,
                  keys: Annotated[str | None, Query(max_length=10_000, description="Comma-separated keys")] = None,
                  max_points: Annotated[int, Query(ge=2, le=100_000)] = 2000,
                  start: Annotated[int | None, Query(ge=0, le=2**53, description="First step (zoom)")] = None,
                  end: Annotated[int | None, Query(ge=0, le=2**53, description="Last step (zoom)")] = None,
                  ) -> dict[str, Any]:
    """History per key, downsampled to at most ``max_points`` keeping extremes; ``start``/``end`` narrow it to the
    steps a zoomed chart shows, at full resolution when they hold at most ``max_points`` points."""
    await manager.get(run_id)
    if start is not None and end is not None and start > end:
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "end"),
                                       "msg": f"end ({end}) is before start ({start})"}])
    wanted = [k for k in keys.split(",") if k] if keys else None
    history = await asyncio.to_thread(store.metric_history, run_id, wanted, max_points, start=start, end=end)
    missing = [k for k in wanted if k not in history] if wanted else []
    return {"run": run_id, "max_points": max_points, "start": start, "end": end, "metrics": history,
            "missing": missing}


@router.get("/runs/{run_id}/metrics.csv")
async def metrics_csv(run_id: str, manager: ManagerDep, store: StoreDep) -> StreamingResponse:
    """The full, un-downsampled history: one row per step, one column per key."""
    await manager.get(run_id)
    return StreamingResponse(store.export_csv(run_id), media_type="text/csv",
                             headers={"Content-Disposition": f'attachment; filename="{run_id}-metrics.csv"'})


_EVENTS_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": '`{"run": id, "until": S, "frames": [frame, ...]}`, frames ascending by seq',
          "content": {"application/json": {}}},
}


@router.get("/runs/{run_id}/events", response_class=Response, responses=_EVENTS_DOC)
async def events(run_id: str, manager: ManagerDep, store: StoreDep,
                 until: Annotated[int | None, Query(ge=0, le=2**63 - 1,  # SQLite's integer range
                                                    description="Last seq to include "
                                                                "(default: the run's last_seq)")] = None
                 ) -> Response:
    """The frames a page restores besides the metric history, up to ``until``; then follow ``?since=until``.

    Every ``status``, ``alert``, ``control``, ``sample`` and ``checkpoint`` frame (the newest 5,000),
    the newest ``hist`` frame per key and the newest ``dldh`` frame; no ``metrics`` (see ``/metrics``).
    """
    rec = await manager.get(run_id)
    upto = rec.last_seq if until is None else until
    frames = await asyncio.to_thread(store.events, run_id, upto)
    # The stored texts are already strict JSON: splice them in rather than parse and re-serialise each.
    body = f'{{"run":{json.dumps(run_id)},"until":{upto},"frames":[{",".join(text for _, text in frames)}]}}'
    return Response(content=body, media_type="application/json")


@router.get("/runs/{run_id}/{kind}", response_model=list[Artifact])
async def list_artifacts(run_id: str, kind: str, manager: ManagerDep) -> list[Artifact]:
    """``samples`` (PNG grids and 2-D field data) or ``checkpoints``, oldest first."""
    if kind not in ARTIFACT_KINDS:
        raise RunError(404, f"no such collection {kind!r}; use samples or checkpoints")
    await manager.get(run_id)
    return await asyncio.to_thread(artifacts_of, manager, run_id, kind)


@router.get("/runs/{run_id}/{kind}/{name}")
async def download(run_id: str, kind: str, name: str, manager: ManagerDep) -> FileResponse:
    """One artifact by run and name; the resolved path must lie inside the run's own folder."""
    if not valid_artifact(kind, name):
        raise RunError(404, f"no {kind} file {name!r}")
    await manager.get(run_id)
    # Containment on resolved paths: a link anywhere on the way (the file or its folder) that
    # leads out of the run's own folder is refused.
    run_dir = manager.run_dir(run_id).resolve()
    path = (manager.run_dir(run_id) / kind / name).resolve()
    if not path.is_relative_to(run_dir / kind) or not path.is_file():
        raise RunError(404, f"run {run_id} has no {kind} file {name!r}")
    return FileResponse(path, media_type=_MEDIA.get(Path(name).suffix, "application/octet-stream"),
                        filename=name if kind == "checkpoints" else None)
