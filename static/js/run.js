// The run page: history first, then the live stream from where history ends.

/* global htmx */
import { cssVar, LineChart, plain, SnapshotChart } from "./charts.js";
import { connectionIndicator, RunStream } from "./stream.js";
import { FieldView } from "./field.js";
import { SaturationView } from "./saturation.js";
import { groupOf, planned, specFamily } from "./keys.js";
import { samplingNote } from "./sampling.js";
import { ExtraCharts } from "./extra.js";
import { SampleView } from "./samples.js";
import { lossFromNorms, showControls, showGLoss } from "./controls.js";
import { zoomDetail } from "./zoom.js";
import { RunClock } from "./time.js";
import { LOSS_VARS, mountToolbar } from "./chartview.js";

const boot = JSON.parse(document.getElementById("boot").textContent);
const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["completed", "stopped", "failed", "interrupted"]);
// 2,000 points per key: enough for a 1,280-px chart, and what the store answers from its per-block summaries
// on a 1M-step run (43 ms; 4,000 points there missed them and took 445 ms, docs/benchmarks.md).
const HISTORY_POINTS = 2000;

const charts = {};
// boot.g_loss: the config's, for a launched run; a script's GAN run tells it by its norms (lossFromNorms).
const state = { gLoss: boot.g_loss, step: boot.step, klDims: new Map(), evalLatest: new Map(), alerts: new Set(),
  status: boot.status, startedAt: boot.started_at, endedAt: boot.ended_at };
// Keys no panel was made for (a script's own): a chart per prefix, after the built-in panels.
const extra = new ExtraCharts($("panels"), (group) => (group === "other"
  ? { title: "Other metrics", note: "keys without a prefix" } : { title: `${group}/…`, note: "logged by the run" }),
(chart) => zoomDetail(chart, rangeOf), { origin: () => state.startedAt });

/** A zoomed chart's lines at full resolution: each trace id on this page is its metric key. */
async function rangeOf(ids, start, end) {
  const keys = encodeURIComponent([...new Set(ids)].join(","));
  const answer = await getJSON(`/api/runs/${boot.id}/metrics?keys=${keys}&start=${start}&end=${end}`
    + `&max_points=${HISTORY_POINTS}`);
  return answer.metrics;
}

function log(axis = {}) {
  return { yaxis: { type: "log", exponentformat: "power", ...axis } };
}

/** A line chart whose log/linear choice is remembered under ``name`` (the compare page's charts share the names). */
function line(id, name, layout) {
  return new LineChart($(id), layout, { name, origin: () => state.startedAt });
}

function buildCharts() {
  if (boot.kind === "gan") {
    charts.losses = line("chart-losses", "losses", { yaxis: { title: { text: "loss (nats)" } } });
    charts.gnorm = line("chart-gnorm", "gnorm", { ...log({ title: { text: "‖∇θ L_G‖₂" } }) });
    charts.dprob = line("chart-dprob", "dprob", { yaxis: { title: { text: "probability" }, range: [0, 1] } });
    charts.layers = line("chart-layers", "layers", { ...log({ title: { text: "‖∇‖₂ per tensor" } }),
      showlegend: false, hovermode: "closest" });
    charts.saturation = new SaturationView($("chart-saturation"));
    if ($("chart-field")) charts.field = new FieldView($("chart-field"));
  } else if (boot.kind === "vae") {
    charts.elbo = line("chart-elbo", "elbo", { yaxis: { title: { text: "nats per input" } } });
    charts.kl = line("chart-kl", "kl", { yaxis: { title: { text: "KL (nats)" } } });
    charts.active = line("chart-active", "active", { yaxis: { title: { text: "latent dimensions" }, rangemode: "tozero" } });
    charts.vaegrad = line("chart-vaegrad", "vaegrad", log({ title: { text: "‖∇‖₂" } }));
    charts.kldim = new SnapshotChart($("chart-kldim"), { showlegend: false, xaxis: { title: { text: "latent dimension" }, dtick: 1 },
      yaxis: { title: { text: "KL (nats)" }, rangemode: "tozero" }, hovermode: "closest" }, () => {
      const dims = [...state.klDims.keys()].sort((a, b) => a - b);
      return { data: [{ type: "bar", x: dims, y: dims.map((d) => state.klDims.get(d)), marker: { color: cssVar("--accent") },
        hovertemplate: "z%{x}: %{y:.3g} nats<extra></extra>" }] };
    });
  }
  if ($("chart-eval")) {
    charts.eval = line("chart-eval", "eval", { yaxis: { title: { text: "count" }, rangemode: "tozero" },
      yaxis2: { title: { text: "fraction" }, overlaying: "y", side: "right", range: [0, 1.05], dtick: 0.25, showgrid: false },
      margin: { l: 48, r: 48, t: 8, b: 36 } });
  }
}

