"""A training worker: one process per run, talking to the server over one websocket.

The server starts ``python -m app.worker --token-stdin`` and writes the run's
token to its stdin: never on the command line, where ``ps`` shows it, nor in
the environment, where ``/proc/<pid>/environ`` keeps it for the process's life
whatever the process does to ``os.environ``. (A worker started by hand or on
another host may take it from ``GRADWATCH_RUN_TOKEN`` instead.) The
trainer runs on the main thread; a channel thread owns the connection:

- frames go out in seq order, batched, and stay in the outbox until the
  server acknowledges them as committed, so a dropped connection or a
  restarted server loses nothing: on reconnect the server says what it
  has (``hello``) and the worker resends the rest;
- each sample or checkpoint file is uploaded, in chunks, just before the
  frame that announces it, so the frame never points at a missing file, and
  deleted locally once acknowledged;
- control and stop messages are handed to the trainer, which applies them
  between two steps; ``SIGINT`` stops the run the same way, while ``SIGTERM``
  (a server shutting down) stops it hurried: the final checkpoint only, and at
  most 2 s spent on delivering what is left, so the server can exit in time;
- reconnects back off exponentially; a worker that cannot reach any server
  for ``orphan_timeout_s`` stops itself (final checkpoint kept locally),
  so a server killed with ``kill -9`` leaves no process behind for long;
- a worker whose token the server refuses (its run deleted, or launched
  again after a restart) exits at once, writing nothing more.

The channel itself is :mod:`gradwatch.channel`, shared with a user's own
script and ``gradwatch sync``. Nothing here imports the web server: a worker
on another host needs only this module, the trainer and ``websockets``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import urllib.request
from pathlib import Path
from types import FrameType

from gradwatch.channel import DRAIN_S, Channel, MemoryOutbox
from trainer.files import atomic_write

log = logging.getLogger("gradwatch.worker")

TOKEN_ENV = "GRADWATCH_RUN_TOKEN"
#: Frames a worker holds unacknowledged before it stops its run: far more than a run sends while its server restarts.
MAX_BACKLOG_MB = 256
#: The exit code of a worker the server disowned (see :func:`_disowned`).
EXIT_DISOWNED = 3
#: How long a terminated worker waits for acks (a finished one waits DRAIN_S): the server is going away, and keeps
#: the final checkpoint from disk.
SHUTDOWN_DRAIN_S = 2.0


class WorkerChannel(Channel):
    """A launched worker's channel: frames in memory, artifacts deleted from the scratch folder once the server has
    them, and a run that stops itself after ``orphan_timeout_s`` without a server."""

    def __init__(self, url: str, token: str, out_dir: Path, *, orphan_timeout_s: float = 120.0,
                 max_backlog_bytes: int = MAX_BACKLOG_MB << 20) -> None:
        super().__init__(lambda: (url, token), MemoryOutbox(), out_dir, orphan_timeout_s=orphan_timeout_s,
                         delete_acked_artifacts=True, max_backlog_bytes=max_backlog_bytes)
        self.url = url
        self.token = token
        self.out_dir = out_dir


def _disowned(status: int) -> None:
    """The server refused this run's token: the run was deleted, or launched again after a restart, or ended
    while this worker could not reach it. Another worker may own the run's folder by now, so exit at once and
    write nothing more there (not even a final checkpoint): whatever this worker did would reach nobody."""
    log.error("the server refused this run's token (HTTP %s): the run was deleted, relaunched or ended while this "
              "worker was away; exiting", status)
    logging.shutdown()
    os._exit(EXIT_DISOWNED)


def fetch_resume_checkpoint(server: str, run_id: str, token: str, target: Path) -> Path:
    """Download the run's starting checkpoint (HTTP, run token), so a worker needs no shared disk."""
    base = server.replace("ws://", "http://", 1).replace("wss://", "https://", 1).rstrip("/")
    request = urllib.request.Request(f"{base}/worker/runs/{run_id}/resume",
                                     headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy, like the channel
    with opener.open(request, timeout=60) as response:
        atomic_write(target, lambda fh: shutil.copyfileobj(response, fh))
    return target


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m app.worker", description="One gradwatch training run.")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--server", required=True, help="ws://host:port of the gradwatch server")
    parser.add_argument("--config", required=True, type=Path, help="run config JSON")
    parser.add_argument("--work-dir", required=True, type=Path, help="local folder for artifacts before upload")
    parser.add_argument("--cache-dir", type=Path, help="where the digits classifier is cached")
    parser.add_argument("--resume", type=Path, help="checkpoint to continue from (a local file)")
    parser.add_argument("--resume-from-server", action="store_true",
                        help="fetch the checkpoint to continue from from the server")
    parser.add_argument("--orphan-timeout", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--nice", type=int, default=0, choices=range(20), metavar="0-19",
                        help="niceness added to the training thread, not to the channel thread that streams")
    parser.add_argument("--max-backlog-mb", type=int, default=MAX_BACKLOG_MB,
                        help="stop the run (failed, final checkpoint kept) when this many MiB of frames wait for the "
                             "server's acknowledgement")
    parser.add_argument("--token-stdin", action="store_true",
                        help=f"read the run token from the first line of stdin (else from ${TOKEN_ENV})")
    return parser.parse_args(argv)


