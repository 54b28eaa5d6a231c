"""Dependencies: what a route needs, read from the app's state (built once by the app factory)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from app.hub import Hub
from app.manager import RunManager
from app.store import Store


def get_store(conn: HTTPConnection) -> Store:
    store: Store = conn.app.state.store
    return store


def get_hub(conn: HTTPConnection) -> Hub:
    hub: Hub = conn.app.state.hub
    return hub


def get_manager(conn: HTTPConnection) -> RunManager:
    manager: RunManager = conn.app.state.manager
    return manager


StoreDep = Annotated[Store, Depends(get_store)]
HubDep = Annotated[Hub, Depends(get_hub)]
ManagerDep = Annotated[RunManager, Depends(get_manager)]