const SERIES = {
  "loss/d": ["losses", { name: "D loss" }],
  "loss/g": ["losses", { name: "G loss" }],
  "loss/d_real": ["losses", { name: "D loss, real", line: { dash: "dot", width: 1 } }],
  "loss/d_fake": ["losses", { name: "D loss, fake", line: { dash: "dot", width: 1 } }],
  "grad/g_norm": ["gnorm", () => ({ name: "applied", line: { width: 3, color: cssVar("--text") }, opacity: 0.55 })],
  "grad/g_norm_saturating": ["gnorm", () => ({ name: "saturating", line: { width: 1.5, color: cssVar(LOSS_VARS.saturating), dash: "dash" } })],
  "grad/g_norm_non_saturating": ["gnorm", () => ({ name: "non-saturating", line: { width: 1.5, color: cssVar(LOSS_VARS.non_saturating), dash: "dash" } })],
  "grad/d_norm": ["gnorm", { name: "D (applied)", visible: "legendonly", line: { width: 1 } }],
  "d/real_prob": ["dprob", () => ({ name: "D(x), real", line: { color: cssVar("--real") } })],
  "d/fake_prob": ["dprob", () => ({ name: "D(G(z)), fake", line: { color: cssVar("--fake") } })],
  "loss/elbo": ["elbo", { name: "ELBO", line: { width: 3 } }],
  "loss/recon": ["elbo", { name: "reconstruction −E log p(x|z)" }],
  "loss/kl": ["kl", { name: "KL closed form" }],
  "kl/mc": ["kl", { name: "KL Monte Carlo", line: { dash: "dot" } }],
  "vae/active_units": ["active", { name: "active units (batch)" }],
  "eval/active_units": ["active", { name: "active units (data set)", mode: "lines+markers" }],
  "grad/enc_norm": ["vaegrad", { name: "encoder" }],
  "grad/dec_norm": ["vaegrad", { name: "decoder" }],
};
const COUNT_EVALS = new Set(["eval/modes", "eval/classes", "eval/active_units"]);
const FRACTION_EVALS = new Set(["eval/hq_frac", "eval/precision", "eval/recall", "eval/coverage"]);

/** Route one key's points to its chart: its built-in panel if this run's kind has one, else a generic chart. */
function series(key, steps, values, times = null) {
  if (specFamily(key) === "telemetry") {
    noteSampling(key, values);
    return;
  }
  if (!planned(key, boot.kind)) {
    if (key.startsWith("eval/")) noteEval(key, steps, values);
    const group = groupOf(key);
    extra.append(group, key, steps, values, { name: plain(group === "other" ? key : key.slice(group.length + 1)) }, times);
    return;
  }
  const route = SERIES[key];
  if (route && charts[route[0]]) {
    const spec = typeof route[1] === "function" ? route[1]() : route[1];
    charts[route[0]].append(key, steps, values, spec, times);
    if (key === "eval/active_units") noteEval(key, steps, values);
    // The ELBO chart shows both of its terms: reconstruction and KL.
    if (key === "loss/kl" && charts.elbo) charts.elbo.append(key, steps, values, { name: "KL(q‖p)", line: { dash: "dash" } }, times);
    return;
  }
  if (key.startsWith("grad/g_layer/") && charts.layers) {
    charts.layers.append(key, steps, values, { name: key.slice(13), line: { width: 1 } }, times);
  } else if (key.startsWith("kl/dim/") && charts.kldim) {
    const last = values[values.length - 1];
    if (last !== undefined) {
      state.klDims.set(Number(key.slice(7)), last);
      charts.kldim.update();
    }
  } else if (key.startsWith("eval/")) {
    noteEval(key, steps, values);
    if (!charts.eval) return;
    if (COUNT_EVALS.has(key)) charts.eval.append(key, steps, values, { name: key.slice(5), mode: "lines+markers" }, times);
    else if (FRACTION_EVALS.has(key)) charts.eval.append(key, steps, values, { name: key.slice(5), mode: "lines+markers", yaxis: "y2", line: { dash: "dot" } }, times);
  }
}

