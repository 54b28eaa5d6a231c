"""``GET /api/runs/changes``: the runs table's push channel (server-sent events, see app/changes.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api.deps import ManagerDep

router = APIRouter(prefix="/api", tags=["runs"])

_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "`text/event-stream`: a `hello` event, then a `runs` event "
                         '`{"version": N, "runs": [id, ...]}` whenever runs are created, change status, advance '
                         "their step, are renamed or tagged, or are deleted (at most two a second); `runs` is null "
                         "when the server cannot say which changed",
          "content": {"text/event-stream": {}}},
}


# Not in the OpenAPI schema: an endless stream is no request-and-answer operation, and the schema's generated
# clients (tests/test_schemathesis.py among them) would wait on it forever. README and docs/architecture.md §5 say it.
@router.get("/runs/changes", response_class=StreamingResponse, responses=_DOC, include_in_schema=False)
async def run_changes(manager: ManagerDep) -> StreamingResponse:
    """Push notifications of run-table changes; a browser's ``EventSource`` reconnects by itself."""
    return StreamingResponse(manager.changes.stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
