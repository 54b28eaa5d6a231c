"""Published experiments, rerun on their published protocol: ``gradwatch reproduce NAME``.

A researcher trusts an instrument that reproduces known results on the known
protocol, so each experiment here fixes what its paper fixed (data layout and
scale, networks, optimiser, batch, evaluation) and leaves free only what a
machine's budget decides: trials and steps. It prints our figures beside the
paper's, each as mean ± standard error over trials (the paper's own spread),
and writes them as JSON and as a Markdown table.

- ``pacgan-table1``: the plain GAN rows of PacGAN's Table 1 (Lin et al. 2018),
  2D-ring and 2D-grid, trained under both generator losses (the paper's GAN
  is the non-saturating one; the saturating rows are ours). Protocol read from
  the authors' code, github.com/fjxmlzn/PacGAN; docs/reproductions.md lists it
  and what we do differently.
- ``arjovsky-bottou``: the saturation study of trainer/saturation_study.py
  (Arjovsky & Bottou 2017, fig. 2), one seed per trial.

Trials run in parallel processes (one torch thread each, up to the machine's
cores), and each keeps a run folder (``config.json`` and ``events.jsonl``,
the frames a dashboard run streams) that ``gradwatch sync DIR`` puts in the
dashboard.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from trainer.config import GLoss, RunConfig, TrainConfig
from trainer.files import atomic_write

EXPERIMENTS = ("pacgan-table1", "arjovsky-bottou")


class ReproduceError(Exception):
    """The experiment cannot start as asked; the message says why."""


# -- PacGAN Table 1 -------------------------------------------------------------------------------------------
#: The paper's training length: 400 epochs of 1,000 batches of 100 (a fixed set of 100,000 points).
PACGAN_PAPER_STEPS = 400_000
#: The paper's trials per row.
PACGAN_TRIALS = 10
#: Our default: what 2 CPU cores run for all 40 trials (2 layouts × 2 losses × 10) in about half an hour.
PACGAN_DEFAULT_STEPS = 3_000
PACGAN_LAYOUTS = ("ring8", "grid25")
PACGAN_LOSSES: tuple[GLoss, ...] = ("non_saturating", "saturating")
#: The generator loss of the paper's GAN rows: G minimises softplus(−D(G(z))) (fjxmlzn/PacGAN, bricks.py).
PACGAN_PAPER_LOSS: GLoss = "non_saturating"
LAYOUT_LABELS = {"ring8": "2D-ring (8 modes)", "grid25": "2D-grid (25 modes)"}


@dataclass(frozen=True)
class Published:
    """One figure of a paper's table: its mean and the ± it prints (PacGAN: the standard error over 10 trials)."""

    mean: float
    se: float


@dataclass(frozen=True)
class PacGanRow:
    """The plain GAN's row of PacGAN's Table 1 for one layout."""

    modes: Published
    hq_percent: Published
    rev_kl: Published


#: PacGAN (Lin, Khetan, Fanti, Oh; NeurIPS 2018), Table 1, row "GAN": mean ± standard error over 10 trials.
PACGAN_TABLE1 = {
    "ring8": PacGanRow(Published(6.3, 0.5), Published(98.2, 0.2), Published(0.45, 0.09)),
    "grid25": PacGanRow(Published(17.3, 0.8), Published(94.8, 0.7), Published(0.70, 0.07)),
}

#: What our runs do differently from the authors' code, whatever the budget (docs/reproductions.md explains each).
PACGAN_DIFFERENCES = (
    "updates alternate (D, then G against the updated D) where the authors' Blocks code updates both at once "
    "from the same batch",
    "every batch is drawn fresh from the mixture where the paper resamples a fixed set of 100,000 points",
)


