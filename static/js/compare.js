// The compare page: chosen runs overlaid on shared axes, one colour per run.
//
// Each run has its own stream and history, exactly as on its run page. On the
// gradient chart the solid line is the gradient that was applied and the
// dotted one is the shadow: the norm under the loss that is not training
// right now (the other of saturating / non-saturating), at the same
// parameters and batch.

import { cssVar, LineChart, PALETTE, plain } from "./charts.js";
import { connectionIndicator, RunStream } from "./stream.js";
import { specFamily } from "./keys.js";
import { ExtraCharts } from "./extra.js";
import { drawParcoords } from "./parcoords.js";
import { mountToolbar, runStyles } from "./chartview.js";
import { zoomDetail } from "./zoom.js";
import { PlaneStrip } from "./twin.js";
import { samplingNote } from "./sampling.js";

const boot = JSON.parse(document.getElementById("boot").textContent);
const $ = (id) => document.getElementById(id);
// 2,000 points per key: enough for a 1,280-px chart, and what the store answers from its per-block summaries
// on a 1M-step run (43 ms; 4,000 points there missed them and took 445 ms, docs/benchmarks.md).
const HISTORY_POINTS = 2000;

// A run's start, for "time since start": each line counts from its own run's start.
const startOf = new Map(boot.map((r) => [r.id, r.started_at ?? null]));
const origin = (traceId) => startOf.get(traceId.split(":")[0]) ?? null;
// Many runs (the server's LEGEND_RUNS): the charts have no legends, the run list above them names every run.
const MANY = Boolean($("compare-runs")?.classList.contains("many"));
/** A line chart whose log/linear choice is remembered under ``name`` (shared with the run page's chart of that name). */
const line = (id, name, layout) => new LineChart($(id), MANY ? { ...layout, showlegend: false } : layout, { name, origin });
if (boot.length) mountToolbar($("cmp-panels"));
const charts = {
  gnorm: line("cmp-gnorm", "gnorm", { yaxis: { type: "log", exponentformat: "power", title: { text: "‖∇θ L_G‖₂" } } }),
  gloss: line("cmp-gloss", "gloss", { yaxis: { title: { text: "loss (nats)" } } }),
  dfake: line("cmp-dfake", "dfake", { yaxis: { title: { text: "D(G(z))" }, range: [0, 1] } }),
  dloss: line("cmp-dloss", "dloss", { yaxis: { title: { text: "loss (nats)" } } }),
  eval: line("cmp-eval", "eval", { yaxis: { title: { text: "count" }, rangemode: "tozero" } }),
  elbo: line("cmp-elbo", "elbo", { yaxis: { title: { text: "ELBO (nats)" } } }),
};
// What each trace draws, so that a zoom can fetch its steps at full resolution: trace id -> {run, keys, derive}.
const sources = new Map();
function source(id, run, keys, derive = (m) => m[keys[0]]) {
  if (!sources.has(id)) sources.set(id, { run, keys, derive });
}

/** A zoomed chart's lines at full resolution: per run one request for the keys its traces draw. */
async function rangeOf(ids, start, end) {
  const byRun = new Map();
  for (const id of ids) {
    const src = sources.get(id);
    if (!src) continue;
    if (!byRun.has(src.run)) byRun.set(src.run, []);
    byRun.get(src.run).push([id, src]);
  }
  const out = {};
  await Promise.all([...byRun].map(async ([run, traces]) => {
    const keys = encodeURIComponent([...new Set(traces.flatMap(([, src]) => src.keys))].join(","));
    const response = await fetch(`/api/runs/${run}/metrics?keys=${keys}&start=${start}&end=${end}&max_points=${HISTORY_POINTS}`);
    if (!response.ok) throw new Error(`run ${run}: ${response.status}`);
    const { metrics } = await response.json();
    for (const [id, src] of traces) {
      const points = src.derive(metrics);
      if (points) out[id] = points;
    }
  }));
  return out;
}

/** The shadow line's points from a history: the other loss's norm, on the applied norm's steps. */
function shadowHistory(m) {
  const g = m["grad/g_norm"];
  if (!g) return null;
  const sat = alignedHistory(m, "grad/g_norm_saturating", g.step);
  const ns = alignedHistory(m, "grad/g_norm_non_saturating", g.step);
  return taken(g.step, shadow(g.step, g.value, sat, ns), g.time);
}

/**
 * The points where the shadow was taken. The telemetry budget samples it (every few steps), so the steps between
 * have none: dropped rather than drawn as gaps, the dotted line joins the sampled points.
 */
function taken(steps, values, times) {
  const keep = [];
  for (let i = 0; i < steps.length; i++) if (values[i] !== null && values[i] !== undefined) keep.push(i);
  return { step: keep.map((i) => steps[i]), value: keep.map((i) => values[i]), time: times ? keep.map((i) => times[i]) : times };
}

// Every key outside SPEC §2 that any compared run logs (a script's own "val/acc"…): one chart per key, a line per run.
const extra = new ExtraCharts($("cmp-panels"), (key) => ({ title: key, note: "logged by the runs" }),
  (chart) => zoomDetail(chart, rangeOf), { origin });
