"""Websockets: the live stream of a run to browsers, and the worker channel."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, WebSocket
from fastapi.responses import FileResponse

from app.api.deps import HubDep, ManagerDep, StoreDep
from app.hub import CLOSE_UNKNOWN_RUN
from app.store import TERMINAL_STATUSES

router = APIRouter(tags=["stream"])


@router.websocket("/ws/runs/{run_id}")
async def run_stream(ws: WebSocket, run_id: str, hub: HubDep, store: StoreDep,
                     since: Annotated[int, Query(ge=0)] = 0) -> None:
    """Every frame of the run after ``since``, then the live tail; closes normally when the run has ended."""
    rec = await asyncio.to_thread(store.get_run, run_id)
    await ws.accept()
    if rec is None:
        await ws.close(code=CLOSE_UNKNOWN_RUN, reason=f"no run {run_id!r}")
        return
    await hub.serve(ws, run_id, since, head=rec.last_seq, ended=rec.status in TERMINAL_STATUSES)


def _bearer(headers: Mapping[str, str]) -> str:
    auth = headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else ""


@router.websocket("/ws/worker/{run_id}")
async def worker_channel(ws: WebSocket, run_id: str, manager: ManagerDep) -> None:
    """The authenticated channel of one run's worker (see gradwatch/protocol.py)."""
    await manager.attach(ws, run_id, _bearer(ws.headers))


@router.get("/worker/runs/{run_id}/resume", include_in_schema=False)
async def worker_resume_checkpoint(request: Request, run_id: str, manager: ManagerDep) -> FileResponse:
    """The checkpoint a resumed run continues from, for its worker only (run token, not the user's)."""
    if await manager.worker_run(run_id, _bearer(request.headers)) is None:
        raise HTTPException(401, "unknown run or wrong run token", headers={"WWW-Authenticate": "Bearer"})
    path = await asyncio.to_thread(manager.resume_checkpoint, run_id)
    if path is None:
        raise HTTPException(404, f"run {run_id} does not resume from a checkpoint")
    return FileResponse(path, media_type="application/octet-stream")
