"""The ``gradwatch`` command.

Kept free of heavy imports at module level so ``gradwatch --help`` is instant;
each subcommand imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from types import FrameType

    from app.settings import Settings


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "config"
        lines.append(f"  {where}: {err['msg']}")
    return "invalid run config:\n" + "\n".join(lines)


def _load_config(args: argparse.Namespace) -> object:
    from trainer.config import RunConfig
    from trainer.presets import get_preset, preset_names

    if args.preset:
        if args.preset not in preset_names():
            raise SystemExit(f"unknown preset {args.preset!r}; choose from: {', '.join(preset_names())}")
        raw = get_preset(args.preset).model_dump(mode="json")
    else:
        try:
            raw = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read config {args.config}: {exc}") from exc
    if not isinstance(raw, dict):
        raise SystemExit("the config file must hold one JSON object")
    overrides = {"steps": args.steps, "seed": args.seed, "device": args.device}
    for key, value in overrides.items():
        if value is not None:
            raw.setdefault("train", {})[key] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise SystemExit(_format_validation_error(exc)) from exc


def _train(args: argparse.Namespace) -> int:
    from trainer.config import RunConfig
    from trainer.headless import run_headless
    from trainer.loop import TrainingError

    cfg = _load_config(args)
    assert isinstance(cfg, RunConfig)
    try:
        status = run_headless(cfg, Path(args.out), resume_from=Path(args.resume) if args.resume else None,
                              progress=not args.no_progress)
    except TrainingError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stderr.write(f"run {status}; frames in {Path(args.out) / 'events.jsonl'}\n")
    return 0 if status in ("completed", "stopped") else 1


def _sync(args: argparse.Namespace) -> int:
    from gradwatch.sync import SyncError, sync

    status = 0
    for folder in args.folders:
        try:
            result = sync(folder, server=args.server, token=args.token, progress=not args.no_progress)
        except SyncError as exc:
            sys.stderr.write(f"error: {exc}\n")
            status = 1
            continue
        if result["uploaded"]:
            sys.stderr.write(f"{folder}: {result['uploaded']} frames uploaded → {result['url']}\n")
        else:
            sys.stderr.write(f"{folder}: already on the server → {result['url']}\n")
    return status


def _reproduce(args: argparse.Namespace) -> int:
    import shlex

    from trainer.loop import TrainingError
    from trainer.reproduce import ReproduceError, default_jobs, reproduce

    out = Path(args.out) if args.out else Path("reproductions") / args.name
    command = "gradwatch " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] \
        else f"gradwatch reproduce {args.name}"
    try:
        report = reproduce(args.name, trials=args.trials, steps=args.steps, device=args.device, out=out,
                           workers=args.jobs or default_jobs(), command=command)
    except ValidationError as exc:
        raise SystemExit(_format_validation_error(exc)) from exc
    except (TrainingError, ReproduceError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the trials that ended are in their run folders; no table written\n")
        return 130
    sys.stdout.write(report.markdown())
    sys.stderr.write(f"results: {out / 'results.json'} and {out / 'table.md'}; every trial's run folder is under {out} "
                     f"(show one in the dashboard with `gradwatch sync <folder>`)\n")
    return 0


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _presets(_args: argparse.Namespace) -> int:
    from trainer.presets import all_presets

    sys.stdout.write(json.dumps({k: v.model_dump(mode="json") for k, v in all_presets().items()}, indent=2) + "\n")
    return 0


def _join_ray(settings: Settings) -> None:
    """Join the Ray cluster before serving, so that a cluster that is not there is a one-line refusal at once,
    not a traceback when the app starts, nor minutes of Ray retrying an address where nothing answers."""
    import os
    import threading

    from app.ray_backend import RayBackend

    failed: list[BaseException] = []

    def join() -> None:
        try:
            RayBackend(settings).connect()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=join, name="ray-join", daemon=True)
    thread.start()
    thread.join(settings.ray_join_timeout_s)
    if thread.is_alive():  # Ray is still retrying inside ray.init, which cannot be interrupted: leave at once
        address = settings.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
        sys.stderr.write(f"cannot serve: no answer from the Ray cluster at {address!r} within "
                         f"{settings.ray_join_timeout_s:g} s (ray_join_timeout_s); is its head running, and is this "
                         "machine one of its nodes? (docs/deploy.md)\n")
        sys.stderr.flush()
        os._exit(1)
    if failed:
        raise SystemExit(f"cannot serve: {failed[0]}")


def _serve(args: argparse.Namespace) -> int:
    import logging
    import socket

    import uvicorn

    from app import __version__
    from app.limits import guarded_http_protocol
    from app.main import create_app
    from app.security import RedactTokenFilter
    from app.settings import Settings, generate_token
    from app.web.assets import missing_vendor_files, setup_report
    from gradwatch.protocol import MAX_MESSAGE_BYTES

    token, generated = args.token, False
    if token == "generate":
        token, generated = generate_token(), True
    given = {"host": args.host, "port": args.port, "data_dir": args.data_dir, "token": token,
             "allowed_hosts": args.allowed_hosts, "backend": args.backend, "ray_address": args.ray_address,
             "public_url": args.public_url}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise SystemExit(_format_validation_error(exc).replace("invalid run config", "cannot serve")) from exc

    # Bind before building the app, so that port 0 becomes a real port the workers can be told.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
        # Listening now, before the URL is printed: a browser or client that connects while the app still starts
        # waits in the backlog until uvicorn accepts it, instead of being refused (the socket used to listen only
        # once uvicorn had run the app's startup).
        sock.listen(2048)
    except OSError as exc:
        raise SystemExit(f"cannot listen on {settings.host}:{settings.port}: {exc}") from exc
    settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{settings.port}/"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.backend == "ray":
        _join_ray(settings)
    lines = [f"gradwatch {__version__} serving on {url} (data in {settings.data_dir})"]
    if generated:
        lines.append(f"access token generated; open {url}?token={token}")
    if settings.backend == "ray":
        reach = settings.public_url or f"{url.rstrip('/')} (no --public-url: only nodes on this machine reach it)"
        lines.append(f"runs go to the Ray cluster at {settings.ray_address or '$RAY_ADDRESS, else this machine'}; "
                     f"its workers report to {reach}")
    report = setup_report(missing_vendor_files())
    if report:
        lines.append(report)
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    # No permessage-deflate: it compresses every frame once per client, and with 20 clients that CPU,
    # not bandwidth, limits fan-out (bench/throughput.py: clients fell to 15-22 % of the stream).
    # The HTTP protocol adds a header deadline, a header size and a connection cap (app/limits.py); the websocket
    # pings free the connections of peers that vanished without closing.
    app = create_app(settings)

    class Server(uvicorn.Server):
        """uvicorn's server, which also ends the runs pages' event streams the moment it is asked to exit: uvicorn waits
        for open streaming responses before the app's own shutdown runs, so they would hold it for the whole grace."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            manager = getattr(app.state, "manager", None)  # set once the app has started
            if manager is not None:
                manager.changes.close_soon()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=15,
                            http=guarded_http_protocol(settings), ws_max_size=MAX_MESSAGE_BYTES,
                            ws_per_message_deflate=False, ws_ping_interval=settings.ws_ping_interval_s,
                            ws_ping_timeout=settings.ws_ping_timeout_s)
    logging.getLogger("uvicorn.access").addFilter(RedactTokenFilter())  # after Config: it sets up the loggers
    Server(config).run(sockets=[sock])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradwatch", description="Live GAN and VAE training dashboard.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run one training run headless (no server)")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("config", nargs="?", help="run config as a JSON file")
    source.add_argument("--preset", help="a shipped preset, e.g. ring8-saturating")
    train.add_argument("--out", required=True, help="output folder (events.jsonl, samples/, checkpoints/)")
    train.add_argument("--steps", type=int, help="override train.steps")
    train.add_argument("--seed", type=int, help="override train.seed")
    train.add_argument("--device", help="override train.device (auto, cpu, cuda, cuda:N)")
    train.add_argument("--resume", help="continue from this checkpoint file")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    serve = sub.add_parser("serve", help="start the dashboard server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1; any other needs a token)")
    serve.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--data-dir", help="where runs, the database and artifacts live")
    serve.add_argument("--token", help="access token (32+ characters), or 'generate' to have one made and printed")
    serve.add_argument("--allowed-hosts", help="extra Host names to accept, comma-separated (a reverse proxy's name)")
    serve.add_argument("--backend", choices=["local", "ray"],
                       help="where runs train: processes on this machine (default) or a Ray cluster")
    serve.add_argument("--ray-address", help="the Ray cluster to join, e.g. ray-head:6379; this machine must be one "
                       "of its nodes (default: $RAY_ADDRESS, else the cluster this machine is part of)")
    serve.add_argument("--public-url", help="http(s) URL at which workers on other machines reach this server, "
                       "e.g. http://10.0.0.5:8000")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)

    sync = sub.add_parser("sync", help="upload run folders (a script's offline run, or a `train --out` folder)")
    sync.add_argument("folders", nargs="+", metavar="DIR", help="run folder(s) holding events.jsonl")
    sync.add_argument("--server", help="the server (default: $GRADWATCH_URL, else http://127.0.0.1:8000)")
    sync.add_argument("--token", help="the server's access token (default: $GRADWATCH_TOKEN)")
    sync.add_argument("--no-progress", action="store_true", help="no progress bar")
    sync.set_defaults(func=_sync)

    from trainer.reproduce import EXPERIMENTS

    repro = sub.add_parser("reproduce", help="rerun a published experiment on its protocol; our figures beside the "
                           "paper's (docs/reproductions.md)")
    repro.add_argument("name", choices=EXPERIMENTS, help="the experiment")
    repro.add_argument("--trials", type=_at_least_one, help="trials per row (default: the paper's, 10 for "
                       "pacgan-table1; 5 seeds for arjovsky-bottou)")
    repro.add_argument("--steps", type=_at_least_one, help="training steps per trial (default: a CPU budget, "
                       "said in the output)")
    repro.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    repro.add_argument("--out", help="output folder (default ./reproductions/NAME)")
    repro.add_argument("--jobs", type=_at_least_one, help="trials at a time (default: this machine's cores)")
    repro.set_defaults(func=_reproduce)

    presets = sub.add_parser("presets", help="print the shipped presets as JSON")
    presets.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