def pacgan_config(layout: str, g_loss: GLoss, *, steps: int, seed: int, device: str = "cpu") -> RunConfig:
    """One trial of PacGAN's plain GAN (packing 1) as a run config, on the protocol of the authors' code.

    Data at the paper's scale (ring: radius 1, std 0.01; grid: spacing 2, std 0.05); the generator
    2→400→400→400→400→2 with batch norm, the discriminator three maxout layers of 200 units × 5
    (``model.arch = "pacgan"``); z ~ N(0, I₂); Adam, lr 1e-4, β = (0.8, 0.999) for both; batches of 100; one
    D step per G step. Evaluated at the last step on 2,500 samples (trainer/evaluation.py ``mode_metrics``).
    """
    if layout not in PACGAN_LAYOUTS:
        raise ValueError(f"layout: must be one of {', '.join(PACGAN_LAYOUTS)}, got {layout!r}")
    return RunConfig.model_validate({
        "name": f"PacGAN Table 1 · {layout} · {g_loss} · trial {seed}",
        "kind": "gan",
        "data": {"name": layout, "scale": 1.0},
        "model": {"arch": "pacgan", "width": 400, "depth": 4, "latent_dim": 2},
        "gan": {"g_loss": g_loss, "lr_g": 1e-4, "lr_d": 1e-4, "beta1": 0.8, "beta2": 0.999, "d_steps": 1},
        "train": {"steps": steps, "batch_size": 100, "seed": seed, "device": device},
        # Ten evaluations along the way for the dashboard's chart (the table takes the last, at the final step),
        # a sample field half-way and at the end, and only the final checkpoint (to resume a trial for longer).
        "intervals": {"eval_every": max(1, steps // 10), "sample_every": max(1, steps // 2),
                      "checkpoint_every": steps, "keep_checkpoints": 1, "hist_every": 100},
    })


# -- spreads and trials -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spread:
    """Mean ± standard error (sample std / √n) of one figure over trials; no error with a single trial."""

    mean: float
    se: float | None
    n: int

    def text(self, digits: int) -> str:
        if not math.isfinite(self.mean):
            return "—"
        if self.se is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.se:.{digits}f}"


def spread(values: Sequence[float]) -> Spread:
    """Mean ± standard error of the finite ``values`` (NaN mean if there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return Spread(math.nan, None, 0)
    se = statistics.stdev(finite) / math.sqrt(len(finite)) if len(finite) > 1 else None
    return Spread(statistics.fmean(finite), se, len(finite))


def _published(p: Published, digits: int) -> str:
    return f"{p.mean:.{digits}f} ± {p.se:.{digits}f}"


@dataclass
class Trial:
    """One run of an experiment: what it is, where its run folder is, and (once done) its figures."""

    row: str
    seed: int
    folder: str
    figures: dict[str, float] = field(default_factory=dict)
    status: str = "pending"
    wall_s: float = 0.0


def _worker_init() -> None:
    """One torch thread per trial process: the models are small, and trials fill the cores instead."""
    import torch

    torch.set_num_threads(1)


def _pacgan_trial(cfg_json: str, folder: str) -> tuple[str, dict[str, float]]:
    """Train one PacGAN trial headless into ``folder``; its status and the last evaluation's figures."""
    from trainer.headless import run_headless

    cfg = RunConfig.model_validate_json(cfg_json)
    status = run_headless(cfg, Path(folder), progress=False)
    return status, last_evaluation(Path(folder) / "events.jsonl")


def last_evaluation(events: Path) -> dict[str, float]:
    """The ``eval/*`` values of the last evaluation in a run folder's ``events.jsonl`` (empty if none)."""
    found: dict[str, float] = {}
    with open(events, encoding="utf-8") as fh:
        for line in fh:
            frame = json.loads(line)
            if frame.get("type") != "metrics" or "eval/modes" not in frame.get("data", {}):
                continue
            found = {k: (math.nan if v[-1] is None else float(v[-1]))
                     for k, v in frame["data"].items() if k.startswith("eval/")}
    return found


def default_jobs() -> int:
    """Trials at a time: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


TrialFn = Callable[..., tuple[str, dict[str, float]]]


def _timed(fn: TrialFn, *args: Any) -> tuple[tuple[str, dict[str, float]], float]:
    """``fn(*args)`` and the seconds it took, measured in the trial's process (not counting its wait in the queue)."""
    began = time.monotonic()
    return fn(*args), time.monotonic() - began


