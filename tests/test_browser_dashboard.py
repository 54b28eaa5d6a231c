"""The dashboard end to end: Debian's Chromium (headless, Playwright) against a real server and real CPU workers.

Each test drives the pages as a user does (preset buttons, the launch form,
the flip and stop buttons, downloads, a reload) and checks what the page
shows against what the server knows. One server serves the whole module;
runs are kept to a few hundred or thousand steps so the file stays well
under four minutes on two cores. Every page is watched: a console error, an
uncaught exception or a request to another host fails the test.
"""

from __future__ import annotations

import csv
import io
import statistics
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
import torch

from tests.browser import new_page, screenshot, watch
from tests.live_server import TINY_GAN, LiveServer, config, wait_status
from trainer.config import RunConfig
from trainer.models import build_gan

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

pytestmark = pytest.mark.xdist_group("browser")

TERMINAL = {"completed", "stopped", "failed", "interrupted"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
XSS_NAME = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
#: Bound on waits for training to get somewhere. A bound on a hang, not a speed check: a worker trains at nice 10,
#: so on a CI machine that is busy (the slow preset tests in the other xdist worker, other jobs) it gets a small
#: share of two cores; once, under a busy loop, a 1,500-step twin took more than 90 s.
LONG_MS = 300_000

# The points of one trace of a LineChart, by its id (a metric key on the run page, `<run>:applied` on compare).
TRACE_JS = """([chart, id]) => {
  const c = window.gradwatch && window.gradwatch.charts[chart];
  if (!c || !c.ids.has(id)) return null;
  const t = c.el.data[c.ids.get(id)];
  return {x: Array.from(t.x), y: Array.from(t.y)};
}"""
# Points held by each run's `:applied` trace on the compare page (0 until the trace exists).
APPLIED_COUNTS_JS = """(ids) => {
  const c = window.gradwatch.charts.gnorm;
  const lengths = c.lengths();
  return ids.map((id) => c.ids.has(id + ':applied') ? lengths[c.ids.get(id + ':applied')] : 0);
}"""




def api_get(server: LiveServer, path: str) -> Any:
    with server.client() as http:
        response = http.get(path)
    assert response.status_code == 200, response.text
    return response.json()


def run_ids(server: LiveServer) -> set[str]:
    return {r["id"] for r in api_get(server, "/api/runs")}


def launch(server: LiveServer, cfg: dict[str, Any]) -> str:
    with server.client() as http:
        response = http.post("/api/runs", json=cfg)
    assert response.status_code == 201, response.text
    run_id: str = response.json()["id"]
    return run_id


def preset(server: LiveServer, name: str, **dotted: Any) -> dict[str, Any]:
    """A preset from GET /api/presets (what the server really ships), with ``train__steps=…`` overrides."""
    return config(api_get(server, "/api/presets")[name], **dotted)


def stop(server: LiveServer, run_id: str) -> None:
    with server.client() as http:
        if http.get(f"/api/runs/{run_id}").json()["status"] not in TERMINAL:
            http.post(f"/api/runs/{run_id}/stop")
        wait_status(http, run_id, TERMINAL)


def wait_ready(page: Page) -> None:
    """History loaded and the stream(s) open: run.js / compare.js set this last."""
    page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=30_000)


def trace(page: Page, chart: str, trace_id: str) -> dict[str, list[Any]] | None:
    result: dict[str, list[Any]] | None = page.evaluate(TRACE_JS, [chart, trace_id])
    return result


def fresh_form(page: Page) -> None:
    """Tag the current launch form, so a swap can be waited for (the tag is gone once htmx replaced it)."""
    page.evaluate("document.getElementById('launch-form').dataset.stale = '1'")


def load_preset(page: Page, key: str) -> Locator:
    """Click preset ``key`` on the launch page (opened on another preset first, so its values must really load) and
    return the launch form once htmx has swapped it in."""
    page.goto("/?preset=digits-gan")
    assert page.input_value('#launch-form input[name="twin"]') == "0"
    fresh_form(page)
    page.click(f'.preset[data-preset="{key}"]')
    page.wait_for_selector("#launch-form:not([data-stale])")
    return page.locator("#launch-form")


