"""The telemetry budget seen in a real browser on a real server: the run and compare pages say in words which keys
are sampled and how often, the sampled shadow line is drawn joined (no gaps between its points) on both pages, and
the ``telemetry/*`` keys that carry the schedule are never charted."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser import new_page, screenshot, watch
from tests.live_server import TINY_GAN, LiveServer, config

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.xdist_group("live-budget")

STEPS = 400
LINE_JS = """([chart, id]) => {
  const c = window.gradwatch.charts[chart];
  const trace = c.el.data[c.ids.get(id)];
  return trace ? {x: Array.from(trace.x), y: Array.from(trace.y)} : null;
}"""


def _launch(server: LiveServer) -> dict[str, Any]:
    # 0.1 % of a step: the always-on telemetry alone costs more, so every sampled piece runs at its longest
    # interval (trainer/budget.py's MAX_INTERVAL_STEPS, 100 steps) whatever this machine's speed.
    cfg = config(TINY_GAN, name="budget", train__steps=STEPS, intervals__telemetry_budget=0.001)
    with server.client() as http:
        run: dict[str, Any] = http.post("/api/runs", json=cfg).json()
        for _ in range(600):
            detail = http.get(f"/api/runs/{run['id']}").json()
            if detail["status"] in ("completed", "failed", "stopped", "interrupted"):
                break
            time.sleep(0.2)
    assert detail["status"] == "completed", detail.get("error")
    return run


def test_the_run_page_says_what_is_sampled_and_joins_the_sampled_line(chromium_browser: Browser,
                                                                        tmp_path: Path) -> None:
    with LiveServer(tmp_path / "data") as server:
        run = _launch(server)
        with new_page(chromium_browser, server.url) as page:
            seen = watch(page)
            page.goto(f"/runs/{run['id']}")
            page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=60_000)
            note = page.locator("#telemetry-note")
            note.wait_for(state="visible", timeout=30_000)
            text = note.inner_text()
            assert "budget 0.1 % of step time" in text and "measured" in text
            assert "the shadow gradient (the other loss's norm and ∂loss/∂h) every 100 steps" in text
            assert "per-layer norms every 100 steps" in text
            assert "the applied gradient norms: every logged step" in text
            page.wait_for_function("window.gradwatch.charts.gnorm.el.data.length >= 3")
            applied = page.evaluate(LINE_JS, ["gnorm", "grad/g_norm"])
            shadow = page.evaluate(LINE_JS, ["gnorm", "grad/g_norm_saturating"])
            assert len(applied["x"]) == STEPS
            assert 3 <= len(shadow["x"]) <= 2 + STEPS // 100 + 1 and None not in shadow["y"]
            # The schedule's keys are told in words, not drawn: no chart carries them.
            keys = page.evaluate("""() => Object.values(window.gradwatch.charts)
                .flatMap((c) => c.el && c.el.data ? c.el.data.map((t) => t.name || '') : [])""")
            assert not [k for k in keys if "telemetry" in k]
            assert page.locator("text=telemetry/").count() == 0
            screenshot(page, "budget-run-page")

            page.goto(f"/compare?runs={run['id']}")
            page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=60_000)
            page.wait_for_function(f"window.gradwatch.charts.gnorm.ids.has('{run['id']}:shadow')")
            line = page.evaluate(LINE_JS, ["gnorm", f"{run['id']}:shadow"])
            assert len(line["x"]) >= 3 and None not in line["y"], line  # joined, not broken into gaps
            # The same sentence as on the run page, under the run's name in the list of runs.
            compared = page.locator(f"[data-sampling-for=\"{run['id']}\"]")
            compared.wait_for(state="visible", timeout=30_000)
            assert compared.inner_text() == text
            assert page.locator("text=telemetry/").count() == 0
            screenshot(page, "budget-compare-page")
            seen.assert_clean(server.url)
