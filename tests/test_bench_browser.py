"""Smoke test of ``bench/browser.py``: the real run page in headless Chromium, a few frames per case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import browser
from tests.browser import require_chromium

pytestmark = pytest.mark.xdist_group("browser")


def test_browser_benchmark_times_frames_on_the_real_run_page(tmp_path: Path) -> None:
    require_chromium()
    out = tmp_path / "browser.json"
    assert browser.main(["--sizes", "100,300", "--frames", "3", "--warmup", "0", "--renderers", "scatter",
                         "--modes", "history,filled", "--variants", "current", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["available"] is True and payload["meta"]["chromium"]
    cases = payload["cases"]
    assert [(c["mode"], c["n"]) for c in cases] == [("history", 100), ("history", 300), ("filled", 100),
                                                    ("filled", 300)]
    for case in cases:
        assert case["trace_types"] == ["scatter"]  # --disable-webgl: the SVG fallback
        assert case["points_per_line"] == case["n"]
        # performance.now() is coarsened (to 0.1 ms here): a handler that fast may read 0, a flush never does.
        assert case["frames"] == 3 and 0 <= case["handler_median_ms"] < case["median_ms"]
    assert set(payload["ratio_largest_over_smallest"]) == {"scatter current history", "scatter current filled"}


def test_the_before_fix_variant_still_applies_and_draws_every_point(tmp_path: Path) -> None:
    """It is a text replacement on the app's charts.js: this fails as soon as it stops applying, or as soon as
    the app's lines stop being thinned (the two variants would then draw the same)."""
    require_chromium()
    assert "if (true) {" in browser.before_fix_charts_js()
    out = tmp_path / "browser.json"
    assert browser.main(["--sizes", "9000", "--frames", "3", "--warmup", "0", "--renderers", "scatter",
                         "--modes", "filled", "--variants", "current,before-fix", "--json", str(out)]) == 0
    drawn = {c["variant"]: c["points_per_line"] for c in json.loads(out.read_text())["cases"]}
    assert drawn["before-fix"] == 9000 and drawn["current"] <= 8000


def test_the_smoothed_variant_opens_the_page_with_smoothing_on(tmp_path: Path) -> None:
    """The variant sets the view the page reads from localStorage; the benchmark refuses to time a page that did not
    take it, so this fails as soon as the storage key or the view's shape drifts from static/js/chartview.js."""
    require_chromium()
    out = tmp_path / "browser.json"
    assert browser.main(["--sizes", "200", "--frames", "3", "--warmup", "0", "--renderers", "scatter",
                         "--modes", "filled", "--variants", "smoothed", "--json", str(out)]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    assert case["variant"] == "smoothed" and case["frames"] == 3 and case["points_per_line"] == 200


def test_a_missing_chromium_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADWATCH_CHROMIUM", str(tmp_path / "no-such-chromium"))
    out = tmp_path / "browser.json"
    assert browser.main(["--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["available"] is False and "no chromium" in payload["reason"]
