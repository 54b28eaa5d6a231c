"""Steps/s of a bare PyTorch loop against the same loop with its metrics logged several ways, interleaved.

Same model, data, batch size and seed in every variant:

(a) ``bare``: a plain PyTorch loop as a user writes it, no tracker.
(b) ``gradwatch``: a real run on a real server. The benchmark starts
    ``gradwatch serve`` once, and each round POSTs the case's config to
    ``/api/runs``; the server launches its worker process, which trains with
    every SPEC §2 key logged every step (``log_every = 1``) and streams every
    frame over its websocket to the server, which stores it and fans it out to
    one open ``/ws/runs/{id}`` client (this benchmark, as a dashboard tab).
    Steps/s come from the metrics frames' worker-side ``time`` stamps.
(c) ``tensorboard``: loop (a) plus ``SummaryWriter.add_scalar`` for the same
    keys every step, computed as a user would (``.item()`` per value, a norm per
    parameter), and ``add_histogram`` of the logits every ``hist_every`` steps.
(d) ``wandb``: the same values through ``wandb.log`` in offline mode.
(e) ``client``: loop (a) instrumented with gradwatch's Python client, as a
    user's own script is (``run.watch_gan`` / ``run.watch_vae``, then the
    probe's backward calls in place of ``loss.backward()``), streaming live to
    the same server as (b). Its ratio to (a) is the client's price; SPEC's
    issue holds it within 0.03 of (b)'s, the built-in trainer computing the
    same keys with the same probes.
(f) ``every-step``: (b) with ``intervals.telemetry_budget = 1``: every
    telemetry piece (the shadow gradient, the per-layer norms, the histograms)
    on every logged step, where (b)'s default budget (0.03, trainer/budget.py)
    samples the expensive pieces to keep telemetry near 3 % of step time. The
    pair shows what the budget buys; issue 15 wants (b) at 0.95 or better.
(g) ``trackio``: (c)'s values through ``trackio.log(dict, step=...)``, the
    local-first, wandb-compatible tracker (SQLite under a temporary
    ``TRACKIO_DIR``, no dashboard launched, nothing sent anywhere).

(c), (d) and (g) leave out the shadow gradient (``grad/g_norm_saturating`` and
``grad/g_norm_non_saturating``): it needs a second backward pass that no
TensorBoard, wandb or Trackio user computes; gradwatch (b) pays for it, or (f) on every step.

Every variant trains in a fresh process of its own, started for each round,
with the same number of torch threads as the server gives its workers (one by
default: ``--threads``). Rounds alternate a, b, c, ..., a, b, ...; each measures a
window of ``--seconds`` (or ``--steps``) after a warm-up of ``--warmup`` seconds
from the end of the process's first step, so start-up costs stay out. The
figure is the median over rounds of each round's ratio to (a), the round's own
bare figure, so a change of machine load between rounds cancels.

    python -m bench.overhead                   # 3 cases x 7 variants x 3 rounds, about 7 minutes on 2 quiet cores
    python -m bench.overhead --quick           # one round, shorter windows (make bench), about 2 minutes
    python -m bench.overhead --inprocess       # all variants in this process, gradwatch without a server
    python -m bench.overhead --device cuda --rounds 5
    python -m bench.overhead --max-seconds 240 # fewer rounds where the time runs out (bench/gpu.py)

A variant whose library is not installed (``pip install -e '.[bench]'``) or
cannot run (wandb or Trackio offline) is reported as not available, with the reason.
Writes ``bench/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import inspect
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from bench._common import RESULTS_DIR, machine_info, render_table, write_json
from bench.server import ROOT, Server, ServerError
from trainer.config import RunConfig
from trainer.data import load_dataset
from trainer.loop import GAN_KEYS, VAE_KEYS, RunOptions, Trainer, make_trainer, resolve_device
from trainer.models import build_gan, build_vae
from trainer.presets import get_preset
from trainer.telemetry import frame_to_json

CASES = {
    "ring8-non-saturating": "ring8 MLP GAN",
    "digits-gan": "digits conv GAN",
    "digits-vae": "digits MLP VAE",
}
VARIANTS = ("bare", "gradwatch", "tensorboard", "wandb", "client", "every-step", "trackio")
LETTER = dict(zip(VARIANTS, "abcdefg", strict=True))
#: The variants that are a run of the built-in trainer on the live server, and the config each adds.
SERVER_RUNS: dict[str, dict[str, Any]] = {
    "gradwatch": {},
    "every-step": {"intervals.telemetry_budget": 1.0},
}
#: The variants that log through another tracker (their library is optional: the ``bench`` extra).
TRACKERS = ("tensorboard", "wandb", "trackio")
TERMINAL = {"completed", "stopped", "failed", "interrupted"}
#: How long one round may take, process start-up included, before the benchmark gives up on it.
ROUND_TIMEOUT_S = 180.0


def _quiet(cfg: RunConfig, device: str) -> RunConfig:
    """Telemetry every step; no samples, evaluations or checkpoints inside the timed window."""
    return cfg.with_overrides({
        "train.device": device, "train.steps": 10_000_000, "intervals.log_every": 1,
        "intervals.sample_every": 1_000_000, "intervals.eval_every": 1_000_000,
        "intervals.checkpoint_every": 10_000_000,
    })


def server_config(cfg: RunConfig, variant: str) -> RunConfig:
    """What a live-server variant POSTs: the case's config with the variant's overrides (:data:`SERVER_RUNS`)."""
    overrides = SERVER_RUNS[variant]
    return cfg.with_overrides(overrides) if overrides else cfg


# -- how a TensorBoard, wandb or Trackio user logs --------------------------------------------------


class Unavailable(Exception):
    """A variant's library is missing or cannot run here; the message says why."""


