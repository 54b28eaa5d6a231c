"""Chart controls (issue 14, item 1) in a real browser on a real server: EMA smoothing with the raw line kept faint
underneath, a log/linear toggle per chart, the x axis by step, wall time (in the browser's zone) or time since the
run started, all remembered across a reload; and a generator loss drawn in the same colour on every page."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from app.store import Store
from bench.history import T0, write_run
from tests.browser import new_page, screenshot, watch
from tests.live_server import LiveServer
from trainer.config import RunConfig

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.xdist_group("live-chart-view")

STEPS = 5_000
SECONDS_PER_STEP = 0.01  # bench.history.write_run: step n was computed at T0 + n * 0.01
TRACES_JS = """([chart, key]) => {
  const c = window.gradwatch.charts[chart];
  const index = c.ids.get(key);
  const line = c.lines[index];
  const main = c.el.data[index];
  const raw = line.raw === null ? null : c.el.data[line.raw];
  return {x: Array.from(main.x), y: Array.from(main.y), held: Array.from(line.value),
          raw: raw && {x: Array.from(raw.x), y: Array.from(raw.y), opacity: raw.opacity, color: raw.line.color},
          color: main.line && main.line.color, xaxis: c.el.layout.xaxis.type, xtitle: c.el.layout.xaxis.title.text,
          yaxis: c.el.layout.yaxis.type};
}"""


def _config(g_loss: str) -> dict[str, Any]:
    return RunConfig.model_validate({"name": f"ring {g_loss}", "gan": {"g_loss": g_loss},
                                     "train": {"steps": STEPS, "device": "cpu"}}).model_dump(mode="json")


def _build(data_dir: Path) -> None:
    """Two stored GAN runs of noisy curves, one per generator loss."""
    rng = np.random.default_rng(11)
    x = np.arange(1, STEPS + 1, dtype=np.float64)
    data_dir.mkdir(parents=True)
    store = Store(data_dir / "gradwatch.db")
    store.start()
    try:
        for run_id, g_loss in (("sat", "saturating"), ("nonsat", "non_saturating")):
            loss_d = 1.2 + 0.2 * np.sin(x / 700.0) + rng.normal(0.0, 0.3, STEPS)
            norm = np.exp(-x / 2000.0) + 0.01
            other = np.full(STEPS, 0.5)
            sat, nonsat = (norm, other) if g_loss == "saturating" else (other, norm)
            write_run(store, run_id, {"loss/d": loss_d, "loss/g": 2.0 - loss_d, "grad/g_norm": norm,
                                      "grad/g_norm_saturating": sat, "grad/g_norm_non_saturating": nonsat},
                      500, config=_config(g_loss))
        assert store.wait_flushed(60)
    finally:
        store.close()


def _ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average."""
    out, acc = [], 0.0
    for n, v in enumerate(values, start=1):
        acc = acc * weight + (1 - weight) * v
        out.append(acc / (1 - weight**n))
    return out


def _trace(page: Page, chart: str, key: str) -> dict[str, Any]:
    trace: dict[str, Any] = page.evaluate(TRACES_JS, [chart, key])
    return trace


def _open(page: Page, path: str) -> None:
    page.goto(path)
    page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=60_000)
    page.wait_for_function("window.gradwatch.charts.losses ? window.gradwatch.charts.losses.el.data.length >= 2"
                           " : window.gradwatch.charts.gloss.el.data.length >= 2")


