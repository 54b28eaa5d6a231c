"""Test-only fault injection: a CUDA out-of-memory error in one chosen run's worker. Not part of the product.

Python imports ``sitecustomize`` at start-up from the first folder on its path that has one, so a test puts this
folder on a server's ``PYTHONPATH`` (``LiveServer(env=...)``); every worker the server starts inherits it. Nothing
in the product knows about it: no test hook in the trainer, the worker or the server.

With ``GRADWATCH_FAULT_OOM_RUN_NAME=<name>`` and ``GRADWATCH_FAULT_OOM_AT_STEP=<N>`` set, the worker of the run
whose config is named ``<name>`` (read from the worker's ``--config`` file) gets ``torch.optim.Adam.step`` patched to
raise ``torch.cuda.OutOfMemoryError`` on an optimiser's N-th step, with the message CUDA gives; the discriminator's
optimiser steps first, so training step N is where it fails. Every other process (the server, other runs'
workers) is left alone and does not even import torch here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

RUN_NAME_ENV = "GRADWATCH_FAULT_OOM_RUN_NAME"
AT_STEP_ENV = "GRADWATCH_FAULT_OOM_AT_STEP"


def _worker_run_name(argv: list[str]) -> str | None:
    """The run name in a worker's ``--config`` file; None for any process that is not a worker."""
    if "--run-id" not in argv or "--config" not in argv:
        return None
    try:
        config = json.loads(Path(argv[argv.index("--config") + 1]).read_text(encoding="utf-8"))
    except (IndexError, OSError, ValueError):
        return None
    name = config.get("name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def _install(at_step: int) -> None:
    import torch

    original = torch.optim.Adam.step

    def step(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        states = [self.state[p] for group in self.param_groups for p in group["params"] if p in self.state]
        done = int(states[0]["step"]) if states else 0
        if done + 1 >= at_step:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                "1.12 GiB is free. (injected by tests/faults/sitecustomize.py)")
        return original(self, *args, **kwargs)

    torch.optim.Adam.step = step  # type: ignore[method-assign]


def _main() -> None:
    target, at_step = os.environ.get(RUN_NAME_ENV), os.environ.get(AT_STEP_ENV)
    if target and at_step and _worker_run_name(sys.argv) == target:
        _install(int(at_step))


_main()