class MetricLogger(Protocol):
    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, Tensor]) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    """``SummaryWriter``: one ``add_scalar`` per key per step, ``add_histogram`` per histogram."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise Unavailable(f"tensorboard is not installed ({exc}); pip install -e '.[bench]'") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, Tensor]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        for key, tensor in histograms.items():
            self.writer.add_histogram(key, tensor, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """``wandb.log`` of one dict per step, offline (``WANDB_MODE=offline``), files under ``log_dir``."""

    def __init__(self, log_dir: Path, cfg: RunConfig) -> None:
        os.environ.update({"WANDB_MODE": "offline", "WANDB_DIR": str(log_dir), "WANDB_SILENT": "true"})
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            import wandb
        except ImportError as exc:
            raise Unavailable(f"wandb is not installed ({exc}); pip install -e '.[bench]'") from exc
        try:
            self.run = wandb.init(project="gradwatch-bench", mode="offline", dir=str(log_dir),
                                  config=cfg.model_dump(mode="json"))
        except Exception as exc:  # any failure to start offline makes the variant unavailable, not the bench fail
            raise Unavailable(f"wandb.init(mode='offline') failed: {type(exc).__name__}: {exc}") from exc
        self.histogram: Callable[[Any], Any] = wandb.Histogram  # takes numpy arrays, whatever its stub says

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, Tensor]) -> None:
        row: dict[str, Any] = dict(scalars)
        for key, tensor in histograms.items():
            row[key] = self.histogram(tensor.detach().cpu().numpy())
        self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


#: This process's Trackio data folder: Trackio reads ``TRACKIO_DIR`` once, when first imported.
_trackio_dir: Path | None = None


def _trackio_home() -> Path:
    """A temporary ``TRACKIO_DIR`` for this process (removed at exit), set before Trackio is first imported."""
    global _trackio_dir
    if _trackio_dir is None:
        if "trackio" in sys.modules:  # imported by someone else: its data would land wherever they said
            raise Unavailable("trackio was imported before the benchmark could point TRACKIO_DIR at a temporary "
                              "folder")
        _trackio_dir = Path(tempfile.mkdtemp(prefix="gradwatch-bench-trackio-"))
        atexit.register(shutil.rmtree, _trackio_dir, True)
        os.environ["TRACKIO_DIR"] = str(_trackio_dir)
    return _trackio_dir


class TrackioLogger:
    """``trackio.log`` of one dict per step, local only: SQLite in a temporary folder, no dashboard, no network."""

    def __init__(self, cfg: RunConfig) -> None:
        if importlib.util.find_spec("trackio") is None:
            raise Unavailable("trackio is not installed; pip install -e '.[bench]'")
        home = _trackio_home()
        # Local mode: no Space, no self-hosted server, the Hugging Face Hub never asked.
        for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_DATASET_ID", "TRACKIO_BUCKET_ID"):
            os.environ.pop(name, None)
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its banner would mix with the benchmark's table
                import trackio

                self.trackio: Any = trackio
                self.run = trackio.init(project=f"gradwatch-bench-{cfg.kind}", name=f"bench-{uuid.uuid4().hex[:8]}",
                                        config=cfg.model_dump(mode="json"), embed=False)
        except ImportError as exc:
            raise Unavailable(f"trackio cannot be imported ({exc}); pip install -e '.[bench]'") from exc
        except Exception as exc:  # any failure to start locally makes the variant unavailable, not the bench fail
            raise Unavailable(f"trackio.init() in {home} failed: {type(exc).__name__}: {exc}") from exc

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, Tensor]) -> None:
        row: dict[str, Any] = dict(scalars)
        for key, tensor in histograms.items():
            row[key] = self.trackio.Histogram(tensor.detach().cpu().numpy())
        self.trackio.log(row, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.trackio.finish()


def make_logger(variant: str, cfg: RunConfig, log_dir: Path) -> MetricLogger | None:
    if variant == "bare":
        return None
    if variant == "tensorboard":
        return TensorBoardLogger(log_dir)
    if variant == "wandb":
        return WandbLogger(log_dir, cfg)
    if variant == "trackio":
        return TrackioLogger(cfg)
    raise ValueError(f"no logger for variant {variant!r}")


# -- the loop a user writes -------------------------------------------------------------------------


def bare_loop(cfg: RunConfig, logger: MetricLogger | None = None, client: Any = None) -> Callable[[int], None]:
    """A plain PyTorch loop as a user would write it; with a logger, plus the metrics a user would log.

    Without a logger it is variant (a). With one, each step also computes
    gradwatch's keys the way a user of that logger does: ``.item()`` per value,
    a norm per parameter tensor in a Python loop, global norms from those on the
    host; histograms of the logits every ``hist_every`` steps. With a
    gradwatch ``client`` run instead (variant (e)), the loop hands its models
    to ``client.watch_gan`` / ``client.watch_vae`` and calls the probe's backward
    passes where it called ``loss.backward()``, as a user's own script does.
    """
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.data, device)
    data_gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
    torch.manual_seed(cfg.train.seed)
    batch, latent, hist_every = cfg.train.batch_size, cfg.model.latent_dim, cfg.intervals.hist_every
    step = 0
    if cfg.kind == "vae":
        vae = build_vae(cfg.model, data.shape).to(device)
        opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae.lr)
        beta = cfg.vae.beta
        watch_vae = client.watch_vae(vae.encoder, vae.decoder, beta=beta, opt=opt) if client is not None else None

        def vae_steps(n: int) -> None:
            nonlocal step
            for _ in range(n):
                step += 1
                x = data.sample(batch, data_gen)
                mu, logvar = vae.encode(x)
                eps = torch.randn(mu.shape, device=device, generator=noise_gen)
                z = mu + eps * (0.5 * logvar).exp()
                logits = vae.decode(z)
                recon = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="none").flatten(1).sum(1)
                kl = 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum(1)
                opt.zero_grad(set_to_none=True)
                if watch_vae is not None:
                    watch_vae.backward(recon, mu, logvar, z, eps=eps)
                    opt.step()
                    client.log({}, step=step)
                    continue
                loss = (recon + beta * kl).mean()
                loss.backward()
                opt.step()
                if logger is not None:
                    with torch.no_grad():
                        enc = math.sqrt(sum(p.grad.norm().item() ** 2 for p in vae.encoder.parameters()
                                            if p.grad is not None))
                        dec = math.sqrt(sum(p.grad.norm().item() ** 2 for p in vae.decoder.parameters()
                                            if p.grad is not None))
                        kl_dims = (0.5 * (logvar.exp() + mu**2 - 1 - logvar)).mean(0).tolist()
                        scalars = {
                            "loss/elbo": -loss.item(),
                            "loss/recon": recon.mean().item(),
                            "loss/kl": kl.mean().item(),
                            "kl/mc": (0.5 * (z**2 - eps**2 - logvar)).sum(1).mean().item(),
                            "vae/active_units": float((mu.var(0) > 0.01).sum().item()),
                            "grad/enc_norm": enc,
                            "grad/dec_norm": dec,
                            **{f"kl/dim/{i}": v for i, v in enumerate(kl_dims)},
                        }
                    logger.log(step, scalars, {})

        return vae_steps

    g, d = build_gan(cfg.model, data.shape)
    g.to(device)
    d.to(device)
    betas = (cfg.gan.beta1, cfg.gan.beta2)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.gan.lr_g, betas=betas)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.gan.lr_d, betas=betas)
    g_named, d_named = list(g.named_parameters()), list(d.named_parameters())
    watch_gan = client.watch_gan(g, d, opt_g=opt_g, opt_d=opt_d) if client is not None else None

    def gan_steps(n: int) -> None:
        nonlocal step
        for _ in range(n):
            step += 1
            real = data.sample(batch, data_gen)
            fake = g(torch.randn(batch, latent, device=device, generator=noise_gen))
            if watch_gan is not None:
                opt_d.zero_grad(set_to_none=True)
                watch_gan.discriminator_backward(real, fake.detach())
                opt_d.step()
                opt_g.zero_grad(set_to_none=True)
                watch_gan.generator_backward(fake)
                opt_g.step()
                client.log({}, step=step)
                continue
            h_real = d(real)
            loss_real = F.softplus(-h_real).mean()
            loss_fake = F.softplus(d(fake.detach())).mean()
            loss_d = loss_real + loss_fake
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            if logger is not None:
                d_norms = {f"grad/d_layer/{name}": p.grad.norm().item() for name, p in d_named
                           if p.grad is not None}
            opt_d.step()
            h_fake = d(fake)
            loss_g = F.softplus(-h_fake).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            if logger is not None:
                with torch.no_grad():
                    g_norms = {f"grad/g_layer/{name}": p.grad.norm().item() for name, p in g_named
                               if p.grad is not None}
                    fake_prob = torch.sigmoid(h_fake).mean().item()
                    scalars = {
                        "loss/d": loss_d.item(),
                        "loss/d_real": loss_real.item(),
                        "loss/d_fake": loss_fake.item(),
                        "loss/g": loss_g.item(),
                        "d/real_prob": torch.sigmoid(h_real).mean().item(),
                        "d/fake_prob": fake_prob,
                        "d/real_logit": h_real.mean().item(),
                        "d/fake_logit": h_fake.mean().item(),
                        "grad/d_norm": math.sqrt(sum(v * v for v in d_norms.values())),
                        "grad/g_norm": math.sqrt(sum(v * v for v in g_norms.values())),
                        "dldh/saturating": fake_prob,
                        "dldh/non_saturating": 1.0 - fake_prob,
                        **g_norms,
                        **d_norms,
                    }
                histograms = ({"hist/real_logit": h_real.detach(), "hist/fake_logit": h_fake.detach()}
                              if step % hist_every == 0 else {})
                logger.log(step, scalars, histograms)

    return gan_steps


def instrumented_loop(cfg: RunConfig, out_dir: Path) -> Callable[[int], None]:
    """gradwatch's hot path in this process: ``train_step`` with every key, frames to JSON in memory.

    For ``--inprocess`` runs and profiling: no server, no worker, no websocket.
    """
    sink = io.StringIO()

    def write(frame: dict[str, Any]) -> None:
        sink.write(frame_to_json(frame) + "\n")
        if sink.tell() > 1 << 24:  # keep memory flat over long benchmarks
            sink.seek(0)
            sink.truncate()

    trainer: Trainer = make_trainer(cfg, RunOptions(out_dir=out_dir, sink=write))

    def steps(n: int) -> None:
        for _ in range(n):
            trainer.step += 1
            trainer.train_step(trainer.step, log=True)
            if trainer.buffer.due():
                trainer.flush()
        trainer.flush()

    return steps


# -- one round's measurement window -----------------------------------------------------------------


@dataclass
class Window:
    """Steps/s between the end of a warm-up and the end of the round, from (step, time) pairs.

    The warm-up starts at the first pair seen (the end of step 1), so process
    start-up and model building never count. Every variant is measured with
    this one estimator, from wall-clock stamps taken as each step ends.
    """

    warmup_s: float
    seconds: float
    warmup_steps: int | None = None
    steps: int | None = None
    first: tuple[int, float] | None = None
    start: tuple[int, float] | None = None
    end: tuple[int, float] | None = None

    def feed(self, step: int, t: float) -> bool:
        """One step's end; True once the window is complete."""
        if self.end is not None:
            return True
        if self.first is None:
            self.first = (step, t)
        if self.start is None:
            s0, t0 = self.first
            warm = step - s0 >= self.warmup_steps if self.warmup_steps is not None else t - t0 >= self.warmup_s
            if warm:
                self.start = (step, t)
            return False
        s1, t1 = self.start
        if (step - s1 >= self.steps) if self.steps is not None else (t - t1 >= self.seconds):
            self.end = (step, t)
        return self.end is not None

    def summary(self) -> dict[str, float]:
        assert self.start is not None and self.end is not None
        steps, seconds = self.end[0] - self.start[0], max(self.end[1] - self.start[1], 1e-9)
        return {"steps_per_s": steps / seconds, "steps": steps, "seconds": seconds}


