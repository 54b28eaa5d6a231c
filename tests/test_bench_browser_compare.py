"""Smoke test of ``bench/browser.py --compare``: N stored runs on one real compare page, a few ticks each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import browser
from tests.browser import require_chromium

pytestmark = pytest.mark.xdist_group("browser")


def test_the_compare_benchmark_loads_n_runs_and_times_ticks_of_one_frame_per_run(tmp_path: Path) -> None:
    require_chromium()
    out = tmp_path / "browser-compare.json"
    assert browser.main(["--compare", "2,3", "--frames", "3", "--warmup", "0", "--renderers", "scatter",
                         "--compare-steps", "200", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["available"] is True and payload["meta"]["page"] == "compare"
    cases = payload["cases"]
    assert [c["n"] for c in cases] == [2, 3]
    for case in cases:
        assert case["trace_types"] == ["scatter"] and case["load_s"] > 0
        assert case["traces"]["gloss"] == case["n"] and case["traces"]["gnorm"] == 2 * case["n"]  # applied, shadow
        # performance.now() is coarsened (to 0.1 ms here): a handler that fast may read 0, a flush never does.
        assert case["frames"] == 3 and 0 <= case["handler_median_ms"] < case["median_ms"]
        assert case["per_frame_median_ms"] == pytest.approx(case["median_ms"] / case["n"], abs=1e-3)


def test_the_compare_servers_limit_is_lifted_in_its_own_process_only() -> None:
    server = browser.CompareServer(Path("/nonexistent"), 50)
    command = server.command("0")
    assert command[1] == "-c" and "MAX_COMPARE = int(sys.argv[1])" in command[2] and command[3] == "50"
    assert command[4:6] == ["serve", "--port"]
    from app.web.pages import MAX_COMPARE
    assert MAX_COMPARE < 50  # this process's page is untouched
