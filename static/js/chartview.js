// How every line chart is viewed: smoothing, the x axis, log or linear y, and the colours of the losses.
//
// One owner for the choices a user makes about charts. They are remembered in this browser (localStorage), so a
// reload, another run's page and the compare page all open as the user left them; every LineChart listens for
// "gradwatch:view" and redraws from the points it holds (nothing is fetched again).

const STORE_KEY = "gradwatch:chart-view";
export const X_MODES = { step: "step", wall: "wall time", relative: "time since start" };
export const MAX_SMOOTHING = 0.99;

function load() {
  const view = { smoothing: 0, x: "step", log: {} };
  try {
    const saved = JSON.parse(localStorage.getItem(STORE_KEY) || "{}");
    const s = Number(saved.smoothing);
    if (Number.isFinite(s)) view.smoothing = Math.min(MAX_SMOOTHING, Math.max(0, s));
    if (Object.hasOwn(X_MODES, saved.x)) view.x = saved.x;
    if (saved.log && typeof saved.log === "object") {
      for (const [name, on] of Object.entries(saved.log)) if (typeof on === "boolean") view.log[name] = on;
    }
  } catch {
    // Unreadable or blocked storage: the defaults.
  }
  return view;
}

/** The current choices: ``smoothing`` (EMA weight, 0 = raw), ``x`` (a key of X_MODES), ``log`` (chart name -> bool). */
export const view = load();

/** Change some choices, remember them, and tell every chart. */
export function setView(changes) {
  Object.assign(view, changes);
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(view));
  } catch {
    // Private mode with storage off: the choice holds for this page only.
  }
  window.dispatchEvent(new CustomEvent("gradwatch:view", { detail: changes }));
}

/**
 * TensorBoard's smoothing: an exponential moving average with weight ``weight`` on the past, debiased so that the
 * first points are not pulled towards zero. Gaps (null, NaN, ±∞) stay gaps and leave the average as it was.
 * ``state`` ({acc, n}) carries the average across calls, so a live line smooths only its new points.
 */
export function ema(values, weight, state = { acc: 0, n: 0 }) {
  const out = new Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || v === undefined || !Number.isFinite(v)) {
      out[i] = v ?? null;
      continue;
    }
    state.acc = state.acc * weight + (1 - weight) * v;
    state.n += 1;
    out[i] = weight > 0 ? state.acc / (1 - weight ** state.n) : v;
  }
  return out;
}

/** The IANA name of the browser's time zone ("Asia/Kolkata"), for axis titles. */
export function zoneName() {
  try {
    return Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  } catch {
    return "local time";
  }
}

/**
 * Unix seconds as the number a Plotly date axis shows as the browser's wall clock. Plotly's date axes have no time
 * zone: a millisecond number is drawn as UTC, so it is moved by the zone's offset at that instant.
 */
export function wallClockMs(unixSeconds) {
  if (unixSeconds === null || unixSeconds === undefined) return null;
  const ms = unixSeconds * 1000;
  return ms - new Date(ms).getTimezoneOffset() * 60_000;
}

/** The inverse of wallClockMs for a date-axis range end (a "2026-11-30 16:20:31.5" string or a number). */
export function unixFromWallClock(value) {
  const shifted = typeof value === "number" ? value : Date.parse(`${String(value).trim().replace(" ", "T")}Z`);
  if (!Number.isFinite(shifted)) return NaN;
  // The offset at the shifted instant is the offset at the real one, except within an hour of a zone change.
  return (shifted + new Date(shifted).getTimezoneOffset() * 60_000) / 1000;
}

/**
 * The colour of a generator loss, the same on every page: the saturating loss always in --sat, the
 * non-saturating one always in --nonsat (the run page's shadow lines, the compare page's twin, the tables).
 */
export const LOSS_VARS = { saturating: "--sat", non_saturating: "--nonsat" };

/**
 * Colours for runs shown together (the compare page): a run whose generator loss no other of them has takes that
 * loss's colour, so a twin is orange (saturating) beside blue (non-saturating) as on each run's page; the other
 * runs take palette colours other than those two, then the palette again, dashed, past its end.
 */
export function runStyles(runs, palette, cssVar) {
  const counts = new Map();
  for (const r of runs) if (r.g_loss) counts.set(r.g_loss, (counts.get(r.g_loss) || 0) + 1);
  const lossColours = new Set(Object.values(LOSS_VARS).map((v) => cssVar(v).toLowerCase()));
  const free = palette.filter((c) => !lossColours.has(c.toLowerCase()));
  let next = 0;
  return runs.map((r) => {
    const own = LOSS_VARS[r.g_loss];
    if (own && counts.get(r.g_loss) === 1) return { color: cssVar(own), dash: "solid", byLoss: true };
    const turn = Math.floor(next / free.length);
    const style = { color: free[next % free.length], dash: ["solid", "dash", "dashdot", "longdash"][turn % 4], byLoss: false };
    next += 1;
    return style;
  });
}

/**
 * The toolbar above a page's charts: smoothing slider and x-axis choice. Its state is ``view``; each chart has its
 * own log/linear button (LineChart.scaleButton).
 */
export function mountToolbar(before) {
  const bar = document.createElement("section");
  bar.className = "card chart-toolbar";
  bar.id = "chart-toolbar";
  bar.setAttribute("aria-label", "Chart view");

  const smooth = document.createElement("label");
  smooth.className = "smoothing";
  smooth.append("Smoothing ");
  const slider = document.createElement("input");
  Object.assign(slider, { type: "range", id: "chart-smoothing", min: "0", max: String(MAX_SMOOTHING), step: "0.01",
    value: String(view.smoothing) });
  slider.setAttribute("aria-describedby", "chart-smoothing-value");
  const shown = document.createElement("output");
  shown.id = "chart-smoothing-value";
  shown.htmlFor = "chart-smoothing";
  const say = () => { shown.textContent = Number(slider.value) ? Number(slider.value).toFixed(2) : "off"; };
  say();
  slider.addEventListener("input", () => { say(); setView({ smoothing: Number(slider.value) }); });
  smooth.append(slider, " ", shown);

  const xLabel = document.createElement("label");
  xLabel.append("x axis ");
  const select = document.createElement("select");
  select.id = "chart-x";
  for (const [value, text] of Object.entries(X_MODES)) select.add(new Option(text, value, false, value === view.x));
  select.addEventListener("change", () => setView({ x: select.value }));
  xLabel.append(select);

  const note = document.createElement("span");
  note.className = "muted";
  note.textContent = "smoothing: exponential moving average (raw line kept faint) · remembered in this browser";
  bar.append(smooth, xLabel, note);
  before.parentNode.insertBefore(bar, before);
  return bar;
}