# -- variants (a), (c), (d), (e), (g): a fresh process per round ------------------------------------


def _child(args: argparse.Namespace) -> int:
    """Run one round of a bare-loop variant and write its window (or why it cannot run) to ``--result``."""
    torch.set_num_threads(args.threads)
    result: dict[str, Any]
    try:
        cfg = _quiet(get_preset(args.preset), args.device)
        client = _client_run(cfg, args.server, args.log_dir) if args.child == "client" else None
        logger = make_logger(args.child, cfg, args.log_dir) if client is None else None
        run = bare_loop(cfg, logger, client)
        window = Window(args.warmup, args.seconds, args.warmup_steps, args.steps)
        step = 0
        while True:
            run(1)
            step += 1
            if window.feed(step, time.time()):
                break
        if logger is not None:
            logger.close()
        if client is not None:
            client.finish()
        result = {"ok": True, **window.summary()}
    except Unavailable as exc:
        result = {"ok": False, "reason": str(exc)}
    Path(args.result).write_text(json.dumps(result))
    return 0


def _client_run(cfg: RunConfig, server: str | None, folder: Path) -> Any:
    """Variant (e)'s gradwatch client run: live to ``server``, or offline into ``folder`` (``--inprocess``)."""
    import gradwatch

    iv = cfg.intervals
    extra: dict[str, Any] = {}
    if "telemetry_budget" in inspect.signature(gradwatch.init).parameters:  # the client's budget, once it has one
        extra["telemetry_budget"] = iv.telemetry_budget
    return gradwatch.init(name=f"bench client {cfg.kind}", config=cfg.model_dump(mode="json"), server=server,
                          mode="online" if server else "offline", out=folder / "client-run", quiet=True,
                          log_every=iv.log_every, hist_every=iv.hist_every, flush_steps=iv.flush_steps,
                          flush_ms=iv.flush_ms, **extra)


