// Plotly charts that append only new points, batched per animation frame.
//
// A websocket can deliver dozens of frames between two screen refreshes.
// Redrawing on each would cost O(points) per frame; instead every chart queues
// new points and one requestAnimationFrame callback hands all queued points of
// all charts to Plotly.extendTraces in one call per chart. Points at or before
// the last step a trace already holds are dropped, which makes loading
// history and then resuming the stream safe when the two overlap.

/* global Plotly */

import { ema, unixFromWallClock, view, setView, wallClockMs, zoneName } from "./chartview.js";

const pending = new Set();
let scheduled = false;
const charts = [];

function flushAll() {
  scheduled = false;
  const batch = [...pending];
  pending.clear();
  for (const chart of batch) chart.flush();
}

export function schedule(chart) {
  pending.add(chart);
  if (!scheduled) {
    scheduled = true;
    requestAnimationFrame(flushAll);
  }
}

/** WebGL lines stay fast at 100k points; fall back to SVG where there is no WebGL. */
export const LINE_TYPE = (() => {
  try {
    const canvas = document.createElement("canvas");
    return canvas.getContext("webgl2") || canvas.getContext("webgl") ? "scattergl" : "scatter";
  } catch {
    return "scatter";
  }
})();

export function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

/** Plotly renders a little HTML in legends and titles: user text goes in as text. */
export function plain(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

/** Plotly's own default line colours, given explicitly (LineChart.trace). */
export const COLORWAY = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf"];

export const PALETTE = ["#1971c2", "#d9480f", "#2b8a3e", "#ae3ec9", "#e8590c", "#0c8599", "#5f3dc4", "#c2255c",
  "#66a80f", "#495057"];

export function themeLayout() {
  const text = cssVar("--text");
  const grid = cssVar("--grid");
  const axis = { gridcolor: grid, zerolinecolor: grid, linecolor: grid, color: text };
  return {
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    font: { family: getComputedStyle(document.body).fontFamily, size: 11, color: text },
    xaxis: axis,
    yaxis: axis,
    yaxis2: axis,
    legend: { bgcolor: "rgba(0,0,0,0)" },
  };
}

function merge(base, extra) {
  const out = { ...base };
  for (const [key, value] of Object.entries(extra || {})) {
    out[key] = value && typeof value === "object" && !Array.isArray(value) && base[key] ? { ...base[key], ...value } : value;
  }
  return out;
}

export const PLOT_CONFIG = {
  displaylogo: false,
  responsive: true,
  modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"],
};

export class Chart {
  /**
   * @param {HTMLElement} el
   * @param {object} layout Plotly layout on top of the theme (axis titles, log axis, ranges)
   */
  constructor(el, layout = {}) {
    this.el = el;
    this.layout = layout;
    Plotly.newPlot(el, [], this.fullLayout(), PLOT_CONFIG);
    charts.push(this);
  }

  fullLayout() {
    const base = merge(themeLayout(), {
      margin: { l: 56, r: 12, t: 8, b: 40 },
      showlegend: true,
      legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom", font: { size: 11 } },
      hovermode: "x unified",
      uirevision: "keep", // zoom and legend clicks survive every update
    });
    return merge(base, this.layout);
  }

  retheme() {
    Plotly.relayout(this.el, this.fullLayout());
  }
}

/**
 * Points per line handed to Plotly, at most twice this many. Plotly.extendTraces redraws the whole chart,
 * so a frame's cost grows with the points the chart holds: a line that would pass 2 × MAX_DRAWN is thinned
 * back to MAX_DRAWN instead (both ends, each bucket's minimum and maximum, so spikes survive, and every
 * null run's start), and a frame costs about the same at 10k points per line as at 1M.
 */
export const MAX_DRAWN = 4000;

/** Indices of at most about ``budget`` of the points ``y``: both ends, per bucket its min and max, null-run starts. */
export function thin(y, budget) {
  const n = y.length;
  const buckets = Math.max(1, Math.floor(budget / 2));
  const keep = [0, n - 1];
  for (let b = 0; b < buckets; b++) {
    const hi = Math.floor(((b + 1) * n) / buckets);
    let min = -1;
    let max = -1;
    for (let i = Math.floor((b * n) / buckets); i < hi; i++) {
      const v = y[i];
      if (v === null || v === undefined) {
        if (i === 0 || (y[i - 1] !== null && y[i - 1] !== undefined)) keep.push(i);
      } else {
        if (min < 0 || v < y[min]) min = i;
        if (max < 0 || v > y[max]) max = i;
      }
    }
    if (min >= 0) keep.push(min);
    if (max >= 0) keep.push(max);
  }
  return [...new Set(keep)].sort((a, b) => a - b);
}

/** The x-axis layout of each x mode (view.x). */
function xAxisOf(mode) {
  if (mode === "wall") return { type: "date", title: { text: `wall time (${zoneName()})` } };
  if (mode === "relative") return { type: "linear", title: { text: "seconds since the run started" } };
  return { type: "linear", title: { text: "step" } };
}

/**
 * A line chart that holds its points by step and draws them as the view says (chartview.js): x by step, wall time or
 * time since start; y raw or smoothed (the raw line then kept faint underneath, in a companion trace), log or linear.
 */
export class LineChart extends Chart {
  /**
   * @param {HTMLElement} el
   * @param {object} layout Plotly layout on top of the theme (axis titles, log axis, ranges)
   * @param {{name?: string, origin?: (id: string) => number|null}} options ``name``: the chart's log/linear choice is
   *   remembered under it; ``origin``: a trace's start (unix seconds) for "time since start", else its first point's
   */
  constructor(el, layout = {}, options = {}) {
    super(el, layout);
    this.name = options.name || null;
    this.origin = options.origin || (() => null);
    this.defaultLog = layout.yaxis?.type === "log";
    this.ids = new Map(); // trace id -> index of its (main) Plotly trace
    this.lines = []; // per main trace index: {id, step, time, value} as held on screen, and its smoothing state
    this.last = []; // last step per main trace (holes for companion traces)
    this.drawn = []; // points Plotly holds per main trace
    this.queue = new Map(); // index -> {x, t, y}: steps, times and values not yet handed to Plotly
    this.shapes = [];
    this.zoomedFrom = new Map(); // index -> points the trace had before a zoom brought in detail
    this.mode = null; // the view this chart last drew with: {x, smoothing, log}
    this.mode = this.current();
    Plotly.relayout(this.el, this.axes(this.mode, this.mode.log !== this.defaultLog));
    window.addEventListener("gradwatch:view", () => this.redraw());
  }

  /** The view this chart should draw with now. */
  current() {
    const log = this.name !== null && Object.hasOwn(view.log, this.name) ? view.log[this.name] : this.defaultLog;
    return { x: view.x, smoothing: view.smoothing, log };
  }

  /** The axis changes of a view, as Plotly.relayout keys (so that zoom.js sees "xaxis.autorange": a reset zoom). */
  axes(mode = this.current(), withY = true) {
    const x = xAxisOf(mode.x);
    const out = { "xaxis.type": x.type, "xaxis.title.text": x.title.text, "xaxis.autorange": true };
    if (!withY) return out;
    const fixed = this.layout.yaxis?.range; // a probability's [0, 1] holds on a linear axis
    out["yaxis.type"] = mode.log ? "log" : "linear";
    if (fixed && !mode.log) out["yaxis.range"] = fixed;
    else out["yaxis.autorange"] = true;
    return out;
  }

  fullLayout() {
    if (!this.mode) return super.fullLayout();
    const y = this.mode.log ? { type: "log", range: null, autorange: true } : { type: "linear" };
    return merge(super.fullLayout(), { xaxis: xAxisOf(this.mode.x), yaxis: y });
  }

  /** x of each point of a trace under x mode ``mode``. */
  xs(index, step, time, mode = this.mode.x) {
    if (mode === "step") return step;
    if (mode === "wall") return time.map(wallClockMs);
    const line = this.lines[index];
    if (line.t0 === undefined || line.t0 === null) {
      line.t0 = this.origin(line.id) ?? time.find((t) => t !== null && t !== undefined) ?? null;
    }
    return time.map((t) => (t === null || t === undefined || line.t0 === null ? null : t - line.t0));
  }

  /** The index of trace ``id``, created with ``spec`` (name, colour, dash…) on first use. */
  trace(id, spec = {}) {
    let index = this.ids.get(id);
    if (index === undefined) {
      // Plotly colours a trace without one by its index among all traces, raw companions included: a line would
      // change colour as smoothing comes and goes. Each line gets its colour here, by its place among lines.
      if (!spec.line?.color && !spec.marker?.color) {
        spec = { ...spec, line: { ...spec.line, color: COLORWAY[this.ids.size % COLORWAY.length] } };
      }
      index = this.el.data.length;
      this.ids.set(id, index);
      this.lines[index] = { id, step: [], time: [], value: [], smooth: { acc: 0, n: 0 }, raw: null };
      this.last[index] = -Infinity;
      this.drawn[index] = 0;
      Plotly.addTraces(this.el, {
        type: LINE_TYPE, mode: "lines", x: [], y: [], name: id, hovertemplate: "%{y:.4g}", legendgroup: id, ...spec,
      });
      if (this.mode.smoothing > 0) this.companion(index);
    }
    return index;
  }

  /** The faint raw line drawn under a smoothed one, made on first need. */
  companion(index) {
    const line = this.lines[index];
    if (line.raw !== null) return line.raw;
    const main = this.el.data[index];
    const color = main.line?.color || main.marker?.color || cssVar("--muted");
    line.raw = this.el.data.length;
    Plotly.addTraces(this.el, {
      type: main.type, mode: "lines", x: [], y: [], name: `${main.name} (raw)`, legendgroup: main.legendgroup,
      showlegend: false, hoverinfo: "skip", opacity: 0.25, yaxis: main.yaxis,
      line: { color, width: 1, dash: main.line?.dash },
    });
    return line.raw;
  }

  has(id) {
    return this.ids.has(id);
  }

  /** Queue points for trace ``id`` (``times``: unix seconds per step, for the time axes); points not after its last
   * step are dropped. */
  append(id, steps, values, spec, times = null) {
    const index = this.trace(id, spec);
    const queued = this.queue.get(index) || { x: [], t: [], y: [] };
    let last = this.last[index];
    for (let i = 0; i < steps.length; i++) {
      if (steps[i] > last) {
        last = steps[i];
        queued.x.push(steps[i]);
        queued.t.push(times?.[i] ?? null);
        queued.y.push(values[i] ?? null);
      }
    }
    this.last[index] = last;
    if (queued.x.length) {
      this.queue.set(index, queued);
      schedule(this);
    }
  }

  flush() {
    if (!this.queue.size) return;
    const extend = { x: [], y: [] };
    const extended = [];
    const rethinned = [];
    for (const [index, { x, t, y }] of this.queue) {
      const line = this.lines[index];
      if (this.drawn[index] + x.length <= 2 * MAX_DRAWN) {
        const smooth = this.mode.smoothing > 0;
        extend.x.push(this.xs(index, x, t));
        extend.y.push(smooth ? ema(y, this.mode.smoothing, line.smooth) : y);
        extended.push(index);
        if (smooth) {
          extend.x.push(extend.x.at(-1));
          extend.y.push(y);
          extended.push(line.raw);
        }
        line.step.push(...x);
        line.time.push(...t);
        line.value.push(...y);
        this.drawn[index] += x.length;
        continue;
      }
      const allX = [...line.step, ...x];
      const allT = [...line.time, ...t];
      const allY = [...line.value, ...y];
      const keep = thin(allY, MAX_DRAWN);
      line.step = keep.map((k) => allX[k]);
      line.time = keep.map((k) => allT[k]);
      line.value = keep.map((k) => allY[k]);
      rethinned.push(index);
      this.drawn[index] = keep.length;
    }
    this.queue.clear();
    if (extended.length) Plotly.extendTraces(this.el, extend, extended);
    if (rethinned.length) this.render(rethinned);
  }

  /** Hand Plotly the whole of some lines as held, drawn under the current view (both traces of a smoothed line). */
  render(indices) {
    const update = { x: [], y: [] };
    const targets = [];
    for (const index of indices) {
      const line = this.lines[index];
      const x = this.xs(index, line.step, line.time);
      line.smooth = { acc: 0, n: 0 };
      const smooth = this.mode.smoothing > 0;
      update.x.push(x);
      update.y.push(smooth ? ema(line.value, this.mode.smoothing, line.smooth) : line.value);
      targets.push(index);
      if (line.raw !== null) {
        update.x.push(smooth ? x : []);
        update.y.push(smooth ? line.value : []);
        targets.push(line.raw);
      }
    }
    if (targets.length) Plotly.restyle(this.el, update, targets);
  }

  /** The view changed (chartview.js): redraw every line from the points it holds, and the axes. */
  redraw() {
    const mode = this.current();
    const was = this.mode;
    if (was && mode.x === was.x && mode.smoothing === was.smoothing && mode.log === was.log) return;
    this.flush();
    this.mode = mode;
    const indices = [...this.ids.values()];
    if (mode.smoothing > 0) for (const index of indices) this.companion(index);
    this.render(indices);
    Plotly.relayout(this.el, { ...this.axes(mode, !was || mode.log !== was.log), ...this.markLayout() });
    this.syncScaleButton();
  }

  /**
   * The steps a range of this chart's x axis covers (a zoom, in whatever unit the axis is in): ``[start, end]``, or
   * null when no line holds a point there.
   */
  stepsIn(x0, x1) {
    if (this.mode.x === "step") return [Math.max(0, Math.floor(Number(x0))), Math.ceil(Number(x1))];
    const lo = this.mode.x === "wall" ? unixFromWallClock(x0) : Number(x0);
    const hi = this.mode.x === "wall" ? unixFromWallClock(x1) : Number(x1);
    let start = Infinity;
    let end = -Infinity;
    for (const index of this.ids.values()) {
      const line = this.lines[index];
      const t0 = this.mode.x === "relative" ? line.t0 ?? 0 : 0;
      // Widen to the held points just outside the range: the steps between them may hold what the zoom shows.
      let before = null;
      for (let i = 0; i < line.step.length; i++) {
        const t = line.time[i];
        if (t === null || t === undefined) continue;
        const x = t - t0;
        if (x < lo) before = line.step[i];
        else if (x <= hi) {
          start = Math.min(start, before ?? line.step[i]);
          end = Math.max(end, line.step[i]);
        } else {
          end = Math.max(end, line.step[i]);
          if (before !== null) start = Math.min(start, before);
          break;
        }
      }
    }
    return start <= end ? [Math.max(0, start), end] : null;
  }

  /**
   * Full-resolution points for steps ``start``..``end`` of some traces (a zoomed view, from the server:
   * ``{trace id: {step, time, value}}``): they replace what the trace holds in that range, the rest stays.
   */
  detail(start, end, points) {
    const indices = [];
    this.flush();
    for (const [id, { step, time, value }] of Object.entries(points)) {
      const index = this.ids.get(id);
      if (index === undefined) continue;
      const line = this.lines[index];
      const x = [];
      const t = [];
      const y = [];
      const keepOld = (i) => { x.push(line.step[i]); t.push(line.time[i]); y.push(line.value[i]); };
      let i = 0;
      while (i < line.step.length && line.step[i] < start) keepOld(i++);
      for (let k = 0; k < step.length; k++) { x.push(step[k]); t.push(time?.[k] ?? null); y.push(value[k] ?? null); }
      while (i < line.step.length && line.step[i] <= end) i++;
      for (; i < line.step.length; i++) keepOld(i);
      Object.assign(line, { step: x, time: t, value: y });
      indices.push(index);
      if (!this.zoomedFrom.has(index)) this.zoomedFrom.set(index, this.drawn[index]);
      this.drawn[index] = x.length;
    }
    this.render(indices);
  }

  /** The zoom was reset: each line zoomed into goes back to the number of points it had before (thinned, extremes
   * and both ends kept), so the whole run's view is what it was. */
  rethin() {
    const indices = [];
    const before = this.zoomedFrom;
    this.zoomedFrom = new Map();
    for (const index of this.ids.values()) {
      const line = this.lines[index];
      const budget = Math.min(MAX_DRAWN, before.get(index) ?? MAX_DRAWN);
      if (line.step.length <= budget) continue;
      const keep = thin(line.value, budget);
      line.step = keep.map((k) => line.step[k]);
      line.time = keep.map((k) => line.time[k]);
      line.value = keep.map((k) => line.value[k]);
      indices.push(index);
      this.drawn[index] = keep.length;
    }
    this.render(indices);
  }

  /** Trace ids, in the order traces were created. */
  traceIds() {
    return [...this.ids.keys()];
  }

  /** x of ``step`` under the current x mode: the time of the first held point at or after it, on the time axes. */
  xOfStep(step) {
    if (this.mode.x === "step") return step;
    for (const index of this.ids.values()) {
      const line = this.lines[index];
      const i = line.step.findIndex((s) => s >= step);
      if (i >= 0 && line.time[i] !== null && line.time[i] !== undefined) return this.xs(index, [step], [line.time[i]])[0];
    }
    return null;
  }

  markLayout() {
    const placed = this.shapes.map((m) => ({ ...m, x: this.xOfStep(m.step) })).filter((m) => m.x !== null);
    return {
      shapes: placed.map((m) => ({
        type: "line", xref: "x", yref: "paper", x0: m.x, x1: m.x, y0: 0, y1: 1,
        line: { color: cssVar("--muted"), dash: "dot", width: 1 },
      })),
      annotations: placed.map((m) => ({
        x: m.x, xref: "x", y: 1, yref: "paper", yanchor: "top", xanchor: "left", text: plain(m.label),
        showarrow: false, font: { size: 10, color: cssVar("--muted") },
      })),
    };
  }

  /** A labelled vertical line at ``step`` (a live control change, for instance). */
  mark(step, label) {
    this.shapes.push({ step, label });
    Plotly.relayout(this.el, this.markLayout());
  }

  /**
   * A log/linear button for this chart, put in ``heading`` (its panel's title); the choice is remembered under the
   * chart's name for every page that has a chart of that name.
   */
  scaleButton(heading) {
    if (!heading || this.name === null) return null;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "small chart-scale";
    button.dataset.chart = this.name;
    button.addEventListener("click", () => setView({ log: { ...view.log, [this.name]: !this.mode.log } }));
    heading.append(" ", button);
    this.button = button;
    this.syncScaleButton();
    return button;
  }

  syncScaleButton() {
    if (!this.button) return;
    this.button.textContent = this.mode.log ? "log y" : "linear y";
    this.button.setAttribute("aria-pressed", String(this.mode.log));
    this.button.title = `y axis on a ${this.mode.log ? "log" : "linear"} scale: click for ${this.mode.log ? "linear" : "log"}`;
  }

  /** Points per trace, in the order traces were created (used by tests and benchmarks). */
  lengths() {
    return (this.el.data || []).map((t) => t.x.length);
  }
}

/** A chart redrawn whole (small data: histograms, snapshots), at most once per animation frame. */
export class SnapshotChart extends Chart {
  constructor(el, layout, render) {
    super(el, layout);
    this.render = render;
  }

  update() {
    schedule(this);
  }

  flush() {
    const { data, layout } = this.render();
    Plotly.react(this.el, data, merge(this.fullLayout(), layout || {}), PLOT_CONFIG);
  }

  retheme() {
    this.flush();
  }
}

window.addEventListener("gradwatch:theme", () => {
  for (const chart of charts) chart.retheme();
});