const finals = []; // per run, in boot order: the last value of each key its history holds

/** Shadow norm per point: whichever of the two losses' norms is not the applied one. */
function shadow(steps, applied, sat, nonsat) {
  const out = [];
  for (let i = 0; i < steps.length; i++) {
    if (applied[i] === null || applied[i] === undefined) out.push(null);
    else if (applied[i] === sat[i]) out.push(nonsat[i]);
    else if (applied[i] === nonsat[i]) out.push(sat[i]);
    else out.push(null); // another loss (hinge, …) trains: neither is its shadow
  }
  return out;
}

/** Align per-key downsampled history on the steps the applied norm has. */
function alignedHistory(metrics, key, steps) {
  const h = metrics[key];
  if (!h) return steps.map(() => null);
  const byStep = new Map(h.step.map((s, i) => [s, h.value[i]]));
  return steps.map((s) => (byStep.has(s) ? byStep.get(s) : null));
}

/**
 * Legend labels: what tells the runs apart. A twin's names differ only after a
 * long shared prefix ("Ring of 8, … · g_loss=saturating"); repeating it in every
 * legend entry buries the difference, so the shared words are dropped.
 */
function labels(runs) {
  const names = runs.map((r) => r.name);
  if (names.length < 2) return names;
  let prefix = names[0];
  for (const n of names) while (!n.startsWith(prefix)) prefix = prefix.slice(0, -1);
  const cut = Math.max(prefix.lastIndexOf(" "), prefix.lastIndexOf("·") + 1);
  return names.map((n) => (cut > 0 ? n.slice(cut).replace(/^[\s·]+/, "") : n) || n);
}
const LABELS = labels(boot);
// A run's colour: its generator loss's when no other run here has that loss (a twin: orange saturating, blue
// non-saturating, as on each run's page), else a palette colour; past the palette, dashed.
const STYLES = runStyles(boot, PALETTE, cssVar);

/** Route one run's points (``times``: unix seconds per step) to the charts. */
function plot(run, index, steps, data, times = null) {
  const { color, dash } = STYLES[index];
  const name = plain(LABELS[index]);
  const style = (extra = {}) => ({ name, legendgroup: run.id, line: { color, width: 2, dash, ...extra } });
  const add = (chart, id, key, values, spec) => {
    source(id, run.id, [key]);
    chart.append(id, steps, values, spec, times);
  };
  const g = data["grad/g_norm"];
  if (g) {
    add(charts.gnorm, `${run.id}:applied`, "grad/g_norm", g, { ...style(), name: `${name} · applied` });
    const sat = data["grad/g_norm_saturating"] || [];
    const ns = data["grad/g_norm_non_saturating"] || [];
    source(`${run.id}:shadow`, run.id, ["grad/g_norm", "grad/g_norm_saturating", "grad/g_norm_non_saturating"], shadowHistory);
    const kept = taken(steps, shadow(steps, g, sat, ns), times);
    charts.gnorm.append(`${run.id}:shadow`, kept.step, kept.value,
      { ...style({ dash: "dot", width: 1.5 }), name: `${name} · shadow`, showlegend: true }, kept.time);
  }
  if (data["loss/g"]) add(charts.gloss, run.id, "loss/g", data["loss/g"], style());
  if (data["d/fake_prob"]) add(charts.dfake, run.id, "d/fake_prob", data["d/fake_prob"], style());
  if (data["loss/d"]) add(charts.dloss, run.id, "loss/d", data["loss/d"], style());
  if (data["loss/elbo"]) add(charts.elbo, run.id, "loss/elbo", data["loss/elbo"], style());
  for (const key of ["eval/modes", "eval/classes"]) {
    if (data[key]) add(charts.eval, `${run.id}:${key}`, key, data[key], { ...style(), mode: "lines+markers", name: `${name} · ${key.slice(5)}` });
  }
  for (const [key, values] of Object.entries(data)) {
    if (specFamily(key) === "telemetry") noteSampling(run, index, key, values);
    else if (specFamily(key) === null) {
      source(`${run.id}:${key}`, run.id, [key]);
      extra.append(key, `${run.id}:${key}`, steps, values, style(), times);
    }
  }
}

/** Each run's newest ``telemetry/*`` values, told in words under its name (sampling.js, as on its run page). */
const sampling = boot.map(() => ({}));
function noteSampling(run, index, key, values) {
  const last = values[values.length - 1];
  if (last === null || last === undefined) return;
  sampling[index][key] = last;
  const note = document.querySelector(`[data-sampling-for="${run.id}"]`);
  if (!note) return;
  const text = samplingNote(sampling[index], run.kind);
  note.textContent = text;
  note.hidden = !text;
}

let planes = null; // the side-by-side data planes / sample grids (twin.js), where the page has them