def read_token(args: argparse.Namespace) -> str:
    """The run token: stdin's first line with ``--token-stdin`` (how the server hands it over), else the
    environment, which is then cleared so that nothing this process starts inherits it."""
    if args.token_stdin:
        return sys.stdin.readline().strip()
    return os.environ.pop(TOKEN_ENV, "")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    token = read_token(args)
    if not token:
        log.error("no run token: give --token-stdin and write it to stdin, or set %s", TOKEN_ENV)
        return 2

    import torch

    from trainer.config import RunConfig
    from trainer.loop import RunOptions, make_trainer
    from trainer.telemetry import flush_when_due

    if args.threads:
        torch.set_num_threads(args.threads)
    url = f"{args.server.rstrip('/')}/ws/worker/{args.run_id}"
    channel = WorkerChannel(url, token, args.work_dir, orphan_timeout_s=args.orphan_timeout,
                            max_backlog_bytes=args.max_backlog_mb << 20)
    channel.on_refused = _disowned  # from the first connection on: the refusal may come before training starts
    channel.start()
    if args.nice:
        # On Linux niceness is per thread: the channel thread, started above, keeps normal priority so frames leave
        # on time, while training and the torch threads it starts later yield the CPU to the server and the stream.
        with contextlib.suppress(OSError):
            os.nice(args.nice)
    status = "failed"
    try:
        cfg = RunConfig.model_validate_json(args.config.read_text(encoding="utf-8"))
        resume = args.resume
        if args.resume_from_server:
            resume = fetch_resume_checkpoint(args.server, args.run_id, token, args.work_dir / "resume.pt")
        options = RunOptions(out_dir=args.work_dir, sink=channel.send_frame, run_id=args.run_id,
                             resume_from=resume)
        if args.cache_dir is not None:
            options.cache_dir = args.cache_dir
        trainer = make_trainer(cfg, options)
    except Exception as exc:  # the run never started: say why on the channel, as its only frame
        log.exception("could not start the run")
        channel.send_frame({"type": "status", "run": args.run_id, "seq": 1, "status": "failed",
                            "error": f"{type(exc).__name__}: {exc}", "step": 0})
        channel.close()
        return 1

    channel.on_control = trainer.control
    channel.on_stop = trainer.request_stop
    # Telemetry leaves as soon as the channel has nothing in flight, batched while it has, and no later than
    # flush_ms after its oldest step: checked by the training thread after each step, and by the channel thread
    # (normal priority, while training runs at nice 10) whenever an acknowledgement comes or the deadline does.
    trainer.buffer.idle = channel.idle
    channel.on_wake = lambda: flush_when_due(trainer.buffer, trainer.emitter.emit)
    channel.on_backlog_full = lambda held: trainer.request_stop(error=(
        f"backlog: {held / 2**20:.0f} MiB of frames were never acknowledged (the server is unreachable or cannot "
        f"store them); the run stopped rather than fill this machine's memory, its final checkpoint in "
        f"{args.work_dir / 'checkpoints'}"))

    terminated = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        # SIGINT is a stop like the dashboard's Stop button (the server sends it when the channel is down).
        # SIGTERM comes from a server shutting down, or from whoever manages this host: nobody will acknowledge
        # much more and we may be killed if we dawdle, so write the final checkpoint and go.
        if signum == signal.SIGTERM:
            terminated.set()
        trainer.request_stop(hurry=terminated.is_set())

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        status = trainer.run()
    finally:
        drain = SHUTDOWN_DRAIN_S if terminated.is_set() else DRAIN_S
        if not channel.close(drain_timeout_s=drain):
            log.error("some frames were never acknowledged by the server")
    return 0 if status in ("completed", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
