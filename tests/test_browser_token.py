"""The dashboard behind an access token, in a real browser: the way in, and everything working once in.

A server bound off loopback requires a token (SPEC §7). The browser opens the
printed ``/?token=…`` address once and from then on rides an HttpOnly cookie:
pages, htmx fragments, the JSON the charts load and the run websocket must
all accept it, and a browser without it gets a page that says how to get in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.browser import new_page, screenshot, watch
from tests.live_server import TINY_GAN, LiveServer, config

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.xdist_group("browser")



@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("guarded"), "--host", "0.0.0.0", "--token", "generate").start()
    try:
        match = re.search(r"\?token=(\S+)", "".join(server.log))
        assert match, "a generated token is printed at start"
        server.token = match.group(1)
        yield server
    finally:
        server.stop()


def test_the_printed_address_logs_the_browser_in_and_the_live_page_works(
        chromium_browser: Browser, guarded: LiveServer) -> None:
    with guarded.client() as http:
        run_id = http.post("/api/runs", json=config(TINY_GAN, train__steps=120)).json()["id"]
    with new_page(chromium_browser, guarded.url) as page:
        # Without the cookie: a readable page, not JSON, and no dashboard.
        refused = page.goto("/")
        assert refused is not None and refused.status == 401
        assert "?token=" in page.inner_text("body") and page.locator("#launch-form").count() == 0
        # The printed address, once; from here on nothing may fail.
        seen = watch(page)
        page.goto(f"/?token={guarded.token}")
        assert page.url.rstrip("/") == guarded.url  # the token left the address bar
        page.wait_for_selector(f'#runs-table tr[data-run="{run_id}"]', timeout=30_000)
        assert all(c["name"] != "gradwatch_token" or c["httpOnly"] for c in page.context.cookies())
        # The run page: history and events over fetch, the live stream over the websocket, all on the cookie.
        page.goto(f"/runs/{run_id}")
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=30_000)
        page.wait_for_function("document.getElementById('run-status').textContent === 'completed'", timeout=300_000)
        # The server closed the stream normally after the last frame: the websocket was let in on the cookie.
        page.wait_for_function("document.getElementById('conn').textContent.includes('ended')", timeout=30_000)
        points = page.evaluate("window.gradwatch.charts.gnorm.lengths()[0]")
        assert points == 120  # every step of the run, from history and the stream together
        screenshot(page, "run-behind-token")
        seen.assert_clean(guarded.url)