function onFrame(run, index, frame) {
  if (frame.type === "sample") planes?.add(run.id, frame);
  else if (frame.type === "metrics") plot(run, index, frame.step, frame.data, frame.time);
  else if (frame.type === "status") {
    const badge = document.querySelector(`[data-status-for="${run.id}"]`);
    if (badge) {
      badge.textContent = frame.status;
      badge.className = `badge status-${frame.status}`;
    }
  } else if (frame.type === "alert") {
    const chip = document.querySelector(`[data-alert-for="${run.id}"]`);
    if (chip) {
      chip.hidden = false;
      chip.className = `alert-chip alert-${frame.kind}`;
      chip.dataset.kind = frame.kind;
      chip.textContent = `${frame.kind.replace(/_/g, " ")} @ ${frame.step}`;
      chip.title = frame.message;
    }
  } else if (frame.type === "control" && frame.changes?.g_loss) {
    charts.gnorm.mark(frame.step, `${LABELS[index]} → ${frame.changes.g_loss}`);
    const label = document.querySelector(`[data-gloss-for="${run.id}"]`);
    if (label) label.textContent = frame.changes.g_loss;
  }
}

/** A run's history and its non-metrics events up to the page's last_seq. */
function load(run) {
  return Promise.all([
    fetch(`/api/runs/${run.id}/metrics?max_points=${HISTORY_POINTS}`).then((r) => r.json()),
    fetch(`/api/runs/${run.id}/events?until=${run.last_seq}`).then((r) => r.json()),
  ]);
}
const loads = boot.map(load);
const allLoaded = Promise.all(loads);

async function start(run, index, indicate) {
  const swatch = document.querySelector(`li[data-run="${run.id}"] .swatch`);
  if (swatch) {
    swatch.style.backgroundColor = STYLES[index].color; // not `background`: it would clear a dashed swatch's pattern
    swatch.dataset.color = STYLES[index].color;
    if (STYLES[index].dash !== "solid") swatch.classList.add("dashed");
    swatch.dataset.dash = STYLES[index].dash; // which dash: past two rounds of the palette, "dashed" alone repeats
  }
  const since = run.last_seq;
  const [history, events] = await loads[index];
  // Every run's history is drawn in one go once all have arrived: each new trace (Plotly.addTraces) and each flush
  // redraws every line a chart already holds, so drawing run by run as they arrive cost O(runs²) redraws: 52 s
  // to load 10 runs, over 120 s for 20 (bench/browser.py --compare, docs/benchmarks.md).
  await allLoaded;
  const m = history.metrics;
  finals[index] = new Map();
  for (const [key, h] of Object.entries(m)) {
    const last = h.value.findLast((v) => v !== null && v !== undefined);
    if (last !== undefined) finals[index].set(key, last);
  }
  if (m["grad/g_norm"]) {
    const steps = m["grad/g_norm"].step;
    const data = {};
    for (const key of ["grad/g_norm", "grad/g_norm_saturating", "grad/g_norm_non_saturating"]) data[key] = alignedHistory(m, key, steps);
    plot(run, index, steps, data, m["grad/g_norm"].time);
  }
  for (const [key, h] of Object.entries(m)) {
    if (!key.startsWith("grad/g_norm")) plot(run, index, h.step, { [key]: h.value }, h.time);
  }
  for (const frame of events.frames) if (frame.type !== "metrics") onFrame(run, index, frame);
  const stream = new RunStream(run.id, (frame) => onFrame(run, index, frame), (s) => indicate(run.id, s));
  stream.open(since);
  return stream;
}

async function main() {
  const indicate = connectionIndicator();
  // Hide the charts no chosen run feeds (a VAE has no discriminator, a GAN no ELBO).
  const kinds = new Set(boot.map((r) => r.kind));
  if (!kinds.has("vae")) $("cmp-elbo").closest(".panel").hidden = true;
  if (!kinds.has("gan")) for (const id of ["cmp-gnorm", "cmp-gloss", "cmp-dfake", "cmp-dloss"]) $(id).closest(".panel").hidden = true;
  if (!kinds.has("gan") && !kinds.has("vae")) $("cmp-eval").closest(".panel").hidden = true;  // scripts' own metrics only
  for (const chart of Object.values(charts)) {
    zoomDetail(chart, rangeOf);
    chart.scaleButton(chart.el.closest(".panel")?.querySelector("h3"));
  }
  if ($("cmp-planes")) {
    planes = new PlaneStrip($("cmp-planes"), boot, { labels: LABELS, color: (i) => STYLES[i].color });
    planes.load();
  }
  const streams = await Promise.all(boot.map((run, i) => start(run, i, indicate)));
  const varied = JSON.parse($("varied").textContent);
  if (varied.length && $("cmp-parcoords")) drawParcoords($("cmp-parcoords"), varied, finals, STYLES.map((st) => st.color));
  // onFrame(runIndex, frame): the handler each run's stream calls, so that a benchmark can time the page's work
  // per frame without a server (bench/browser.py --compare).
  window.gradwatch = { charts, extra, streams, planes, onFrame: (i, frame) => onFrame(boot[i], i, frame) };
  document.body.dataset.ready = "true";
}

if (boot.length) main();
