"""Zoom that shows detail (issue 14, item 2), in a real browser on a real server: a 1M-step run's chart holds a
thinned view (2,000 points per line, extremes kept); zooming in fetches the visible steps at full resolution, so a
one-step excursion the thinned view left out appears, with its exact value; resetting the zoom thins it back."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from app.store import Store
from bench.history import write_run
from tests.browser import new_page, screenshot, watch
from tests.live_server import LiveServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.xdist_group("live-zoom")

RUN = "zoom1m"
STEPS = 1_000_000
TRACE_JS = """([key]) => {
  const chart = window.gradwatch.charts.losses;
  const trace = chart.el.data[chart.ids.get(key)];
  return {x: Array.from(trace.x), y: Array.from(trace.y)};
}"""


def _build(data_dir: Path) -> tuple[int, float]:
    """A 1M-step GAN run whose loss/d has 60 small one-step excursions; returns one the thinned view leaves out."""
    rng = np.random.default_rng(7)
    x = np.arange(1, STEPS + 1, dtype=np.float64)
    loss_d = np.sin(x / 40_000.0) + 1.5 + rng.normal(0.0, 0.05, STEPS)
    candidates = rng.choice(np.arange(10_000, STEPS - 10_000), size=60, replace=False)
    loss_d[candidates - 1] += 0.4  # above the noise, but not the extremes of the run
    data_dir.mkdir(parents=True)
    store = Store(data_dir / "gradwatch.db")
    store.start()
    try:
        write_run(store, RUN, {"loss/d": loss_d, "loss/g": 2.0 - loss_d}, 4096)
        assert store.wait_flushed(300)
        shown = set(store.metric_history(RUN, ["loss/d"], 2000)["loss/d"]["step"])
    finally:
        store.close()
    hidden = sorted(int(s) for s in candidates if int(s) not in shown)
    assert hidden, "every excursion made it into the thinned view: nothing for the zoom to show"
    step = hidden[len(hidden) // 2]
    return step, float(loss_d[step - 1])


def _points(page: Page) -> dict[str, list[float]]:
    trace: dict[str, list[float]] = page.evaluate(TRACE_JS, ["loss/d"])
    return trace


def test_zooming_into_a_million_step_run_fetches_the_detail_the_thinned_view_hid(
        chromium_browser: Browser, tmp_path: Path) -> None:
    step, value = _build(tmp_path / "data")
    with LiveServer(tmp_path / "data") as server, new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto(f"/runs/{RUN}")
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=60_000)
        page.wait_for_function("window.gradwatch.charts.losses.el.data.length >= 2")
        before = _points(page)
        assert len(before["x"]) <= 4000 and step not in before["x"]  # the whole run's view: thinned, no excursion

        # Zoom as a drag on the x axis does (the event Plotly fires is the same).
        page.evaluate("([a, b]) => Plotly.relayout(window.gradwatch.charts.losses.el, "
                      "{'xaxis.range[0]': a, 'xaxis.range[1]': b})", [step - 500, step + 500])
        page.wait_for_function(f"window.gradwatch.charts.losses.el.data[0].x.includes({step})", timeout=30_000)
        zoomed = _points(page)
        inside = [(x, y) for x, y in zip(zoomed["x"], zoomed["y"], strict=True) if step - 500 <= x <= step + 500]
        assert [x for x, _ in inside] == list(range(step - 500, step + 501))  # every step of the zoomed range
        assert dict(inside)[step] == pytest.approx(value, abs=0, rel=1e-12)
        assert zoomed["x"] == sorted(zoomed["x"]) and zoomed["x"][0] == 1 and zoomed["x"][-1] == STEPS
        screenshot(page, "zoom-detail")

        page.evaluate("Plotly.relayout(window.gradwatch.charts.losses.el, {'xaxis.autorange': true})")
        page.wait_for_function(f"window.gradwatch.charts.losses.el.data[0].x.length <= {len(before['x']) + 2}",
                               timeout=30_000)
        seen.assert_clean(server.url)
