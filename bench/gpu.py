"""The GPU run, prepared to fit a short loan of one GPU (issue 15, item 2): every figure in one go, one JSON.

A lent GPU machine is fresh: this repository, a Python with torch, minutes of
time. So this script checks what it imports before anything else and says what
is missing, then measures, on ``--device`` (CUDA by default), within
``--max-minutes`` (default 7: the machine's first start and a rerun must fit the
loan too):

1. ``micro``: one training step's telemetry, piece by piece, for each case,
   each piece called ``--calls`` times after ``--warmup-calls``: milliseconds
   per call (wall time to the device's end, the host's share before the final
   sync, and the device's own time from CUDA events), and from
   ``torch.profiler`` over ``--profiled-calls`` calls: CUDA kernels and kernel
   launches per call (on a CPU: ATen ops per call). The pieces:

   * ``user_step``: the plain PyTorch step a user writes (bench/overhead.py's
     variant (a)), no telemetry: the reference.
   * ``trainer_unlogged`` / ``trainer_logged_default`` /
     ``trainer_logged_every_step``: the built-in trainer's step (make_trainer,
     as a worker runs it, its frames encoded to memory) not logged, logged at
     the default telemetry budget, and logged with ``telemetry_budget = 1``
     (every piece on every step).
   * GAN cases only, the generator's gradient on its own (G's forward
     included): ``g_grad_user`` (the user's ``loss.backward()``),
     ``g_grad_applied`` (trainer/gradients.py, applied loss only) and
     ``g_grad_applied_shadow`` (applied and shadow loss, as a logged step with
     the shadow takes them); ``layer_norms``: the per-tensor gradient norms of
     G and D, one fused call. ``derived.shadow_extra`` is the shadow
     gradient's price: applied+shadow minus applied-only.

2. ``overhead``: bench/overhead.py on the same device with variants bare,
   gradwatch (default budget), every-step, client and tensorboard (the last
   reported as not available without the ``bench`` extra), up to
   ``--rounds`` rounds per case within what is left of the time.

Writes ``bench/results/gpu.json`` (and the overhead run's own JSON beside it,
``overhead-gpu.json``), with the device's name, the driver and torch's version.

    python -m bench.gpu                                 # on the lent GPU, about 6 minutes
    python -m bench.gpu --device cpu --quick            # a smoke run on any machine
    pip install -e '.[bench]'                           # if the import check says something is missing

A missing runtime dependency stops the script (exit 2) before it measures
anything; a missing optional one (tensorboard) is only reported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Optional distributions: a variant of the overhead run needs them, nothing else does.
OPTIONAL = {"tensorboard": "overhead variant (c) tensorboard"}
OVERHEAD_VARIANTS = ("bare", "gradwatch", "tensorboard", "client", "every-step")  # in bench.overhead's order
CASES = ("ring8-non-saturating", "digits-gan", "digits-vae")
#: What the run imports: the trainer and the benchmark (micro), the server and the client (overhead).
MODULES = ("torch", "trainer.loop", "bench.overhead", "app.cli", "gradwatch")
#: Kept back from --max-minutes for the overhead run's server start and stop and this script's own end.
MARGIN_S = 45.0


# -- what this machine has --------------------------------------------------------------------------


def _requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    return match.group(1) if match else spec.strip()


def check_imports() -> dict[str, list[str]]:
    """What is missing: runtime dependencies (pyproject.toml's) not installed or modules that fail to import; optional
    distributions not installed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    missing, optional_missing = [], []
    for spec in project["dependencies"]:
        name = _requirement_name(spec)
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(spec)
    for name in OPTIONAL:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            optional_missing.append(name)
    if not missing:  # installed is not importable: a broken or mismatched package shows here
        for module in MODULES:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                missing.append(f"{module}: {type(exc).__name__}: {exc}")
    return {"missing": missing, "optional_missing": optional_missing}


def device_facts(device: str) -> dict[str, Any]:
    """torch and CUDA versions, the device's name, memory and driver (``nvidia-smi``), the CPU's."""
    import torch

    from bench._common import machine_info

    facts: dict[str, Any] = {**machine_info(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        facts.update({"device_name": torch.cuda.get_device_name(index), "device_memory_gib": props.total_memory / 2**30,
                      "capability": f"{props.major}.{props.minor}", "driver": _driver()})
    else:
        facts.update({"device_name": facts["cpu"], "driver": None})
    return facts


def _driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        return out.strip().splitlines()[0] if out.strip() else None
    return None


# -- the microbenchmark -----------------------------------------------------------------------------


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _no_native_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: the profiler's native library logs each start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure(fn: Callable[[], None], device: Any, calls: int, warmup: int, profiled: int) -> dict[str, Any]:
    """Time ``fn`` over ``calls`` calls after ``warmup``, then profile ``profiled`` more: per-call figures."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    _sync(device)
    start_event = end_event = None
    if cuda:
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    host_s = time.perf_counter() - began
    if end_event is not None:
        end_event.record()
    _sync(device)
    wall_s = time.perf_counter() - began
    out: dict[str, Any] = {
        "calls": calls,
        "ms_per_call": 1e3 * wall_s / calls,
        "host_ms_per_call": 1e3 * host_s / calls,
        "device_ms_per_call": (start_event.elapsed_time(end_event) / calls
                               if start_event is not None and end_event is not None else None),
        "kernels_per_call": None, "launches_per_call": None, "aten_ops_per_call": None, "profile_error": None,
    }
    if profiled <= 0:
        return out
    try:
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        with _no_native_stderr(), profile(activities=activities) as prof:
            for _ in range(profiled):
                fn()
            _sync(device)
        events = prof.events()
        top_aten = [e for e in events if e.name.startswith("aten::")
                    and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
        out["aten_ops_per_call"] = len(top_aten) / profiled
        if cuda:
            out["kernels_per_call"] = sum(1 for e in events if e.device_type == DeviceType.CUDA) / profiled
            out["launches_per_call"] = sum(1 for e in events if "LaunchKernel" in e.name) / profiled
    except Exception as exc:  # a profiler that cannot start here costs the counts, not the run
        out["profile_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _trainer_step(cfg: Any, out_dir: Path, log: bool) -> Callable[[], None]:
    """One step of the built-in trainer as a worker runs it, its frames encoded to JSON in memory."""
    import io

    from trainer.loop import RunOptions, make_trainer
    from trainer.telemetry import frame_to_json

    sink = io.StringIO()

    def write(frame: dict[str, Any]) -> None:
        sink.write(frame_to_json(frame) + "\n")
        if sink.tell() > 1 << 22:
            sink.seek(0)
            sink.truncate()

    trainer = make_trainer(cfg, RunOptions(out_dir=out_dir, sink=write))

    def step() -> None:
        trainer.step += 1
        trainer.train_step(trainer.step, log=log)
        if trainer.buffer.due():
            trainer.flush()

    return step


def _gan_pieces(cfg: Any) -> dict[str, Callable[[], None]]:
    """The generator gradient on its own, three ways, and the per-tensor norms, on a GAN built as the trainer does."""
    import torch
    import torch.nn.functional as F

    from trainer.data import load_dataset
    from trainer.gradients import couples_samples, generator_gradients
    from trainer.loop import resolve_device
    from trainer.losses import SHADOW_PAIR
    from trainer.models import build_gan
    from trainer.telemetry import grad_norms, total_norm

    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = load_dataset(cfg.data, device)
    g, d = build_gan(cfg.model, data.shape)
    g.to(device)
    d.to(device)
    batch, latent = cfg.train.batch_size, cfg.model.latent_dim
    noise = torch.Generator(device=device).manual_seed(cfg.train.seed + 1)
    g_params = [p for p in g.parameters() if p.requires_grad]
    applied = cfg.gan.g_loss
    losses = [applied, *(name for name in SHADOW_PAIR if name != applied)]
    fake0 = g(torch.randn(batch, latent, device=device, generator=noise))
    per_sample = not couples_samples(d, fake0)

    def fake() -> Any:
        return g(torch.randn(batch, latent, device=device, generator=noise))

    def user() -> None:
        g.zero_grad(set_to_none=True)
        F.softplus(-d(fake())).mean().backward()

    def applied_only() -> None:
        generator_gradients(fake(), d, g_params, [applied], per_sample=per_sample)

    def with_shadow() -> None:
        generator_gradients(fake(), d, g_params, losses, per_sample=per_sample)

    user()  # every parameter of G has a .grad
    F.softplus(d(fake0.detach())).mean().backward()  # and of D
    grads = [p.grad for p in (*g_params, *d.parameters()) if p.grad is not None]

    def norms() -> None:
        with torch.no_grad():
            total_norm(grad_norms(grads))

    return {"g_grad_user": user, "g_grad_applied": applied_only, "g_grad_applied_shadow": with_shadow,
            "layer_norms": norms}


def micro_case(preset: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every piece of one case, measured one after another (each on its own models, seeded)."""
    import torch

    from bench.overhead import CASES as CASE_NAMES
    from bench.overhead import _quiet, bare_loop
    from trainer.loop import resolve_device
    from trainer.presets import get_preset

    cfg = _quiet(get_preset(preset), args.device)
    device = resolve_device(cfg.train.device)
    every = cfg.with_overrides({"intervals.telemetry_budget": 1.0})
    builders: dict[str, Callable[[], Callable[[], None]]] = {
        "user_step": lambda: _one(bare_loop(cfg)),
        "trainer_unlogged": lambda: _trainer_step(cfg, tmp / f"{preset}-unlogged", log=False),
        "trainer_logged_default": lambda: _trainer_step(cfg, tmp / f"{preset}-default", log=True),
        "trainer_logged_every_step": lambda: _trainer_step(every, tmp / f"{preset}-every", log=True),
    }
    pieces: dict[str, Any] = {}
    for name, build in builders.items():
        torch.manual_seed(cfg.train.seed)
        pieces[name] = measure(build(), device, args.calls, args.warmup_calls, args.profiled_calls)
    if cfg.kind == "gan":
        for name, fn in _gan_pieces(cfg).items():
            pieces[name] = measure(fn, device, args.calls, args.warmup_calls, args.profiled_calls)
    derived: dict[str, Any] = {}
    user = pieces["user_step"]["ms_per_call"]
    for name in ("trainer_unlogged", "trainer_logged_default", "trainer_logged_every_step"):
        derived[f"user_over_{name}"] = user / pieces[name]["ms_per_call"]
    if cfg.kind == "gan":
        derived["shadow_extra"] = {
            key: (None if pieces["g_grad_applied_shadow"][key] is None or pieces["g_grad_applied"][key] is None
                  else pieces["g_grad_applied_shadow"][key] - pieces["g_grad_applied"][key])
            for key in ("ms_per_call", "device_ms_per_call", "kernels_per_call", "launches_per_call",
                        "aten_ops_per_call")}
    _progress(f"micro {CASE_NAMES[preset]}: " + ", ".join(f"{n} {p['ms_per_call']:.3f} ms" for n, p in pieces.items()))
    return {"preset": preset, "case": CASE_NAMES[preset], "kind": cfg.kind, "pieces": pieces, "derived": derived}


def _one(run: Callable[[int], None]) -> Callable[[], None]:
    return lambda: run(1)


# -- the run ----------------------------------------------------------------------------------------


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def print_micro(cases: list[dict[str, Any]]) -> None:
    from bench._common import render_table

    rows = []
    for case in cases:
        for name, p in case["pieces"].items():
            rows.append([case["case"], name, _fmt(p["ms_per_call"]), _fmt(p["host_ms_per_call"]),
                         _fmt(p["device_ms_per_call"]), _fmt(p["kernels_per_call"], 1),
                         _fmt(p["launches_per_call"], 1), _fmt(p["aten_ops_per_call"], 1)])
    sys.stdout.write(render_table(["case", "piece", "ms/call", "host ms", "device ms", "kernels", "launches",
                                   "aten ops"], rows))
    for case in cases:
        extra = case["derived"].get("shadow_extra")
        if extra:
            sys.stdout.write(f"{case['case']}: the shadow gradient adds {_fmt(extra['ms_per_call'])} ms, "
                             f"{_fmt(extra['kernels_per_call'], 1)} kernels, {_fmt(extra['aten_ops_per_call'], 1)} "
                             "ATen ops per logged step\n")
    sys.stdout.flush()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (a smoke run): 20 calls, one overhead round of 2 s windows")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated presets from {list(CASES)}")
    parser.add_argument("--max-minutes", type=float, default=7.0, help="the whole run's time budget")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per micro piece")
    parser.add_argument("--warmup-calls", type=int, default=20)
    parser.add_argument("--profiled-calls", type=int, default=10, help="profiled calls per piece (0: no profile)")
    parser.add_argument("--rounds", type=int, default=5, help="at most this many overhead rounds per case")
    parser.add_argument("--overhead-steps", type=int,
                        help="overhead windows of this many steps after 1 warm-up step (smoke runs)")
    parser.add_argument("--inprocess", action="store_true", help="the overhead run in this process, no server")
    parser.add_argument("--no-overhead", action="store_true", help="the microbenchmark only")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.warmup_calls, args.profiled_calls = min(args.calls, 20), min(args.warmup_calls, 3), min(
            args.profiled_calls, 2)
        args.rounds = 1
    return args


def _overhead_argv(args: argparse.Namespace, presets: list[str], seconds_left: float, out: Path) -> list[str]:
    argv = ["--device", args.device, "--cases", ",".join(presets), "--variants", ",".join(OVERHEAD_VARIANTS),
            "--rounds", str(args.rounds), "--max-seconds", f"{max(1.0, seconds_left):.0f}", "--json", str(out)]
    if args.overhead_steps is not None:
        argv += ["--steps", str(args.overhead_steps), "--warmup-steps", "1"]
    elif args.quick:
        argv += ["--warmup", "1", "--seconds", "2"]
    if args.inprocess:
        argv.append("--inprocess")
    return argv


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    began = time.monotonic()
    imports = check_imports()
    if imports["missing"]:
        sys.stderr.write("bench.gpu: missing runtime dependencies: " + ", ".join(imports["missing"])
                         + f"\n  install them: {sys.executable} -m pip install -e '.[bench]' (torch kept as is)\n")
        return 2
    for name in imports["optional_missing"]:
        _progress(f"bench.gpu: {name} is not installed: {OPTIONAL[name]} will be reported as not available")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.stderr.write(f"bench.gpu: --device {args.device} but torch {torch.__version__} sees no CUDA device "
                         f"(torch.version.cuda = {torch.version.cuda}); --device cpu for a smoke run\n")
        return 2
    from bench import overhead
    from bench._common import write_json

    presets = [p for p in args.cases.split(",") if p]
    unknown = [p for p in presets if p not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    facts = device_facts(args.device)
    _progress(f"bench.gpu on {facts['device_name']} (driver {facts['driver']}, torch {facts['torch']}), "
              f"budget {args.max_minutes:g} min")
    torch.set_num_threads(1)
    payload: dict[str, Any] = {"meta": {**facts, "quick": args.quick, "argv": sys.argv[1:] if argv is None else argv,
                                        "max_minutes": args.max_minutes}, "imports": imports}
    with TemporaryDirectory(prefix="gradwatch-bench-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        cases = [micro_case(p, args, tmp) for p in presets]
    payload["micro"] = {"calls": args.calls, "warmup_calls": args.warmup_calls,
                        "profiled_calls": args.profiled_calls, "cases": cases}
    print_micro(cases)
    micro_s = time.monotonic() - began
    payload["meta"]["micro_s"] = micro_s
    if args.no_overhead:
        payload["overhead"] = {"skipped": "--no-overhead"}
    else:
        out = args.json.with_name("overhead-gpu.json")
        left = 60 * args.max_minutes - micro_s - MARGIN_S
        try:
            overhead.main(_overhead_argv(args, presets, left, out))
            payload["overhead"] = json.loads(out.read_text())
        except Exception as exc:  # the microbenchmark's figures are still worth writing
            payload["overhead"] = {"error": f"{type(exc).__name__}: {exc}"}
            _progress(f"bench.gpu: the overhead run failed: {payload['overhead']['error']}")
    payload["meta"]["elapsed_s"] = time.monotonic() - began
    write_json(args.json, payload)
    _progress(f"bench.gpu: {payload['meta']['elapsed_s']:.0f} s; wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
