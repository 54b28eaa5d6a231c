// The run page: history first, then the live stream from where history ends.

/* global htmx */
import { cssVar, LineChart, SnapshotChart } from "./charts.js";
import { connectionIndicator, RunStream } from "./stream.js";
import { FieldView } from "./field.js";
import { SaturationView } from "./saturation.js";

const boot = JSON.parse(document.getElementById("boot").textContent);
const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["completed", "stopped", "failed", "interrupted"]);
// 2,000 points per key: enough for a 1,280-px chart, and what the store answers from its per-block summaries
// on a 1M-step run (43 ms; 4,000 points there missed them and took 445 ms, docs/benchmarks.md).
const HISTORY_POINTS = 2000;

const charts = {};
const state = { gLoss: boot.config?.gan?.g_loss, step: boot.step, klDims: new Map(), evalLatest: new Map(), alerts: new Set() };

function log(extra = {}) {
  return { yaxis: { type: "log", exponentformat: "power", ...extra } };
}

function buildCharts() {
  if (boot.kind === "gan") {
    charts.losses = new LineChart($("chart-losses"), { yaxis: { title: { text: "loss (nats)" } } });
    charts.gnorm = new LineChart($("chart-gnorm"), { ...log({ title: { text: "‖∇θ L_G‖₂" } }) });
    charts.dprob = new LineChart($("chart-dprob"), { yaxis: { title: { text: "probability" }, range: [0, 1] } });
    charts.layers = new LineChart($("chart-layers"), { ...log({ title: { text: "‖∇‖₂ per tensor" } }),
      showlegend: false, hovermode: "closest" });
    charts.saturation = new SaturationView($("chart-saturation"));
    if ($("chart-field")) charts.field = new FieldView($("chart-field"));
  } else {
    charts.elbo = new LineChart($("chart-elbo"), { yaxis: { title: { text: "nats per input" } } });
    charts.kl = new LineChart($("chart-kl"), { yaxis: { title: { text: "KL (nats)" } } });
    charts.active = new LineChart($("chart-active"), { yaxis: { title: { text: "latent dimensions" }, rangemode: "tozero" } });
    charts.vaegrad = new LineChart($("chart-vaegrad"), log({ title: { text: "‖∇‖₂" } }));
    charts.kldim = new SnapshotChart($("chart-kldim"), { showlegend: false, xaxis: { title: { text: "latent dimension" }, dtick: 1 },
      yaxis: { title: { text: "KL (nats)" }, rangemode: "tozero" }, hovermode: "closest" }, () => {
      const dims = [...state.klDims.keys()].sort((a, b) => a - b);
      return { data: [{ type: "bar", x: dims, y: dims.map((d) => state.klDims.get(d)), marker: { color: cssVar("--accent") },
        hovertemplate: "z%{x}: %{y:.3g} nats<extra></extra>" }] };
    });
  }
  if ($("chart-eval")) {
    charts.eval = new LineChart($("chart-eval"), { yaxis: { title: { text: "count" }, rangemode: "tozero" },
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
  "grad/g_norm_saturating": ["gnorm", () => ({ name: "saturating", line: { width: 1.5, color: cssVar("--sat"), dash: "dash" } })],
  "grad/g_norm_non_saturating": ["gnorm", () => ({ name: "non-saturating", line: { width: 1.5, color: cssVar("--nonsat"), dash: "dash" } })],
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

/** Route one key's points to its chart. */
function series(key, steps, values) {
  const route = SERIES[key];
  if (route && charts[route[0]]) {
    const spec = typeof route[1] === "function" ? route[1]() : route[1];
    charts[route[0]].append(key, steps, values, spec);
    if (key === "eval/active_units") noteEval(key, steps, values);
    // The ELBO chart shows both of its terms: reconstruction and KL.
    if (key === "loss/kl" && charts.elbo) charts.elbo.append(key, steps, values, { name: "KL(q‖p)", line: { dash: "dash" } });
    return;
  }
  if (key.startsWith("grad/g_layer/") && charts.layers) {
    charts.layers.append(key, steps, values, { name: key.slice(13), line: { width: 1 } });
  } else if (key.startsWith("kl/dim/") && charts.kldim) {
    const last = values[values.length - 1];
    if (last !== undefined) {
      state.klDims.set(Number(key.slice(7)), last);
      charts.kldim.update();
    }
  } else if (key.startsWith("eval/")) {
    noteEval(key, steps, values);
    if (!charts.eval) return;
    if (COUNT_EVALS.has(key)) charts.eval.append(key, steps, values, { name: key.slice(5), mode: "lines+markers" });
    else if (FRACTION_EVALS.has(key)) charts.eval.append(key, steps, values, { name: key.slice(5), mode: "lines+markers", yaxis: "y2", line: { dash: "dot" } });
  }
}

function noteEval(key, steps, values) {
  if (!steps.length) return;
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

function onMetrics(frame) {
  for (const [key, values] of Object.entries(frame.data)) series(key, frame.step, values);
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
  if ($("run-gloss")) $("run-gloss").textContent = loss;
  const flip = $("flip-button");
  if (flip) {
    const other = loss === "saturating" ? "non_saturating" : "saturating";
    flip.dataset.other = other;
    flip.textContent = `Flip to ${other}`;
    flip.setAttribute("hx-vals", JSON.stringify({ g_loss: other }));
    htmx.process(flip);
  }
}

function setStatus(status, error) {
  const badge = $("run-status");
  badge.textContent = status;
  badge.className = `badge status-${status}`;
  if (error) {
    $("run-error").textContent = error;
    $("run-error").hidden = false;
  }
  if (TERMINAL.has(status)) {
    for (const el of document.querySelectorAll("#stop-button, #control-apply, #flip-button")) el.disabled = true;
  }
}

const sampleSteps = [];
function addSample(frame) {
  const isJson = frame.url.endsWith(".json");
  if (charts.field ? !isJson : isJson) return;
  if (sampleSteps.some((s) => s.url === frame.url)) return;
  sampleSteps.push({ step: frame.step, url: frame.url });
  sampleSteps.sort((a, b) => a.step - b.step);
  const slider = $("sample-slider");
  const following = slider.disabled || Number(slider.value) === Number(slider.max);
  slider.max = String(sampleSteps.length - 1);
  slider.disabled = sampleSteps.length < 2;
  if (following) {
    slider.value = slider.max;
    showSample(sampleSteps.length - 1);
  }
}

function showSample(index) {
  const sample = sampleSteps[index];
  if (!sample) return;
  $("sample-label").textContent = `step ${sample.step.toLocaleString("en")} · ${index + 1} of ${sampleSteps.length}`;
  if (charts.field) {
    charts.field.load(sample.url);
  } else {
    const img = $("sample-img");
    img.src = sample.url;
    img.hidden = false;
    img.dataset.step = sample.step;
  }
}

function onFrame(frame) {
  switch (frame.type) {
    case "metrics": return onMetrics(frame);
    case "hist": return charts.saturation?.hist(frame);
    case "dldh": return charts.saturation?.samples(frame);
    case "sample":
      addSample(frame);
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
    default: return undefined;
  }
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

async function main() {
  buildCharts();
  $("sample-slider")?.addEventListener("input", (e) => showSample(Number(e.target.value)));
  // History up to (at least) last_seq, then every frame after it live: the chart
  // drops points it already has, so the overlap leaves no gap and no duplicate.
  const since = boot.last_seq;
  const [history, events] = await Promise.all([
    getJSON(`/api/runs/${boot.id}/metrics?max_points=${HISTORY_POINTS}`),
    getJSON(`/api/runs/${boot.id}/events?until=${since}`),
  ]);
  for (const [key, h] of Object.entries(history.metrics)) series(key, h.step, h.value);
  for (const frame of events.frames) {
    if (frame.type !== "metrics") onFrame(frame);
  }
  const indicate = connectionIndicator();
  const stream = new RunStream(boot.id, onFrame, (s) => indicate(boot.id, s));
  stream.open(since);
  // onFrame: the stream's own handler, so that a benchmark can time the page's work per frame without a server.
  window.gradwatch = { charts, stream, state, sampleSteps, onFrame };
  document.body.dataset.ready = "true";
}

main().catch((error) => {
  $("run-error").textContent = `The page could not load this run's history: ${error.message}`;
  $("run-error").hidden = false;
});
