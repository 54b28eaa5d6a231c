"""The part of a Ray run that lives on the node Ray chose: one actor per run, which starts the run's worker and
watches it.

The worker is the same ``python -P -m app.worker`` a local run starts, talking to the server over the same
channel: it is started as a child process, not run inside the actor, so that a stop arrives as the signal a local
worker gets (SIGINT: stop; SIGTERM: the server is leaving, hurry), a refused token can end it with ``os._exit``,
and nothing of one run (torch threads, CUDA context) outlives it in a pooled Ray process. The child is tied to
the actor (``PR_SET_PDEATHSIG``): when Ray loses the actor, because its node died or it was killed, the worker
dies too instead of training on unseen.

Nothing here imports the web server: a Ray node needs gradwatch installed (``pip install 'gradwatch[ray]'``),
nothing else. The server side is :mod:`app.ray_backend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from trainer.files import log_tail

#: Lines of the worker's log returned with its exit. The server appends them, under a line naming the node, to the
#: run's worker.log, whose last 20 lines go into the run's error: 15 leave room for that line and the next.
LOG_TAIL_LINES = 15
#: After the worker exits, how long the actor waits for the server to collect the exit before it ends itself
#: (the server may be restarting): an actor nobody collects would hold its CPUs or GPU share for ever.
UNCOLLECTED_EXIT_S = 600.0
_PR_SET_PDEATHSIG = 1


def _tie_to_parent() -> None:
    """In the worker, before it runs: its own process group (a terminal's Ctrl-C is not its business), and a
    SIGKILL when the actor that started it dies (Linux; elsewhere the worker's orphan timeout ends it)."""
    os.setpgrp()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class RunSupervisor:
    """One run's actor (``ray.remote`` is applied by :mod:`app.ray_backend`, so this module imports without Ray).

    Async, so that ``wait`` (which lasts the whole run) and ``signal`` are served side by side.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.folder: Path | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.ended: asyncio.Future[dict[str, Any]] | None = None  # how the worker ended, once it has
        self.collected = asyncio.Event()

    async def start(self, args: list[str], token: str, config_json: str, env: dict[str, str]) -> dict[str, Any]:
        """Start the worker (``args`` are app.worker's, without the config and scratch folder, which are made
        here, on this node) and say where it runs."""
        import ray

        self.folder = Path(tempfile.mkdtemp(prefix=f"gradwatch-run-{self.run_id}-"))
        config = self.folder / "config.json"
        config.write_text(config_json, encoding="utf-8")
        package_root = str(Path(__file__).resolve().parents[1])  # where app/ is on this node, for python -P
        child_env = {**os.environ, **env,
                     "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        log = (self.folder / "worker.log").open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-P", *args, "--config", str(config), "--work-dir", str(self.folder / "work"),
                env=child_env, stdin=asyncio.subprocess.PIPE, stdout=log, stderr=log, preexec_fn=_tie_to_parent,
            )
        finally:
            log.close()
        assert self.process.stdin is not None
        with contextlib.suppress(OSError, RuntimeError):  # a worker that died at once: wait() reports it
            self.process.stdin.write(token.encode() + b"\n")
            await self.process.stdin.drain()
        self.process.stdin.close()
        self.ended = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().create_task(self._watch())
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "pid": self.process.pid,
                "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
                "folder": str(self.folder)}

    async def wait(self) -> dict[str, Any]:
        """Wait for the worker to exit: its exit code, the end of its log, and the scratch folder if it was kept."""
        assert self.ended is not None
        result = await asyncio.shield(self.ended)
        self.collected.set()
        return result

    def signal(self, signum: int) -> bool:
        """Send the worker a signal; False if it has already exited."""
        if self.process is None or self.process.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)
            return True
        return False

    async def _watch(self) -> None:
        """When the worker exits, whoever is listening: its scratch folder is removed when the server has everything,
        and kept (and named) otherwise: after a failure, or with a checkpoint or sample the worker could not upload
        (it deletes each one the server acknowledged). Then the actor waits for the server to collect the exit, and
        ends itself if no server does: an actor nobody collects would hold its CPUs or GPU share for ever."""
        assert self.process is not None and self.folder is not None and self.ended is not None
        code = await self.process.wait()
        tail = log_tail(self.folder / "worker.log", LOG_TAIL_LINES)
        work = self.folder / "work"
        unsent = [p for sub in ("checkpoints", "samples") for p in (work / sub).glob("*") if p.is_file()]
        kept = None
        if code == 0 and not unsent:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            kept = str(self.folder)
        self.ended.set_result({"code": code, "log_tail": tail, "kept": kept})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.collected.wait(), UNCOLLECTED_EXIT_S)
            return  # the server has the exit, and ends this actor itself
        os._exit(0)
