// The compare page's side-by-side view: each run's 2-D data plane (or its sample grids), one shared step slider.
//
// The slider's positions are the union of the runs' sample steps. At a position each run shows its own newest
// snapshot at or before that step, and says which step that is (runs sampled on different schedules rarely share
// a step). Live runs add steps as their `sample` frames arrive; the slider follows the newest step unless the
// user moved it away from the end. A run's server keeps only its first grid and the newest keep_samples
// (trainer/samples.py prune_samples): the list starts from the server's listing, which holds only files still on
// disk, and a run's list is pruned the same way as frames arrive, so no position points at a deleted file.

import { FieldView } from "./field.js";

const fmt = (n) => Number(n).toLocaleString("en");

export class PlaneStrip {
  /**
   * @param {HTMLElement} root  the #cmp-planes section: a range input, a step label and one figure.plane per run
   * @param {Array<object>} boot  the compare page's runs (id, plane "field"|"image", keep)
   * @param {{labels: string[], color: (index: number) => string}} look  what the legend calls and paints each run
   */
  constructor(root, boot, { labels, color }) {
    this.root = root;
    this.slider = root.querySelector("input[type=range]");
    this.label = root.querySelector(".plane-at");
    this.planes = new Map(); // run id -> {mode, keep, el, view, img, list: [{step, url}], shown}
    this.steps = [];
    this.following = true;
    this.at = null; // the step the user chose, while not following
    for (const el of root.querySelectorAll("figure.plane")) {
      const index = Number(el.dataset.index);
      const run = boot[index];
      const swatch = el.querySelector(".swatch");
      if (swatch) swatch.style.background = color(index);
      const name = el.querySelector(".plane-name");
      if (name && labels[index]) name.textContent = labels[index];
      const chart = el.querySelector(".plane-chart");
      this.planes.set(run.id, {
        mode: run.plane, keep: run.keep ?? null, el, list: [], shown: null,
        chart, view: null, img: el.querySelector("img"), // the FieldView is made once the section is shown
      });
    }
    this.slider.addEventListener("input", () => {
      this.following = Number(this.slider.value) === Number(this.slider.max);
      this.at = this.steps[Number(this.slider.value)] ?? null;
      this.show();
    });
  }

  accepts(plane, url) {
    return typeof url === "string" && url.endsWith(plane.mode === "field" ? ".json" : ".png");
  }

  /** Each run's samples still on disk, from the server's listing. */
  async load() {
    await Promise.all([...this.planes].map(async ([id, plane]) => {
      const response = await fetch(`/api/runs/${id}/samples`, { credentials: "same-origin" });
      if (!response.ok) return;
      for (const a of await response.json()) {
        if (a.step !== null && this.accepts(plane, a.url)) this.insert(plane, a.step, a.url);
      }
    }));
    this.refresh();
  }

  /** A `sample` frame from a run's stream (or its restored events). */
  add(runId, frame) {
    const plane = this.planes.get(runId);
    if (!plane || !Number.isInteger(frame.step) || !this.accepts(plane, frame.url)) return;
    if (frame.label && frame.label !== "samples") return; // a script's other image series ("recon"…)
    if (this.insert(plane, frame.step, frame.url)) this.refresh();
  }

  insert(plane, step, url) {
    const list = plane.list;
    if (list.some((s) => s.url === url || s.step === step)) return false;
    list.push({ step, url });
    list.sort((a, b) => a.step - b.step);
    // As the server prunes: the first step and the newest `keep`.
    if (plane.keep && list.length > plane.keep + 1) list.splice(1, list.length - plane.keep - 1);
    return true;
  }

  refresh() {
    const union = new Set();
    for (const plane of this.planes.values()) for (const s of plane.list) union.add(s.step);
    this.steps = [...union].sort((a, b) => a - b);
    this.root.hidden = this.steps.length === 0; // runs with no samples (yet): nothing to show
    this.slider.max = String(Math.max(0, this.steps.length - 1));
    this.slider.disabled = this.steps.length < 2;
    if (this.following || this.at === null) {
      this.slider.value = this.slider.max;
    } else {
      let index = 0; // the newest step at or before the one the user chose (it may have been pruned since)
      for (let i = 0; i < this.steps.length; i++) if (this.steps[i] <= this.at) index = i;
      this.slider.value = String(index);
    }
    this.show();
  }

  show() {
    const index = Number(this.slider.value);
    const step = this.steps[index];
    if (step === undefined) return;
    this.label.textContent = `step ${fmt(step)} · ${index + 1} of ${this.steps.length}`;
    this.root.dataset.step = step;
    for (const plane of this.planes.values()) {
      const pick = plane.list.findLast((s) => s.step <= step);
      const at = plane.el.querySelector(".plane-step");
      plane.el.classList.toggle("stale", !pick);
      if (!pick) {
        if (at) at.textContent = plane.list.length ? `no sample at or before step ${fmt(step)}` : "no sample yet";
        continue;
      }
      if (at) at.textContent = pick.step === step ? `step ${fmt(pick.step)}` : `step ${fmt(pick.step)} (its newest ≤ ${fmt(step)})`;
      if (plane.shown === pick.url) continue;
      plane.shown = pick.url;
      plane.el.dataset.step = pick.step;
      plane.el.dataset.url = pick.url;
      if (plane.chart) {
        plane.view ??= new FieldView(plane.chart);
        plane.view.load(pick.url);
      }
      else if (plane.img) {
        plane.img.src = pick.url;
        plane.img.hidden = false;
        plane.img.dataset.step = pick.step;
      }
    }
  }
}
