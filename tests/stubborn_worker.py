"""A real worker that ignores SIGTERM, as one stuck in a long call would: what a graceful shutdown must still end.

Used by tests/test_server_restart.py as the server's ``worker_module``; everything else is ``app.worker``.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from app import worker


def _ignore_sigterm(signum: int, handler: Any) -> Any:
    return signal.getsignal(signum) if signum == signal.SIGTERM else _install(signum, handler)


_install = signal.signal

if __name__ == "__main__":
    _install(signal.SIGTERM, signal.SIG_IGN)
    worker.signal.signal = _ignore_sigterm  # type: ignore[assignment]  # the worker's own handler never goes in
    sys.exit(worker.main())