def test_grid_twin_preset_loads_the_grid_at_pacgans_scale_as_a_twin(chromium_browser: Browser,
                                                                     server: LiveServer) -> None:
    with new_page(chromium_browser, server.url) as page:
        form = load_preset(page, "grid-saturation-twin")
        assert form.locator('input[name="twin"]').input_value() == "1"
        assert form.locator('select[name="data.name"]').input_value() == "grid25"
        assert float(form.locator('input[name="data.scale"]').input_value()) == 1.0
        assert form.locator('select[name="gan.g_loss"]').input_value() == "saturating"
        assert form.locator('input[name="gan.d_head_start"]').input_value() == "500"
        assert "twin" in form.locator("#launch-button").inner_text().lower()
        assert "supports overlap" in page.locator('.preset[data-preset="grid-saturation-twin"]').inner_text()


def test_twin_preset_from_the_form_opens_compare_where_only_the_saturating_run_collapses(
        chromium_browser: Browser, server: LiveServer) -> None:
    before = run_ids(server)
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        form = load_preset(page, "saturation-twin")
        assert form.locator('input[name="twin"]').input_value() == "1"
        assert form.locator('select[name="kind"]').input_value() == "gan"
        assert form.locator('select[name="data.name"]').input_value() == "ring8"
        assert form.locator('select[name="gan.g_loss"]').input_value() == "saturating"
        assert form.locator('input[name="gan.d_head_start"]').input_value() == "500"
        assert "twin" in form.locator("#launch-button").inner_text().lower()

        form.locator('input[name="train.steps"]').fill("1500")
        page.click("#launch-button")
        page.wait_for_url("**/compare?runs=*")

        ids = parse_qs(urlsplit(page.url).query)["runs"][0].split(",")
        assert len(ids) == 2 and run_ids(server) - before == set(ids)
        configs = {i: api_get(server, f"/api/runs/{i}")["config"] for i in ids}
        by_loss = {cfg["gan"]["g_loss"]: i for i, cfg in configs.items()}
        assert set(by_loss) == {"saturating", "non_saturating"}
        sat, nonsat = by_loss["saturating"], by_loss["non_saturating"]
        for cfg in configs.values():  # the edited field and the preset's values both reached the server
            assert cfg["train"]["steps"] == 1500 and cfg["gan"]["d_head_start"] == 500
            assert cfg["train"]["seed"] == configs[sat]["train"]["seed"]

        wait_ready(page)
        first = page.evaluate(APPLIED_COUNTS_JS, ids)
        assert all(n < 1500 for n in first), first  # the workers had barely started when the page opened
        # Both applied-norm traces grow live, well past what the page held when it opened.
        page.wait_for_function(
            "([ids, first]) => { const c = window.gradwatch.charts.gnorm; const l = c.lengths();"
            " return ids.every((id, k) => c.ids.has(id + ':applied')"
            " && l[c.ids.get(id + ':applied')] >= Math.min(1500, Math.max(first[k] + 100, 300))); }",
            arg=[ids, first], timeout=LONG_MS, polling=200)

        chip_sat = page.locator(f'[data-alert-for="{sat}"][data-kind="gradient_collapse"]')
        chip_sat.wait_for(state="visible", timeout=LONG_MS)
        assert "gradient collapse" in chip_sat.inner_text()
        chip_nonsat = page.locator(f'[data-alert-for="{nonsat}"]')
        assert chip_nonsat.get_attribute("data-kind") is None and chip_nonsat.is_hidden()

        # Both runs end; every logged step (log_every=1) reached the chart, and the non-saturating run
        # never collapsed at all.
        for run_id in ids:
            page.locator(f'[data-status-for="{run_id}"]').filter(has_text="completed").wait_for(timeout=LONG_MS)
        page.wait_for_function(f"(ids) => ({APPLIED_COUNTS_JS})(ids).every((n) => n === 1500)",
                               arg=ids, timeout=30_000, polling=200)
        assert chip_nonsat.get_attribute("data-kind") is None and chip_nonsat.is_hidden()
        assert api_get(server, f"/api/runs/{nonsat}")["last_alert"] is None

        # The saturating run's shadow (what non_saturating would give) dwarfs its collapsed applied norm. The
        # default telemetry budget samples the shadow: compare it with the applied norm at the steps it was taken.
        applied = trace(page, "gnorm", f"{sat}:applied")
        shadow = trace(page, "gnorm", f"{sat}:shadow")
        assert applied is not None and shadow is not None
        applied_at = dict(zip(applied["x"], applied["y"], strict=True))
        ratios = [s / applied_at[x] for x, s in zip(shadow["x"], shadow["y"], strict=True)
                  if x > 1000 and applied_at.get(x) and s]
        assert len(ratios) >= 3 and statistics.median(ratios) > 100, ratios
        # Both streams were closed by the server once their runs ended.
        page.locator("#conn").filter(has_text="ended").wait_for(timeout=30_000)

        screenshot(page, "compare")
        seen.assert_clean(server.url)