def child_round(variant: str, preset: str, args: argparse.Namespace, threads: int, tmp: Path,
                server: str | None = None) -> dict[str, Any]:
    """Variant (a), (c), (d), (e) or (g) for one round, in its own process; ``{"ok": False, "reason"}`` if not."""
    tag = uuid.uuid4().hex[:8]
    result = tmp / f"{variant}-{tag}.json"
    cmd = [sys.executable, "-m", "bench.overhead", "--child", variant, "--preset", preset,
           "--device", args.device, "--threads", str(threads), "--warmup", str(args.warmup),
           "--seconds", str(args.seconds), "--result", str(result), "--log-dir", str(tmp / f"{variant}-{tag}")]
    if args.warmup_steps is not None:
        cmd += ["--warmup-steps", str(args.warmup_steps)]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if server is not None:
        cmd += ["--server", server]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=ROUND_TIMEOUT_S,
                          check=False)
    if result.is_file():
        outcome: dict[str, Any] = json.loads(result.read_text())
        return outcome
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    reason = f"exited with {proc.returncode}: " + " | ".join(tail)
    if variant == "bare":
        raise RuntimeError(f"bare loop ({preset}) {reason}")
    return {"ok": False, "reason": reason}


# -- variants (b) and (f): a real run on the real server --------------------------------------------


