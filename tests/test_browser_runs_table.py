"""Organising runs (issue 14, item 4), in a real browser on a real ``gradwatch serve``: tags set on the run page filter
the runs table; 100 runs come in pages of 50; search narrows; a sweep shows as a group with a working compare link;
and the table is pushed, not polled: an idle page asks for nothing, and a run created through the API appears (and
changes status) without a reload."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from app.store import RunRecord, Store
from tests.browser import new_page, screenshot, watch
from tests.live_server import TINY_GAN, LiveServer, config, wait_for
from trainer.config import RunConfig

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.xdist_group("live-runs-table")

T0 = 1_764_000_000.0
SWEEP = "sweep0000001"
ROWS = '#runs-table tr[data-run]'


def _populate(data_dir: Path) -> tuple[list[str], list[str]]:
    """98 finished runs and a two-run g_loss sweep, newest last: 100 runs in all. Returns (plain ids, sweep ids)."""
    data_dir.mkdir(parents=True)
    store = Store(data_dir / "gradwatch.db")
    plain, sweep = [], []
    try:
        for i in range(98):
            cfg = RunConfig.model_validate({"name": f"bulk-{i:03d}", "train": {"steps": 100}})
            run_id = f"b{i:011x}"
            store.insert_run(RunRecord(id=run_id, name=cfg.name, kind="gan", status="completed", step=100,
                                       config=cfg.model_dump(mode="json"), created_at=T0 + i, ended_at=T0 + i))
            plain.append(run_id)
        for j, loss in enumerate(("saturating", "non_saturating")):
            cfg = RunConfig.model_validate({"name": f"twin · g_loss={loss}", "gan": {"g_loss": loss},
                                            "train": {"steps": 100}})
            run_id = f"s{j:011x}"
            store.insert_run(RunRecord(id=run_id, name=cfg.name, kind="gan", status="completed", step=100,
                                       config=cfg.model_dump(mode="json"), created_at=T0 + 1000 + j,
                                       sweep_id=SWEEP))
            sweep.append(run_id)
    finally:
        store.close()
    return plain, sweep


def _ids(page: Page) -> list[str]:
    ids: list[str] = page.eval_on_selector_all(ROWS, "rows => rows.map(r => r.dataset.run)")
    return ids


def _table_gets(seen_urls: list[str]) -> int:
    return sum("/ui/runs-table" in url for url in seen_urls)


def test_tags_filter_pages_search_sweeps_and_pushed_updates(chromium_browser: Browser, tmp_path: Path) -> None:
    plain, sweep = _populate(tmp_path / "data")
    with LiveServer(tmp_path / "data") as server, new_page(chromium_browser, server.url,
                                                           viewport={"width": 1400, "height": 900}) as page:
        seen = watch(page)
        page.goto("/")
        page.wait_for_function("window.gradwatch && window.gradwatch.changes.readyState === 1")

        # Pages: 50 rows of 100, newest first; the sweep (newest) is a group row naming what varies.
        assert "Showing 1–50 of 100 runs" in page.inner_text("#runs-summary")
        first = _ids(page)
        assert len(first) == 50 and first[:2] == [sweep[1], sweep[0]]
        head = page.locator(f'tr[data-sweep-head="{SWEEP}"]')
        assert "gan.g_loss: saturating, non_saturating" in head.inner_text()
        assert "2 runs" in head.inner_text() and "2 completed" in head.inner_text()
        screenshot(page, "runs-sweep-group")
        # Collapsing hides the sweep's runs, not its row.
        head.locator(".sweep-toggle").click()
        assert not page.is_visible(f'tr[data-run="{sweep[0]}"]') and head.is_visible()
        head.locator(".sweep-toggle").click()
        assert page.is_visible(f'tr[data-run="{sweep[0]}"]')

        # Compare selection survives paging.
        page.check(f'tr[data-run="{plain[97]}"] .compare-pick')
        page.click(".pager-next")
        page.wait_for_function("document.querySelector('#runs-summary').textContent.includes('51–100')")
        second = _ids(page)
        assert len(second) == 50 and not set(first) & set(second)
        assert set(first) | set(second) == set(plain) | set(sweep)
        assert "page=2" in page.url
        page.check(f'tr[data-run="{plain[0]}"] .compare-pick')
        assert page.input_value("#compare-runs") == f"{plain[97]},{plain[0]}"
        page.click(".pager-prev")
        page.wait_for_function("document.querySelector('#runs-summary').textContent.includes('1–50')")
        assert page.is_checked(f'tr[data-run="{plain[97]}"] .compare-pick')

        # Idle: nothing asks for the table (it used to be fetched every second).
        page.wait_for_timeout(500)
        before = _table_gets(seen.requests)
        page.wait_for_timeout(3000)
        assert _table_gets(seen.requests) == before, "the idle runs page fetched the table: it polls"

        # Search narrows, case-insensitively; the URL keeps it.
        page.fill("#filter-q", "BULK-07")
        page.wait_for_function("document.querySelector('#runs-summary').textContent.includes('of 10 matching')")
        assert sorted(_ids(page)) == sorted(plain[70:80]) and "q=BULK-07" in page.url
        page.reload()
        assert sorted(_ids(page)) == sorted(plain[70:80]) and page.input_value("#filter-q") == "BULK-07"

        # Tags set through the run page's editor: rename, add two tags, remove one, write notes.
        target = plain[90]  # on the first page
        page.goto(f"/runs/{target}")
        page.click("#rename-button")
        page.fill("#rename-input", "renamed <b>run</b>")
        page.press("#rename-input", "Enter")
        page.wait_for_selector("#run-name:has-text('renamed <b>run</b>')")
        meta = f"**/ui/runs/{target}/meta"
        page.fill("#tag-input", "keeper")
        with page.expect_response(meta):
            page.press("#tag-input", "Enter")
        page.wait_for_selector('#meta-tags .tag-chip[data-tag="keeper"]')
        page.fill("#tag-input", "scratch")
        with page.expect_response(meta):
            page.click("#tag-add")
        page.wait_for_selector('#meta-tags .tag-chip[data-tag="scratch"]')
        with page.expect_response(meta):
            page.click('#meta-tags .tag-chip[data-tag="scratch"] .tag-remove')
        page.wait_for_selector('#meta-tags .tag-chip[data-tag="keeper"]')
        assert page.locator('#meta-tags .tag-chip[data-tag="scratch"]').count() == 0
        page.fill("#tag-input", "no;way")
        with page.expect_response(meta) as refused:
            page.press("#tag-input", "Enter")
        assert refused.value.status == 422
        page.wait_for_selector("#tags-error")  # refused in place, the typed text kept
        assert "letters, digits" in page.inner_text("#tags-error") and page.input_value("#tag-input") == "no;way"
        page.fill("#tag-input", "")
        if not page.is_visible("#notes-input"):
            page.click("#meta-notes summary")
        page.fill("#notes-input", "D wins early; watch step 500.")
        page.click("#notes-save")
        page.wait_for_selector("#notes-saved")
        screenshot(page, "run-meta-editor")
        with server.client() as http:
            got = http.get(f"/api/runs/{target}").json()
        assert (got["name"], got["tags"], got["notes"]) == ("renamed <b>run</b>", ["keeper"],
                                                            "D wins early; watch step 500.")

        # ...then filter the runs table: clicking the tag chip shows only the tagged run.
        page.goto("/")
        page.click(f'tr[data-run="{target}"] a.tag-chip[data-tag="keeper"]')
        page.wait_for_function("document.querySelector('#runs-summary').textContent.includes('of 1 matching')")
        assert _ids(page) == [target] and "tag=keeper" in page.url
        assert page.input_value("#filter-tag") == "keeper"
        screenshot(page, "runs-filtered-by-tag")
        page.click("#filter-clear")
        page.wait_for_url(f"{server.url}/")
        assert len(_ids(page)) == 50
        page.fill("#filter-tag", "KEEPER")  # the tag filter field, case-insensitive
        page.wait_for_function("document.querySelector('#runs-summary').textContent.includes('of 1 matching')")
        assert _ids(page) == [target]

        # The sweep's compare link opens both runs on the compare page.
        page.goto("/")
        page.click(f'tr[data-sweep-head="{SWEEP}"] a.sweep-compare')
        page.wait_for_url("**/compare?runs=*")
        assert page.url.endswith(f"/compare?runs={sweep[0]},{sweep[1]}")
        for run_id in sweep:
            page.wait_for_selector(f'#compare-runs li[data-run="{run_id}"]')

        # Pushed: a run created through the API appears in an open runs page without a reload and without polling.
        page.goto("/")
        page.wait_for_function("window.gradwatch && window.gradwatch.changes.readyState === 1")
        page.wait_for_timeout(500)
        idle_from = _table_gets(seen.requests)
        page.wait_for_timeout(3000)
        assert _table_gets(seen.requests) == idle_from, "the idle runs page fetched the table: it polls"
        with server.client() as http:
            created = time.monotonic()
            run = http.post("/api/runs", json=config(TINY_GAN, name="pushed run", train__steps=200_000)).json()
            page.wait_for_selector(f'tr[data-run="{run["id"]}"]', timeout=5000)
            appeared = time.monotonic() - created
            # A status change is pushed too: running once its worker starts, then stopped.
            page.wait_for_selector(f'tr[data-run="{run["id"]}"][data-status="running"]', timeout=120_000)
            http.post(f"/api/runs/{run['id']}/stop")
            page.wait_for_selector(f'tr[data-run="{run["id"]}"][data-status="stopped"]', timeout=120_000)
            # A rename from the API is pushed as well.
            http.patch(f"/api/runs/{run['id']}", json={"name": "renamed by the API"})
            page.wait_for_selector(f'tr[data-run="{run["id"]}"] td.run-name a:has-text("renamed by the API")',
                                   timeout=5000)
        assert appeared < 5.0
        # The one refusal above was wanted (the browser logs every 4xx as an error).
        seen.console_errors = [m for m in seen.console_errors if not ("status of 422" in m and "/meta" in m)]
        seen.assert_clean(server.url)


def test_the_event_stream_does_not_hold_the_server_at_shutdown(tmp_path: Path) -> None:
    """uvicorn waits for streaming responses before it shuts down (up to its 15 s graceful timeout): an open
    runs-page stream must end as soon as the server is told to stop."""
    server = LiveServer(tmp_path / "data").start()
    try:
        events: list[str] = []
        ended = threading.Event()

        def listen() -> None:
            try:
                with httpx.stream("GET", server.url + "/api/runs/changes", timeout=60) as response:
                    assert response.headers["content-type"].startswith("text/event-stream")
                    for line in response.iter_lines():
                        events.append(line)
            except httpx.HTTPError:
                pass
            finally:
                ended.set()

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        wait_for(lambda: "event: hello" in events, 10, what="the stream's hello")
        started = time.monotonic()
        server.stop()
        took = time.monotonic() - started
        assert ended.wait(5) and took < 8.0, f"stopping took {took:.1f} s with a runs page open"
    finally:
        server.stop()
