// A run's sample images: a slider over the grids of one label, following the newest while it sits at the end.
//
// A built-in run has one kind of grid ("samples", or the 2-D snapshots); a
// user's script may log several ("samples", "recon"…): a picker then chooses
// which the slider walks, and the label is shown beside the step.

const DEFAULT_LABEL = "samples";

export class SampleView {
  /**
   * @param {{slider: HTMLInputElement, label: HTMLElement, pick?: HTMLSelectElement | null, panel?: HTMLElement | null,
   *          accept: (frame: object) => boolean, show: (sample: object) => void, keep?: number | null}} parts
   * keep: a launched run's intervals.keep_samples. Its server keeps the first grid and the newest `keep`
   * (trainer/samples.py prune_samples); the slider walks the same ones, never a pruned grid's missing file.
   */
  constructor({ slider, label, pick = null, panel = null, accept, show, keep = null }) {
    this.keep = keep;
    this.slider = slider;
    this.label = label;
    this.pick = pick;
    this.panel = panel;
    this.accept = accept;
    this.display = show;
    this.byLabel = new Map(); // label -> [{step, url, label}] by step
    this.current = null;
    slider.addEventListener("input", () => this.show(Number(slider.value)));
    pick?.addEventListener("change", () => this.choose(pick.value));
  }

  /** The grids of the label on screen, oldest first. */
  get steps() {
    return this.byLabel.get(this.current) || [];
  }

  add(frame) {
    if (!this.accept(frame)) return;
    const label = frame.label || DEFAULT_LABEL;
    if (!this.byLabel.has(label)) this.addLabel(label);
    const list = this.byLabel.get(label);
    if (list.some((s) => s.url === frame.url)) return;
    list.push({ step: frame.step, url: frame.url, label });
    list.sort((a, b) => a.step - b.step);
    if (this.keep && list.length > this.keep + 1) list.splice(1, list.length - this.keep - 1);
    if (this.panel) this.panel.hidden = false;
    if (label !== this.current) return;
    const following = this.slider.disabled || Number(this.slider.value) === Number(this.slider.max);
    this.resize();
    if (following) {
      this.slider.value = this.slider.max;
      this.show(list.length - 1);
    }
  }

  addLabel(label) {
    this.byLabel.set(label, []);
    if (this.pick) {
      const option = document.createElement("option");
      option.value = label;
      option.textContent = label;
      this.pick.append(option);
      this.pick.hidden = this.byLabel.size < 2;
    }
    if (this.current === null) this.current = label;
  }

  choose(label) {
    if (!this.byLabel.has(label)) return;
    this.current = label;
    this.resize();
    this.slider.value = this.slider.max;
    this.show(this.steps.length - 1);
  }

  resize() {
    this.slider.max = String(Math.max(0, this.steps.length - 1));
    this.slider.disabled = this.steps.length < 2;
  }

  show(index) {
    const sample = this.steps[index];
    if (!sample) return;
    const label = sample.label === DEFAULT_LABEL ? "" : ` · ${sample.label}`;
    this.label.textContent = `step ${sample.step.toLocaleString("en")}${label} · ${index + 1} of ${this.steps.length}`;
    this.display(sample);
  }
}