def test_flipping_a_collapsed_run_to_non_saturating_revives_its_gradient(
        chromium_browser: Browser, server: LiveServer) -> None:
    # Long enough to still be running after the flip; stopped from the page at the end.
    run_id = launch(server, preset(server, "ring8-saturating", train__steps=20_000, train__device="cpu"))
    try:
        with new_page(chromium_browser, server.url) as page:
            seen = watch(page)
            page.goto(f"/runs/{run_id}")
            wait_ready(page)
            assert page.inner_text("#run-gloss") == "saturating"
            banner = page.locator('.alert-banner[data-kind="gradient_collapse"]')
            banner.wait_for(state="visible", timeout=LONG_MS)
            assert "flip to non_saturating" in banner.inner_text()

            applied = trace(page, "gnorm", "grad/g_norm")
            assert applied is not None and len(applied["y"]) >= 20
            collapsed = applied["y"][-1]
            early = statistics.mean(applied["y"][:10])
            assert 0 < collapsed < early / 100, (collapsed, early)
            assert page.evaluate("document.getElementById('chart-gnorm').layout.shapes || []") == []

            page.click("#flip-button")
            page.locator("#control-notice").filter(has_text="non_saturating").wait_for()
            page.locator("#run-gloss").filter(has_text="non_saturating").wait_for(timeout=30_000)
            assert page.inner_text("#flip-button").strip() == "Flip to saturating"

            # The chart marks the step where the change took effect...
            page.wait_for_function(
                "() => (document.getElementById('chart-gnorm').layout.shapes || []).length >= 1", timeout=30_000)
            flip_step = page.evaluate("document.getElementById('chart-gnorm').layout.shapes[0].x0")
            # ...and the applied norms after it are the non-saturating one's: orders of magnitude larger. (Not
            # every one: G's first big steps can land a batch where D already says "real", whose 1 - D(G(z))
            # and so its gradient are small again for a step; the flip's step depends on the click's timing.)
            page.wait_for_function(
                "([step]) => { const c = window.gradwatch.charts.gnorm; const t = c.el.data[c.ids.get('grad/g_norm')];"
                " return Array.from(t.x).filter((x) => x > step).length >= 50; }",
                arg=[flip_step], timeout=30_000, polling=200)
            applied = trace(page, "gnorm", "grad/g_norm")
            assert applied is not None
            after = [y for x, y in zip(applied["x"], applied["y"], strict=True) if x > flip_step][:50]
            assert statistics.median(after) > 100 * collapsed, (after, collapsed)

            # A field snapshot taken after the flip...
            page.wait_for_function("(step) => Number(document.getElementById('chart-field').dataset.step) > step",
                                   arg=flip_step, timeout=LONG_MS, polling=200)

            page.click("#stop-button")
            page.locator("#control-notice").filter(has_text="Stopping").wait_for()
            page.locator("#run-status").filter(has_text="stopped").wait_for(timeout=LONG_MS)
            assert page.is_disabled("#flip-button") and page.is_disabled("#stop-button")
            # ...and, the run at rest, the field shows the newest one, for the screenshot.
            page.wait_for_function(
                "() => { const s = window.gradwatch.sampleSteps; const el = document.getElementById('chart-field');"
                " return s.length && Number(el.dataset.step) === s[s.length - 1].step && el.data.length === 5; }",
                timeout=30_000, polling=200)
            screenshot(page, "run-gan-2d")
            seen.assert_clean(server.url)
    finally:
        stop(server, run_id)


