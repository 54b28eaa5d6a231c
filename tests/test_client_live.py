"""The Python client against a real ``gradwatch serve``: user scripts in subprocesses, public API only (SPEC §8)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.live_server import ROOT, LiveServer, read_frames, wait_for, wait_status

pytestmark = pytest.mark.xdist_group("live-client")

SCRIPT = ROOT / "tests" / "scripts" / "client_gan.py"
TERMINAL = {"completed", "stopped", "failed", "interrupted"}
GAN_KEYS = ["loss/d", "loss/d_real", "loss/d_fake", "loss/g", "d/real_prob", "d/fake_prob", "d/real_logit",
            "d/fake_logit", "grad/d_norm", "grad/g_norm", "grad/g_norm_saturating", "grad/g_norm_non_saturating",
            "dldh/saturating", "dldh/non_saturating"]
G_LAYERS = ["grad/g_layer/0.weight", "grad/g_layer/0.bias", "grad/g_layer/2.weight", "grad/g_layer/2.bias"]


def script_env(server: LiveServer | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    if server is not None:
        env["GRADWATCH_URL"] = server.url
        if server.token:
            env["GRADWATCH_TOKEN"] = server.token
    env.update(extra)
    return env


def run_script(server: LiveServer | None, cwd: Path, *args: str, script: Path = SCRIPT, check: bool = True,
               **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=script_env(server, **env),
                          capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"script failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def start_script(server: LiveServer | None, cwd: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=script_env(server, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def all_frames(server: LiveServer, run_id: str) -> list[dict[str, Any]]:
    """Every frame of an ended run, by replaying its stream from the start."""
    with server.stream(run_id, since=0) as ws:
        return read_frames(ws, lambda frames: False, timeout=60)


def history(http: Any, run_id: str, keys: list[str]) -> dict[str, dict[int, float | None]]:
    body = http.get(f"/api/runs/{run_id}/metrics", params={"keys": ",".join(keys), "max_points": 100_000}).json()
    return {k: dict(zip(v["step"], v["value"], strict=True)) for k, v in body["metrics"].items()}


def run_of(server: LiveServer, name: str) -> dict[str, Any]:
    with server.client() as http:
        runs = [r for r in http.get("/api/runs").json() if r["name"] == name]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = LiveServer(tmp_path_factory.mktemp("client") / "data", env={"GRADWATCH_CLIENT_GRACE_S": "3"}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("bn", [True, False], ids=["batchnorm-D-exact-path", "plain-D-fast-path"])
def test_a_scripts_gan_streams_every_spec_key_with_norms_equal_to_plain_autograd(
        live: LiveServer, tmp_path: Path, bn: bool) -> None:
    name = f"norms-bn-{bn}"
    run_script(live, tmp_path, "--steps", "30", "--ref", str(tmp_path / "ref.json"), "--name", name,
               *(["--bn"] if bn else []))
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert ref["fast_path"] is (not bn)  # batch norm couples the batch: the probe must have noticed
    meta = json.loads((tmp_path / ref["folder"] / "run.json").read_text())  # relative to the script's folder
    assert meta["server"] == {"url": live.url, "run": ref["run"]} and meta["status"] == "completed"
    with live.client() as http:
        detail = wait_status(http, ref["run"], TERMINAL)
        assert detail["status"] == "completed" and detail["source"]["script"] == "client_gan.py"
        assert detail["kind"] == "gan" and set(detail["controls"]) == {"g_loss", "lr_g", "lr_d", "stop"}
        series = history(http, ref["run"], [*GAN_KEYS, *G_LAYERS, "my/metric"])
        events = http.get(f"/api/runs/{ref['run']}/events").json()["frames"]
    for key in [*GAN_KEYS, *G_LAYERS, "my/metric"]:
        assert sorted(series[key]) == list(range(1, 31)), key
    kinds = {(f["type"], f.get("key")) for f in events}
    assert {("hist", "hist/real_logit"), ("hist", "hist/fake_logit"), ("dldh", None)} <= kinds
    for step, norms in ref["refs"].items():
        step = int(step)
        applied, shadow = norms["non_saturating"], norms["saturating"]
        assert series["grad/g_norm"][step] == pytest.approx(applied, rel=1e-4)
        assert series["grad/g_norm_non_saturating"][step] == pytest.approx(applied, rel=1e-4)
        assert series["grad/g_norm_saturating"][step] == pytest.approx(shadow, rel=1e-4)
        assert series["dldh/saturating"][step] == pytest.approx(series["d/fake_prob"][step], rel=1e-5)
    frames = all_frames(live, ref["run"])
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))  # gapless
    assert frames[-1]["type"] == "status" and frames[-1]["status"] == "completed"
    samples = [f for f in frames if f["type"] == "sample"]
    assert [f["url"] for f in samples] == [f"/api/runs/{ref['run']}/samples/step_{s:08d}.png" for s in (20,)]
    with live.client() as http:
        checkpoint = http.get(f"/api/runs/{ref['run']}/checkpoints/step_00000020.pt")
    assert checkpoint.status_code == 200
    (tmp_path / "ck.pt").write_bytes(checkpoint.content)
    import torch

    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert set(state) == {"G", "D"}


def test_the_server_killed_and_restarted_mid_run_loses_nothing(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data", env={"GRADWATCH_CLIENT_GRACE_S": "60"}).start()
    try:
        proc = start_script(server, tmp_path, "--steps", "150", "--pace", "0.03", "--name", "restart",
                            "--ref", str(tmp_path / "ref.json"))
        with server.client() as http:
            wait_for(lambda: [r for r in http.get("/api/runs").json() if r["step"] > 20], 120,
                     what="the script's run to pass step 20")
        server.kill()
        time.sleep(2.0)  # the script trains on; its frames wait on its disk
        server.start()
        assert proc.wait(300) == 0, proc.stderr.read() if proc.stderr else ""
        run_id = json.loads((tmp_path / "ref.json").read_text())["run"]
        with server.client() as http:
            detail = wait_status(http, run_id, TERMINAL)
            series = history(http, run_id, ["loss/g", "my/metric"])
        assert detail["status"] == "completed"
        assert sorted(series["loss/g"]) == list(range(1, 151)) == sorted(series["my/metric"])
        frames = all_frames(server, run_id)
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        assert [f["status"] for f in frames if f["type"] == "status"] == ["running", "completed"]
    finally:
        server.stop()


def _values(frames: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a run's frames say, without the fields that name the run or the moment."""
    out = []
    for f in frames:
        if f["type"] == "metrics":
            out.append(("metrics", tuple(f["step"]), json.dumps(f["data"], sort_keys=True)))
        elif f["type"] in ("sample", "checkpoint"):
            out.append((f["type"], f["step"], f["name"]))
        elif f["type"] in ("hist", "dldh", "status", "capabilities"):
            out.append((f["type"], json.dumps({k: v for k, v in f.items() if k not in ("run", "seq", "url")},
                                              sort_keys=True)))
    return out


