// The saturation panel: measured per-sample |∂loss/∂h| on the analytic curves, logit histograms beneath.
//
// Per fake sample, ∂loss/∂h is −σ(h) under the saturating loss and −(1 − σ(h))
// under the non-saturating one. The points come from the worker (autograd on
// the real batch, `dldh` frames); the curves are drawn here from the formula.
// When D wins, the fake logits slide left, where σ(h) → 0: the orange points
// sink to the axis while the blue ones stay near 1.

import { cssVar, SnapshotChart } from "./charts.js";

const sigmoid = (h) => 1 / (1 + Math.exp(-h));

export class SaturationView {
  constructor(el) {
    this.hists = new Map(); // key -> latest hist frame
    this.points = null; // latest dldh frame
    this.chart = new SnapshotChart(el, {
      hovermode: "closest",
      xaxis: { title: { text: "discriminator logit h" }, anchor: "y2" },
      yaxis: { title: { text: "|∂loss/∂h|" }, domain: [0.4, 1], range: [-0.03, 1.05] },
      yaxis2: { title: { text: "count" }, domain: [0, 0.3], rangemode: "tozero" },
      barmode: "overlay",
      bargap: 0,
    }, () => this.render());
  }

  hist(frame) {
    this.hists.set(frame.key, frame);
    this.chart.update();
  }

  samples(frame) {
    this.points = frame;
    this.chart.update();
  }

  range() {
    let lo = Infinity;
    let hi = -Infinity;
    for (const frame of this.hists.values()) {
      lo = Math.min(lo, frame.edges[0]);
      hi = Math.max(hi, frame.edges[frame.edges.length - 1]);
    }
    for (const h of this.points?.h || []) {
      if (h !== null) {
        lo = Math.min(lo, h);
        hi = Math.max(hi, h);
      }
    }
    if (!Number.isFinite(lo)) [lo, hi] = [-6, 6];
    const mid = (lo + hi) / 2;
    const half = Math.max((hi - lo) / 2 * 1.1, 4);
    return [mid - half, mid + half];
  }

  render() {
    const sat = cssVar("--sat");
    const nonsat = cssVar("--nonsat");
    const [lo, hi] = this.range();
    const xs = Array.from({ length: 241 }, (_, i) => lo + (hi - lo) * i / 240);
    const data = [
      { type: "scatter", mode: "lines", x: xs, y: xs.map(sigmoid), name: "σ(h): saturating", line: { color: sat, width: 2 },
        hoverinfo: "skip" },
      { type: "scatter", mode: "lines", x: xs, y: xs.map((h) => 1 - sigmoid(h)), name: "1 − σ(h): non-saturating",
        line: { color: nonsat, width: 2 }, hoverinfo: "skip" },
    ];
    if (this.points) {
      const marker = (color) => ({ color, size: 6, line: { width: 1, color: cssVar("--surface") } });
      data.push(
        { type: "scatter", mode: "markers", x: this.points.h, y: this.points.saturating, name: "measured, saturating",
          marker: marker(sat), hovertemplate: "h=%{x:.3g}<br>|∂L/∂h|=%{y:.3g}<extra>saturating</extra>" },
        { type: "scatter", mode: "markers", x: this.points.h, y: this.points.non_saturating, name: "measured, non-saturating",
          marker: marker(nonsat), hovertemplate: "h=%{x:.3g}<br>|∂L/∂h|=%{y:.3g}<extra>non-saturating</extra>" },
      );
    }
    for (const [key, name, color] of [["hist/real_logit", "real logits", cssVar("--real")], ["hist/fake_logit", "fake logits", cssVar("--fake")]]) {
      const frame = this.hists.get(key);
      if (!frame) continue;
      const centres = frame.counts.map((_, i) => (frame.edges[i] + frame.edges[i + 1]) / 2);
      data.push({ type: "bar", x: centres, y: frame.counts, name, yaxis: "y2", marker: { color }, opacity: 0.55,
        width: frame.edges[1] - frame.edges[0], hovertemplate: `${name}: %{y}<extra></extra>` });
    }
    const step = this.points?.step ?? [...this.hists.values()].at(-1)?.step;
    return {
      data,
      layout: {
        xaxis: { title: { text: step === undefined ? "discriminator logit h" : `discriminator logit h · step ${step}` },
          anchor: "y2", range: [lo, hi] },
      },
    };
  }
}