def test_the_2d_data_plane_shows_the_whole_snapshot(chromium_browser: Browser, server: LiveServer) -> None:
    run_id = launch(server, TINY_GAN)
    with server.client() as http:
        assert wait_status(http, run_id, TERMINAL)["status"] == "completed"
    snapshot = api_get(server, f"/api/runs/{run_id}/samples/step_00000200.json")
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto(f"/runs/{run_id}")
        wait_ready(page)
        # The newest snapshot is drawn: heat map, real, generated and both arrow sets.
        window = page.wait_for_function(
            "() => { const el = document.getElementById('chart-field');"
            " return el.dataset.step === '200' && el.data && el.data.length === 5"
            " ? [el.layout.xaxis.range, el.layout.yaxis.range] : null; }").json_value()
        seen.assert_clean(server.url)
    (x0, x1), (y0, y1) = window
    real_x = [p[0] for p in snapshot["real"]]
    real_y = [p[1] for p in snapshot["real"]]
    # Every real point, all eight modes of the ring, lies inside the drawn window...
    assert x0 <= min(real_x) and max(real_x) <= x1 and y0 <= min(real_y) and max(real_y) <= y1, window
    # ...which is the snapshot's own extent (the fixed window field.js asks for).
    assert [x0, x1, y0, y1] == pytest.approx(snapshot["extent"], abs=1e-6), (window, snapshot["extent"])


def test_an_invalid_field_is_named_beside_its_input_and_nothing_is_launched(
        chromium_browser: Browser, server: LiveServer) -> None:
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto("/?preset=ring8-non-saturating")
        before = run_ids(server)

        page.fill('#launch-form input[name="gan.lr_g"]', "-0.001")
        fresh_form(page)
        with page.expect_response(lambda r: r.url.endswith("/ui/runs") and r.request.method == "POST") as answer:
            page.click("#launch-button")
        assert answer.value.status == 422
        page.wait_for_selector("#launch-form:not([data-stale])")
        assert page.locator('[data-testid="form-errors"]').is_visible()
        error = page.locator('[data-error-for="gan.lr_g"]')
        assert error.is_visible() and "greater than 0" in error.inner_text()
        lr_g = page.locator('#launch-form input[name="gan.lr_g"]')
        assert lr_g.get_attribute("aria-invalid") == "true"
        assert lr_g.input_value() == "-0.001"  # what the user typed is kept, to be fixed
        page.wait_for_function("() => document.activeElement && document.activeElement.name === 'gan.lr_g'")
        assert page.locator("[data-error-for]").count() == 1  # only the bad field is blamed
        assert urlsplit(page.url).path == "/"
        assert run_ids(server) == before

        # A value that is not a number at all. A number input cannot hold "abc", so it is made a text
        # input first: this is what a hand-made request sends, and the server must name the field.
        page.fill('#launch-form input[name="gan.lr_g"]', "0.001")
        page.eval_on_selector('#launch-form input[name="train.steps"]', "el => { el.type = 'text'; }")
        page.fill('#launch-form input[name="train.steps"]', "abc")
        fresh_form(page)
        with page.expect_response(lambda r: r.url.endswith("/ui/runs") and r.request.method == "POST") as answer:
            page.click("#launch-button")
        assert answer.value.status == 422
        page.wait_for_selector("#launch-form:not([data-stale])")
        assert page.locator('[data-error-for="train.steps"]').is_visible()
        assert page.locator('#launch-form input[name="train.steps"]').get_attribute("aria-invalid") == "true"
        assert page.locator('[data-error-for="gan.lr_g"]').count() == 0
        assert page.locator('#launch-form input[name="gan.lr_g"]').get_attribute("aria-invalid") is None
        assert run_ids(server) == before
        # Chromium logs every 4xx response to the console; the two refusals asked for here are the feature
        # under test, not a page error. Exactly those two are set aside, anything else still fails.
        refused = [m for m in seen.console_errors
                   if "status of 422" in m and urlsplit(m.rsplit("(", 1)[-1]).path.startswith("/ui/runs")]
        assert len(refused) == 2, seen.console_errors
        seen.console_errors = [m for m in seen.console_errors if m not in refused]
        seen.assert_clean(server.url)


