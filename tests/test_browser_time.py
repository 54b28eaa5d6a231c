"""Time and place (issue 14, item 6), in a real browser: timestamps in the browser's own time zone with the zone
shown, and a run page's elapsed time and ETA."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import pytest

from tests.browser import new_page, watch
from tests.live_server import TINY_GAN, LiveServer, config, wait_status

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.xdist_group("browser")

TERMINAL = {"completed", "stopped", "failed", "interrupted"}
ZONE = "Asia/Kolkata"  # UTC+5:30: an hour and a half-hour off, so neither UTC nor the server's zone can pass


def _launch(server: LiveServer, **dotted: object) -> dict[str, object]:
    with server.client() as http:
        response = http.post("/api/runs", json=config(TINY_GAN, **dotted))
    assert response.status_code == 201, response.text
    run: dict[str, object] = response.json()
    return run


def test_the_runs_table_shows_times_in_the_browsers_zone_with_the_zone_named_across_refreshes(
        chromium_browser: Browser, server: LiveServer) -> None:
    run = _launch(server, train__steps=20)
    created = float(str(run["created_at"]))
    local = datetime.fromtimestamp(created, ZoneInfo(ZONE))
    utc = datetime.fromtimestamp(created, UTC)
    with new_page(chromium_browser, server.url, timezone_id=ZONE, locale="en-US") as page:
        seen = watch(page)
        page.goto("/")
        fresh = f'tr[data-run="{run["id"]}"] time[data-local]:not([data-seen])'
        for _ in range(2):  # as loaded, and after htmx replaced the table (every second) with server-rendered UTC
            page.wait_for_function("([sel, zone]) => document.querySelector(sel)?.textContent.includes(zone)",
                                   arg=[fresh, "GMT+5:30"], timeout=15_000)
            cell = page.locator(fresh)
            text = cell.inner_text()
            assert local.strftime("%I:%M").lstrip("0") in text and "GMT+5:30" in text, text
            assert utc.strftime("%H:%M UTC") in (cell.get_attribute("title") or "")
            cell.evaluate("el => { el.dataset.seen = '1'; }")  # the next one found is a new element
        seen.assert_clean(server.url)
    with server.client() as http:
        wait_status(http, str(run["id"]), TERMINAL)


def test_a_training_run_shows_time_elapsed_and_an_eta_then_how_long_it_took(
        chromium_browser: Browser, server: LiveServer) -> None:
    run = _launch(server, train__steps=200_000, intervals__sample_every=1_000_000)
    run_id = str(run["id"])
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto(f"/runs/{run_id}")
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=60_000)
        page.wait_for_function("/^elapsed \\d+ (s|min).* · ETA \\d/.test(document.getElementById('run-clock')"
                               ".textContent)", timeout=60_000)
        clock = page.inner_text("#run-clock")
        eta = re.search(r"ETA (.+)$", clock)
        assert eta and re.fullmatch(r"\d+ (s|min \d\d s|h \d\d min|d \d+ h)", eta.group(1)), clock
        with server.client() as http:
            assert http.post(f"/api/runs/{run_id}/stop").status_code == 202
            wait_status(http, run_id, TERMINAL)
        page.wait_for_function("/^took \\d/.test(document.getElementById('run-clock').textContent)", timeout=30_000)
        seen.assert_clean(server.url)
