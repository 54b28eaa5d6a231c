"""A worker that trains nothing: it pushes metrics frames at the server as fast as the server acknowledges them.

The throughput benchmark must load the *server* (ingest, SQLite, fan-out), not
the 2-core machine's CPUs with PyTorch, so the server is started with
``GRADWATCH_WORKER_MODULE=bench.synthetic_worker`` and launches this module
instead of ``app.worker``: the same arguments, the same run token in the
environment, and the real :class:`app.worker.WorkerChannel` on the real
``/ws/worker/{id}`` protocol (hello, batched ``frames``, acks after commit,
resend on reconnect). Only the trainer is replaced.

Each frame is what a real GAN worker sends after a flush: ``STEPS`` steps ×
``KEYS`` keys (default 64 × 60: the twelve SPEC §2 scalars plus per-tensor
gradient norms of a 4-layer generator and discriminator), values with full
float precision, worker-side ``time`` stamps. The frame's JSON is assembled
from pre-serialised value columns, so this process spends its CPU on the
channel, not on ``json.dumps``: on a 2-core machine every cycle it saves is
one the server can use.

Flow control: the real worker's outbox is unbounded (training is slower than
the server); here at most ``WINDOW`` frames may be unacknowledged, which is
what "as fast as the server takes them" means: a new frame is built as soon as
an ack makes room. Environment (inherited from the server):

- ``GRADWATCH_SYNTH_SECONDS``: how long to push (default: until ``train.steps``
  of the run config have been sent);
- ``GRADWATCH_SYNTH_STEPS`` (64), ``GRADWATCH_SYNTH_KEYS`` (60),
  ``GRADWATCH_SYNTH_WINDOW`` (16).

Ends with a ``completed`` status frame (``stopped`` on a stop request or
SIGTERM), after which the channel drains every frame, as ``app.worker`` does.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import threading
import time
import zlib
from types import FrameType
from typing import Any

from app.worker import WorkerChannel, _parse, read_token
from trainer.loop import GAN_KEYS

log = logging.getLogger("gradwatch.synthetic_worker")

#: Distinct pre-serialised value columns per key; frames cycle through them (values repeat, sizes do not).
_VARIANTS = 8


def synthetic_keys(n: int) -> list[str]:
    """``n`` metric keys named as a real GAN run names them: SPEC §2 scalars first, then per-tensor norms."""
    keys = list(GAN_KEYS)
    layer = 0
    while len(keys) < n:
        for net in ("g", "d"):
            for part in ("weight", "bias"):
                keys.append(f"grad/{net}_layer/net.{2 * layer}.{part}")
        layer += 1
    return keys[:n]


class SyntheticChannel(WorkerChannel):
    """The real channel, plus a window on unacknowledged frames and a way to queue a pre-serialised frame."""

    def send_text(self, seq: int, frame_type: str, text: str) -> None:
        """Queue a frame whose JSON is already built; the channel needs only its type and seq besides the text."""
        with self._cond:
            self.outbox.append({"type": frame_type, "seq": seq}, text)  # type: ignore[attr-defined]
            self._cond.notify_all()

    def wait_window(self, window: int, timeout: float = 1.0) -> bool:
        """Block until fewer than ``window`` frames await their ack; False if that did not happen in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.pending() >= window:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._gave_up or self._refused:
                    return False
                self._cond.wait(remaining)
        return True


class FrameFactory:
    """Metrics frames of one run as JSON text, built by splicing cached value columns (see the module doc)."""

    def __init__(self, run_id: str, steps_per_frame: int, n_keys: int, seed: int = 0) -> None:
        self.run_id = run_id
        self.steps_per_frame = steps_per_frame
        self.keys = synthetic_keys(n_keys)
        rng = random.Random(seed)
        self._data: list[str] = []
        for _ in range(_VARIANTS):
            # Values like a float32 read back as float64 (0.6931471824645996): as long as real telemetry is.
            columns = {key: [float(rng.random() * 4.0) for _ in range(steps_per_frame)] for key in self.keys}
            self._data.append(json.dumps(columns, separators=(",", ":")))

    @property
    def points_per_frame(self) -> int:
        return self.steps_per_frame * len(self.keys)

    def metrics(self, seq: int, first_step: int) -> str:
        steps = range(first_step, first_step + self.steps_per_frame)
        now = time.time()
        # Worker-side stamps, as the trainer takes them: one per step, the newest now.
        times = [now - (self.steps_per_frame - 1 - i) * 1e-5 for i in range(self.steps_per_frame)]
        return (f'{{"type":"metrics","run":"{self.run_id}","seq":{seq},'
                f'"step":[{",".join(map(str, steps))}],"time":[{",".join(map(repr, times))}],'
                f'"data":{self._data[seq % _VARIANTS]}}}')


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw else default


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parse(argv)  # exactly app.worker's arguments
    token = read_token(args)
    if not token:
        log.error("no run token")
        return 2
    config: dict[str, Any] = json.loads(args.config.read_text(encoding="utf-8"))
    seconds = _env_number("GRADWATCH_SYNTH_SECONDS", 0.0)
    steps_per_frame = int(_env_number("GRADWATCH_SYNTH_STEPS", 64))
    n_keys = int(_env_number("GRADWATCH_SYNTH_KEYS", 60))
    window = int(_env_number("GRADWATCH_SYNTH_WINDOW", 16))
    total_steps = int(config.get("train", {}).get("steps", 1000))

    channel = SyntheticChannel(f"{args.server.rstrip('/')}/ws/worker/{args.run_id}", token, args.work_dir,
                               orphan_timeout_s=args.orphan_timeout)
    stop = threading.Event()
    channel.on_stop = stop.set

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    channel.start()
    factory = FrameFactory(args.run_id, steps_per_frame, n_keys, seed=zlib.crc32(args.run_id.encode()))
    seq, step = 1, 0
    channel.send_text(seq, "status", json.dumps({"type": "status", "run": args.run_id, "seq": seq,
                                                 "status": "running", "error": None, "step": 0}))
    deadline = time.monotonic() + seconds if seconds > 0 else None
    while not stop.is_set():
        if deadline is not None and time.monotonic() >= deadline:
            break
        if deadline is None and step >= total_steps:
            break
        if not channel.wait_window(window):
            continue  # re-check the stop flag and the deadline, then wait again
        seq += 1
        channel.send_text(seq, "metrics", factory.metrics(seq, step + 1))
        step += steps_per_frame
    seq += 1
    status = "stopped" if stop.is_set() else "completed"
    channel.send_text(seq, "status", json.dumps({"type": "status", "run": args.run_id, "seq": seq,
                                                 "status": status, "error": None, "step": step}))
    drained = channel.close()
    if not drained:
        log.error("some frames were never acknowledged by the server")
    return 0 if drained else 1


if __name__ == "__main__":
    sys.exit(main())
