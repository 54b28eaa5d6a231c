"""Property-based requests over the whole HTTP API, generated from its own OpenAPI schema: never a 5xx (SPEC §4:
"a 5xx is always a bug"). Issue 12: "A schemathesis run over /openapi.json in the suite: no 5xx."

The server is a real ``gradwatch serve`` on loopback, reached over real sockets, so the edge limits
(``app/limits.py``) and the security middleware are in the path exactly as a client meets them; the test asserts
that what it serves at ``/openapi.json`` is the schema the cases came from. Its workers are a module that does not
exist: a generated config that validates launches a run whose worker fails at once, which exercises launch and
failure without training anything. Each operation gets valid inputs (positive) and invalid ones (negative);
generation is derandomized and bounded, so every run of the suite sends the same requests in about a minute.

schemathesis's own pytest plugin (``from_fixture``/``parametrize``) reads a pytest private attribute that pytest 9
no longer has, so the cases are drawn here with hypothesis from schemathesis's per-operation strategies.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err

from app.main import create_app
from app.settings import Settings
from tests.live_server import LiveServer

#: Examples per operation and mode: enough to reach every field's bounds and types, few enough for a 2-core machine.
MAX_EXAMPLES = 30


def _openapi() -> dict[str, Any]:
    spec: dict[str, Any] = create_app(Settings(data_dir=Path("/nonexistent"), _env_file=None)).openapi()
    return spec


def _labels() -> list[str]:
    """Every operation of the schema; a part schemathesis cannot read fails collection rather than going untested."""
    labels = []
    for result in SCHEMA.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        labels.append(result.ok().label)
    return sorted(labels)


SPEC = _openapi()
SCHEMA = schemathesis.openapi.from_dict(SPEC)
LABELS = _labels()


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path_factory.mktemp("schemathesis-data"),
                     env={"GRADWATCH_WORKER_MODULE": "tests.no_such_worker_module"}).start()
    try:
        with srv.client() as http:
            assert http.get("/openapi.json").json() == SPEC, "the cases would not be drawn from the served schema"
        yield srv
    finally:
        srv.stop()


@pytest.mark.xdist_group("schemathesis")  # one server for every operation, on one xdist worker
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("label", LABELS)
def test_no_request_gets_a_server_error(api_server: LiveServer, label: str, mode: GenerationMode) -> None:
    operation = SCHEMA.find_operation_by_label(label)
    assert operation is not None

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=api_server.url, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])

    try:
        check()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        # Only free-form strings in the path and no body or bounded query: nothing a client sends can be invalid.
        pytest.skip(f"{label} has no input that its schema refuses")