def test_an_offline_run_synced_later_equals_the_online_run_and_syncing_twice_makes_one_run(
        live: LiveServer, tmp_path: Path) -> None:
    args = ("--steps", "25", "--seed", "7", "--every", "10", "--flush-ms", "1000000")  # frames cut by steps alone
    run_script(live, tmp_path, *args, "--name", "twin-online", "--ref", str(tmp_path / "online.json"))
    offline = tmp_path / "offline-run"
    done = run_script(None, tmp_path, *args, "--name", "twin-offline", "--mode", "offline", "--out", str(offline),
                      GRADWATCH_URL="http://127.0.0.1:9")
    assert f"gradwatch sync {offline}" in done.stderr
    assert not [r for r in live.request("GET", "/api/runs") if r["name"] == "twin-offline"]
    sync = [sys.executable, "-m", "app.cli", "sync", str(offline), "--server", live.url, "--no-progress"]
    first = subprocess.run(sync, cwd=ROOT, env=script_env(None), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    synced = run_of(live, "twin-offline")
    online = run_of(live, "twin-online")
    with live.client() as http:
        assert wait_status(http, synced["id"], TERMINAL)["status"] == "completed"
    ours, theirs = all_frames(live, synced["id"]), all_frames(live, online["id"])
    assert [f["seq"] for f in ours] == list(range(1, len(ours) + 1))
    assert _values(ours) == _values(theirs)  # the same frames and values as the online run of the same seed
    assert run_of(live, "twin-offline")["source"]["origin"] == "sync"
    with live.client() as http:
        assert len(http.get(f"/api/runs/{synced['id']}/checkpoints").json()) == 2
    second = subprocess.run(sync, cwd=ROOT, env=script_env(None), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "already on the server" in second.stderr
    run_of(live, "twin-offline")  # still exactly one
    assert len(all_frames(live, synced["id"])) == len(ours)


def test_an_interrupted_sync_resumes_where_the_server_stopped(live: LiveServer, tmp_path: Path) -> None:
    """What an interrupted sync leaves is a run holding the folder's first frames: the next sync sends the rest."""
    folder = tmp_path / "run"
    run_script(None, tmp_path, "--steps", "40", "--name", "resumed-sync", "--mode", "offline", "--out", str(folder),
               GRADWATCH_URL="http://127.0.0.1:9")
    lines = (folder / "events.jsonl").read_text().splitlines(keepends=True)
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)  # same run.json, so the same uid: the same run on the server
    (partial / "events.jsonl").write_text("".join(lines[: len(lines) // 2]))
    from gradwatch.sync import sync

    first = sync(partial, server=live.url, progress=False)
    assert first["uploaded"] == len(lines) // 2
    second = sync(folder, server=live.url, progress=False)
    assert second["run"] == first["run"] and second["uploaded"] == len(lines) - len(lines) // 2
    frames = all_frames(live, first["run"])
    assert len(frames) >= len(lines) and [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    with live.client() as http:
        assert sorted(history(http, first["run"], ["loss/g"])["loss/g"]) == list(range(1, 41))
        assert wait_status(http, first["run"], TERMINAL)["status"] == "completed"


def test_a_headless_train_folder_syncs_as_a_run_with_its_history_and_artifacts(
        live: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "headless"
    train = subprocess.run([sys.executable, "-m", "app.cli", "train", "--preset", "ring8-non-saturating", "--steps",
                            "40", "--out", str(out), "--no-progress"], cwd=ROOT, env=script_env(None),
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    from gradwatch.sync import sync

    result = sync(out, server=live.url, progress=False)
    with live.client() as http:
        detail = wait_status(http, result["run"], TERMINAL)
        series = history(http, result["run"], ["loss/g", "grad/g_norm_saturating"])
    assert detail["status"] == "completed" and detail["kind"] == "gan" and detail["config"]["train"]["steps"] == 40
    assert sorted(series["loss/g"]) == list(range(1, 41))
    assert [c["name"] for c in detail["checkpoints"]] == ["step_00000040.pt"]
    assert sync(out, server=live.url, progress=False)["uploaded"] == 0


def _trace(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_stop_flip_and_lr_from_the_dashboard_reach_the_script_within_a_second(
        live: LiveServer, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    proc = start_script(live, tmp_path, "--steps", "100000", "--pace", "0.02", "--g-loss", "saturating",
                        "--trace", str(trace), "--name", "controlled", "--every", "100000")
    try:
        wait_for(lambda: len(_trace(trace)) > 10, 120, what="the script to train")
        run_id = run_of(live, "controlled")["id"]
        with live.client() as http:
            for changes, field in (({"g_loss": "non_saturating"}, "g_loss"), ({"lr_g": 5e-4}, "lr_g"),
                                   ({"lr_d": 2e-4}, "lr_d")):
                sent = time.time()
                assert http.post(f"/api/runs/{run_id}/control", json=changes).status_code == 200
                seen = wait_for(lambda c=changes, f=field: next(
                    (row for row in _trace(trace) if row[f] == c[f]), None), 10, 0.02, what=f"{field} in the script")
                assert seen["time"] - sent < 1.0, (field, seen["time"] - sent)
            flipped_at = next(row["step"] for row in _trace(trace) if row["g_loss"] == "non_saturating")
            wait_for(lambda: http.get(f"/api/runs/{run_id}").json()["step"] > flipped_at + 5, 60,
                     what="telemetry after the flip")
            series = history(http, run_id, ["grad/g_norm", "grad/g_norm_saturating", "grad/g_norm_non_saturating"])
            after = [s for s in series["grad/g_norm"] if s > flipped_at + 1]
            before = [s for s in series["grad/g_norm"] if s < flipped_at - 1]
            # The applied norm is the saturating one before the flip, the non-saturating one after it.
            assert all(series["grad/g_norm"][s] == series["grad/g_norm_saturating"][s] for s in before)
            assert all(series["grad/g_norm"][s] == series["grad/g_norm_non_saturating"][s] for s in after)
            events = http.get(f"/api/runs/{run_id}/events").json()["frames"]
            assert [f["changes"] for f in events if f["type"] == "control"] == [
                {"g_loss": "non_saturating"}, {"lr_g": 5e-4}, {"lr_d": 2e-4}]
            sent = time.time()
            assert http.post(f"/api/runs/{run_id}/stop").status_code == 202
            assert proc.wait(30) == 0
            last = _trace(trace)[-1]
            assert last["time"] - sent < 1.0
            detail = wait_status(http, run_id, TERMINAL)
        assert detail["status"] == "stopped"
        # Stop saved what the probe watches (the script registered no checkpoint of its own).
        assert [c["step"] for c in detail["checkpoints"]] == [last["step"]]
    finally:
        proc.kill()


def test_controls_the_script_did_not_register_are_refused_not_ignored(live: LiveServer, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    proc = start_script(live, tmp_path, "--steps", "100000", "--pace", "0.02", "--no-opt-d", "--trace", str(trace),
                        "--name", "no-lr-d")
    try:
        wait_for(lambda: len(_trace(trace)) > 3, 120, what="the script to train")
        run_id = run_of(live, "no-lr-d")["id"]
        with live.client() as http:
            assert http.get(f"/api/runs/{run_id}").json()["controls"] == ["g_loss", "lr_g", "stop"]
            refused = http.post(f"/api/runs/{run_id}/control", json={"lr_d": 1e-4})
            assert refused.status_code == 409 and "lr_d" in refused.json()["detail"]
            assert http.post(f"/api/runs/{run_id}/stop").status_code == 202
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_a_script_that_raises_fails_with_its_traceback(live: LiveServer, tmp_path: Path) -> None:
    done = run_script(live, tmp_path, "--steps", "50", "--raise-at", "5", "--name", "raises",
                      "--ref", str(tmp_path / "ref.json"), check=False)
    assert done.returncode != 0
    run_id = json.loads((tmp_path / "ref.json").read_text())["run"]
    with live.client() as http:
        detail = wait_status(http, run_id, TERMINAL)
    assert detail["status"] == "failed"
    assert "Traceback" in detail["error"] and "RuntimeError: the user's script broke at step 5" in detail["error"]


def test_a_killed_script_and_one_that_never_finishes_end_interrupted(live: LiveServer, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    proc = start_script(live, tmp_path, "--steps", "100000", "--pace", "0.02", "--trace", str(trace),
                        "--name", "killed")
    wait_for(lambda: len(_trace(trace)) > 5, 120, what="the script to train")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed = run_of(live, "killed")
    run_script(live, tmp_path, "--steps", "12", "--no-finish", "--name", "unfinished")
    unfinished = run_of(live, "unfinished")
    with live.client() as http:
        for run in (killed, unfinished):
            detail = wait_status(http, run["id"], {"completed", "stopped", "failed", "interrupted"}, timeout=60)
            assert detail["status"] == "interrupted"
            assert "connection was lost" in detail["error"]
        # What the unfinished script logged before it exited still arrived.
        assert sorted(history(http, unfinished["id"], ["loss/g"])["loss/g"]) == list(range(1, 13))


def test_a_server_with_a_token_refuses_a_script_without_it(tmp_path: Path) -> None:
    server = LiveServer(tmp_path / "data", "--token", "generate").start()
    try:
        token = server.token
        assert token is None  # the harness learns it from the log below
        line = next(line for line in server.log if "?token=" in line)
        server.token = line.rsplit("?token=", 1)[1].strip()
        refused = run_script(server, tmp_path, "--steps", "3", check=False, GRADWATCH_TOKEN="")
        assert refused.returncode != 0 and "access token" in refused.stderr
        run_script(server, tmp_path, "--steps", "3", "--name", "with-token")
        assert run_of(server, "with-token")["status"] in TERMINAL | {"running"}
    finally:
        server.stop()


def test_a_wandb_script_streams_with_only_its_import_line_changed(live: LiveServer, tmp_path: Path) -> None:
    original = (ROOT / "tests" / "scripts" / "wandb_script.py").read_text()
    assert original.count("import wandb\n") == 1
    script = tmp_path / "wandb_script.py"
    script.write_text(original.replace("import wandb\n", "import gradwatch as wandb\n"))
    run_script(live, tmp_path, "--epochs", "3", script=script)
    run = run_of(live, "wandb-style")
    with live.client() as http:
        detail = wait_status(http, run["id"], TERMINAL)
        series = history(http, run["id"], ["train/loss", "val/loss", "epoch"])
    assert detail["status"] == "completed"
    assert detail["config"] == {"lr": 0.05, "epochs": 3, "final_val": pytest.approx(series["val/loss"][33])}
    assert sorted(series["train/loss"]) == [s for s in range(1, 34) if s % 11] and sorted(series["val/loss"]) == [
        11, 22, 33]
    assert [s["name"] for s in detail["samples"]] == ["step_00000011_examples.png", "step_00000022_examples.png",
                                                      "step_00000033_examples.png"]


def _digits_folder(root: Path, n: int = 24) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    root.mkdir()
    for i, image in enumerate(load_digits().images[:n]):
        Image.fromarray((image * 16).clip(0, 255).astype("uint8")).save(root / f"{i}.png")
    return root


#: Keys the default telemetry budget samples (trainer/budget.py) among those the examples' test reads.
SAMPLED = {"grad/g_norm_saturating", "dldh/saturating", "kl/mc", "kl/dim/0", "kl/dim/3"}


def test_the_examples_run_against_a_server(live: LiveServer, tmp_path: Path) -> None:
    images = _digits_folder(tmp_path / "images")
    run_script(live, tmp_path, "--data", str(images), "--channels", "1", "--steps", "4", "--sample-every", "2",
               "--width", "8", "--batch-size", "8", "--name", "example-dcgan", "--device", "cpu",
               script=ROOT / "examples" / "dcgan.py")
    run_script(live, tmp_path, "--steps", "6", "--sample-every", "3", "--name", "example-vae", "--device", "cpu",
               script=ROOT / "examples" / "vae.py")
    vae_keys = ["loss/elbo", "loss/recon", "loss/kl", "kl/mc", "vae/active_units", "grad/enc_norm", "grad/dec_norm",
                "kl/dim/0", "kl/dim/3"]
    with live.client() as http:
        for name, keys, steps in (("example-dcgan", [*GAN_KEYS, "data/real_mean"], 4), ("example-vae", vae_keys, 6)):
            run = run_of(live, name)
            detail = wait_status(http, run["id"], TERMINAL)
            assert detail["status"] == "completed" and len(detail["samples"]) == 2 and detail["checkpoints"]
            series = history(http, run["id"], keys)
            for key in keys:
                if key in SAMPLED:  # the examples keep the default telemetry budget: measured from step 1 on
                    assert 1 in series[key], (name, key)
                else:
                    assert sorted(series[key]) == list(range(1, steps + 1)), (name, key)