def test_checkpoint_sample_and_csv_download_from_the_run_page(
        chromium_browser: Browser, server: LiveServer) -> None:
    run_id = launch(server, TINY_GAN)
    with server.client() as http:
        assert wait_status(http, run_id, TERMINAL)["status"] == "completed"
    with new_page(chromium_browser, server.url, accept_downloads=True) as page:
        seen = watch(page)
        page.goto(f"/runs/{run_id}")
        wait_ready(page)

        checkpoint = page.locator('#downloads a[data-kind="checkpoint"]').first
        assert checkpoint.get_attribute("download") is not None
        with page.expect_download() as got:
            checkpoint.click()
        download = got.value
        assert download.failure() is None
        assert download.suggested_filename == checkpoint.inner_text() == "step_00000200.pt"  # newest first
        state = torch.load(download.path(), weights_only=True)
        assert state["format"] == 1 and state["kind"] == "gan" and state["step"] == 200
        cfg = RunConfig.model_validate(state["config"])
        assert cfg.model_dump(mode="json") == api_get(server, f"/api/runs/{run_id}")["config"]
        g, d = build_gan(cfg.model, (2,))
        g.load_state_dict(state["models"]["generator"])  # strict: every tensor present with its shape
        d.load_state_dict(state["models"]["discriminator"])
        assert set(state["optimizers"]) == {"generator", "discriminator"}

        sample = page.locator('#downloads a[data-kind="sample"][href$=".png"]').first
        with page.expect_download() as got:
            sample.click()
        blob = got.value.path().read_bytes()
        assert blob[:8] == PNG_SIGNATURE and len(blob) > 1000
        assert got.value.suggested_filename.endswith(".png")

        with page.expect_download() as got:
            page.click('#downloads a[data-kind="csv"]')
        rows = list(csv.DictReader(io.StringIO(got.value.path().read_text(encoding="utf-8"))))
        assert [int(r["step"]) for r in rows] == list(range(1, 201))
        assert all(float(r["grad/g_norm"]) > 0 for r in rows)
        seen.assert_clean(server.url)


def test_the_downloads_list_catches_up_with_a_runs_final_artifacts(
        chromium_browser: Browser, server: LiveServer) -> None:
    # Artifacts come in two bursts a few steps apart (step 590, then the final ones at 600), far from everything else.
    run_id = launch(server, config(TINY_GAN, train__steps=600, intervals__sample_every=590,
                                   intervals__checkpoint_every=590))
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto(f"/runs/{run_id}")
        wait_ready(page)
        assert page.evaluate("window.gradwatch.state.step") < 590, "the page must be open before the first artifact"
        page.locator("#run-status").filter(has_text="completed").wait_for(timeout=LONG_MS)
        detail = api_get(server, f"/api/runs/{run_id}")
        expected = sorted(a["name"] for a in detail["samples"] + detail["checkpoints"])
        assert "step_00000600.pt" in expected and "step_00000600.png" in expected
        shown_js = ("() => [...document.querySelectorAll("
                    "'#downloads a[data-kind=\"sample\"], #downloads a[data-kind=\"checkpoint\"]')]"
                    ".map((a) => a.textContent).sort()")
        try:
            page.wait_for_function(f"(expected) => JSON.stringify(({shown_js})()) === JSON.stringify(expected)",
                                   arg=expected, timeout=5_000, polling=200)
        finally:
            shown = page.evaluate(shown_js)
        assert shown == expected
        seen.assert_clean(server.url)


