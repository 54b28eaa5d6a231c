// Plotly charts that append only new points, batched per animation frame.
//
// A websocket can deliver dozens of frames between two screen refreshes.
// Redrawing on each would cost O(points) per frame; instead every chart queues
// new points and one requestAnimationFrame callback hands all queued points of
// all charts to Plotly.extendTraces in one call per chart. Points at or before
// the last step a trace already holds are dropped, which makes loading
// history and then resuming the stream safe when the two overlap.

/* global Plotly */

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

export class LineChart extends Chart {
  constructor(el, layout = {}) {
    super(el, merge({ xaxis: { title: { text: "step" } } }, layout));
    this.ids = new Map(); // trace id -> index
    this.last = []; // last step per trace
    this.drawn = []; // points Plotly holds per trace
    this.queue = new Map(); // index -> {x, y}
    this.shapes = [];
    this.zoomedFrom = new Map(); // index -> points the trace had before a zoom brought in detail
  }

  /** The index of trace ``id``, created with ``spec`` (name, colour, dash…) on first use. */
  trace(id, spec = {}) {
    let index = this.ids.get(id);
    if (index === undefined) {
      index = this.ids.size;
      this.ids.set(id, index);
      this.last.push(-Infinity);
      this.drawn.push(0);
      Plotly.addTraces(this.el, {
        type: LINE_TYPE, mode: "lines", x: [], y: [], name: id, hovertemplate: "%{y:.4g}", ...spec,
      });
    }
    return index;
  }

  has(id) {
    return this.ids.has(id);
  }

  /** Queue points for trace ``id``; points not after its last step are dropped. */
  append(id, steps, values, spec) {
    const index = this.trace(id, spec);
    const queued = this.queue.get(index) || { x: [], y: [] };
    let last = this.last[index];
    for (let i = 0; i < steps.length; i++) {
      if (steps[i] > last) {
        last = steps[i];
        queued.x.push(steps[i]);
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
    const thinned = { x: [], y: [] };
    const rethinned = [];
    for (const [index, { x, y }] of this.queue) {
      if (this.drawn[index] + x.length <= 2 * MAX_DRAWN) {
        extend.x.push(x);
        extend.y.push(y);
        extended.push(index);
        this.drawn[index] += x.length;
        continue;
      }
      const trace = this.el.data[index];
      const allX = [...trace.x, ...x];
      const allY = [...trace.y, ...y];
      const keep = thin(allY, MAX_DRAWN);
      thinned.x.push(keep.map((k) => allX[k]));
      thinned.y.push(keep.map((k) => allY[k]));
      rethinned.push(index);
      this.drawn[index] = keep.length;
    }
    this.queue.clear();
    if (extended.length) Plotly.extendTraces(this.el, extend, extended);
    if (rethinned.length) Plotly.restyle(this.el, thinned, rethinned);
  }

  /**
   * Full-resolution points for steps ``start``..``end`` of some traces (a zoomed view, from the server:
   * ``{trace id: {step, value}}``): they replace what the trace holds in that range, the rest stays.
   */
  detail(start, end, points) {
    const update = { x: [], y: [] };
    const indices = [];
    for (const [id, { step, value }] of Object.entries(points)) {
      const index = this.ids.get(id);
      if (index === undefined) continue;
      const trace = this.el.data[index];
      const x = [];
      const y = [];
      let i = 0;
      while (i < trace.x.length && trace.x[i] < start) { x.push(trace.x[i]); y.push(trace.y[i]); i++; }
      for (let k = 0; k < step.length; k++) { x.push(step[k]); y.push(value[k] ?? null); }
      while (i < trace.x.length && trace.x[i] <= end) i++;
      for (; i < trace.x.length; i++) { x.push(trace.x[i]); y.push(trace.y[i]); }
      update.x.push(x);
      update.y.push(y);
      indices.push(index);
      if (!this.zoomedFrom.has(index)) this.zoomedFrom.set(index, this.drawn[index]);
      this.drawn[index] = x.length;
    }
    if (indices.length) Plotly.restyle(this.el, update, indices);
  }

  /** The zoom was reset: each line zoomed into goes back to the number of points it had before (thinned, extremes
   * and both ends kept), so the whole run's view is what it was. */
  rethin() {
    const update = { x: [], y: [] };
    const indices = [];
    const before = this.zoomedFrom;
    this.zoomedFrom = new Map();
    (this.el.data || []).forEach((trace, index) => {
      const budget = Math.min(MAX_DRAWN, before.get(index) ?? MAX_DRAWN);
      if (trace.x.length <= budget) return;
      const keep = thin(trace.y, budget);
      update.x.push(keep.map((k) => trace.x[k]));
      update.y.push(keep.map((k) => trace.y[k]));
      indices.push(index);
      this.drawn[index] = keep.length;
    });
    if (indices.length) Plotly.restyle(this.el, update, indices);
  }

  /** Trace ids, in the order traces were created. */
  traceIds() {
    return [...this.ids.keys()];
  }

  /** A labelled vertical line at ``step`` (a live control change, for instance). */
  mark(step, label) {
    this.shapes.push({ step, label });
    Plotly.relayout(this.el, {
      shapes: this.shapes.map((m) => ({
        type: "line", xref: "x", yref: "paper", x0: m.step, x1: m.step, y0: 0, y1: 1,
        line: { color: cssVar("--muted"), dash: "dot", width: 1 },
      })),
      annotations: this.shapes.map((m) => ({
        x: m.step, xref: "x", y: 1, yref: "paper", yanchor: "top", xanchor: "left", text: plain(m.label),
        showarrow: false, font: { size: 10, color: cssVar("--muted") },
      })),
    });
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
