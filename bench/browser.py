"""Browser: the JavaScript time the run page spends per incoming frame, with 1k, 10k and 100k points per line.

Visdom's append cost grew from 0.37 ms to 12 ms between 500 and 20k points
because it resent whole plots; gradwatch's page appends (``static/js/charts.js``:
points queued per trace, one ``Plotly.extendTraces`` per chart per animation
frame). This measures whether that stays flat as the lines grow.

Headless Chromium (Debian's, driven by Playwright) opens a real run page
(``/runs/{id}``) on a real ``gradwatch serve``. The page's own frame handler,
``window.gradwatch.onFrame`` (the one its websocket calls), is then fed
``--frames`` metrics frames of ``--steps-per-frame`` (16) steps × every key of
a ring8 GAN run (26 keys across the four line charts), generated in the page.
Per frame, with ``performance.now()``:

- **handler**: the ``onFrame`` call (routing points into each chart's queue);
- **flush**: the animation-frame callback that hands the queues to
  ``Plotly.extendTraces``, timed between a ``requestAnimationFrame`` callback
  registered before the frame and one registered after it (callbacks run in
  registration order, so the two bracket the flush);

and the benchmark awaits two animation frames per frame, so each frame's
flush is over before the next frame arrives. The figure is handler + flush.

Two ways of reaching N points per line, both measured:

- **history**: a stored run of N steps, opened as a user opens it. The page
  loads its history downsampled to 2,000 points per key (``HISTORY_POINTS`` in
  ``static/js/run.js``), so its lines hold min(N, 2,000) points.
- **filled**: a run with one frame of history, whose lines are then filled to
  N points through ``onFrame`` (frames of 1,000 steps) before the timed frames:
  the page as it is after watching a long run live.

Both chart renderers are measured: ``scattergl`` (WebGL, what the page picks
when the browser has WebGL; headless Chromium renders it with SwiftShader on
the CPU) and ``scatter`` (SVG, Chromium started with ``--disable-webgl``).
And two versions of ``static/js/charts.js``: the app's (``current``), which
keeps each line at most 8,000 points on screen by thinning it back to 4,000
(min and max per bucket) whenever it would pass that, and the same file with
the thinning switched off (``before-fix``: :data:`BEFORE_FIX_CHARTS_JS`, served
in place of the app's file by the browser, so no file is edited): the fix and
what it fixed, side by side in one run.

    python -m bench.browser                         # the app's charts.js, both renderers and modes
    python -m bench.browser --variants current,before-fix   # beside the charts.js before the fix (slow: 100k-point
                                                            # WebGL lines cost seconds per frame there)
    python -m bench.browser --modes filled --frames 20 --case-seconds 8 --gl-max-n 10000   # make bench

Writes ``bench/results/browser.json``.

**Compare page** (``--compare 10,20,50``): instead of the run page, N stored runs (``--compare-steps`` steps of
the same 26 keys each) opened on one ``/compare?runs=…`` page, whose handler ``window.gradwatch.onFrame(runIndex,
frame)`` is fed one metrics frame per run per *tick* (what N live runs send while each flushes a frame): handler
(all N calls) + flush per tick, and per frame (the tick over N). Also the page's load time (navigation to
``data-ready``: N runs' histories and events fetched and drawn, N websockets opened). The page shows at most
``MAX_COMPARE`` runs (app/web/pages.py), so the benchmark's server lifts that limit to the largest N (in its own
process only). Writes ``bench/results/browser-compare.json``; the figures chose ``MAX_COMPARE``
(docs/benchmarks.md, "Compare page").

    python -m bench.browser --compare 10,20,50 --renderers scattergl,scatter
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.store import Store
from bench._common import RESULTS_DIR, machine_info, render_table, write_json
from bench.history import curves, write_run
from bench.server import ROOT, Server
from bench.synthetic_worker import synthetic_keys

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-background-timer-throttling", "--disable-renderer-backgrounding"]
RENDERERS = {"scattergl": [], "scatter": ["--disable-webgl"]}
#: The SPEC §2 scalars and the per-tensor norms of a width-32, depth-2 ring8 GAN: what its page charts.
N_KEYS = 26
FILL_CHUNK = 1000

#: Where static/js/chartview.js keeps the user's chart view, and the views the variants set there before a page loads.
VIEW_KEY = "gradwatch:chart-view"
VIEWS: dict[str, dict[str, Any]] = {"smoothed": {"smoothing": 0.6, "x": "step", "log": {}}}

#: Text replacements that turn the app's ``static/js/charts.js`` into the "before-fix" variant: every frame
#: extends its lines, which are never thinned, as before the fix.
BEFORE_FIX_CHARTS_JS: list[tuple[str, str]] = [
    ("if (this.drawn[index] + x.length <= 2 * MAX_DRAWN) {", "if (true) {  // before the fix: never thinned"),
]

LAST_STEPS_JS = """() => Object.values(window.gradwatch.charts).filter((c) => Array.isArray(c.last))
  .flatMap((c) => c.last)"""
LENGTHS_JS = """() => Object.fromEntries(Object.entries(window.gradwatch.charts)
  .filter(([, c]) => typeof c.lengths === "function").map(([name, c]) => [name, c.lengths()]))"""
TRACE_TYPES_JS = """() => [...new Set(Object.values(window.gradwatch.charts).filter((c) => c.el && c.el.data)
  .flatMap((c) => c.el.data.map((t) => t.type)))]"""
WEBGL_JS = """() => { const c = document.createElement('canvas');
  const g = c.getContext('webgl2') || c.getContext('webgl');
  if (!g) return null; const d = g.getExtension('WEBGL_debug_renderer_info');
  return d ? g.getParameter(d.UNMASKED_RENDERER_WEBGL) : 'webgl'; }"""


#: Feeds ``ticks`` ticks of metrics frames to a page's own frame handler; per tick [handler ms, flush ms, wall ms].
#: ``runs`` null: the run page, one frame a tick to ``onFrame(frame)``; ``runs`` N: the compare page, one frame a tick
#: to each of its N runs, ``onFrame(runIndex, frame)``.
FEED_JS = """
async ({ticks, runs, stepsPerFrame, firstStep, keys, warmup, budgetMs}) => {
  const g = window.gradwatch;
  const tick = () => new Promise((resolve) => requestAnimationFrame(() => resolve(performance.now())));
  const make = (first, n, r) => {
    const step = [], time = [], now = Date.now() / 1000, data = {};
    for (let i = 0; i < n; i++) { step.push(first + i); time.push(now); }
    keys.forEach((key, j) => {
      const v = new Array(n);
      for (let i = 0; i < n; i++) v[i] = 2 + Math.sin((first + i) / (3000 + 500 * j) + r) + 0.1 * (Math.random() - 0.5);
      data[key] = v;
    });
    // The applied norm is the non-saturating one, as in a non-saturating run: its shadow is the saturating norm.
    if (data["grad/g_norm_non_saturating"]) data["grad/g_norm"] = data["grad/g_norm_non_saturating"].slice();
    return { type: "metrics", run: "bench", seq: 0, step, time, data };
  };
  let next = firstStep;
  const out = [];
  const started = performance.now();
  let warm = warmup;
  for (let t = 0; t < warm + ticks; t++) {
    const elapsed = performance.now() - started;
    if (t < warm && elapsed > budgetMs / 2) warm = t;  // a slow case: cut its warm-up short
    if (t >= warm + 3 && elapsed > budgetMs) break;  // ...and stop after three timed ticks once over budget
    const frames = [];
    for (let r = 0; r < (runs ?? 1); r++) frames.push(make(next, stepsPerFrame, r));
    next += stepsPerFrame;
    let before = 0;
    requestAnimationFrame(() => { before = performance.now(); });  // runs just before the charts' flush
    const t0 = performance.now();
    if (runs === null) g.onFrame(frames[0]);
    else for (let r = 0; r < runs; r++) g.onFrame(r, frames[r]);
    const t1 = performance.now();
    const after = await tick();  // registered after the flush: runs just after it, in the same animation frame
    const end = await tick();
    if (t >= warm) out.push([t1 - t0, after - before, end - t0]);
  }
  return { times: out, next };
}
"""
#: Traces per compare chart, and the last step of every main trace.
COMPARE_STATE_JS = """() => { const c = window.gradwatch.charts;
  return { traces: Object.fromEntries(Object.entries(c).filter(([, v]) => v.el && v.el.data)
                                        .map(([k, v]) => [k, v.el.data.length])),
           last: Object.values(c).filter((v) => Array.isArray(v.last)).flatMap((v) => v.last)
                   .filter((s) => Number.isFinite(s)) }; }"""
#: ``python -c`` for the compare benchmark's server: the app with MAX_COMPARE lifted to argv[1], then ``gradwatch``.
LIFT_COMPARE_LIMIT = ("import sys; import app.web.pages as pages; pages.MAX_COMPARE = int(sys.argv[1]); "
                      "from app.cli import main; sys.exit(main(sys.argv[2:]))")


class CompareServer(Server):
    """``gradwatch serve`` whose compare page takes up to ``limit`` runs (the app's MAX_COMPARE, in this process)."""

    def __init__(self, data_dir: Path, limit: int) -> None:
        super().__init__(data_dir)
        self.limit = limit

    def command(self, port: str) -> list[str]:
        command = super().command(port)
        if command[1:3] != ["-m", "app.cli"]:
            raise RuntimeError(f"unexpected server command {command}")
        return [command[0], "-c", LIFT_COMPARE_LIMIT, str(self.limit), *command[3:]]


def chromium_path() -> str:
    return os.environ.get("GRADWATCH_CHROMIUM") or DEFAULT_CHROMIUM


def unavailable_reason() -> str | None:
    """Why the browser benchmark cannot run here, or None."""
    path = chromium_path()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return f"no chromium at {path} (apt-get install chromium, or set GRADWATCH_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -e '.[dev]')"
    return None


def chromium_version() -> str:
    try:
        return subprocess.run([chromium_path(), "--version"], capture_output=True, text=True, timeout=30,
                              check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def build_runs(data_dir: Path, sizes: list[int], keys: list[str]) -> dict[str, str]:
    """Runs of each size, plus one with a single frame of history (the one filled live); name → run id."""
    store = Store(data_dir / "gradwatch.db")
    store.start()
    ids: dict[str, str] = {}
    try:
        for n in sizes:
            ids[f"history-{n}"] = f"hist{n}"
            write_run(store, f"hist{n}", curves(n, keys, seed=n), frame_steps=256)
        ids["filled"] = "filled"
        write_run(store, "filled", curves(16, keys), frame_steps=16)
        if not store.wait_flushed(300):
            raise RuntimeError("the store did not commit the runs")
    finally:
        store.close()
    return ids


def before_fix_charts_js() -> str:
    """The app's charts.js with :data:`BEFORE_FIX_CHARTS_JS` applied; ValueError once it no longer applies."""
    text = (ROOT / "static" / "js" / "charts.js").read_text(encoding="utf-8")
    for old, new in BEFORE_FIX_CHARTS_JS:
        if text.count(old) != 1:
            raise ValueError("static/js/charts.js has changed: the before-fix patch no longer applies")
        text = text.replace(old, new)
    return text


def _open(browser: Browser, url: str, charts_js: str | None = None, view: dict[str, Any] | None = None) -> Page:
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    if view is not None:  # the chart view a user left in this browser (static/js/chartview.js): smoothed
        page.add_init_script(f"localStorage.setItem({json.dumps(VIEW_KEY)}, {json.dumps(json.dumps(view))})")
    if charts_js is not None:  # the page gets this charts.js instead of the app's: before-fix
        page.route("**/assets/js/charts.js*",
                   lambda route: route.fulfill(body=charts_js, content_type="text/javascript"))
    page.set_default_timeout(120_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready === 'true'")
    if errors:
        raise RuntimeError(f"the run page failed: {errors}")
    return page


def fill(page: Page, target: int, first_step: int, keys: list[str]) -> int:
    """Feed big frames until every line holds ``target`` points; returns the next step.

    Two frames (of at least FILL_CHUNK steps) whatever the target: every flush redraws every point, and
    on a software-rendered WebGL canvas a redraw of 100k-point lines takes seconds.
    """
    chunk = max(FILL_CHUNK, -(-target // 2))
    next_step = first_step
    have = first_step - 1
    while have < target:
        n = min(chunk, target - have)
        result = page.evaluate(FEED_JS, {"ticks": 1, "runs": None, "stepsPerFrame": n, "firstStep": next_step,
                                         "keys": keys, "warmup": 0, "budgetMs": 1e9})
        next_step = int(result["next"])
        have += n
    return next_step


def summarize(times: list[list[float]]) -> dict[str, float]:
    handler = [t[0] for t in times]
    flush = [t[1] for t in times]
    total = sorted(t[0] + t[1] for t in times)
    p95 = total[min(len(total) - 1, int(0.95 * len(total)))]
    return {"frames": len(times), "handler_median_ms": round(statistics.median(handler), 2),
            "flush_median_ms": round(statistics.median(flush), 2), "median_ms": round(statistics.median(total), 2),
            "p95_ms": round(p95, 2), "max_ms": round(total[-1], 2),
            "wall_median_ms": round(statistics.median(t[2] for t in times), 1)}


def measure(args: argparse.Namespace, server: Server, ids: dict[str, str], keys: list[str],
            scripts: dict[str, str | None]) -> list[dict[str, Any]]:
    """Every (renderer, variant, mode, N) case; ``scripts`` maps a variant to the charts.js it serves (None: app's)."""
    from playwright.sync_api import sync_playwright

    cases: list[dict[str, Any]] = []
    with sync_playwright() as playwright:
        for renderer in args.renderers:
            browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                                 args=CHROMIUM_ARGS + RENDERERS[renderer])
            try:
                for variant, script in scripts.items():
                    for mode in args.modes:
                        for n in args.sizes:
                            label = f"{renderer:9s} {variant:10s} {mode:7s} N={n:>7,}"
                            if (renderer == "scattergl" and variant == "before-fix" and mode == "filled"
                                    and args.gl_max_n and n > args.gl_max_n):
                                print(f"  {label}: skipped (--gl-max-n {args.gl_max_n})", flush=True)
                                continue
                            case = _case(args, browser, f"{server.url}/runs/"
                                         f"{ids[f'history-{n}'] if mode == 'history' else ids['filled']}",
                                         script, mode, n, keys, VIEWS.get(variant))
                            case = {"renderer": renderer, "variant": variant, **case}
                            cases.append(case)
                            print(f"  {label}: {case['points_per_line']:>7,} points per line, "
                                  f"{case['median_ms']:.2f} ms median per frame (handler "
                                  f"{case['handler_median_ms']:.2f} + flush {case['flush_median_ms']:.2f}), "
                                  f"p95 {case['p95_ms']:.2f}", flush=True)
            finally:
                browser.close()
    return cases


def _case(args: argparse.Namespace, browser: Browser, url: str, script: str | None, mode: str, n: int,
          keys: list[str], view: dict[str, Any] | None = None) -> dict[str, Any]:
    """One page: reach N points per line (history or filled), then time the frames."""
    page = _open(browser, url, script, view)
    try:
        if view is not None:  # the page took the view (a renamed storage key would measure the default silently)
            taken = page.evaluate("Object.values(window.gradwatch.charts).filter((c) => c.mode)"
                                  ".map((c) => c.mode.smoothing)")
            if not taken or set(taken) != {view["smoothing"]}:
                raise RuntimeError(f"the page did not take the chart view {view}: smoothing {taken}")
        types = page.evaluate(TRACE_TYPES_JS)
        webgl = page.evaluate(WEBGL_JS)
        started = time.perf_counter()
        first = n + 1 if mode == "history" else fill(page, n, 17, keys)
        fill_s = time.perf_counter() - started
        lengths = page.evaluate(LENGTHS_JS)
        drawn = max(max(v) for v in lengths.values() if v)
        result = page.evaluate(FEED_JS, {"ticks": args.frames, "runs": None, "stepsPerFrame": args.steps_per_frame,
                                         "firstStep": first, "keys": keys, "warmup": args.warmup,
                                         "budgetMs": 1000 * args.case_seconds})
        last = set(page.evaluate(LAST_STEPS_JS))
        if last != {int(result["next"]) - 1}:  # every line took every point of every frame
            raise RuntimeError(f"the lines end at steps {last}, not {int(result['next']) - 1}")
    finally:
        page.context.close()
    return {"trace_types": types, "webgl": webgl, "mode": mode, "n": n, "points_per_line": drawn,
            "fill_s": round(fill_s, 1), **summarize(result["times"])}


def build_compare_runs(data_dir: Path, n: int, steps: int, keys: list[str]) -> list[str]:
    """``n`` completed non-saturating GAN runs of ``steps`` steps (their applied norm is the non-saturating one)."""
    store = Store(data_dir / "gradwatch.db")
    store.start()
    ids = [f"cmp{i:03d}" for i in range(n)]
    try:
        for i, run_id in enumerate(ids):
            columns = curves(steps, keys, seed=i)
            if "grad/g_norm_non_saturating" in columns:
                columns["grad/g_norm"] = columns["grad/g_norm_non_saturating"].copy()
            write_run(store, run_id, columns, frame_steps=256)
        if not store.wait_flushed(300):
            raise RuntimeError("the store did not commit the runs")
    finally:
        store.close()
    return ids


def summarize_ticks(times: list[list[float]], runs: int) -> dict[str, float]:
    """A tick's figures (one frame to each of ``runs`` runs), and per frame (a tick's JS time over ``runs``)."""
    tick = summarize(times)
    return {**tick, "per_frame_median_ms": round(tick["median_ms"] / runs, 3),
            "per_frame_p95_ms": round(tick["p95_ms"] / runs, 3)}


def measure_compare(args: argparse.Namespace, server: Server, ids: list[str], keys: list[str]) -> list[dict[str, Any]]:
    """Every (renderer, N) case of the compare page: load time, then ticks of one frame per run."""
    from playwright.sync_api import sync_playwright

    cases: list[dict[str, Any]] = []
    with sync_playwright() as playwright:
        for renderer in args.renderers:
            browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                                 args=CHROMIUM_ARGS + RENDERERS[renderer])
            try:
                for n in args.compare:
                    case = {"renderer": renderer, **_compare_case(args, browser, server.url, ids[:n], keys)}
                    cases.append(case)
                    print(f"  {renderer:9s} compare N={n:>3}: load {case['load_s']:.2f} s, per tick "
                          f"{case['median_ms']:.2f} ms median (handler {case['handler_median_ms']:.2f} + flush "
                          f"{case['flush_median_ms']:.2f}), p95 {case['p95_ms']:.2f}; per frame "
                          f"{case['per_frame_median_ms']:.3f} ms", flush=True)
            finally:
                browser.close()
    return cases


def _compare_case(args: argparse.Namespace, browser: Browser, base: str, ids: list[str],
                  keys: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    page = _open(browser, f"{base}/compare?runs={','.join(ids)}")
    try:
        load_s = time.perf_counter() - started
        types = page.evaluate(TRACE_TYPES_JS)
        shown = page.evaluate("() => document.querySelectorAll('#compare-runs li[data-run]').length")
        if shown != len(ids):
            raise RuntimeError(f"the compare page shows {shown} runs, not {len(ids)}")
        before = page.evaluate(COMPARE_STATE_JS)
        result = page.evaluate(FEED_JS, {"ticks": args.frames, "runs": len(ids), "stepsPerFrame": args.steps_per_frame,
                                         "firstStep": args.compare_steps + 1, "keys": keys, "warmup": args.warmup,
                                         "budgetMs": 1000 * args.case_seconds})
        last = set(page.evaluate(COMPARE_STATE_JS)["last"])
        if last != {int(result["next"]) - 1}:  # every run's lines took every point of every tick
            raise RuntimeError(f"the compare lines end at steps {last}, not {int(result['next']) - 1}")
    finally:
        page.context.close()
    return {"trace_types": types, "n": len(ids), "steps_per_run": args.compare_steps, "load_s": round(load_s, 2),
            "traces": before["traces"], **summarize_ticks(result["times"], len(ids))}


def compare_main(args: argparse.Namespace, meta: dict[str, Any]) -> int:
    """The compare-page benchmark (``--compare``): a table of load time and per-tick / per-frame JS cost by N."""
    out = args.json if args.json is not None else RESULTS_DIR / "browser-compare.json"
    meta = {**meta, "compare_steps": args.compare_steps, "page": "compare"}
    reason = unavailable_reason()
    if reason is not None:
        print(f"browser benchmark not available: {reason}")
        write_json(out, {"meta": meta, "available": False, "reason": reason, "cases": []})
        return 0
    keys = synthetic_keys(N_KEYS)
    with tempfile.TemporaryDirectory(prefix="gradwatch-browser-") as tmp:
        ids = build_compare_runs(Path(tmp), max(args.compare), args.compare_steps, keys)
        with CompareServer(Path(tmp), max(args.compare)) as server:
            cases = measure_compare(args, server, ids, keys)
    rows = [[c["renderer"], str(c["n"]), f"{c['load_s']:.2f}", f"{c['handler_median_ms']:.2f}",
             f"{c['flush_median_ms']:.2f}", f"{c['median_ms']:.2f}", f"{c['p95_ms']:.2f}",
             f"{c['per_frame_median_ms']:.3f}", f"{c['wall_median_ms']:.0f}"] for c in cases]
    print(render_table(["renderer", "runs", "load s", "handler ms", "flush ms", "per tick ms", "p95 ms",
                        "per frame ms", "wall ms"], rows))
    print("a tick = one 16-step frame to every run; per tick = handler (all runs) + flush (JS); per frame = per tick "
          "/ runs; wall = from the tick to the second animation frame after it (includes software rendering)")
    write_json(out, {"meta": meta, "available": True, "reason": None, "cases": cases})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.browser", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1_000, 10_000, 100_000])
    parser.add_argument("--frames", type=int, default=60, help="timed frames per case")
    parser.add_argument("--warmup", type=int, default=5, help="frames fed before the timed ones")
    parser.add_argument("--steps-per-frame", type=int, default=16)
    parser.add_argument("--renderers", type=lambda s: s.split(","), default=list(RENDERERS),
                        help="scattergl (WebGL) and/or scatter (SVG, WebGL disabled)")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["history", "filled"],
                        help="history (stored run, page loads 2,000 points per key) and/or filled (lines fed to N)")
    parser.add_argument("--case-seconds", type=float, default=30.0,
                        help="stop feeding a case after this long (at least three timed frames)")
    parser.add_argument("--gl-max-n", type=int, default=0,
                        help="skip scattergl lines filled beyond this many points with the before-fix charts.js (0: "
                             "none skipped); software WebGL takes seconds per frame at 100k unthinned points")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["current"],
                        help="current (the app's charts.js), before-fix (its thinning switched off) and/or "
                             "smoothed (the app's, with the user's smoothing on: each line drawn twice)")
    parser.add_argument("--compare", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="measure the compare page instead, with these numbers of runs (e.g. 10,20,50)")
    parser.add_argument("--compare-steps", type=int, default=2_000,
                        help="steps of history per run on the compare page (it loads at most 2,000 per key)")
    parser.add_argument("--json", type=Path, default=None,
                        help="default: bench/results/browser.json (browser-compare.json with --compare)")
    args = parser.parse_args(argv)
    bad = ([r for r in args.renderers if r not in RENDERERS] + [m for m in args.modes if m not in ("history", "filled")]
           + [v for v in args.variants if v not in ("current", "before-fix", *VIEWS)])
    if bad:
        parser.error(f"unknown renderer or mode: {bad}")
    meta = {**machine_info("cpu"), "chromium": chromium_version(), "steps_per_frame": args.steps_per_frame,
            "keys": N_KEYS, "frames": args.frames, "warmup": args.warmup, "case_seconds": args.case_seconds,
            "variants": args.variants}
    if args.compare:
        if min(args.compare) < 1:
            parser.error("--compare: numbers of runs are at least 1")
        return compare_main(args, meta)
    if args.json is None:
        args.json = RESULTS_DIR / "browser.json"
    reason = unavailable_reason()
    if reason is not None:
        print(f"browser benchmark not available: {reason}")
        write_json(args.json, {"meta": meta, "available": False, "reason": reason, "cases": []})
        return 0
    keys = synthetic_keys(N_KEYS)
    scripts: dict[str, str | None] = {}
    for variant in args.variants:
        try:
            scripts[variant] = before_fix_charts_js() if variant == "before-fix" else None
        except ValueError as exc:
            print(f"  before-fix variant left out: {exc}")
            meta["before_fix_unavailable"] = str(exc)
    with tempfile.TemporaryDirectory(prefix="gradwatch-browser-") as tmp:
        ids = build_runs(Path(tmp), args.sizes, keys)
        with Server(Path(tmp)) as server:
            cases = measure(args, server, ids, keys, scripts)

    rows = []
    ratios: dict[str, float] = {}
    ratio_sizes: dict[str, list[int]] = {}  # the N the ratio compares: a skipped size narrows it
    for renderer in args.renderers:
        for variant in scripts:
            for mode in args.modes:
                group = [c for c in cases if (c["renderer"], c["variant"], c["mode"]) == (renderer, variant, mode)]
                for c in group:
                    rows.append([f"{renderer} {variant} {mode}", f"{c['n']:,}", f"{c['points_per_line']:,}",
                                 f"{c['handler_median_ms']:.2f}", f"{c['flush_median_ms']:.2f}",
                                 f"{c['median_ms']:.2f}", f"{c['p95_ms']:.2f}", f"{c['wall_median_ms']:.0f}"])
                if len(group) >= 2 and group[0]["median_ms"] > 0:
                    ratios[f"{renderer} {variant} {mode}"] = round(group[-1]["median_ms"] / group[0]["median_ms"], 1)
                    ratio_sizes[f"{renderer} {variant} {mode}"] = [group[0]["n"], group[-1]["n"]]
    print(render_table(["renderer, charts.js, lines from", "N", "points per line", "handler ms", "flush ms",
                        "per frame ms", "p95 ms", "wall ms"], rows))
    print("per frame = handler + flush (JS); wall = from the frame to the second animation frame after it "
          "(includes rendering, which headless Chromium does in software)")
    for name, ratio in ratios.items():
        small, large = ratio_sizes[name]
        print(f"{name}: per-frame median at N={large:,} / at N={small:,} = {ratio}x "
              f"({'flat' if ratio <= 2.0 else 'GROWS with N'})")
    write_json(args.json, {"meta": meta, "available": True, "reason": None, "cases": cases,
                           "ratio_largest_over_smallest": ratios, "ratio_sizes": ratio_sizes,
                           "flat": {name: r <= 2.0 for name, r in ratios.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