def test_reload_mid_run_restores_every_step_with_no_gap(chromium_browser: Browser, server: LiveServer) -> None:
    # 2000 logged steps stay within the page's 2000-point history limit: no downsampling may excuse a gap.
    # A wider model and a larger batch make each step ~15–30 ms instead of TINY_GAN's ~3: the run must outlast a
    # reload and 300 more live steps however fast the worker's telemetry is.
    run_id = launch(server, config(TINY_GAN, train__steps=2000, model__width=512, train__batch_size=512))
    try:
        with new_page(chromium_browser, server.url) as page:
            seen = watch(page)
            page.goto(f"/runs/{run_id}")
            wait_ready(page)
            page.wait_for_function(
                "() => { const c = window.gradwatch.charts.gnorm;"
                " return c.ids.has('grad/g_norm') && c.lengths()[c.ids.get('grad/g_norm')] > 100; }",
                timeout=LONG_MS, polling=200)
            newest_sample = page.get_attribute('#downloads a[data-kind="sample"]', "href")

            page.reload()
            wait_ready(page)
            assert page.evaluate("window.gradwatch.state.step") > 0
            at_ready = trace(page, "gnorm", "grad/g_norm")
            assert at_ready is not None and at_ready["x"], "the reloaded page restored no history"
            last_at_ready = at_ready["x"][-1]
            # A few more seconds of live data on top of the restored history.
            page.wait_for_function(
                "(last) => { const c = window.gradwatch.charts.gnorm; const t = c.el.data[c.ids.get('grad/g_norm')];"
                " return t.x[t.x.length - 1] >= last + 300; }",
                arg=last_at_ready, timeout=LONG_MS, polling=200)
            assert api_get(server, f"/api/runs/{run_id}")["status"] == "running", "the run ended too soon to test"

            applied = trace(page, "gnorm", "grad/g_norm")
            assert applied is not None
            steps = applied["x"]
            assert steps[0] == 1 and steps == list(range(steps[0], steps[-1] + 1)), "gap or duplicate after reload"
            assert steps[-1] >= last_at_ready + 300
            assert all(isinstance(y, float) and y > 0 for y in applied["y"])
            assert int(page.inner_text("#run-step").replace(",", "")) >= last_at_ready
            # The downloads list follows the run live (htmx refresh on each new sample).
            page.wait_for_function(
                "(old) => { const a = document.querySelector('#downloads a[data-kind=\"sample\"]');"
                " return a && a.getAttribute('href') !== old; }",
                arg=newest_sample, timeout=30_000, polling=200)
            seen.assert_clean(server.url)
    finally:
        stop(server, run_id)


def test_a_hostile_run_name_is_shown_as_text_everywhere(chromium_browser: Browser, server: LiveServer) -> None:
    pwned = "() => typeof window.__pwned === 'undefined' && !document.querySelector('img[src=\"x\"]')"
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto("/?preset=ring8-non-saturating")
        page.fill('#launch-form input[name="name"]', XSS_NAME)
        page.fill('#launch-form input[name="train.steps"]', "200")
        page.click("#launch-button")
        page.wait_for_url("**/runs/*")
        run_id = urlsplit(page.url).path.rsplit("/", 1)[1]
        assert api_get(server, f"/api/runs/{run_id}")["name"] == XSS_NAME
        wait_ready(page)
        assert page.inner_text("#run-name") == XSS_NAME
        assert page.title().startswith(XSS_NAME)
        assert page.evaluate(pwned)

        page.goto("/")
        link = page.locator(f'#runs-table tr[data-run="{run_id}"] td.run-name a')
        link.wait_for()
        assert link.inner_text() == XSS_NAME
        assert page.evaluate(pwned)

        page.goto(f"/compare?runs={run_id}")
        wait_ready(page)
        assert page.inner_text(f'#compare-runs li[data-run="{run_id}"] a') == XSS_NAME
        # The chart legend (Plotly renders a little HTML there) gets it once its traces exist.
        page.wait_for_function(
            "(id) => window.gradwatch.charts.gnorm.ids.has(id + ':applied')", arg=run_id, timeout=LONG_MS)
        legend = page.locator("#cmp-gnorm .legendtext").first
        legend.wait_for()
        assert "<script>" in legend.text_content()
        assert page.evaluate(pwned)
        with server.client() as http:
            wait_status(http, run_id, TERMINAL)
        seen.assert_clean(server.url)


