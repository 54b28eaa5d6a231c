// Times shown to the user: the one owner of turning a unix time into text.
//
// The server renders every timestamp in UTC, marked as such, inside <time data-local data-unix="…">; this
// module rewrites each into the browser's own time zone with the zone shown ("2026-11-30, 20:41 GMT+5:30"),
// at load and after every htmx swap (the runs table is replaced every second). It also keeps a run page's
// clock: time elapsed, and an ETA from the pace of the last minute.

const LOCAL = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", timeZoneName: "short",
});

/** A unix time (seconds) in the browser's time zone, the zone named. */
export function localTime(unix) {
  return LOCAL.format(new Date(unix * 1000));
}

/** Every <time data-local data-unix> under ``root`` in the browser's time zone; the UTC instant as its tooltip. */
export function localizeTimes(root = document) {
  for (const el of root.querySelectorAll("time[data-local]")) {
    const unix = Number(el.dataset.unix);
    if (!Number.isFinite(unix)) continue;
    el.textContent = localTime(unix);
    el.title = `${new Date(unix * 1000).toISOString().slice(0, 16).replace("T", " ")} UTC`;
  }
}

/** Seconds as "45 s", "3 min 12 s", "2 h 05 min", "3 d 4 h". */
export function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

const PACE_WINDOW_MS = 60_000; // the ETA follows the pace of the last minute: a run's speed changes as it goes

/**
 * A run page's clock in ``el``: "elapsed 3 min 12 s · ETA 1 min 40 s" while it trains, "took 4 min 52 s" once
 * it has ended. ``read()`` gives {status, step, steps, startedAt, endedAt} as the page knows them now.
 */
export class RunClock {
  constructor(el, read) {
    this.el = el;
    this.read = read;
    this.samples = []; // [ms, step] of the last minute
    this.timer = setInterval(() => this.tick(), 1000);
    this.tick();
  }

  /** Steps per second over the last minute, or null until two different steps were seen. */
  pace(now, step) {
    this.samples.push([now, step]);
    while (this.samples.length > 2 && now - this.samples[0][0] > PACE_WINDOW_MS) this.samples.shift();
    const [t0, s0] = this.samples[0];
    return step > s0 && now > t0 ? ((step - s0) * 1000) / (now - t0) : null;
  }

  tick() {
    const { status, step, steps, startedAt, endedAt } = this.read();
    if (!startedAt) {
      this.el.textContent = "";
      return;
    }
    if (endedAt) {
      this.el.textContent = `took ${duration(endedAt - startedAt)}`;
      clearInterval(this.timer);
      return;
    }
    const parts = [`elapsed ${duration(Date.now() / 1000 - startedAt)}`];
    const rate = status === "running" ? this.pace(performance.now(), step) : null;
    if (rate && steps && steps > step) parts.push(`ETA ${duration((steps - step) / rate)}`);
    this.el.textContent = parts.join(" · ");
  }
}

localizeTimes();
document.body.addEventListener("htmx:afterSettle", (event) => localizeTimes(event.detail.target));
