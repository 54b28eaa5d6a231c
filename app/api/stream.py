"""Websockets: the live stream of a run to browsers, and the worker channel."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, WebSocket

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


@router.websocket("/ws/worker/{run_id}")
async def worker_channel(ws: WebSocket, run_id: str, manager: ManagerDep) -> None:
    """The authenticated channel of one run's worker (see app/protocol.py)."""
    auth = ws.headers.get("authorization", "")
    token = auth[7:] if auth.lower().startswith("bearer ") else ""
    await manager.attach(ws, run_id, token)
