"""Out of memory on the device: the run fails with reason ``oom``, its slot goes to the next run, others train on.

The fault is injected without any hook in the product: ``tests/faults/sitecustomize.py``, on the server's
``PYTHONPATH`` and so on every worker's, makes one named run's optimiser raise ``torch.cuda.OutOfMemoryError`` at a
chosen step, exactly what CUDA raises when an allocation fails. No GPU is needed to show how the rest of the
system takes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.live_server import ROOT, TINY_GAN, TINY_VAE, LiveServer, config, wait_status
from trainer.config import RunConfig
from trainer.loop import RunOptions, is_out_of_memory, make_trainer

FAULTS = Path(__file__).resolve().parent / "faults"
OOM_STEP = 30


def _submit(http: Any, cfg: dict[str, Any]) -> str:
    response = http.post("/api/runs", json=cfg)
    assert response.status_code == 201, response.text
    run_id: str = response.json()["id"]
    return run_id


@pytest.mark.xdist_group("live-server")
def test_oom_in_one_worker_fails_that_run_with_reason_oom_frees_its_slot_and_spares_the_others(
        tmp_path: Path) -> None:
    """Two CPU slots. A (OOM injected at step 30) and B (long) start; C waits for a slot. A fails with an error
    starting ``oom:`` that says where, when and what to change; C then starts in A's slot while B still holds
    the other, and completes; B, untouched, stops cleanly when asked. Before, A ended ``failed`` with a bare
    ``OutOfMemoryError: ...`` traceback line and no reason to act on."""
    env = {
        "GRADWATCH_CPU_RUN_LIMIT": "2",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), str(ROOT), os.environ.get("PYTHONPATH")])),
        "GRADWATCH_FAULT_OOM_RUN_NAME": "oom-victim",
        "GRADWATCH_FAULT_OOM_AT_STEP": str(OOM_STEP),
    }
    live = LiveServer(tmp_path / "data", env=env)
    with live as server, live.client() as http:
        a = _submit(http, config(TINY_GAN, name="oom-victim", train__steps=100_000))
        # B and C are VAEs on digits: quick to start and to stop (no matplotlib plot for their last sample).
        b = _submit(http, config(TINY_VAE, name="bystander", train__steps=1_000_000, intervals__sample_every=1_000_000,
                                 intervals__checkpoint_every=1_000_000, intervals__eval_every=1_000_000))
        c = _submit(http, config(TINY_VAE, name="queued", train__steps=20))
        assert http.get(f"/api/runs/{c}").json()["status"] == "queued"

        failed = wait_status(http, a, {"failed", "completed", "stopped", "interrupted"})
        assert failed["status"] == "failed"
        error = failed["error"]
        assert error.startswith(f"oom: out of memory on cpu at step {OOM_STEP} — lower train.batch_size (now 64) "
                                "or model.width (now 32)"), error
        assert "GiB" in error and "Traceback" not in error

        done = wait_status(http, c, {"completed", "failed", "stopped", "interrupted"})
        assert done["status"] == "completed" and done["error"] is None
        bystander = http.get(f"/api/runs/{b}").json()
        assert bystander["status"] == "running", bystander  # C ran in A's slot: B never let go of its own
        assert done["started_at"] >= failed["ended_at"]

        assert http.post(f"/api/runs/{b}/stop").status_code == 202
        stopped = wait_status(http, b, {"completed", "failed", "stopped", "interrupted"})
        assert stopped["status"] == "stopped" and stopped["error"] is None
        assert stopped["step"] > OOM_STEP
        # A's worker is gone (its slot really freed), and so are the others once they ended.
        assert server.wait_workers_gone(60)


def test_out_of_memory_is_recognised_in_each_form_it_takes() -> None:
    """CUDA's error class, the CPU allocator's RuntimeError and Python's MemoryError are all out of memory; any
    other RuntimeError is not."""
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)
    assert is_out_of_memory(info.value)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_an_oom_mid_run_sends_what_was_buffered_then_the_reason(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: the steps before the failure still reach the sink, then one ``failed`` status whose error
    starts with ``oom:``; ``run`` returns instead of raising, so a worker exits normally."""
    cfg = RunConfig.model_validate(config(TINY_GAN, train__steps=50, intervals__flush_steps=1000,
                                          intervals__flush_ms=60_000))
    original = torch.optim.Adam.step
    calls = {"n": 0}

    def failing_step(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2 * 12 + 1:  # D then G each step: the 13th step's D update
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    frames: list[dict[str, Any]] = []
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=frames.append, cache_dir=tmp_path))
    assert trainer.run() == "failed"
    logged = sorted({s for f in frames if f["type"] == "metrics" for s in f["step"]})
    assert logged == list(range(1, 13))
    assert frames[-1]["type"] == "status" and frames[-1]["status"] == "failed"
    assert frames[-1]["error"].startswith("oom: out of memory on cpu at step 13 — lower train.batch_size")


def test_an_oom_while_setting_up_is_reported_by_run_as_reason_oom(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Models or data that do not fit on the device fail the same way, before step 1: the trainer is still
    made (a worker reports through it), and ``run`` ends ``failed`` with ``oom:`` instead of a worker's
    ``OutOfMemoryError: ...`` start-up message."""
    import trainer.loop as loop

    def no_room(*_args: Any, **_kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(loop, "load_dataset", no_room)
    frames: list[dict[str, Any]] = []
    cfg = RunConfig.model_validate(TINY_GAN)
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=frames.append, cache_dir=tmp_path))
    assert trainer.run() == "failed"
    assert [f["type"] for f in frames] == ["status"]
    assert frames[0]["status"] == "failed" and frames[0]["step"] == 0
    assert frames[0]["error"].startswith("oom: out of memory on cpu while putting the data and models on the "
                                         "device, before step 1 — lower train.batch_size")
