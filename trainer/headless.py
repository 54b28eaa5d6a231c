"""One run without a server: frames as JSON lines, artifacts in folders, a progress bar.

``DIR/events.jsonl`` holds exactly the frames the websocket would carry
(SPEC §4), one per line, so a headless run can be replayed or imported later.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any

from tqdm import tqdm

from trainer.config import RunConfig
from trainer.loop import RunOptions, Trainer, make_trainer
from trainer.telemetry import Frame, frame_to_json

PROGRESS_KEYS = ("loss/d", "loss/g", "grad/g_norm", "loss/elbo", "loss/kl")


class JsonlSink:
    """Appends each frame to a JSON-lines file and keeps a progress bar current."""

    def __init__(self, fh: IO[str], bar: tqdm[Any] | None) -> None:
        self.fh = fh
        self.bar = bar

    def __call__(self, frame: Frame) -> None:
        self.fh.write(frame_to_json(frame) + "\n")
        self.fh.flush()
        if self.bar is None:
            return
        if frame["type"] == "metrics" and frame["step"]:
            self.bar.n = frame["step"][-1]
            data = frame["data"]
            shown = {k.split("/")[-1]: data[k][-1] for k in PROGRESS_KEYS if k in data and data[k][-1] is not None}
            if shown:
                self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self.bar.refresh()
        elif frame["type"] == "alert" or (frame["type"] == "status" and frame.get("error")):
            self.bar.write(f"[{frame['type']}] {frame.get('kind', frame.get('status'))}: "
                           f"{frame.get('message') or frame.get('error')}")


@contextmanager
def _graceful_interrupt(trainer: Trainer) -> Iterator[None]:
    """First Ctrl-C stops the run cleanly (final checkpoint); a second one aborts."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop()

    previous = signal.signal(signal.SIGINT, handler)
    previous_term = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


def run_headless(
    cfg: RunConfig,
    out_dir: Path,
    *,
    resume_from: Path | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> str:
    """Train one run into ``out_dir``; returns the final status."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    bar = tqdm(total=cfg.train.steps, unit="step", file=sys.stderr, dynamic_ncols=True) if progress else None
    try:
        with open(out_dir / "events.jsonl", "a", encoding="utf-8") as fh:
            options = RunOptions(out_dir=out_dir, sink=JsonlSink(fh, bar), run_id=out_dir.name or "local",
                                 resume_from=resume_from)
            if cache_dir is not None:
                options.cache_dir = cache_dir
            trainer = make_trainer(cfg, options)
            if bar is not None:
                bar.n = trainer.step
            with _graceful_interrupt(trainer):
                return trainer.run()
    finally:
        if bar is not None:
            bar.close()
