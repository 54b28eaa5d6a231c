// The compare page's parallel coordinates: one line per run across the config fields that differ between the
// runs (a sweep's varied fields) and then each run's final metrics, so which setting led where reads at a glance.
// Plotly's parcoords (shipped in plotly.min.js); drawn once, from what the page loaded.

/* global Plotly */
import { plain, themeLayout } from "./charts.js";

/** Final metrics shown, in order, when any run has them: what a sweep is usually judged by. */
export const RESULTS = ["eval/modes", "eval/hq_frac", "eval/fd", "eval/classes", "loss/elbo", "loss/d", "grad/g_norm"];

/** One parcoords axis from per-run values: numbers as they are, anything else as labelled categories. */
function dimension(label, values) {
  if (values.every((v) => v === null || typeof v === "number")) {
    return { label: plain(label), values: values.map((v) => (v === null ? NaN : v)) };
  }
  const text = values.map((v) => (v === null ? "—" : typeof v === "string" ? v : JSON.stringify(v)));
  const categories = [...new Set(text)];
  return {
    label: plain(label), values: text.map((t) => categories.indexOf(t)),
    tickvals: categories.map((_, i) => i), ticktext: categories.map(plain), range: [0, Math.max(1, categories.length - 1)],
  };
}

/**
 * @param {HTMLElement} el
 * @param {{name: string, values: any[]}[]} varied differing config fields, values in the runs' order
 * @param {Map<string, number|null>[]} finals per run (same order), the last value of each logged key
 * @param {string[]} colors per run (same order), its colour on the rest of the page
 */
export function drawParcoords(el, varied, finals, colors) {
  const dims = varied.map((f) => dimension(f.name, f.values));
  for (const key of RESULTS) {
    const values = finals.map((f) => (f.has(key) ? f.get(key) : null));
    if (values.some((v) => v !== null)) dims.push(dimension(`final ${key}`, values));
  }
  const n = finals.length;
  const scale = finals.map((_, i) => [n === 1 ? 0 : i / (n - 1), colors[i]]);
  const trace = {
    type: "parcoords", dimensions: dims,
    // Each run keeps its colour from the rest of the page: the colour scale maps run i to colors[i].
    line: { color: finals.map((_, i) => i), colorscale: scale, cmin: 0, cmax: Math.max(1, n - 1) },
  };
  const layout = { ...themeLayout(), margin: { l: 64, r: 64, t: 48, b: 24 } };
  Plotly.newPlot(el, [trace], layout, { displaylogo: false, responsive: true });
}
