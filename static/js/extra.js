// Generic live charts for the keys no panel was made for: one panel per group, made when its first key arrives.
//
// A user's script logs what it likes ("val/acc", "my/metric", "epoch"); the run
// page groups such keys by prefix, the compare page gives each key its own
// chart. The lines are ordinary LineCharts: history first, then the stream,
// points batched per animation frame like every other chart.

import { LineChart } from "./charts.js";

/** Panels sort by group name, with the catch-all "other" last. */
function order(group) {
  return group === "other" ? "\uffff" : group;
}

export class ExtraCharts {
  /**
   * @param {HTMLElement} container where the panels go, after what it holds already
   * @param {(group: string) => {title: string, note?: string}} describe a panel's heading (set as text)
   * @param {(chart: LineChart) => void} [made] called with each chart as it is made (the run page's zoom)
   * @param {object} [options] LineChart options for every chart (``origin`` of "time since start")
   */
  constructor(container, describe, made = () => {}, options = {}) {
    this.container = container;
    this.describe = describe;
    this.made = made;
    this.options = options;
    this.charts = new Map(); // group -> LineChart
  }

  /** The chart of ``group``, made (panel and all) on first use. */
  chart(group) {
    let chart = this.charts.get(group);
    if (chart) return chart;
    const section = document.createElement("section");
    section.className = "card panel extra-panel";
    section.dataset.group = group;
    const heading = document.createElement("h3");
    const { title, note } = this.describe(group);
    heading.textContent = title;
    if (note) {
      const muted = document.createElement("span");
      muted.className = "muted";
      muted.textContent = note;
      heading.append(" ", muted);
    }
    const el = document.createElement("div");
    el.className = "chart";
    section.append(heading, el);
    const next = [...this.container.querySelectorAll(":scope > .extra-panel")]
      .find((s) => order(s.dataset.group) > order(group));
    this.container.insertBefore(section, next || null);
    chart = new LineChart(el, {}, { ...this.options, name: `extra:${group}` });
    chart.scaleButton(heading);
    this.charts.set(group, chart);
    this.made(chart);
    return chart;
  }

  /** Queue points of trace ``id`` on ``group``'s chart (``spec``: name, colour… of a new trace; ``times``: unix
   * seconds per step). */
  append(group, id, steps, values, spec, times = null) {
    // SVG, not WebGL: a browser keeps about 16 WebGL contexts and drops the oldest beyond that (a blank built-in
    // chart), and a script may log dozens of groups. Lines are thinned to a few thousand points anyway.
    this.chart(group).append(id, steps, values, { type: "scatter", ...spec }, times);
  }

  /** Points the trace ``id`` holds on screen (0 before it exists): what tests and benchmarks read. */
  points(id) {
    for (const chart of this.charts.values()) {
      if (chart.has(id)) return chart.lengths()[chart.ids.get(id)] || 0;
    }
    return 0;
  }
}
