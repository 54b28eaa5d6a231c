"""A user's own script in the dashboard: Debian's Chromium against a real server and a real script subprocess.

The scripts use gradwatch's public API only (tests/scripts/). What is checked is what a user of the dashboard sees:
charts for keys the dashboard did not plan for, growing live; where the run came from and its free-form config in
the header; only the controls the script registered; a script's GAN with the same panels as a built-in GAN run.
Every wait is for a condition, bounded generously (a busy CI machine is slow, not wrong).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser import new_page, screenshot, watch
from tests.live_server import ROOT, RUN_WAIT_S, LiveServer, wait_for, wait_status

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.xdist_group("browser-client")

SCRIPTS = ROOT / "tests" / "scripts"
TERMINAL = {"completed", "stopped", "failed", "interrupted"}
LONG_MS = int(RUN_WAIT_S * 1000)

# Points the run page holds for one key of a generic chart (0 until its chart exists).
EXTRA_POINTS_JS = "(key) => (window.gradwatch && window.gradwatch.extra ? window.gradwatch.extra.points(key) : 0)"
# Points per built-in chart: {chart: [points per trace]}.
LENGTHS_JS = """() => Object.fromEntries(Object.entries(window.gradwatch.charts)
  .filter(([, c]) => typeof c.lengths === "function").map(([name, c]) => [name, c.lengths()]))"""


def script_env(server: LiveServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GRADWATCH_URL": server.url})
    if server.token:
        env["GRADWATCH_TOKEN"] = server.token
    return env


@contextmanager
def script(server: LiveServer, cwd: Path, name: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A user's script streaming to ``server``, killed however the test ends."""
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / name), *args], cwd=cwd, env=script_env(server),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        if proc.stderr:
            proc.stderr.close()


def run_named(server: LiveServer, name: str) -> dict[str, Any] | None:
    with server.client() as http:
        runs = [r for r in http.get("/api/runs").json() if r["name"] == name]
    return runs[0] if runs else None


def wait_ready(page: Page) -> None:
    page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=30_000)


def extra_points(page: Page, key: str) -> int:
    points: int = page.evaluate(EXTRA_POINTS_JS, key)
    return points


def test_a_scripts_own_metrics_chart_live_with_its_source_config_and_only_its_controls(
        chromium_browser: Browser, server: LiveServer, tmp_path: Path) -> None:
    stop_file = tmp_path / "watch-stop"
    name = "my-own-script"
    with script(server, tmp_path, "client_metrics.py", "--steps", "3000", "--pace", "0.05", "--name", name,
                "--stop-file", str(stop_file)) as proc:
        run = wait_for(lambda: (r := run_named(server, name)) and r["step"] >= 5 and r, RUN_WAIT_S,
                       0.2, "the script's run to pass step 5")
        assert run["device"] == "script" and run["kind"] == "custom" and run["controls"] == []
        with new_page(chromium_browser, server.url) as page:
            seen = watch(page)
            page.goto(f"/runs/{run['id']}")
            wait_ready(page)

            # my/metric gets a chart of its own group ("my/…"), drawn from history, then growing from the stream.
            page.wait_for_function(f"() => ({EXTRA_POINTS_JS})('my/metric') > 0", timeout=LONG_MS)
            first = extra_points(page, "my/metric")
            page.wait_for_function(f"(n) => ({EXTRA_POINTS_JS})('my/metric') > n + 5", arg=first,
                                   timeout=LONG_MS, polling=200)
            assert proc.poll() is None, "the script must still be running: the points came live"
            assert extra_points(page, "my/metric") > first
            groups = page.eval_on_selector_all(".extra-panel", "els => els.map((e) => e.dataset.group)")
            assert groups[0] == "my"  # val/… and epoch come every 10 steps: maybe not yet
            page.wait_for_function(f"() => ({EXTRA_POINTS_JS})('epoch') > 0 && ({EXTRA_POINTS_JS})('val/acc') > 0",
                                   timeout=LONG_MS)
            assert page.eval_on_selector_all(".extra-panel", "els => els.map((e) => e.dataset.group)") == [
                "my", "val", "other"]
            legend = page.evaluate("() => window.gradwatch.extra.charts.get('my').el.data.map((t) => t.name)")
            assert legend == ["metric", "other"]

            # The header says where the run came from, and shows its config as text.
            assert page.inner_text("#source-script") == "client_metrics.py"
            assert "--stop-file" in page.inner_text("#source-argv")
            assert page.get_attribute("#run-source", "data-origin") == "script"
            config = page.locator("#script-config")
            assert config.is_visible()
            rows = dict(page.eval_on_selector_all(
                "#script-config tr", "rows => rows.map((r) => [r.cells[0].textContent, r.cells[1].textContent])"))
            assert rows["model.width"] == "64" and rows["optimizer"] == "adam" and rows["lr"] == "0.003"
            assert rows["note"] == "<b>not bold</b>"  # shown as typed, not as markup
            assert page.locator("#script-config b").count() == 0

            # It never checked run.stop_requested, and watches no model: no Stop, no live-change form.
            assert not page.is_visible("#stop-button")
            assert page.locator("#control-form").count() == 0 and page.locator("#flip-button").count() == 0

            # Its images, under two labels: a picker chooses which the slider walks, the label is said.
            page.wait_for_function("() => document.getElementById('sample-pick').options.length === 2",
                                   timeout=LONG_MS)
            assert page.is_visible("#sample-panel") and page.is_visible("#sample-img")
            assert page.get_attribute("#sample-img", "data-label") == "samples"
            page.select_option("#sample-pick", "recon")
            page.wait_for_function("() => document.getElementById('sample-img').dataset.label === 'recon'")
            assert "recon" in page.inner_text("#sample-label")
            page.wait_for_function("() => { const i = document.getElementById('sample-img');"
                                   " return i.complete && i.naturalWidth > 0; }")

            # Now the script checks run.stop_requested and changes its config: its capabilities frame shows Stop,
            # its config frame the new value, live; and Stop works.
            stop_file.write_text("")
            page.locator("#stop-button").wait_for(state="visible", timeout=LONG_MS)
            page.locator("#script-config th").filter(has_text="phase").wait_for(timeout=LONG_MS)
            assert "stoppable" in page.inner_text("#script-config")
            screenshot(page, "run-script-custom")
            page.click("#stop-button")
            page.locator("#control-notice").filter(has_text="Stopping").wait_for()
            page.locator("#run-status").filter(has_text="stopped").wait_for(timeout=LONG_MS)
            assert proc.wait(60) == 0
            seen.assert_clean(server.url)
        with server.client() as http:
            assert wait_status(http, run["id"], TERMINAL)["status"] == "stopped"