def gradwatch_round(server: Server, cfg: RunConfig, args: argparse.Namespace) -> dict[str, Any]:
    """POST the run, read its live stream until the window closes, stop it, wait for its worker to exit.

    ``cfg`` is the case's config with the variant's overrides already applied (:func:`server_config`).
    """
    key = (VAE_KEYS if cfg.kind == "vae" else GAN_KEYS)[0]
    window = Window(args.warmup, args.seconds, args.warmup_steps, args.steps)
    run_id = str(server.request("POST", "/api/runs", cfg.model_dump(mode="json"))["id"])
    seen: dict[str, Any] = {"frames": 0, "metric_keys": 0, "status": None, "error": None}
    done = threading.Event()

    def read(ws: ClientConnection) -> None:
        try:
            for message in ws:
                frame = json.loads(message)
                seen["frames"] += 1
                if frame["type"] == "metrics" and key in frame["data"]:
                    seen["metric_keys"] = max(seen["metric_keys"], len(frame["data"]))
                    for step, t in zip(frame["step"], frame["time"], strict=True):
                        if window.feed(step, t):
                            done.set()
                elif frame["type"] == "status" and frame["status"] in TERMINAL:
                    seen["status"], seen["error"] = frame["status"], frame.get("error")
                    done.set()
        except ConnectionClosed:
            pass
        finally:
            done.set()

    with server.stream(run_id) as ws:
        reader = threading.Thread(target=read, args=(ws,), daemon=True)
        reader.start()
        done.wait(ROUND_TIMEOUT_S)
        stopping = time.monotonic()
        if seen["status"] is None:
            with contextlib.suppress(ServerError):  # it may have ended on its own meanwhile
                server.request("POST", f"/api/runs/{run_id}/stop")
        deadline = time.monotonic() + 120.0
        while server.request("GET", f"/api/runs/{run_id}")["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id} did not stop within 120 s")
            time.sleep(0.1)
        server.wait_workers_gone()
    reader.join(5.0)
    if window.end is None:
        raise RuntimeError(f"gradwatch run {run_id} ended ({seen['status']}: {seen['error']}) before its window closed")
    server.request("DELETE", f"/api/runs/{run_id}")
    return {"ok": True, **window.summary(), "metric_keys": seen["metric_keys"], "frames": seen["frames"],
            "stop_s": time.monotonic() - stopping}


