"""Shared test set-up.

Torch's intra-op threads are pinned to one per test process: the suite runs
under pytest-xdist on a 2-core machine, and oversubscribed threads make small
models slower, not faster.

Every test starts from the same global random state (Python's, NumPy's and
torch's), whichever tests ran before it in the same process and however xdist
shared them out: a draw a test forgot to seed is then the same draw on every
machine, so an outcome cannot pass here and fail on a fresh one. ``TEST_SEED``
picks another state: running the suite under a few values shows which tests
rest on a lucky draw (each must hold for every draw, or seed its own).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store import Store
from tests.browser import chromium
from tests.installed_wheel import InstalledWheel, build_and_install
from tests.live_server import LiveServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser

torch.set_num_threads(1)

#: tests/ray_cluster needs the network namespace tests/test_ray.py makes for it (Ray may bind only loopback there).
collect_ignore = [] if os.environ.get("GRADWATCH_RAY_NETNS") else ["ray_cluster"]


@pytest.fixture(autouse=True)
def _same_global_random_state() -> None:
    seed = int(os.environ.get("TEST_SEED", "0"))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def classifier_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp().parent / "classifier-cache"


def read_frames(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where :func:`store` keeps its database (a test module may override it)."""
    return tmp_path / "gradwatch.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    """A real SQLite store at ``db_path``, writer thread running, closed afterwards."""
    store = Store(db_path)
    store.start()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    """The whole app in process (real store, real manager), on the address a browser would use."""
    app = create_app(Settings(data_dir=tmp_path, _env_file=None))  # type: ignore[call-arg]
    with TestClient(app, base_url="http://127.0.0.1:8000") as test_client:
        yield test_client


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real ``gradwatch serve`` subprocess shared by one test module, always torn down."""
    srv = LiveServer(tmp_path_factory.mktemp("gradwatch-data")).start()
    try:
        yield srv
    finally:
        srv.stop()


# Not named `browser` or `page`: pytest-playwright, where installed, owns those names and would launch
# its own downloaded browser, which we never install. Requested before `server` by the browser tests,
# so that without chromium they skip (fail under CI) before starting a server.
@pytest.fixture(scope="module")
def chromium_browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


# Built and installed once per session: tests/test_wheel.py and tests/test_container.py share one xdist group.
@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    """The sdist and wheel ``python -m build`` makes, the wheel installed with torch in a fresh venv."""
    return build_and_install(tmp_path_factory.mktemp("wheel"))