def test_digits_gan_vae_and_runs_pages_render_samples_evaluations_and_kl(
        chromium_browser: Browser, server: LiveServer) -> None:
    intervals = {"intervals__sample_every": 100, "intervals__eval_every": 150, "intervals__checkpoint_every": 150}
    gan_id = launch(server, preset(server, "digits-gan", train__steps=300, **intervals))
    vae_cfg = preset(server, "digits-vae", train__steps=300, **intervals)
    vae_id = launch(server, vae_cfg)
    with new_page(chromium_browser, server.url, viewport={"width": 1400, "height": 900}) as page:
        seen = watch(page)
        page.goto("/")
        # The server pushes the table's changes: both rows reach "completed" with no reload.
        for run_id in (gan_id, vae_id):
            page.wait_for_selector(f'#runs-table tr[data-run="{run_id}"][data-status="completed"]', timeout=LONG_MS)
        assert page.locator("#runs-table tr[data-run]").count() == len(run_ids(server))
        # Picking runs enables "Compare selected", and the pick survives the table's refreshes.
        assert page.is_disabled("#compare-button")
        page.check(f'#runs-table tr[data-run="{gan_id}"] .compare-pick')
        page.evaluate("document.querySelector('#runs-table table').dataset.stale = '1'")
        server.client().patch(f"/api/runs/{vae_id}", json={"notes": "a change the server pushes"}).raise_for_status()
        page.wait_for_selector("#runs-table table:not([data-stale])")  # the table was drawn again, by the push
        assert page.is_checked(f'#runs-table tr[data-run="{gan_id}"] .compare-pick')
        assert page.is_enabled("#compare-button") and page.input_value("#compare-runs") == gan_id
        screenshot(page, "runs")
        seen.assert_clean(server.url)

    with new_page(chromium_browser, server.url, viewport={"width": 1400, "height": 900}) as page:
        seen = watch(page)
        page.goto(f"/runs/{gan_id}")
        wait_ready(page)
        image = ("() => { const i = document.getElementById('sample-img');"
                 " return i && !i.hidden && i.complete && i.naturalWidth > 0; }")
        page.wait_for_function(image)
        assert page.get_attribute("#sample-img", "data-step") == "300"
        assert page.get_attribute("#sample-img", "src").endswith("/samples/step_00000300.png")
        # The slider walks back through the sample grids.
        page.fill("#sample-slider", "0")
        page.wait_for_function("() => document.getElementById('sample-img').dataset.step === '100'")
        page.wait_for_function(image)
        assert "1 of 3" in page.inner_text("#sample-label")
        page.fill("#sample-slider", "2")
        page.wait_for_function(image)
        rows = page.locator("#eval-table tr[data-key]")
        rows.first.wait_for()
        classes = page.locator('#eval-table tr[data-key="eval/classes"]')
        assert "step 300" in classes.inner_text()
        assert 1 <= float(classes.locator("td.num").inner_text()) <= 10
        screenshot(page, "run-digits-gan")
        seen.assert_clean(server.url)

    latent_dim = vae_cfg["model"]["latent_dim"]
    with new_page(chromium_browser, server.url, viewport={"width": 1400, "height": 900}) as page:
        seen = watch(page)
        page.goto(f"/runs/{vae_id}")
        wait_ready(page)
        bars = page.wait_for_function(
            "() => { const d = document.getElementById('chart-kldim').data;"
            " return d && d.length === 1 && d[0].type === 'bar' && d[0].x.length"
            " ? {x: Array.from(d[0].x), y: Array.from(d[0].y)} : null; }")
        bar = bars.json_value()
        assert bar["x"] == list(range(latent_dim)) and all(v >= 0 for v in bar["y"])
        elbo = trace(page, "elbo", "loss/elbo")
        assert elbo is not None and elbo["x"] == list(range(1, 301))
        page.wait_for_function(
            "() => { const i = document.getElementById('sample-img'); return i.complete && i.naturalWidth > 0; }")
        assert page.locator('#eval-table tr[data-key="eval/active_units"]').count() == 1
        screenshot(page, "run-vae")
        seen.assert_clean(server.url)


def test_the_sample_slider_walks_only_the_grids_the_run_kept(chromium_browser: Browser, server: LiveServer) -> None:
    """keep_samples prunes old grids (issue 12, item 7); the slider must not offer their missing files (a 404)."""
    run_id = launch(server, preset(server, "digits-gan", train__steps=200, intervals__sample_every=50,
                                   intervals__keep_samples=2, intervals__eval_every=1000,
                                   intervals__checkpoint_every=1000))
    with server.client() as http:
        assert wait_status(http, run_id, TERMINAL)["status"] == "completed"
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto(f"/runs/{run_id}")
        wait_ready(page)
        loaded = ("(step) => { const i = document.getElementById('sample-img');"
                  " return i && !i.hidden && i.complete && i.naturalWidth > 0 && i.dataset.step === step; }")
        page.wait_for_function(loaded, arg="200")
        assert "3 of 3" in page.inner_text("#sample-label")
        for index, step in enumerate(["50", "150", "200"]):  # the first grid and the newest two
            page.fill("#sample-slider", str(index))
            page.wait_for_function(loaded, arg=step)
        seen.assert_clean(server.url)