# -- orchestration ----------------------------------------------------------------------------------


def _threads(requested: int) -> tuple[int, int]:
    """(GRADWATCH_CPU_RUN_LIMIT, threads per training process) giving ``requested`` threads per worker.

    The server gives each worker ``cpu_count // cpu_run_limit`` torch threads
    (app/manager.py); the bare loops get the same number.
    """
    cpus = os.cpu_count() or 1
    limit = max(1, min(64, cpus // max(1, requested)))
    return limit, max(1, cpus // limit)


def _ratios(base: list[float], other: list[float]) -> dict[str, Any]:
    paired = [b / a for a, b in zip(base, other, strict=False) if a > 0]
    if not paired:
        return {"median": None, "min": None, "max": None, "rounds": []}
    return {"median": statistics.median(paired), "min": min(paired), "max": max(paired), "rounds": paired}


def summarize(preset: str, variants: list[str], rounds: dict[str, list[dict[str, Any]]],
              reasons: dict[str, str]) -> dict[str, Any]:
    rates = {v: [r["steps_per_s"] for r in rounds[v]] for v in variants}
    out: dict[str, Any] = {"case": CASES[preset], "preset": preset, "variants": {}}
    for v in variants:
        entry: dict[str, Any] = {
            "available": v not in reasons,
            "reason": reasons.get(v),
            "steps_per_s": statistics.median(rates[v]) if rates[v] else None,
            "rounds": rounds[v],
        }
        if v != "bare" and "bare" in rates:
            entry["ratio_to_bare"] = _ratios(rates["bare"], rates[v])
        out["variants"][v] = entry
    client, builtin = (out["variants"].get(v, {}).get("ratio_to_bare") for v in ("client", "gradwatch"))
    if client and builtin and client["median"] is not None and builtin["median"] is not None:
        # The bar: a script instrumented with the client costs what the built-in trainer costs.
        out["client_minus_builtin"] = client["median"] - builtin["median"]
    return out


def _cell(entry: dict[str, Any]) -> str:
    if not entry["available"]:
        return "not available"
    rate = entry["steps_per_s"]
    ratio = entry.get("ratio_to_bare")
    if rate is None:
        return "-"
    if ratio is None or ratio["median"] is None:
        return f"{rate:.1f}/s"
    spread = f" [{ratio['min']:.2f}-{ratio['max']:.2f}]" if len(ratio["rounds"]) > 1 else ""
    return f"{rate:.1f}/s x{ratio['median']:.2f}{spread}"


def print_table(results: list[dict[str, Any]], variants: list[str]) -> None:
    headers = ["case", *(f"({LETTER[v]}) {v}" for v in variants)]
    rows = [[r["case"], *(_cell(r["variants"][v]) for v in variants)] for r in results]
    sys.stdout.write(render_table(headers, rows))
    reasons = {(v, r["variants"][v]["reason"]) for r in results for v in variants if r["variants"][v]["reason"]}
    for variant, reason in sorted(reasons):
        sys.stdout.write(f"({LETTER[variant]}) {variant} not available: {reason}\n")
    for r in results:
        if "client_minus_builtin" in r:
            gap = r["client_minus_builtin"]
            sys.stdout.write(f"{r['case']}: (e) client's ratio minus (b) built-in's: {gap:+.3f}\n")
    sys.stdout.write("steps/s: median over rounds; xR: median of per-round ratios to (a) [min-max]\n")
    sys.stdout.flush()


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_separate(args: argparse.Namespace, presets: list[str], variants: list[str]) -> tuple[list[dict[str, Any]],
                                                                                               dict[str, Any]]:
    """Every variant in fresh processes, (b) and (f) through a live server; rounds interleaved a, b, c, ..., a, ...

    With ``--max-seconds``, each case gets an equal share of that time: after its first round, a case starts
    another only if one more round of the length of its last one still ends within its share.
    """
    limit, threads = _threads(args.threads)
    meta: dict[str, Any] = {"mode": "separate processes, (b) and (f) live through gradwatch serve",
                            "threads_per_process": threads, "gradwatch_cpu_run_limit": limit,
                            "max_seconds": args.max_seconds}
    results = []
    started = time.monotonic()
    with TemporaryDirectory(prefix="gradwatch-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server = None
        if any(v in SERVER_RUNS or v == "client" for v in variants):
            server = Server(tmp / "server", env={"GRADWATCH_CPU_RUN_LIMIT": str(limit),
                                                 "OMP_NUM_THREADS": str(threads)}).start()
        try:
            for i, preset in enumerate(presets):
                cfg = _quiet(get_preset(preset), args.device)
                deadline = (started + args.max_seconds * (i + 1) / len(presets)) if args.max_seconds else None
                rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
                reasons: dict[str, str] = {}
                last_round_s = 0.0
                done = 0
                for r in range(args.rounds):
                    if r > 0 and deadline is not None and time.monotonic() + last_round_s > deadline:
                        _progress(f"{CASES[preset]}: its share of --max-seconds {args.max_seconds:g} is spent "
                                  f"after {r} round(s)")
                        break
                    round_began = time.monotonic()
                    line = []
                    for v in variants:
                        if v in reasons:
                            continue
                        began = time.monotonic()
                        if v in SERVER_RUNS:
                            assert server is not None
                            outcome = gradwatch_round(server, server_config(cfg, v), args)
                        elif v == "client":
                            assert server is not None
                            outcome = child_round(v, preset, args, threads, tmp, server.url)
                            server.wait_workers_gone()
                        else:
                            outcome = child_round(v, preset, args, threads, tmp)
                        outcome["round_wall_s"] = time.monotonic() - began
                        if outcome["ok"]:
                            rounds[v].append(outcome)
                            line.append(f"{v} {outcome['steps_per_s']:.1f} ({outcome['round_wall_s']:.0f} s)")
                        else:
                            reasons[v] = outcome["reason"]
                            line.append(f"{v} n/a")
                    _progress(f"{CASES[preset]} round {r + 1}/{args.rounds}, steps/s (round's wall time): "
                              + ", ".join(line))
                    last_round_s = time.monotonic() - round_began
                    done += 1
                results.append({**summarize(preset, variants, rounds, reasons), "rounds_done": done})
        finally:
            if server is not None:
                server.stop()
    return results, meta


def run_inprocess(args: argparse.Namespace, presets: list[str], variants: list[str]) -> tuple[list[dict[str, Any]],
                                                                                                dict[str, Any]]:
    """All variants in this process, fixed step counts, (b) and (f) as ``train_step`` writing JSON to memory."""
    torch.set_num_threads(args.threads)
    steps = args.steps or 200
    warmup = args.warmup_steps if args.warmup_steps is not None else 20
    meta = {"mode": "in process, (b) and (f) without a server", "threads_per_process": args.threads,
            "steps_per_round": steps, "warmup_steps": warmup}
    results = []
    with TemporaryDirectory(prefix="gradwatch-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for preset in presets:
            cfg = _quiet(get_preset(preset), args.device)
            loops: dict[str, Callable[[int], None]] = {}
            loggers: list[MetricLogger] = []
            reasons: dict[str, str] = {}
            for v in variants:
                if v in SERVER_RUNS:
                    loops[v] = instrumented_loop(server_config(cfg, v), tmp / f"{preset}-{v}")
                    continue
                if v == "client":
                    loops[v] = bare_loop(cfg, None, _client_run(cfg, None, tmp / f"{preset}-client"))
                    continue
                try:
                    logger = make_logger(v, cfg, tmp / f"{preset}-{v}")
                except Unavailable as exc:
                    reasons[v] = str(exc)
                    continue
                if logger is not None:
                    loggers.append(logger)
                loops[v] = bare_loop(cfg, logger)
            for run in loops.values():  # warm-up: allocator, kernels, first Adam state
                run(warmup)
            rounds: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for v, run in loops.items():
                    _sync(args.device)
                    start = time.perf_counter()
                    run(steps)
                    _sync(args.device)
                    seconds = time.perf_counter() - start
                    rounds[v].append({"ok": True, "steps_per_s": steps / seconds, "steps": steps, "seconds": seconds})
            for logger in loggers:
                logger.close()
            results.append({**summarize(preset, variants, rounds, reasons), "rounds_done": args.rounds})
    return results, meta


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds from the end of step 1 before a window")
    parser.add_argument("--seconds", type=float, default=2.5, help="length of each round's window")
    parser.add_argument("--warmup-steps", type=int, help="warm up this many steps instead of --warmup seconds")
    parser.add_argument("--steps", type=int, help="windows of this many steps instead of --seconds")
    parser.add_argument("--quick", action="store_true", help="one round, 1 s warm-up, 2 s windows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    parser.add_argument("--max-seconds", type=float,
                        help="share this much wall time between the cases: a case starts no round past its share "
                             "(it always runs one)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated presets from {list(CASES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--inprocess", action="store_true",
                        help="every variant in this process, (b) without a server (for profiling)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "overhead.json")
    # One round of a bare-loop variant in a child process (used by the benchmark itself).
    parser.add_argument("--child", choices=["bare", *TRACKERS, "client"], help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.seconds = 1, 1.0, 2.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        return _child(args)
    presets = [p for p in args.cases.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [p for p in presets if p not in CASES] + [v for v in variants if v not in VARIANTS]
    if unknown or "bare" not in variants:
        raise SystemExit(f"unknown case or variant {unknown}, or no 'bare' variant to compare with")
    variants = [v for v in VARIANTS if v in variants]  # always in the order a, b, c, ...
    info = machine_info(args.device)
    runner = run_inprocess if args.inprocess else run_separate
    results, meta = runner(args, presets, variants)
    print_table(results, variants)
    window = ({"steps": args.steps} if args.steps else {"seconds": args.seconds})
    warmup = ({"steps": args.warmup_steps} if args.warmup_steps is not None else {"seconds": args.warmup})
    write_json(args.json, {"meta": {**info, **meta, "rounds": args.rounds, "window": window, "warmup": warmup,
                                    "variants": variants}, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