def test_smoothing_log_scale_and_time_axes_redraw_the_lines_and_survive_a_reload(
        chromium_browser: Browser, tmp_path: Path) -> None:
    _build(tmp_path / "data")
    with LiveServer(tmp_path / "data") as server, \
            new_page(chromium_browser, server.url, timezone_id="Asia/Kolkata") as page:
        seen = watch(page)
        _open(page, "/runs/sat")
        raw = _trace(page, "losses", "loss/d")
        assert raw["y"] == raw["held"] and raw["raw"] is None  # no smoothing: the line is the data itself
        assert raw["xaxis"] == "linear" and raw["xtitle"] == "step" and raw["x"][0] == 1

        # Smoothing: the drawn line becomes the debiased EMA of the held points; the raw line stays, faint, beneath.
        page.fill("#chart-smoothing", "0.9")
        page.wait_for_function("window.gradwatch.charts.losses.lines[0].raw !== null")
        smooth = _trace(page, "losses", "loss/d")
        assert smooth["held"] == raw["held"]
        assert smooth["y"] == pytest.approx(_ema(raw["held"], 0.9), rel=1e-9)
        assert np.std(np.diff(smooth["y"])) < 0.5 * np.std(np.diff(raw["held"]))  # visibly smoother
        assert smooth["raw"]["y"] == raw["held"] and smooth["raw"]["x"] == raw["x"]
        assert smooth["raw"]["opacity"] == pytest.approx(0.25)
        assert page.locator("#chart-smoothing-value").inner_text() == "0.90"

        # Log y on the losses chart (linear by default), linear on the norms (log by default).
        page.click('button.chart-scale[data-chart="losses"]')
        page.click('button.chart-scale[data-chart="gnorm"]')
        assert _trace(page, "losses", "loss/d")["yaxis"] == "log"
        assert _trace(page, "gnorm", "grad/g_norm")["yaxis"] == "linear"
        screenshot(page, "chart-view-smoothed-log")

        # All of it survives a reload: the page opens as the user left it.
        _open(page, "/runs/sat")
        again = _trace(page, "losses", "loss/d")
        assert page.input_value("#chart-smoothing") == "0.9"
        assert again["y"] == pytest.approx(smooth["y"], rel=1e-9) and again["raw"]["y"] == raw["held"]
        assert again["yaxis"] == "log" and _trace(page, "gnorm", "grad/g_norm")["yaxis"] == "linear"
        # Each line keeps its colour whether smoothing was on as the page opened or not, its raw line the same.
        g_loss = _trace(page, "losses", "loss/g")
        assert again["color"] == again["raw"]["color"] == smooth["color"] == raw["color"]
        assert g_loss["color"] == g_loss["raw"]["color"] != raw["color"]
        assert page.locator('button.chart-scale[data-chart="losses"]').get_attribute("aria-pressed") == "true"

        # x by time since the run started (started_at = T0): step n sits at n * 0.01 s.
        page.select_option("#chart-x", "relative")
        page.wait_for_function("window.gradwatch.charts.losses.el.layout.xaxis.title.text.startsWith('seconds')")
        rel = _trace(page, "losses", "loss/d")
        assert rel["x"] == pytest.approx([s * SECONDS_PER_STEP for s in raw["x"]], abs=1e-6)

        # x by wall time, drawn as the browser's clock (Asia/Kolkata, UTC+5:30), the zone named on the axis.
        page.select_option("#chart-x", "wall")
        page.wait_for_function("window.gradwatch.charts.losses.el.layout.xaxis.type === 'date'")
        wall = _trace(page, "losses", "loss/d")
        assert "Asia/Kolkata" in wall["xtitle"] or "Asia/Calcutta" in wall["xtitle"]  # ICU's older name
        assert wall["x"][0] == pytest.approx((T0 + raw["x"][0] * SECONDS_PER_STEP + 5.5 * 3600) * 1000, abs=1)
        screenshot(page, "chart-view-wall-time")

        # A zoom on a time axis fetches the steps it covers at full resolution (10 s..12 s since start = steps
        # 1000..1200, which the 2,000-point view of 5,000 steps had thinned).
        page.select_option("#chart-x", "relative")
        page.fill("#chart-smoothing", "0")
        page.evaluate("Plotly.relayout(window.gradwatch.charts.losses.el,"
                      " {'xaxis.range[0]': 10, 'xaxis.range[1]': 12})")
        page.wait_for_function("(() => { const l = window.gradwatch.charts.losses.lines[0];"
                               " return [1000, 1001, 1002, 1003].every((s) => l.step.includes(s)); })()",
                               timeout=30_000)
        held = page.evaluate("Array.from(window.gradwatch.charts.losses.lines[0].step)")
        assert [s for s in held if 1000 <= s <= 1200] == list(range(1000, 1201))
        seen.assert_clean(server.url)


def test_a_generator_loss_has_the_same_colour_on_every_page(chromium_browser: Browser, tmp_path: Path) -> None:
    """Saturating is always --sat, non-saturating always --nonsat: on a run's page and on the twin's compare page,
    whichever order the runs are in (the palette used to colour them by position: saturating blue when first)."""
    _build(tmp_path / "data")
    with LiveServer(tmp_path / "data") as server, new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        _open(page, "/runs/sat")
        sat = page.evaluate("getComputedStyle(document.documentElement).getPropertyValue('--sat').trim()")
        nonsat = page.evaluate("getComputedStyle(document.documentElement).getPropertyValue('--nonsat').trim()")
        assert sat != nonsat
        assert _trace(page, "gnorm", "grad/g_norm_saturating")["color"] == sat
        assert _trace(page, "gnorm", "grad/g_norm_non_saturating")["color"] == nonsat
        assert page.locator("#run-gloss").get_attribute("class") == "loss-saturating"

        page.goto("/")  # the runs table names each loss in its colour
        for run_id, colour in (("sat", sat), ("nonsat", nonsat)):
            label = page.locator(f'#runs-table tr[data-run="{run_id}"] .run-name [class^="loss-"]')
            assert label.evaluate("(el) => getComputedStyle(el).color") == page.evaluate(
                "(c) => { const e = document.createElement('i'); e.style.color = c; document.body.append(e);"
                " const rgb = getComputedStyle(e).color; e.remove(); return rgb; }", colour)

        for order in ("nonsat,sat", "sat,nonsat"):
            _open(page, f"/compare?runs={order}")
            assert _trace(page, "gloss", "sat")["color"] == sat
            assert _trace(page, "gloss", "nonsat")["color"] == nonsat
            assert _trace(page, "gnorm", "sat:applied")["color"] == sat
            assert page.get_attribute('li[data-run="sat"] .swatch', "data-color") == sat
            assert page.get_attribute('li[data-run="nonsat"] .swatch', "data-color") == nonsat
        screenshot(page, "chart-view-twin-colours")

        # Zoom on the compare page fetches each run's own steps at full resolution, the shadow line too.
        page.evaluate("Plotly.relayout(window.gradwatch.charts.gnorm.el,"
                      " {'xaxis.range[0]': 1000, 'xaxis.range[1]': 1200})")
        for trace in ("sat:applied", "nonsat:applied", "sat:shadow"):
            page.wait_for_function(
                "([id]) => { const c = window.gradwatch.charts.gnorm; const l = c.lines[c.ids.get(id)];"
                " return l.step.filter((s) => s >= 1000 && s <= 1200).length === 201; }", arg=[trace], timeout=30_000)
        shadow = page.evaluate("(() => { const c = window.gradwatch.charts.gnorm;"
                               " const l = c.lines[c.ids.get('sat:shadow')];"
                               " return l.value[l.step.indexOf(1100)]; })()")
        assert shadow == 0.5  # the saturating run's shadow: its non-saturating norm at that step
        seen.assert_clean(server.url)
