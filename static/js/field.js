// The 2-D data plane: D's belief as a heat map, real and generated points, and
// where one generator step would move each fake point under each loss.
//
// Both arrow sets are drawn at one common scale (the longer mean arrow is 8 %
// of the plot width), as in the PNG the worker writes, so when D wins the
// saturating arrows visibly shrink to nothing while the non-saturating ones
// keep their length. Only the newest requested snapshot is drawn: a slow
// fetch that resolves after a newer one is dropped.

import { cssVar, SnapshotChart } from "./charts.js";

const MAX_ARROWS = 250;
const ARROW_FRACTION = 0.08;

function segments(points, arrows, scale) {
  const x = [];
  const y = [];
  const n = Math.min(points.length, arrows.length, MAX_ARROWS);
  for (let i = 0; i < n; i++) {
    const [px, py] = points[i];
    const [dx, dy] = arrows[i];
    if (px === null || dx === null || dy === null) continue;
    x.push(px, px + dx * scale, null);
    y.push(py, py + dy * scale, null);
  }
  return { x, y };
}

export class FieldView {
  constructor(el) {
    this.snapshot = null;
    this.wanted = null;
    this.chart = new SnapshotChart(el, {
      hovermode: "closest",
      margin: { l: 48, r: 12, t: 8, b: 40 },
      // No scaleanchor until there is data: Plotly would pin x to its empty-plot range [-1, 6] for good.
      xaxis: { title: { text: "x₁" } },
      yaxis: { title: { text: "x₂" } },
    }, () => this.render());
  }

  async load(url) {
    this.wanted = url;
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok || this.wanted !== url) return;
    const snapshot = await response.json();
    if (this.wanted !== url) return;
    this.snapshot = snapshot;
    this.chart.el.dataset.step = snapshot.step;
    this.chart.update();
  }

  render() {
    const s = this.snapshot;
    if (!s) return { data: [] };
    const [xmin, xmax] = s.extent;
    const means = Object.values(s.arrow_mean).filter((m) => m !== null && m > 0);
    const scale = means.length ? ARROW_FRACTION * (xmax - xmin) / Math.max(...means) : 0;
    const satArrows = segments(s.fake, s.arrows.saturating, scale);
    const nsArrows = segments(s.fake, s.arrows.non_saturating, scale);
    const fmt = (m) => (m === null ? "—" : m.toExponential(2));
    return {
      data: [
        { type: "heatmap", x: s.grid_x, y: s.grid_y, z: s.d_prob, zmin: 0, zmax: 1, colorscale: "RdBu", reversescale: false,
          colorbar: { title: { text: "D(x)" }, thickness: 10, len: 0.8 }, hovertemplate: "D(%{x:.2f}, %{y:.2f}) = %{z:.3f}<extra></extra>",
          opacity: 0.75, name: "D(x)" },
        { type: "scatter", mode: "markers", x: s.real.map((p) => p[0]), y: s.real.map((p) => p[1]), name: "real",
          marker: { size: 4, color: cssVar("--real") }, hoverinfo: "skip" },
        { type: "scatter", mode: "markers", x: s.fake.map((p) => p[0]), y: s.fake.map((p) => p[1]), name: "generated",
          marker: { size: 4, color: cssVar("--fake") }, hoverinfo: "skip" },
        { type: "scatter", mode: "lines", ...satArrows, name: `G step, saturating (mean ${fmt(s.arrow_mean.saturating)})`,
          line: { color: cssVar("--sat"), width: 1.5 }, hoverinfo: "skip" },
        { type: "scatter", mode: "lines", ...nsArrows, name: `G step, non-saturating (mean ${fmt(s.arrow_mean.non_saturating)})`,
          line: { color: cssVar("--nonsat"), width: 1.5 }, hoverinfo: "skip" },
      ],
      layout: {
        // A fixed window per snapshot: autorange would chase the arrows and squeeze the heat map.
        xaxis: { title: { text: `x₁ · step ${s.step} · training loss ${s.g_loss}` }, range: [s.extent[0], s.extent[1]],
          autorange: false, constrain: "domain" },
        yaxis: { title: { text: "x₂" }, range: [s.extent[2], s.extent[3]], autorange: false, scaleanchor: "x", scaleratio: 1,
          constrain: "domain" },
        uirevision: s.extent.join(","),
      },
    };
  }
}