def test_a_scripts_gan_shows_the_gan_panels_with_data(
        chromium_browser: Browser, server: LiveServer, tmp_path: Path) -> None:
    name = "script-gan-panels"
    with script(server, tmp_path, "client_gan.py", "--steps", "30", "--name", name) as proc:
        assert proc.wait(RUN_WAIT_S) == 0, proc.stderr.read() if proc.stderr else ""
    run = run_named(server, name)
    assert run is not None
    with server.client() as http:
        detail = wait_status(http, run["id"], TERMINAL)
    assert detail["status"] == "completed" and detail["kind"] == "gan"
    with new_page(chromium_browser, server.url) as page:
        seen = watch(page)
        page.goto(f"/runs/{run['id']}")
        wait_ready(page)
        page.wait_for_function("() => window.gradwatch.charts.layers.lengths().length >= 4", timeout=30_000)
        lengths = page.evaluate(LENGTHS_JS)
        # Losses (4 keys), the applied / saturating / non-saturating / D norms, D(x) and D(G(z)), per-layer norms:
        # every step of the run, as on a built-in GAN run's page.
        assert lengths["losses"] == [30] * 4, lengths
        assert lengths["gnorm"] == [30] * 4 and lengths["dprob"] == [30] * 2, lengths
        assert lengths["layers"] == [30] * 4, lengths
        sat_names = page.evaluate("() => window.gradwatch.charts.gnorm.el.data.map((t) => t.name)")
        assert {"applied", "saturating", "non-saturating"} <= set(sat_names)
        # The saturation panel: per-sample points from the newest dldh frame, histograms of both logits.
        page.wait_for_function("() => { const d = document.getElementById('chart-saturation').data || [];"
                               " return d.some((t) => t.name === 'measured, saturating' && t.x.length > 0)"
                               " && d.filter((t) => t.type === 'bar').length === 2; }", timeout=30_000)
        assert page.evaluate("window.gradwatch.state.gLoss") == "non_saturating"  # told by its norms
        assert page.inner_text("#run-gloss") == "non_saturating"
        assert page.get_attribute("#sample-img", "data-step") == "20"
        # Its own key, outside SPEC §2, has a chart too; the SPEC keys have none besides their panels.
        assert extra_points(page, "my/metric") == 30
        groups = page.eval_on_selector_all(".extra-panel", "els => els.map((e) => e.dataset.group)")
        assert groups == ["my"]
        # Every control registered (watch_gan got both optimisers; the script checks stop_requested): all shown,
        # disabled now that the run has ended.
        for selector in ("#stop-button", "#flip-button", "#control-gloss", 'input[name="lr_g"]', 'input[name="lr_d"]'):
            assert page.is_visible(selector), selector
        assert page.is_disabled("#stop-button") and page.is_disabled("#flip-button")
        assert page.inner_text("#source-script") == "client_gan.py"
        screenshot(page, "run-script-gan")
        seen.assert_clean(server.url)

        # The compare page charts the script's own keys too, beside the GAN panels.
        page.goto(f"/compare?runs={run['id']}")
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=30_000)
        page.wait_for_function("(id) => window.gradwatch.extra.points(id + ':my/metric') === 30", arg=run["id"],
                               timeout=30_000)
        keys = page.eval_on_selector_all(".extra-panel", "els => els.map((e) => e.dataset.group)")
        assert keys == ["my/metric", "my/step_squared"]
        # Drawn in SVG: a browser keeps about 16 WebGL contexts and blanks the oldest chart beyond that, which
        # a script logging many keys would do to the gradient-norm chart (seen with five extra keys).
        types = page.evaluate(
            "() => [...window.gradwatch.extra.charts.values()].flatMap((c) => c.el.data.map((t) => t.type))")
        assert types and set(types) == {"scatter"}
        assert page.evaluate("() => window.gradwatch.charts.gnorm.lengths()") == [30, 30]
        seen.assert_clean(server.url)
