"""Which GPU a worker sees: the server's own visible set, mapped entry by entry.

The server numbers its GPUs as torch does, 0 … N−1 among the devices *it*
can see. Those are local indices: a server started with
``CUDA_VISIBLE_DEVICES=2,3`` calls physical GPUs 2 and 3 ``cuda:0`` and
``cuda:1``. A worker is a new process that reads ``CUDA_VISIBLE_DEVICES``
afresh, so it must be given the server's own entry for the chosen GPU — ``2``,
or a ``GPU-…``/``MIG-…`` UUID as the server was given it — never the local
index, which would land it on someone else's GPU.
"""

from __future__ import annotations

import os

CUDA_ENV = "CUDA_VISIBLE_DEVICES"


def visible_gpu_ids(env_value: str | None, count: int) -> list[str]:
    """The driver's name for each GPU this process sees, by local index.

    ``env_value`` is this process's ``CUDA_VISIBLE_DEVICES`` (None when unset, which shows every GPU under its
    own index) and ``count`` the number of GPUs torch found with it. CUDA stops reading the list at the first
    entry it cannot use, so the first ``count`` entries are the ones in use, in order.
    """
    if env_value is None:
        return [str(i) for i in range(count)]
    entries = [entry.strip() for entry in env_value.split(",")]
    if len(entries) < count:
        raise ValueError(f"{CUDA_ENV}={env_value!r} names fewer GPUs than the {count} found")
    return entries[:count]


def worker_cuda_visible_devices(device: str, gpu_ids: list[str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker placed on ``device`` (``cpu`` or ``cuda:N``, N a local index).

    A CPU worker sees no GPU at all (the empty string), so nothing it imports can allocate on one.
    """
    if not device.startswith("cuda:"):
        return ""
    return gpu_ids[int(device.split(":", 1)[1])]


def server_gpu_ids() -> list[str]:
    """This server's GPUs, by local index, as the driver names them (empty without CUDA)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return visible_gpu_ids(os.environ.get(CUDA_ENV), count)