def run_trials(jobs: list[tuple[Trial, TrialFn, tuple[Any, ...]]], workers: int, log: TextIO) -> None:
    """Run every trial in a pool of ``workers`` processes, printing one line per trial as it ends.

    Processes are spawned, not forked: a forked torch (its thread pools) can hang in a child.
    """
    started = time.monotonic()
    total = len(jobs)
    pool = ProcessPoolExecutor(max_workers=max(1, min(workers, total)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)
    pending: dict[Future[tuple[tuple[str, dict[str, float]], float]], Trial] = {}
    try:
        for trial, fn, args in jobs:
            pending[pool.submit(_timed, fn, *args)] = trial
        done = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                trial = pending.pop(future)
                done += 1
                try:
                    (trial.status, trial.figures), trial.wall_s = future.result()
                except Exception as exc:  # one failed trial is reported, the others go on
                    trial.status, trial.figures = f"failed: {type(exc).__name__}: {exc}", {}
                log.write(f"[{done:>{len(str(total))}}/{total}] {trial.row} · seed {trial.seed}: {trial.status}"
                          f"{_figures_text(trial.figures)} · {time.monotonic() - started:.0f} s elapsed\n")
                log.flush()
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _figures_text(figures: dict[str, float]) -> str:
    if "eval/modes" in figures:
        modes = round(figures["eval/modes"])
        return (f" · {modes} mode{'' if modes == 1 else 's'}, {100 * figures['eval/hq_frac']:.1f} % high quality, "
                f"reverse KL {figures['eval/rev_kl']:.2f}")
    if "final_norm_ratio" in figures:
        return (f" · mean D(G(z)) {figures['final_fake_prob']:.1e}, ‖∇L_sat‖/‖∇L_ns‖ "
                f"{figures['final_norm_ratio']:.1e}")
    return ""


# -- the reports ------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What ``gradwatch reproduce`` prints and writes: the table, the budget sentence, every trial (``data``)."""

    command: str
    table: str
    budget: str
    data: dict[str, Any]

    def write(self, out: Path) -> None:
        atomic_write(out / "results.json", (json.dumps(self.data, indent=2, allow_nan=False) + "\n").encode())
        atomic_write(out / "table.md", self.markdown().encode())

    def markdown(self) -> str:
        return f"{self.table}\n{self.budget}\n\nCommand: `{self.command}`\n"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _spread_json(s: Spread) -> dict[str, Any]:
    return {"mean": _finite(s.mean), "se": s.se, "n": s.n}


def pacgan_table1(*, trials: int, steps: int, device: str, out: Path, workers: int, log: TextIO,
                  command: str) -> Report:
    """Run PacGAN Table 1's plain GAN rows (both layouts × both generator losses × ``trials``) and tabulate."""
    rows = [(layout, loss) for layout in PACGAN_LAYOUTS for loss in PACGAN_LOSSES]
    share = steps / PACGAN_PAPER_STEPS
    budget = (f"Budget: {steps:,} steps of batch 100 per trial, {share:.2%} of the paper's {PACGAN_PAPER_STEPS:,} "
              f"(400 epochs of 100,000 points); {trials} trial{'s' if trials != 1 else ''} per row "
              f"(the paper: {PACGAN_TRIALS}). ")
    if steps < PACGAN_PAPER_STEPS:
        budget += (f"Far short of the paper's training, our rows measure where its GAN was after "
                   f"{share:.2%} of it; the paper's budget is `--steps {PACGAN_PAPER_STEPS}` away.")
    log.write(f"pacgan-table1: {len(rows) * trials} trials ({len(PACGAN_LAYOUTS)} layouts × {len(PACGAN_LOSSES)} "
              f"generator losses × {trials}), {workers} at a time, on {device}\n{budget}\n")
    jobs: list[tuple[Trial, TrialFn, tuple[Any, ...]]] = []
    for layout, loss in rows:
        for seed in range(trials):
            folder = out / f"{layout}-{loss}" / f"trial-{seed}"
            trial = Trial(f"{layout} {loss}", seed, str(folder))
            cfg = pacgan_config(layout, loss, steps=steps, seed=seed, device=device)
            jobs.append((trial, _pacgan_trial, (cfg.model_dump_json(), str(folder))))
    began = time.monotonic()
    run_trials(jobs, workers, log)
    wall = time.monotonic() - began
    results = []
    lines = [
        "| data | generator loss | modes: ours | modes: paper | high quality %: ours | high quality %: paper "
        "| reverse KL: ours | reverse KL: paper |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for layout, loss in rows:
        mine = [t for t, _, _ in jobs if t.row == f"{layout} {loss}"]
        modes = spread([t.figures.get("eval/modes", math.nan) for t in mine])
        hq = spread([100 * t.figures.get("eval/hq_frac", math.nan) for t in mine])
        kl = spread([t.figures.get("eval/rev_kl", math.nan) for t in mine])
        paper = PACGAN_TABLE1[layout] if loss == PACGAN_PAPER_LOSS else None
        lines.append(
            f"| {LAYOUT_LABELS[layout]} | {loss} | {modes.text(1)} | {_published(paper.modes, 1) if paper else '—'} "
            f"| {hq.text(1)} | {_published(paper.hq_percent, 1) if paper else '—'} "
            f"| {kl.text(2)} | {_published(paper.rev_kl, 2) if paper else '—'} |")
        results.append({
            "layout": layout, "g_loss": loss, "modes": _spread_json(modes), "hq_percent": _spread_json(hq),
            "rev_kl": _spread_json(kl), "paper": asdict(paper) if paper else None,
            "trials": [{"seed": t.seed, "folder": t.folder, "status": t.status, "wall_s": round(t.wall_s, 1),
                        **{k: _finite(v) for k, v in t.figures.items()}} for t in mine],
        })
    table = "\n".join(lines) + "\n"
    data = {
        "experiment": "pacgan-table1", "command": command, "steps": steps, "paper_steps": PACGAN_PAPER_STEPS,
        "trials": trials, "paper_trials": PACGAN_TRIALS, "device": device, "workers": workers,
        "wall_s": round(wall, 1), "budget": budget, "differences": list(PACGAN_DIFFERENCES),
        "paper": "Lin, Khetan, Fanti, Oh. PacGAN: The power of two samples in generative adversarial networks. "
                 "NeurIPS 2018, Table 1 (mean ± standard error over 10 trials)",
        "rows": results,
    }
    return Report(command, table, budget, data)


# -- Arjovsky & Bottou ------------------------------------------------------------------------------------------
#: What the paper shows (fig. 2, a plot, no table): read off it, the saturating gradient's fall after 4,000 D steps.
ARJOVSKY_BOTTOU_PAPER = ("Arjovsky & Bottou (ICLR 2017), fig. 2: with the generator frozen, the saturating generator "
                         "loss's gradient norm falls about five orders of magnitude over 4,000 discriminator steps "
                         "(read off the plot; the paper prints no table).")
ARJOVSKY_BOTTOU_DEFAULT_STEPS = 4_000
#: Seeds by default: enough for a standard error, about 2 minutes on 2 cores.
ARJOVSKY_BOTTOU_TRIALS = 5
ARJOVSKY_BOTTOU_EVERY = 500


def _study_trial(d_steps: int, every: int, seed: int, device: str, folder: str) -> tuple[str, dict[str, float]]:
    """One seed of the saturation study, kept as a run folder of metrics frames (``gradwatch sync`` takes it)."""
    import numpy as np

    from trainer.loop import resolve_device
    from trainer.saturation_study import run_study
    from trainer.telemetry import FrameEmitter, frame_to_json, metrics_frame_fields

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    config = {"name": f"Arjovsky & Bottou saturation study · seed {seed}", "kind": "custom",
              "experiment": "arjovsky-bottou", "d_steps": d_steps, "record_every": every, "seed": seed,
              "device": device}
    atomic_write(path / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    rows = run_study(d_steps=d_steps, record_every=every, seed=seed, device=str(resolve_device(device)))
    keys = ["d/fake_prob", "grad/g_norm_saturating", "grad/g_norm_non_saturating", "study/norm_ratio",
            "study/ratio_max_rel_err"]
    table = np.array([[r.fake_prob, r.g_norm_saturating, r.g_norm_non_saturating, r.norm_ratio,
                       r.ratio_max_rel_err] for r in rows], dtype=np.float64)
    now = time.time()
    with open(path / "events.jsonl", "w", encoding="utf-8") as fh:
        def write(frame: dict[str, Any]) -> None:
            fh.write(frame_to_json(frame) + "\n")

        emitter = FrameEmitter(path.name, write)
        emitter.emit("status", status="running", error=None, step=0)
        emitter.emit("metrics", **metrics_frame_fields(keys, [r.d_step for r in rows], [now] * len(rows), table))
        emitter.emit("status", status="completed", error=None, step=rows[-1].d_step)
    figures = {f"{key}@{r.d_step}": float(v) for r, values in zip(rows, table, strict=True)
               for key, v in zip(keys, values, strict=True)}
    figures.update(final_fake_prob=rows[-1].fake_prob, final_norm_ratio=rows[-1].norm_ratio)
    return "completed", figures


def arjovsky_bottou(*, trials: int, steps: int, device: str, out: Path, workers: int, log: TextIO,
                    command: str) -> Report:
    """The saturation study over ``trials`` seeds: per recorded D step, mean ± standard error of each column."""
    every = max(1, min(ARJOVSKY_BOTTOU_EVERY, steps // 8 or 1))
    budget = (f"Budget: {steps:,} discriminator steps per trial, recorded every {every}; {trials} "
              f"trial{'s' if trials != 1 else ''} (seeds 0–{trials - 1}). The paper's fig. 2 runs 4,000.")
    log.write(f"arjovsky-bottou: {trials} trials, {workers} at a time, on {device}\n{budget}\n")
    jobs: list[tuple[Trial, TrialFn, tuple[Any, ...]]] = []
    for seed in range(trials):
        folder = out / f"trial-{seed}"
        jobs.append((Trial("saturation study", seed, str(folder)), _study_trial,
                     (steps, every, seed, device, str(folder))))
    began = time.monotonic()
    run_trials(jobs, workers, log)
    wall = time.monotonic() - began
    trials_done = [t for t, _, _ in jobs]
    d_steps = sorted({int(k.split("@")[1]) for t in trials_done for k in t.figures if "@" in k})
    lines = ["| D step | mean D(G(z)) | ‖∇θ L_sat‖ | ‖∇θ L_ns‖ | sat / ns |", "|---:|---:|---:|---:|---:|"]
    rows = []
    saturating: list[float] = []  # the mean norm per recorded step
    for d_step in d_steps:
        cols = {key: spread([t.figures.get(f"{key}@{d_step}", math.nan) for t in trials_done])
                for key in ("d/fake_prob", "grad/g_norm_saturating", "grad/g_norm_non_saturating",
                            "study/norm_ratio")}
        lines.append(f"| {d_step} | " + " | ".join(_sci(s) for s in cols.values()) + " |")
        rows.append({"d_step": d_step, **{k: _spread_json(s) for k, s in cols.items()}})
        saturating.append(cols["grad/g_norm_saturating"].mean)
    fall = math.log10(saturating[0] / saturating[-1]) if saturating and saturating[0] > 0 < saturating[-1] else math.nan
    summary = (f"Ours: the saturating gradient fell {fall:.1f} orders of magnitude over {steps:,} D steps "
               f"(mean over trials). Paper: {ARJOVSKY_BOTTOU_PAPER}")
    table = "\n".join(lines) + "\n\n" + summary + "\n"
    data = {
        "experiment": "arjovsky-bottou", "command": command, "steps": steps, "record_every": every,
        "trials": trials, "device": device, "workers": workers, "wall_s": round(wall, 1), "budget": budget,
        "orders_of_magnitude": _finite(fall), "paper": ARJOVSKY_BOTTOU_PAPER, "rows": rows,
        "trial_runs": [{"seed": t.seed, "folder": t.folder, "status": t.status, "wall_s": round(t.wall_s, 1)}
                       for t in trials_done],
    }
    return Report(command, table, budget, data)


def _sci(s: Spread) -> str:
    if not math.isfinite(s.mean):
        return "—"
    return f"{s.mean:.2e}" if s.se is None else f"{s.mean:.2e} ± {s.se:.1e}"


def reproduce(name: str, *, trials: int | None, steps: int | None, device: str, out: Path, workers: int,
              log: TextIO = sys.stderr, command: str = "") -> Report:
    """Run experiment ``name`` (one of :data:`EXPERIMENTS`) into ``out`` and write its results; returns the report.

    A device the run config would refuse raises its ``ValidationError`` (naming ``device``) before any trial starts.
    """
    from trainer.loop import resolve_device

    device = str(resolve_device(TrainConfig.model_validate({"device": device}).device))
    if out.exists() and any(out.rglob("events.jsonl")):
        # A trial's events.jsonl is appended to: a second run into it would mix two runs' frames in one folder.
        raise ReproduceError(f"{out} already holds trials of an earlier run; choose another --out or remove it")
    if name == "pacgan-table1":
        report = pacgan_table1(trials=PACGAN_TRIALS if trials is None else trials,
                               steps=PACGAN_DEFAULT_STEPS if steps is None else steps, device=device, out=out,
                               workers=workers, log=log, command=command)
    elif name == "arjovsky-bottou":
        report = arjovsky_bottou(trials=ARJOVSKY_BOTTOU_TRIALS if trials is None else trials,
                                 steps=ARJOVSKY_BOTTOU_DEFAULT_STEPS if steps is None else steps, device=device,
                                 out=out, workers=workers, log=log, command=command)
    else:
        raise ValueError(f"experiment: must be one of {', '.join(EXPERIMENTS)}, got {name!r}")
    report.write(out)
    return report

