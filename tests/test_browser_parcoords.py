"""Comparing many runs (issue 14, item 5), in a real browser: a 4-run sweep's compare page draws one
parallel-coordinates line per run, across the field the sweep varied and the runs' final metrics."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser import new_page, screenshot, watch
from tests.live_server import TINY_GAN, LiveServer, config, wait_status

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.xdist_group("browser")

RATES = [0.0005, 0.001, 0.002, 0.004]


def test_a_four_run_sweep_has_four_lines_across_the_varied_field_and_the_final_metrics(
        chromium_browser: Browser, server: LiveServer) -> None:
    with server.client() as http:
        response = http.post("/api/sweeps", json={"base": config(TINY_GAN, train__steps=60),
                                                  "vary": {"gan.lr_g": RATES}})
        assert response.status_code == 201, response.text
        ids = [run["id"] for run in response.json()["runs"]]
        for run_id in ids:
            assert wait_status(http, run_id, {"completed", "failed", "stopped", "interrupted"})["status"] == "completed"
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto(f"/compare?runs={','.join(ids)}")
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=60_000)
        page.wait_for_function("document.getElementById('cmp-parcoords')?.data?.length === 1")
        trace: dict[str, Any] = page.evaluate(
            "(() => { const t = document.getElementById('cmp-parcoords').data[0];"
            " return {type: t.type, dims: t.dimensions.map((d) => ({label: d.label, values: Array.from(d.values)})),"
            " colors: Array.from(t.line.color), scale: t.line.colorscale.map((c) => c[1])}; })()")
        assert trace["type"] == "parcoords" and trace["colors"] == [0, 1, 2, 3]  # four lines, one per run
        # Each line in its run's colour on the rest of the page (the run list's swatches).
        swatches = [page.get_attribute(f'li[data-run="{run_id}"] .swatch', "data-color") for run_id in ids]
        assert trace["scale"] == swatches and len(set(swatches)) == 4
        dims = {d["label"]: d["values"] for d in trace["dims"]}
        assert next(iter(dims)) == "gan.lr_g" and dims["gan.lr_g"] == RATES  # in the runs' order
        finals = dims["final grad/g_norm"]
        assert len(finals) == 4 and all(math.isfinite(v) and v > 0 for v in finals)
        assert "final loss/d" in dims and "name" not in dims
        screenshot(page, "compare-parcoords")
        seen.assert_clean(server.url)
