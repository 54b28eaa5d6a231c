"""Run placement (app/placement.py and the manager's slots), the manager's small helpers (app/manager.py), and the
artifact routes (app/api/runs.py).

Everything runs in-process: the manager is built but never started (no worker is launched), GPUs are faked by
setting ``manager.gpu_ids``, and busy slots by adding ``Active`` entries.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from starlette.testclient import TestClient

from app.api.runs import artifacts_of
from app.hub import Hub
from app.main import create_app
from app.manager import Active, RunError, RunManager, _describe_exit, pid_alive, token_hash
from app.placement import visible_gpu_ids, worker_cuda_visible_devices
from app.settings import Settings
from app.store import RunRecord, Store
from trainer.config import RunConfig
from trainer.files import atomic_write
from trainer.files import log_tail as _stderr_tail

BASE = "http://127.0.0.1:8000"


@pytest.fixture(autouse=True)
def _no_gradwatch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("GRADWATCH_"):
            monkeypatch.delenv(name)


def make_settings(data_dir: Path, **fields: object) -> Settings:
    values: dict[str, object] = {"cpu_run_limit": 2, "gpu_run_limit": 1, **fields}
    return Settings(data_dir=data_dir, **values)  # type: ignore[arg-type]


def make_manager(tmp_path: Path, store: Store, **fields: object) -> RunManager:
    return RunManager(make_settings(tmp_path, **fields), store, Hub(store), server_url=lambda: "ws://127.0.0.1:8000")


@pytest.fixture
def manager(tmp_path: Path, store: Store) -> RunManager:
    return make_manager(tmp_path, store)


def cfg(device: str) -> RunConfig:
    return RunConfig.model_validate({"train": {"device": device}})


def occupy(manager: RunManager, *devices: str) -> None:
    for device in devices:
        run_id = f"busy{len(manager.active)}"
        manager.active[run_id] = Active(run_id, device)


# ----------------------------------------------------------------------------- _device_request


@pytest.mark.parametrize(
    ("gpus", "spec", "expected"),
    [
        (0, "auto", "cpu"),
        (2, "auto", "cuda"),
        (0, "cpu", "cpu"),
        (2, "cpu", "cpu"),
        (2, "cuda", "cuda"),
        (2, "cuda:0", "cuda:0"),
        (2, "cuda:1", "cuda:1"),
        (1, "cuda:0", "cuda:0"),
    ],
)
def test_device_request(manager: RunManager, gpus: int, spec: str, expected: str) -> None:
    manager.gpu_ids = [str(i) for i in range(gpus)]
    assert manager._device_request(cfg(spec)) == expected


@pytest.mark.parametrize(
    ("gpus", "spec"),
    [(0, "cuda"), (0, "cuda:0"), (0, "cuda:1"), (2, "cuda:2"), (2, "cuda:10"), (1, "cuda:1")],
)
def test_device_request_refuses_a_gpu_this_server_lacks(manager: RunManager, gpus: int, spec: str) -> None:
    manager.gpu_ids = [str(i) for i in range(gpus)]
    with pytest.raises(RunError) as info:
        manager._device_request(cfg(spec))
    assert info.value.status == 422
    assert info.value.detail.startswith("train.device")
    assert str(info.value) == info.value.detail


# ----------------------------------------------------------------------------- _free_slot


def test_free_slot_fills_each_gpu_before_refusing(manager: RunManager) -> None:
    manager.gpu_ids = ["0", "1"]  # gpu_run_limit=1: two GPU slots in all
    placed = []
    for _ in range(2):
        device = manager._free_slot("cuda")
        assert device is not None
        placed.append(device)
        occupy(manager, device)
    assert placed == ["cuda:0", "cuda:1"]
    assert manager._free_slot("cuda") is None
    assert manager._free_slot("cuda:0") is None
    assert manager._free_slot("cuda:1") is None
    assert manager._free_slot("cpu") == "cpu"  # GPU runs take no CPU slot


def test_free_slot_for_a_named_gpu_waits_for_that_gpu(manager: RunManager) -> None:
    manager.gpu_ids = ["0", "1"]
    occupy(manager, "cuda:1")
    assert manager._free_slot("cuda:1") is None
    assert manager._free_slot("cuda:0") == "cuda:0"
    assert manager._free_slot("cuda") == "cuda:0"


def test_free_slot_picks_the_free_gpu_not_the_first(manager: RunManager) -> None:
    manager.gpu_ids = ["0", "1"]
    occupy(manager, "cuda:0")
    assert manager._free_slot("cuda") == "cuda:1"


@pytest.mark.parametrize(
    ("busy", "expected"),
    [
        ((), "cuda:0"),
        (("cuda:0",), "cuda:1"),
        (("cuda:0", "cuda:0", "cuda:1", "cuda:2", "cuda:2"), "cuda:1"),
        (("cuda:1", "cuda:1", "cuda:0", "cuda:2", "cuda:2"), "cuda:0"),
        (("cuda:0", "cuda:1"), "cuda:2"),
        (("cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:2"), "cuda:1"),
        (("cuda:0",) * 3 + ("cuda:1",) * 3 + ("cuda:2",) * 3, None),
    ],
)
def test_free_slot_picks_the_least_loaded_gpu(tmp_path: Path, store: Store, busy: tuple[str, ...],
                                             expected: str | None) -> None:
    manager = make_manager(tmp_path, store, gpu_run_limit=3)
    manager.gpu_ids = ["0", "1", "2"]
    occupy(manager, *busy)
    assert manager._free_slot("cuda") == expected


def test_free_slot_respects_cpu_run_limit(manager: RunManager) -> None:
    manager.gpu_ids = ["0", "1"]
    assert manager._free_slot("cpu") == "cpu"
    occupy(manager, "cpu")
    assert manager._free_slot("cpu") == "cpu"
    occupy(manager, "cpu")
    assert manager._free_slot("cpu") is None  # cpu_run_limit=2
    assert manager._free_slot("cuda") == "cuda:0"  # CPU runs take no GPU slot
    del manager.active["busy0"]
    assert manager._free_slot("cpu") == "cpu"


def test_free_slot_without_gpus_has_nothing_for_cuda(manager: RunManager) -> None:
    manager.gpu_ids = []
    assert manager._free_slot("cuda") is None


# ----------------------------------------------------------------------------- which GPU a worker sees


@pytest.mark.parametrize(
    ("server_env", "count", "ids"),
    [
        (None, 0, []),
        (None, 3, ["0", "1", "2"]),  # unset: every GPU under its own index
        ("", 0, []),
        ("2,3", 2, ["2", "3"]),
        ("3, 1", 2, ["3", "1"]),  # the server's order is the local order
        ("GPU-8f0c1a2b-aaaa-bbbb-cccc-0123456789ab,GPU-1234", 2, ["GPU-8f0c1a2b-aaaa-bbbb-cccc-0123456789ab",
                                                               "GPU-1234"]),
        ("MIG-5c1f0e7e-aaaa-bbbb-cccc-0123456789ab", 1, ["MIG-5c1f0e7e-aaaa-bbbb-cccc-0123456789ab"]),
        ("1,5,-1,7", 2, ["1", "5"]),  # CUDA stops reading at the first unusable entry
    ],
)
def test_visible_gpu_ids_follow_the_servers_own_visible_set(server_env: str | None, count: int,
                                                           ids: list[str]) -> None:
    assert visible_gpu_ids(server_env, count) == ids


def test_visible_gpu_ids_refuse_a_count_the_list_cannot_name() -> None:
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        visible_gpu_ids("4", 2)


@pytest.mark.parametrize(
    ("server_env", "device", "worker_env"),
    [
        ("2,3", "cuda:0", "2"),  # not "0": that would be someone else's GPU
        ("2,3", "cuda:1", "3"),
        (None, "cuda:1", "1"),
        ("GPU-aaaa,GPU-bbbb", "cuda:1", "GPU-bbbb"),
        ("2,3", "cpu", ""),  # a CPU worker sees no GPU at all
    ],
)
def test_worker_sees_the_servers_entry_for_its_gpu(server_env: str | None, device: str, worker_env: str) -> None:
    assert worker_cuda_visible_devices(device, visible_gpu_ids(server_env, 2)) == worker_env


def test_a_launched_worker_gets_the_servers_entry_for_its_gpu(tmp_path: Path, store: Store,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The manager's own launch path, with the worker replaced by a script that reports what it was given.
    import asyncio


    seen = tmp_path / "seen.txt"
    script = tmp_path / "report_env.py"
    script.write_text(f"import os; open({str(seen)!r}, 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])\n")
    manager = make_manager(tmp_path, store, worker_module="report_env")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    manager.gpu_ids = ["2", "3"]
    rec = RunRecord(id="r1", name="r", kind="gan", status="queued", config=cfg("cuda:1").model_dump(mode="json"),
                    created_at=time.time())
    store.insert_run(rec)

    async def launch() -> None:
        await manager._launch(rec, cfg("cuda:1"), "cuda:1")
        active = manager.active["r1"]
        assert active.process is not None
        await active.process.wait()

    asyncio.run(launch())
    assert seen.read_text() == "3"


# ----------------------------------------------------------------------------- helpers


def test_token_hash_is_sha256_hex() -> None:
    assert token_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    token = "x" * 43
    assert token_hash(token) == hashlib.sha256(token.encode()).hexdigest()
    assert token_hash("a") != token_hash("b")


def test_describe_exit() -> None:
    assert "SIGKILL" in _describe_exit(-9)
    assert "SIGTERM" in _describe_exit(-15)
    assert "code 3" in _describe_exit(3)
    assert "code 0" in _describe_exit(0)
    assert "disappeared" in _describe_exit(None)
    assert "signal 200" in _describe_exit(-200)  # not a named signal: still described, never raises


def test_stderr_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text("".join(f"line {i}\n" for i in range(1, 31)) + "\n\n", encoding="utf-8")
    assert _stderr_tail(log, 3) == "line 28\nline 29\nline 30"
    default = _stderr_tail(log).splitlines()
    assert default == [f"line {i}" for i in range(11, 31)]  # STDERR_TAIL_LINES = 20
    assert _stderr_tail(log, 100).splitlines()[0] == "line 1"


def test_stderr_tail_of_a_missing_or_undecodable_log(tmp_path: Path) -> None:
    assert _stderr_tail(tmp_path / "nope.log") == ""
    log = tmp_path / "bin.log"
    log.write_bytes(b"ok\n\xff\xfe broken\n")
    assert _stderr_tail(log, 1).endswith("broken")


def test_pid_alive_for_this_process() -> None:
    me = os.getpid()
    assert pid_alive(me, None)
    started = psutil.Process(me).create_time()
    assert pid_alive(me, started)
    assert pid_alive(me, started + 0.5)  # create_time is rounded differently by different readers


def test_pid_alive_refuses_a_reused_pid() -> None:
    started = psutil.Process(os.getpid()).create_time()
    assert not pid_alive(os.getpid(), started - 10.0)
    assert not pid_alive(os.getpid(), started + 10.0)


def test_pid_alive_without_a_pid() -> None:
    assert not pid_alive(None, None)


def test_pid_alive_for_a_dead_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(timeout=10) == 0
    assert not pid_alive(proc.pid, None)


def test_pid_alive_for_an_unreaped_zombie() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 5.0
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert not pid_alive(proc.pid, None)
    finally:
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- runs API: artifacts_of


def test_artifacts_lists_only_valid_finished_files(manager: RunManager) -> None:
    folder = manager.run_dir("r1") / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step_00000100.pt").write_bytes(b"a" * 10)
    (folder / "step_00000020.pt").write_bytes(b"b" * 3)
    (folder / "final.pt").write_bytes(b"c")
    (folder / ".tmp-abc123-step_00000200.pt").write_bytes(b"partial")  # an upload in progress
    (folder / ".hidden.pt").write_bytes(b"x")
    (folder / "bad name.pt").write_bytes(b"x")
    (folder / "a..b.pt").write_bytes(b"x")
    (folder / "step_00000300.pt").mkdir()  # a folder, even with a valid name
    listed = artifacts_of(manager, "r1", "checkpoints")
    assert [(a.name, a.step, a.size, a.url) for a in listed] == [
        ("final.pt", None, 1, "/api/runs/r1/checkpoints/final.pt"),
        ("step_00000020.pt", 20, 3, "/api/runs/r1/checkpoints/step_00000020.pt"),
        ("step_00000100.pt", 100, 10, "/api/runs/r1/checkpoints/step_00000100.pt"),
    ]


def test_artifacts_of_a_run_without_the_folder_is_empty(manager: RunManager) -> None:
    assert artifacts_of(manager, "nope", "samples") == []
    (manager.run_dir("r2") / "samples").mkdir(parents=True)
    assert artifacts_of(manager, "r2", "samples") == []


def test_artifacts_parses_the_step_only_at_the_start(manager: RunManager) -> None:
    folder = manager.run_dir("r3") / "samples"
    folder.mkdir(parents=True)
    (folder / "step_00000500.png").write_bytes(b"png")
    (folder / "step_00000500.json").write_bytes(b"{}")
    (folder / "grid-step_7.png").write_bytes(b"png")
    steps = {a.name: a.step for a in artifacts_of(manager, "r3", "samples")}
    assert steps == {"grid-step_7.png": None, "step_00000500.json": 500, "step_00000500.png": 500}


def test_artifacts_does_not_list_a_symlink_leading_outside_the_run(manager: RunManager, tmp_path: Path) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"s" * 1234)
    folder = manager.run_dir("r4") / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "evil.pt").symlink_to(outside)
    (folder / "final.pt").write_bytes(b"ok")
    assert [a.name for a in artifacts_of(manager, "r4", "checkpoints")] == ["final.pt"]


# ----------------------------------------------------------------------------- runs API: download


def completed_run(run_id: str) -> RunRecord:
    return RunRecord(id=run_id, name="done", kind="gan", status="completed", config={}, created_at=time.time())


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(tmp_path / "data"))
    with TestClient(app, base_url=BASE) as client:
        yield client


def run_folder(client: TestClient, run_id: str, kind: str) -> Path:
    manager: RunManager = client.app.state.manager  # type: ignore[attr-defined]
    client.app.state.store.insert_run(completed_run(run_id))  # type: ignore[attr-defined]
    folder = manager.run_dir(run_id) / kind
    folder.mkdir(parents=True)
    return folder


@pytest.mark.parametrize("target", ["outside-file", "/etc/passwd"])
def test_download_refuses_a_symlink_leading_outside_the_run(api: TestClient, tmp_path: Path, target: str) -> None:
    if target == "outside-file":
        outside = tmp_path / "secret.bin"
        outside.write_bytes(b"top secret")
    else:
        outside = Path(target)
        if not outside.is_file():
            pytest.skip("no /etc/passwd here")
    folder = run_folder(api, "abc123", "checkpoints")
    (folder / "evil.pt").symlink_to(outside)
    (folder / "final.pt").write_bytes(b"weights")

    refused = api.get("/api/runs/abc123/checkpoints/evil.pt")
    assert refused.status_code == 404
    assert outside.read_bytes()[:8] not in refused.content

    ok = api.get("/api/runs/abc123/checkpoints/final.pt")
    assert ok.status_code == 200
    assert ok.content == b"weights"
    assert ok.headers["content-type"] == "application/octet-stream"
    assert 'filename="final.pt"' in ok.headers["content-disposition"]


def test_download_allows_a_symlink_that_stays_inside_the_folder(api: TestClient) -> None:
    folder = run_folder(api, "abc124", "samples")
    (folder / "step_00000020.png").write_bytes(b"\x89PNG")
    (folder / "latest.png").symlink_to(folder / "step_00000020.png")
    response = api.get("/api/runs/abc124/samples/latest.png")
    assert response.status_code == 200
    assert response.content == b"\x89PNG"
    assert response.headers["content-type"] == "image/png"


def test_download_refuses_temp_invalid_and_missing_files(api: TestClient) -> None:
    folder = run_folder(api, "abc125", "checkpoints")
    (folder / ".tmp-1-final.pt").write_bytes(b"partial")
    assert api.get("/api/runs/abc125/checkpoints/.tmp-1-final.pt").status_code == 404
    assert api.get("/api/runs/abc125/checkpoints/missing.pt").status_code == 404
    assert api.get("/api/runs/abc125/checkpoints/..%2Fconfig.json").status_code == 404
    assert api.get("/api/runs/abc125/logs/final.pt").status_code == 404
    assert api.get("/api/runs/nosuchrun/checkpoints/final.pt").status_code == 404


def test_download_refuses_a_symlinked_kind_folder(api: TestClient, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.png").write_bytes(b"top secret")
    manager: RunManager = api.app.state.manager  # type: ignore[attr-defined]
    api.app.state.store.insert_run(completed_run("abc126"))  # type: ignore[attr-defined]
    manager.run_dir("abc126").mkdir(parents=True)
    (manager.run_dir("abc126") / "samples").symlink_to(elsewhere, target_is_directory=True)
    assert api.get("/api/runs/abc126/samples/secret.png").status_code == 404


# ----------------------------------------------------------------------------- temp files (trainer/files.py)


def test_salvage_moves_finished_files_and_never_a_killed_writers_temp_file(manager: RunManager) -> None:
    scratch = manager.run_dir("r1") / "work" / "samples"
    scratch.mkdir(parents=True)
    (scratch / "step_00000100.png").write_bytes(b"png")
    (scratch / ".tmp-k1ll3d-step_00000200.png").write_bytes(b"half a png")
    manager._salvage("r1")
    assert [p.name for p in (manager.run_dir("r1") / "samples").iterdir()] == ["step_00000100.png"]


def test_start_sweeps_temp_files_of_dead_runs_and_the_shared_cache(manager: RunManager) -> None:
    left = [manager.run_dir("r1") / sub / ".tmp-x-step_00000001.png" for sub in ("samples", "work/samples", "work")]
    left.append(manager.cache_dir / ".tmp-y-classifier-abc.pt")
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    kept = manager.run_dir("r2") / "work" / "checkpoints" / ".tmp-z-step_00000001.pt"  # r2's worker is alive
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"being written")
    manager._sweep_temp_files({"r2"})
    assert not any(path.exists() for path in left[:3])
    assert kept.exists()
    assert left[3].exists()  # a live worker may be writing the shared cache
    manager._sweep_temp_files(set())
    assert not left[3].exists()


# ----------------------------------------------------------------------------- what a shutdown leaves (app/manager.py)


def _write_checkpoint(manager: RunManager, run_id: str, sub: str, step: int) -> None:
    # As the trainer and the upload path write them: a new file, renamed into place.
    atomic_write(manager.run_dir(run_id) / sub / f"step_{step:08d}.pt", b"ckpt")


SHUT_DOWN = "the server was shut down while this run was training; "


@pytest.mark.parametrize("run_id", ["quiet", "final", "killed"])
def test_shutdown_reason_says_a_final_checkpoint_was_saved_only_when_one_was_written_after_the_stop(
    manager: RunManager, run_id: str
) -> None:
    _write_checkpoint(manager, run_id, "checkpoints", 100)  # a periodic one, uploaded
    _write_checkpoint(manager, run_id, "work/checkpoints", 130)  # a periodic one, not yet acknowledged
    told_to_stop = manager._checkpoint_files(run_id)
    if run_id == "final":
        # The worker stopped at the end of the step of its last periodic checkpoint, so its final checkpoint
        # replaced that one under the same name: only the file itself is new.
        _write_checkpoint(manager, run_id, "work/checkpoints", 130)
    if run_id == "killed":
        _write_checkpoint(manager, run_id, "work/checkpoints", 200)  # training on, ignoring the stop
    reason = manager._shutdown_reason(Active(run_id, "cpu"), killed=run_id == "killed", before=told_to_stop)
    assert reason == SHUT_DOWN + {
        # e.g. a worker re-attached after a restart, whose exit code the server cannot see
        "quiet": "its worker wrote no final checkpoint; resume from step_00000130.pt",
        "final": "its worker saved a final checkpoint; resume from step_00000130.pt",
        # A killed worker had not finished stopping, whatever its periodic checkpoints did meanwhile.
        "killed": "its worker was killed after 30 s without writing its final checkpoint; "
                  "resume from step_00000200.pt",
    }[run_id]
    assert (manager.run_dir(run_id) / "checkpoints" / "step_00000130.pt").is_file()  # salvaged from the scratch


def test_shutdown_reason_of_a_run_stopped_before_its_first_checkpoint(manager: RunManager) -> None:
    reason = manager._shutdown_reason(Active("r1", "cpu"), killed=False, before=frozenset())
    assert reason == SHUT_DOWN + "its worker wrote no final checkpoint; the run has no checkpoint to resume from"
