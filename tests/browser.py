"""Debian's chromium driven by Playwright, for tests that need a real browser.

Always the system chromium (``/usr/bin/chromium``, or ``GRADWATCH_CHROMIUM``):
``playwright install`` is never run. Without it a browser test skips locally
with the reason, and fails when ``CI`` is set, so CI can never go green by
skipping. Pair it with ``tests.live_server.LiveServer``::

    with chromium() as browser, new_page(browser, server.url) as page:
        seen = watch(page)
        page.goto("/docs")
        screenshot(page, "docs")
        seen.assert_clean(server.url)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Error, Page, Request

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: Playwright's own wait limit for every action and navigation on a page from ``new_page``.
TIMEOUT_MS = 15_000

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def chromium_path() -> str:
    return os.environ.get("GRADWATCH_CHROMIUM") or DEFAULT_CHROMIUM


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests need chromium and playwright in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_chromium() -> str:
    """The chromium executable; skips the test (fails it when ``CI`` is set) if it or playwright is missing."""
    path = chromium_path()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        _unavailable(f"no chromium at {path}: apt-get install -y chromium, or set GRADWATCH_CHROMIUM")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is missing: pip install -e '.[dev]'")
    return path


@contextmanager
def chromium(**launch: Any) -> Iterator[Browser]:
    """A headless Playwright ``Browser`` on the system chromium, closed however the block ends.

    ``launch`` goes to ``BrowserType.launch`` (e.g. ``slow_mo=250``); extra ``args``
    are added to ``CHROMIUM_ARGS``.
    """
    path = require_chromium()
    from playwright.sync_api import sync_playwright

    args = [*CHROMIUM_ARGS, *launch.pop("args", ())]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=args, **launch)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def new_page(browser: Browser, base_url: str | None = None, **context: Any) -> Iterator[Page]:
    """A ``Page`` in a fresh browser context (own cookies and storage), ``page.goto("/x")`` relative to ``base_url``."""
    if base_url is not None:
        context["base_url"] = base_url
    ctx = browser.new_context(**context)
    try:
        page = ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        yield page
    finally:
        ctx.close()


def screenshot(page: Page, name: str) -> Path:
    """A full-page PNG at ``test-artifacts/screenshots/<name>.png`` (repo root); returns its path.

    The viewport is first made as tall as the page: Chromium's full-page capture otherwise draws sticky
    elements (the top bar, the launch button row) where the viewport last was, over the content.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"screenshot name must be a plain file name, got {name!r}")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.evaluate("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
    width = (page.viewport_size or {"width": 1280})["width"]
    page.set_viewport_size({"width": width, "height": page.evaluate("document.documentElement.scrollHeight")})
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
    page.screenshot(path=str(path), full_page=True)
    return path


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


@dataclass
class PageWatch:
    """What a page did since ``watch(page)``: console errors, uncaught errors, every request, failed requests."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        """Everything that went wrong; a request aborted by navigating away (``net::ERR_ABORTED``) is not."""
        return ([f"console: {m}" for m in self.console_errors] + [f"pageerror: {m}" for m in self.page_errors]
                + [f"requestfailed: {m}" for m in self.failed_requests if "net::ERR_ABORTED" not in m])

    def offsite(self, base_url: str) -> list[str]:
        """Requests to any origin but ``base_url``'s (``data:`` and ``blob:`` URLs are local)."""
        home = _origin(base_url)
        return [url for url in self.requests
                if urlsplit(url).scheme not in ("data", "blob", "about") and _origin(url) != home]

    def assert_no_errors(self) -> None:
        errors = self.errors()
        assert not errors, "the page reported errors:\n" + "\n".join(errors)

    def assert_clean(self, base_url: str | None = None) -> None:
        """No errors, and (given ``base_url``) no request that left the server: no CDN, no phoning home."""
        self.assert_no_errors()
        if base_url is not None:
            offsite = self.offsite(base_url)
            assert not offsite, "requests to other hosts:\n" + "\n".join(offsite)


def watch(page: Page) -> PageWatch:
    """Start recording ``page``'s console errors, page errors and requests; call before ``page.goto``."""
    seen = PageWatch()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            location = message.location or {}
            where = f" ({location.get('url')}:{location.get('lineNumber')})" if location.get("url") else ""
            seen.console_errors.append(f"{message.text}{where}")

    def on_page_error(error: Error) -> None:
        seen.page_errors.append(f"{error.name}: {error.message}")

    def on_request(request: Request) -> None:
        seen.requests.append(request.url)

    def on_request_failed(request: Request) -> None:
        seen.failed_requests.append(f"{request.url} ({request.failure})")

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    page.on("request", on_request)
    page.on("requestfailed", on_request_failed)
    return seen
