"""More than ten runs on the compare page (issue 14, item 5): MAX_COMPARE runs, chosen from the compare-page
benchmark (docs/benchmarks.md), are drawn in a real browser, one line per run on each chart, and the next run is
reported as left out. Past a handful of runs the charts' own legends give way to the run list above them, which
names every run in its colour and dash."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from app.store import Store
from app.web.pages import MAX_COMPARE
from bench.history import curves, write_run
from bench.synthetic_worker import synthetic_keys
from tests.browser import new_page, screenshot, watch
from tests.live_server import LiveServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.xdist_group("browser")

STEPS = 300


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, list[str]]]:
    """MAX_COMPARE + 1 completed GAN runs in the store, then a real server on it."""
    data = tmp_path_factory.mktemp("gradwatch-many")
    keys = synthetic_keys(26)
    ids = [f"many{i:02d}" for i in range(MAX_COMPARE + 1)]
    store = Store(data / "gradwatch.db")
    store.start()
    try:
        for i, run_id in enumerate(ids):
            write_run(store, run_id, curves(STEPS, keys, seed=i), frame_steps=100)
        assert store.wait_flushed(120)
    finally:
        store.close()
    server = LiveServer(data).start()
    try:
        yield server, ids
    finally:
        server.stop()


def test_the_compare_page_draws_max_compare_runs_and_reports_the_next_as_left_out(
        chromium_browser: Browser, many: tuple[LiveServer, list[str]]) -> None:
    server, ids = many
    assert MAX_COMPARE >= 20  # the benchmark's choice: more than ten
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto(f"/compare?runs={','.join(ids)}")
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=120_000)
        assert page.locator("#compare-runs li[data-run]").count() == MAX_COMPARE
        notice = page.inner_text("p.notice.bad")
        assert f"Showing the first {MAX_COMPARE} runs" in notice and ids[-1] in notice
        assert ids[-2] not in notice
        # One line per run on the loss chart, each with the run's whole history.
        lines = page.evaluate("""() => window.gradwatch.charts.gloss.el.data
            .filter((t) => t.visible !== false && (t.x || []).length > 0).map((t) => t.x.length)""")
        assert len(lines) == MAX_COMPARE and all(n > 0 for n in lines), lines
        assert page.evaluate("() => window.gradwatch.charts.gnorm.el.data.length") >= 2 * MAX_COMPARE
        # The charts' legends give way to the run list; its swatches tell runs apart (colour, then dash).
        assert page.evaluate("() => window.gradwatch.charts.gloss.el._fullLayout.showlegend") is False
        looks = page.evaluate("""() => Array.from(document.querySelectorAll('#compare-runs li .swatch'))
            .map((s) => s.style.backgroundColor + '|' + (s.dataset.dash || 'solid'))""")
        assert len(looks) == MAX_COMPARE and all(look.split("|")[0] for look in looks)
        assert len(set(looks)) == MAX_COMPARE, looks  # no two runs look the same: colours repeat dashed
        lines = page.evaluate("""() => window.gradwatch.charts.gloss.el._fullData
            .map((t) => t.line.color + '|' + t.line.dash)""")
        assert len(set(lines)) == MAX_COMPARE, lines  # and so do the lines themselves
        # No run here has samples: no empty side-by-side planes.
        assert page.locator("#cmp-planes").is_hidden()
        screenshot(page, "compare-many")
        seen.assert_clean(server.url)


def test_a_few_runs_keep_their_legends(chromium_browser: Browser, many: tuple[LiveServer, list[str]]) -> None:
    server, ids = many
    with new_page(chromium_browser, server.url) as page:
        page.goto(f"/compare?runs={','.join(ids[:2])}")
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=60_000)
        assert page.evaluate("() => window.gradwatch.charts.gloss.el._fullLayout.showlegend") is True
        assert page.locator("p.notice.bad").count() == 0