function noteEval(key, steps, values) {
  if (!steps.length) return;
  $("eval-panel").hidden = false;
  state.evalLatest.set(key, { step: steps[steps.length - 1], value: values[values.length - 1] });
  const rows = [...state.evalLatest.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([k, { step, value }]) => {
    const tr = document.createElement("tr");
    tr.dataset.key = k;
    for (const [text, cls] of [[k.slice(5).replace(/_/g, " "), ""], [value === null ? "—" : Number(value).toPrecision(4), "num"], [`step ${step}`, "muted"]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  });
  const table = document.createElement("table");
  table.append(...rows);
  $("eval-table").replaceChildren(table);
}

/** The newest of each ``telemetry/*`` key, told in words above the charts: which keys are sampled, how often. */
const sampling = {};
function noteSampling(key, values) {
  const last = values[values.length - 1];
  if (last === null || last === undefined) return;
  sampling[key] = last;
  const text = samplingNote(sampling, boot.kind);
  const note = $("telemetry-note");
  note.textContent = text;
  note.hidden = !text;
}

const NORMS = ["grad/g_norm", "grad/g_norm_saturating", "grad/g_norm_non_saturating"];

/** A script's GAN run: the loss in force, told by the newest step whose norms say it. */
function noteGLoss(steps, data) {
  const [g, sat, ns] = NORMS.map((k) => data[k]);
  if (!boot.external || boot.kind !== "gan" || !g || !sat || !ns) return;
  for (let i = steps.length - 1; i >= 0; i--) {
    const loss = lossFromNorms(g[i], sat[i], ns[i]);
    if (loss) {
      if (loss !== state.gLoss) setGLoss(loss);
      return;
    }
  }
}

/** The newest point of each of ``keys`` in a history, as a one-step frame's data, if they share that step. */
function newestShared(metrics, keys) {
  const last = keys.map((k) => metrics[k]).map((h) => (h?.step.length ? [h.step.at(-1), h.value.at(-1)] : null));
  if (last.some((p) => p === null || p[0] !== last[0][0])) return null;
  return { step: [last[0][0]], data: Object.fromEntries(keys.map((k, i) => [k, [last[i][1]]])) };
}

function onMetrics(frame) {
  for (const [key, values] of Object.entries(frame.data)) series(key, frame.step, values, frame.time);
  noteGLoss(frame.step, frame.data);
  const step = frame.step[frame.step.length - 1];
  if (step > state.step && !Object.keys(frame.data).every((k) => k.startsWith("eval/"))) {
    state.step = step;
    $("run-step").textContent = step.toLocaleString("en");
  }
}

function showAlert(frame) {
  const id = `${frame.kind}@${frame.step}`;
  if (state.alerts.has(id)) return;
  state.alerts.add(id);
  const banner = document.createElement("div");
  banner.className = `alert-banner alert-${frame.kind}`;
  banner.dataset.kind = frame.kind;
  banner.setAttribute("role", "alert");
  const title = document.createElement("strong");
  title.textContent = frame.kind.replace(/_/g, " ");
  const text = document.createElement("span");
  text.textContent = `step ${frame.step}: ${frame.message}`;
  banner.append(title, text);
  if (frame.kind === "gradient_collapse" && state.gLoss === "saturating") {
    const hint = document.createElement("span");
    hint.className = "muted";
    hint.textContent = "— the saturating loss has lost its gradient; flip to non_saturating to watch it recover.";
    banner.append(hint);
  }
  $("alerts").prepend(banner);
}

function setGLoss(loss) {
  state.gLoss = loss;
  showGLoss(loss);
}

/** A script's run that starts watching a model changes kind (custom → gan): its page has other panels. */
let reloading = false;
async function followKind(kind) {
  if (reloading) return;
  reloading = true;
  // The frame is published before the server records the new kind: wait until a reload would render it.
  for (let i = 0; i < 40; i++) {
    const run = await getJSON(`/api/runs/${boot.id}`).catch(() => null);
    if (run?.kind === kind) return window.location.reload();
    await new Promise((done) => setTimeout(done, 250));
  }
  reloading = false;
}

function onCapabilities(frame) {
  if (frame.kind && frame.kind !== boot.kind) return followKind(frame.kind);
  boot.controls = frame.controls;
  return showControls(frame.controls);
}

function setStatus(status, error) {
  const badge = $("run-status");
  badge.textContent = status;
  badge.className = `badge status-${status}`;
  state.status = status;
  // The clock's ends, for a run that starts or ends while the page is open (the page had them for the rest).
  if (status === "running" && !state.startedAt) state.startedAt = Date.now() / 1000;
  if (TERMINAL.has(status) && !state.endedAt) state.endedAt = Date.now() / 1000;
  // "waiting for Ray: …" holds only while queued; the node it then runs on is on the page after a reload.
  const where = $("run-where");
  if (where && status !== "queued" && where.classList.contains("where-waiting")) where.hidden = true;
  if (error) {
    $("run-error").textContent = error;
    $("run-error").hidden = false;
  }
  if (TERMINAL.has(status)) {
    for (const el of document.querySelectorAll("#stop-button, #control-apply, #flip-button")) el.disabled = true;
  }
}

const img = $("sample-img");
const samples = $("sample-slider") && new SampleView({
  slider: $("sample-slider"), label: $("sample-label"), pick: $("sample-pick"), panel: $("sample-panel"),
  // The 2-D plane draws the JSON snapshots; an image panel, the PNG grids.
  accept: (frame) => typeof frame.url === "string" && frame.url.endsWith(".json") === Boolean(charts.field),
  keep: boot.external ? null : boot.config?.intervals?.keep_samples ?? null, // a script's samples are all kept
  show: (sample) => {
    if (charts.field) return charts.field.load(sample.url);
    img.src = sample.url;
    img.alt = sample.label;
    img.hidden = false;
    img.dataset.step = sample.step;
    img.dataset.label = sample.label;
    return undefined;
  },
});

function onFrame(frame) {
  switch (frame.type) {
    case "metrics": return onMetrics(frame);
    case "hist": return charts.saturation?.hist(frame);
    case "dldh": return charts.saturation?.samples(frame);
    case "sample":
      samples?.add(frame);
      return htmx.trigger(document.body, "artifacts");
    case "checkpoint": return htmx.trigger(document.body, "artifacts");
    case "alert": return showAlert(frame);
    case "control":
      if (frame.changes?.g_loss) {
        setGLoss(frame.changes.g_loss);
        for (const chart of [charts.gnorm, charts.losses, charts.dprob]) chart?.mark(frame.step, `→ ${frame.changes.g_loss}`);
      }
      return;
    case "status": return setStatus(frame.status, frame.error);
    case "capabilities": return onCapabilities(frame);
    case "config": return htmx.trigger(document.body, "config-changed");
    default: return undefined;
  }
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

async function main() {
  mountToolbar($("panels"));
  if (state.gLoss && $("run-gloss")) $("run-gloss").className = `loss-${state.gLoss}`;
  buildCharts();
  for (const chart of Object.values(charts)) {
    if (!(chart instanceof LineChart)) continue;
    zoomDetail(chart, rangeOf);
    chart.scaleButton(chart.el.closest(".panel")?.querySelector("h3"));
  }
  const steps = boot.config?.train?.steps; // a launched run's; a script's run has no planned length, so no ETA
  new RunClock($("run-clock"), () => ({ status: state.status, step: state.step, steps: Number.isInteger(steps) ? steps : null,
    startedAt: state.startedAt, endedAt: state.endedAt }));
  // History up to (at least) last_seq, then every frame after it live: the chart
  // drops points it already has, so the overlap leaves no gap and no duplicate.
  const since = boot.last_seq;
  const [history, events] = await Promise.all([
    getJSON(`/api/runs/${boot.id}/metrics?max_points=${HISTORY_POINTS}`),
    getJSON(`/api/runs/${boot.id}/events?until=${since}`),
  ]);
  for (const [key, h] of Object.entries(history.metrics)) series(key, h.step, h.value, h.time);
  const newest = newestShared(history.metrics, NORMS);
  if (newest) noteGLoss(newest.step, newest.data);
  for (const frame of events.frames) {
    if (frame.type !== "metrics") onFrame(frame);
  }
  const indicate = connectionIndicator();
  const stream = new RunStream(boot.id, onFrame, (s) => indicate(boot.id, s));
  stream.open(since);
  // onFrame: the stream's own handler, so that a benchmark can time the page's work per frame without a server.
  window.gradwatch = { charts, extra, stream, state, onFrame, get sampleSteps() { return samples ? samples.steps : []; } };
  document.body.dataset.ready = "true";
}

main().catch((error) => {
  $("run-error").textContent = `The page could not load this run's history: ${error.message}`;
  $("run-error").hidden = false;
});
