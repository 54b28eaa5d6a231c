"""Chromium, Playwright and a live server together: the ground every browser test stands on.

The OpenAPI page is the app's one page that needs JavaScript before the web UI:
Swagger UI must render from the app's own files (fastapi-offline) and fetch
``/openapi.json``, with no request leaving the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser import new_page, screenshot, watch
from tests.live_server import LiveServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.xdist_group("browser")




def test_openapi_page_renders_offline_in_chromium(chromium_browser: Browser, server: LiveServer) -> None:
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto("/docs")
        # The title comes from /openapi.json: it shows only once Swagger UI's script ran and fetched the schema.
        page.locator(".swagger-ui .info .title").filter(has_text="gradwatch").wait_for()
        page.locator(".swagger-ui .opblock").first.wait_for()
        page.wait_for_load_state("networkidle")
        shot = screenshot(page, "openapi-docs")

        assert any(url.endswith("/openapi.json") for url in seen.requests), seen.requests
        seen.assert_clean(server.url)
    assert shot.is_file() and shot.stat().st_size > 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.parent == Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
