"""The twin, explained on one page (issue 14, item 3), in a real browser on a real server.

A real saturation twin (the ring preset, launched as a two-run sweep over ``gan.g_loss``) opens on its compare
page with both runs' data planes side by side under one step slider; moving the slider changes the snapshot in
both planes. The caption says what the page shows and links to the maths, served by the app itself. An image run
pair gets its sample grids side by side, and keep_samples pruning leaves no slider position on a deleted grid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.browser import new_page, screenshot, watch
from tests.live_server import LiveServer, config, wait_status

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.xdist_group("browser")

TERMINAL = {"completed", "failed", "stopped", "interrupted"}
READY_MS = 120_000

# Each plane's shown snapshot: its url and step as the strip set them, and the step the FieldView drew.
PLANES_JS = """() => Array.from(document.querySelectorAll('#cmp-planes figure.plane')).map((f) => ({
  run: f.dataset.run, url: f.dataset.url || null, step: f.dataset.step ? Number(f.dataset.step) : null,
  drawn: f.querySelector('.plane-chart')?.dataset.step ?? f.querySelector('img')?.dataset.step ?? null,
  text: f.querySelector('.plane-step').textContent, title: f.querySelector('.plane-name').textContent,
  gloss: f.querySelector('code')?.textContent ?? null,
  img: f.querySelector('img') ? {src: f.querySelector('img').src, ok: f.querySelector('img').naturalWidth > 0} : null,
}))"""


def _sweep(server: LiveServer, base: dict[str, Any], vary: dict[str, list[Any]]) -> list[str]:
    with server.client() as http:
        response = http.post("/api/sweeps", json={"base": base, "vary": vary})
        assert response.status_code == 201, response.text
        ids = [run["id"] for run in response.json()["runs"]]
        for run_id in ids:
            assert wait_status(http, run_id, TERMINAL)["status"] == "completed"
    return ids


def _samples(server: LiveServer, run_id: str, suffix: str) -> list[int]:
    with server.client() as http:
        listing = http.get(f"/api/runs/{run_id}/samples").json()
    return [a["step"] for a in listing if a["name"].endswith(suffix)]


def _move(page: Page, index: int) -> None:
    page.eval_on_selector("#cmp-plane-slider", "(el, i) => { el.value = String(i); "
                          "el.dispatchEvent(new Event('input', {bubbles: true})); }", index)


def test_a_twin_shows_both_data_planes_under_one_slider_and_a_caption_that_links_to_the_maths(
        chromium_browser: Browser, server: LiveServer) -> None:
    with server.client() as http:
        ring = http.get("/api/presets").json()["ring8-saturating"]
    base = config(ring, train__steps=120, train__device="cpu", gan__d_head_start=40, model__width=32,
                  intervals__sample_every=30, intervals__eval_every=100_000, intervals__checkpoint_every=1000,
                  intervals__flush_ms=20, intervals__flush_steps=16)
    ids = _sweep(server, base, {"gan.g_loss": ["saturating", "non_saturating"]})
    steps = sorted(set(_samples(server, ids[0], ".json")) | set(_samples(server, ids[1], ".json")))
    assert len(steps) >= 3, steps

    with new_page(chromium_browser, server.url, viewport={"width": 1280, "height": 900}) as page:
        seen = watch(page)
        page.goto(f"/compare?runs={','.join(ids)}")
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=READY_MS)

        # Two planes, one per run, titled with the run's label and g_loss, following the newest step.
        assert page.locator("#cmp-planes figure.plane .plane-chart").count() == 2
        page.wait_for_function(f"""() => Array.from(document.querySelectorAll('#cmp-planes .plane-chart'))
            .every((c) => c.dataset.step === '{steps[-1]}')""", timeout=30_000)
        planes = page.evaluate(PLANES_JS)
        assert [p["run"] for p in planes] == ids
        assert sorted(p["gloss"] for p in planes) == ["non_saturating", "saturating"]
        assert all(p["step"] == steps[-1] and p["url"].endswith(".json") for p in planes)
        assert page.eval_on_selector("#cmp-plane-slider", "(el) => [Number(el.max), el.disabled]") == \
            [len(steps) - 1, False]
        before = {p["run"]: p["url"] for p in planes}
        screenshot(page, "compare-twin")

        # Moving the slider to the first position changes the snapshot in BOTH planes.
        _move(page, 0)
        page.wait_for_function(f"""() => Array.from(document.querySelectorAll('#cmp-planes .plane-chart'))
            .every((c) => c.dataset.step === '{steps[0]}')""", timeout=30_000)
        planes = page.evaluate(PLANES_JS)
        assert all(p["step"] == steps[0] and p["url"] != before[p["run"]] for p in planes), planes
        assert f"step {steps[0]:,}" in page.inner_text("#cmp-planes .plane-at")
        # Each plane really drew its snapshot: the heat map of D and four point/arrow traces.
        kinds = page.evaluate("() => Array.from(document.querySelectorAll('#cmp-planes .plane-chart'))"
                              ".map((c) => (c.data || []).map((t) => t.type))")
        assert all(k and k[0] == "heatmap" and len(k) == 5 for k in kinds), kinds
        screenshot(page, "compare-twin-first-step")

        # The caption: present, short, and its link opens the maths page of the app itself.
        caption = page.inner_text("#twin-caption")
        assert "shadow" in caption and "log(1 − D(G(z)))" in caption and "−log D(G(z))" in caption
        link = page.locator("#twin-caption a[href^='/guide/maths']")
        assert link.count() == 1
        with page.expect_navigation():
            link.click()
        assert page.url.startswith(f"{server.url.rstrip('/')}/guide/maths")
        assert page.locator("h1", has_text="The maths gradwatch implements").count() == 1
        assert page.locator('[id="2-the-two-generator-losses"]').count() == 1
        seen.assert_clean(server.url)

    with server.client() as http:
        assert http.get("/guide/maths", headers={"accept": "text/html"}).status_code == 200


def test_image_runs_show_their_sample_grids_side_by_side_and_pruned_grids_are_not_on_the_slider(
        chromium_browser: Browser, server: LiveServer) -> None:
    with server.client() as http:
        digits = http.get("/api/presets").json()["digits-gan"]
    base = config(digits, train__steps=40, train__device="cpu", train__batch_size=32, model__width=8,
                  intervals__sample_every=10, intervals__keep_samples=2, intervals__eval_every=100_000,
                  intervals__checkpoint_every=1000, intervals__hist_every=10)
    ids = _sweep(server, base, {"gan.lr_g": [0.0002, 0.001]})
    kept = sorted(set(_samples(server, ids[0], ".png")) | set(_samples(server, ids[1], ".png")))
    assert len(kept) == 3, kept  # the first grid and the newest two: the others were pruned on disk

    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto(f"/compare?runs={','.join(ids)}")
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=READY_MS)
        assert page.locator("#twin-caption").count() == 0  # not a twin: no caption
        page.wait_for_function("() => Array.from(document.querySelectorAll('#cmp-planes figure.plane img'))"
                               ".every((i) => !i.hidden && i.complete && i.naturalWidth > 0)", timeout=30_000)
        planes = page.evaluate(PLANES_JS)
        assert len(planes) == 2 and all(p["step"] == kept[-1] and p["img"]["ok"] for p in planes), planes
        assert page.eval_on_selector("#cmp-plane-slider", "(el) => Number(el.max)") == len(kept) - 1
        _move(page, 0)
        page.wait_for_function(f"() => Array.from(document.querySelectorAll('#cmp-planes figure.plane'))"
                               f".every((f) => f.dataset.step === '{kept[0]}')")
        page.wait_for_function("() => Array.from(document.querySelectorAll('#cmp-planes figure.plane img'))"
                               ".every((i) => i.complete && i.naturalWidth > 0)")
        screenshot(page, "compare-image-samples")
        seen.assert_clean(server.url)  # no request for a pruned grid (it would 404)


def test_live_runs_add_steps_and_the_slider_follows_the_newest_unless_moved(
        chromium_browser: Browser, server: LiveServer) -> None:
    with server.client() as http:
        ring = http.get("/api/presets").json()["ring8-saturating"]
    base = config(ring, train__steps=20_000, train__device="cpu", gan__d_head_start=20, model__width=16,
                  model__depth=2, intervals__sample_every=40, intervals__keep_samples=1000,
                  intervals__eval_every=100_000, intervals__checkpoint_every=100_000,
                  intervals__flush_ms=20, intervals__flush_steps=16)
    with server.client() as http:
        response = http.post("/api/sweeps", json={"base": base, "vary": {"gan.g_loss": ["saturating",
                                                                                        "non_saturating"]}})
        assert response.status_code == 201, response.text
        ids = [run["id"] for run in response.json()["runs"]]
    try:
        with new_page(chromium_browser, server.url) as page:
            seen = watch(page)
            page.goto(f"/compare?runs={','.join(ids)}")
            page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=READY_MS)
            # Following: as sample frames arrive the slider grows and sits on the newest step, in both planes.
            page.wait_for_function("() => Number(document.getElementById('cmp-plane-slider').max) >= 3",
                                   timeout=READY_MS)
            page.wait_for_function("""() => { const s = document.getElementById('cmp-plane-slider');
                return s.value === s.max; }""")
            grown = page.eval_on_selector("#cmp-plane-slider", "(el) => Number(el.max)")
            page.wait_for_function(f"() => Number(document.getElementById('cmp-plane-slider').max) > {grown}",
                                   timeout=READY_MS)
            assert page.eval_on_selector("#cmp-plane-slider", "(el) => el.value === el.max")
            # Moved away from the end: new steps extend the slider but leave the user's choice alone.
            _move(page, 0)
            first = page.eval_on_selector("#cmp-planes", "(el) => Number(el.dataset.step)")
            size = page.eval_on_selector("#cmp-plane-slider", "(el) => Number(el.max)")
            page.wait_for_function(f"() => Number(document.getElementById('cmp-plane-slider').max) > {size + 1}",
                                   timeout=READY_MS)
            assert page.eval_on_selector("#cmp-plane-slider", "(el) => Number(el.value)") == 0
            assert page.eval_on_selector("#cmp-planes", "(el) => Number(el.dataset.step)") == first
            planes = page.evaluate(PLANES_JS)
            assert all(p["step"] is not None and p["step"] <= first for p in planes), planes
            seen.assert_clean(server.url)
    finally:
        with server.client() as http:
            for run_id in ids:
                http.post(f"/api/runs/{run_id}/stop")
            for run_id in ids:
                wait_status(http, run_id, TERMINAL)
