"""Runs on a real two-node Ray cluster, launched through the HTTP API of a real server (``--backend ray``).

Run by ``tests/test_ray.py`` inside a network namespace; the tests share one cluster and one server and run in
file order, the node's death last.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch

from tests.browser import chromium, new_page, screenshot, watch
from tests.live_server import TINY_GAN, LiveServer, config, metric_series, read_frames, wait_for, wait_status
from tests.ray_cluster.conftest import OOM_STEP, RayCluster

TERMINAL = {"completed", "stopped", "failed", "interrupted"}


def _submit(http: httpx.Client, cfg: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/api/runs", json=cfg)
    assert response.status_code == 201, response.text
    run: dict[str, Any] = response.json()
    return run


def _frames(server: LiveServer, run_id: str) -> list[dict[str, Any]]:
    with server.stream(run_id) as ws:
        return read_frames(ws, lambda fs: fs[-1]["type"] == "status" and fs[-1]["status"] in TERMINAL)


def _placed(http: httpx.Client, run_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run: dict[str, Any] = http.get(f"/api/runs/{run_id}").json()
        return run if (run["placement"] or {}).get("node_id") and run["step"] > 0 else None

    found: dict[str, Any] = wait_for(check, 180, 0.2, f"run {run_id} to be placed and training")
    return found


def _long_run(http: httpx.Client, name: str, resources: str, **dotted: Any) -> dict[str, Any]:
    """Submit a run that trains until stopped, pinned by ``resources``, and wait until it is placed and training."""
    cfg = config(TINY_GAN, name=name, train__steps=1_000_000, train__resources=resources,
                 intervals__sample_every=1_000_000, **dotted)
    return _placed(http, _submit(http, cfg)["id"])


def _local_workers(server: LiveServer) -> list[psutil.Process]:
    return [p for p in server.workers() if "app.worker" in " ".join(p.cmdline())]


def test_a_run_pinned_to_the_second_node_lands_there_streams_gaplessly_and_its_checkpoint_downloads(
        ray_cluster: RayCluster, ray_server: LiveServer) -> None:
    with ray_server.client() as http:
        run = _submit(http, config(TINY_GAN, name="on-node2", train__steps=300, train__resources="node2=1"))
        assert run["status"] == "queued" and run["placement"]["resources"] == {"CPU": 1.0, "node2": 1.0}
        placed = _placed(http, run["id"])
        assert placed["placement"]["node_id"] == ray_cluster.node2_id != ray_cluster.head_id
        assert placed["placement"]["node_ip"] == "127.0.0.1"
        assert not _local_workers(ray_server), "the worker must be Ray's process, not the server's child"
        page = http.get(f"/runs/{run['id']}").text
        assert "Ray node 127.0.0.1" in page and ray_cluster.node2_id[:12] in page
        done = wait_status(http, run["id"], TERMINAL)
        assert done["status"] == "completed", done["error"]

        frames = _frames(ray_server, run["id"])
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))  # gapless, in order
        assert sorted(metric_series(frames, "loss/d")) == list(range(1, 301))  # every step, once

        checkpoints = http.get(f"/api/runs/{run['id']}/checkpoints").json()
        assert [c["step"] for c in checkpoints][-1] == 300
        blob = http.get(checkpoints[-1]["url"])
        assert blob.status_code == 200
        state = torch.load(io.BytesIO(blob.content), weights_only=True)
        assert state["step"] == 300 and state["config"]["name"] == "on-node2" and state["models"]
        samples = http.get(f"/api/runs/{run['id']}/samples").json()
        assert samples and http.get(samples[-1]["url"]).status_code == 200
    # The server has every file: the worker's scratch folder on the node goes.
    wait_for(lambda: not Path(placed["placement"]["folder"]).exists(), 30, what="the scratch folder to be removed")


def test_control_and_stop_reach_a_worker_on_ray(ray_server: LiveServer) -> None:
    with ray_server.client() as http:
        run = _long_run(http, "controlled", "node2=1", gan__g_loss="saturating")
        flip = http.post(f"/api/runs/{run['id']}/control", json={"g_loss": "non_saturating"})
        assert flip.status_code == 200, flip.text
        with ray_server.stream(run["id"]) as ws:
            frames = read_frames(ws, lambda fs: any(f["type"] == "control" for f in fs), timeout=120)
        control = next(f for f in frames if f["type"] == "control")
        assert control["changes"] == {"g_loss": "non_saturating"}
        assert http.post(f"/api/runs/{run['id']}/stop").status_code == 202
        stopped = wait_status(http, run["id"], TERMINAL, timeout=120)
        assert stopped["status"] == "stopped" and stopped["error"] is None
        assert stopped["checkpoints"], "the stop's final checkpoint reached the server"


def test_a_run_ray_has_no_room_for_stays_queued_saying_what_it_waits_for_and_can_be_withdrawn(
        ray_server: LiveServer) -> None:
    with ray_server.client() as http:
        run = _submit(http, config(TINY_GAN, name="nowhere", train__resources="gpu_box=1"))
        time.sleep(2.0)
        waiting = http.get(f"/api/runs/{run['id']}").json()
        assert waiting["status"] == "queued"
        assert waiting["placement"]["waiting_for"] == "1 CPU, gpu_box=1 (no node of the cluster has gpu_box now)"
        assert "waiting for Ray: 1 CPU, gpu_box=1" in http.get("/").text
        assert http.post(f"/api/runs/{run['id']}/stop").status_code == 202
        assert wait_status(http, run["id"], TERMINAL, timeout=30)["status"] == "stopped"
        # A device this cluster lacks, or a GPU of one machine, is refused at submit, naming the field.
        for device, says in (("cuda", "the Ray cluster has no GPU"), ("cuda:1", "names a GPU of one machine")):
            refused = http.post("/api/runs", json=config(TINY_GAN, train__device=device))
            assert refused.status_code == 422 and says in refused.text and "train.device" in refused.text


def test_out_of_memory_on_a_ray_node_fails_the_run_saying_so_and_frees_its_place(ray_server: LiveServer) -> None:
    """node2 has one CPU: the second run waits in Ray's queue until the first one's failure gives it back."""
    with ray_server.client() as http:
        victim = _submit(http, config(TINY_GAN, name="oom-victim", train__steps=100_000, train__resources="node2=1"))
        _placed(http, victim["id"])
        after = _submit(http, config(TINY_GAN, name="after-oom", train__steps=50, train__resources="node2=1"))
        assert http.get(f"/api/runs/{after['id']}").json()["status"] == "queued"
        failed = wait_status(http, victim["id"], TERMINAL)
        assert failed["status"] == "failed"
        assert failed["error"].startswith(f"oom: out of memory on cpu at step {OOM_STEP}"), failed["error"]
        done = wait_status(http, after["id"], TERMINAL)
        assert done["status"] == "completed", done["error"]
        assert done["started_at"] >= failed["ended_at"] - 1.0


def test_a_resumed_run_on_ray_fetches_its_checkpoint_over_http_and_carries_on(ray_server: LiveServer) -> None:
    with ray_server.client() as http:
        source = next(r for r in http.get("/api/runs").json() if r["name"] == "on-node2")
        detail = http.get(f"/api/runs/{source['id']}").json()
        ckpt = detail["checkpoints"][-1]
        body = {"train": {"steps": ckpt["step"] + 40, "resources": "node2=1"},
                "resume_from": {"run": source["id"], "checkpoint": ckpt["name"]}}
        response = http.post("/api/runs", json=body)
        assert response.status_code == 201, response.text
        resumed = wait_status(http, response.json()["id"], TERMINAL)
        assert resumed["status"] == "completed", resumed["error"]
    steps = sorted(metric_series(_frames(ray_server, resumed["id"]), "loss/d"))
    assert steps == list(range(ckpt["step"] + 1, ckpt["step"] + 41))


def _carries_on_and_stops(server: LiveServer, run_id: str) -> dict[str, Any]:
    """After a server restart: the run is still running and training, stops when asked, and its stream has every
    frame and every step exactly once."""
    with server.client() as http:
        again = http.get(f"/api/runs/{run_id}").json()
        assert again["status"] == "running"
        wait_for(lambda: http.get(f"/api/runs/{run_id}").json()["step"] > again["step"] + 20, 120,
                 what="training to continue after the restart")
        assert http.post(f"/api/runs/{run_id}/stop").status_code == 202
        stopped = wait_status(http, run_id, TERMINAL, timeout=120)
    assert stopped["status"] == "stopped", stopped["error"]
    frames = _frames(server, run_id)
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert sorted(metric_series(frames, "loss/d")) == list(range(1, stopped["step"] + 1))  # nothing lost
    return stopped


def _worker_processes(run_id: str) -> list[psutil.Process]:
    """The run's worker, found among all processes of this machine (under Ray, not under the server)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            line = " ".join(proc.info["cmdline"] or [])
            if run_id in line and "app.worker" in line:
                found.append(proc)
    return found


def test_a_killed_server_finds_its_ray_run_again_after_a_restart(ray_server: LiveServer) -> None:
    with ray_server.client() as http:
        run = _long_run(http, "outlives", "node2=1")
    ray_server.kill()
    time.sleep(1.0)
    ray_server.start(timeout=120)
    stopped = _carries_on_and_stops(ray_server, run["id"])
    assert stopped["placement"]["node_id"] == run["placement"]["node_id"]


def test_per_gpu_limits_hold_on_ray(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A node that declares one GPU, a server with gpu_run_limit 2: each CUDA run asks Ray for half a GPU, so two
    share it and the third waits in Ray's queue, saying so, until one of the two ends. The workers are the
    benchmark's synthetic ones (no GPU here to train on): the test is of placement, not of CUDA."""
    node3 = ray_cluster.cluster.add_node(num_cpus=3, num_gpus=1)
    ray_cluster.cluster.wait_for_nodes()
    server = LiveServer(tmp_path_factory.mktemp("ray-gpu") / "data", "--backend", "ray", "--ray-address",
                        ray_cluster.address,
                        env={"GRADWATCH_WORKER_MODULE": "bench.synthetic_worker", "GRADWATCH_GPU_RUN_LIMIT": "2"})
    try:
        server.start(timeout=120)
        with server.client() as http:
            cfg = config(TINY_GAN, train__device="cuda", train__steps=10_000_000)  # node3 alone has a GPU
            runs = [_submit(http, {**cfg, "name": f"gpu-{i}"})["id"] for i in range(3)]

            def placed() -> list[dict[str, Any]]:
                found = [http.get(f"/api/runs/{r}").json() for r in runs]
                return [r for r in found if r["status"] == "running" and (r["placement"] or {}).get("node_id")]

            two = wait_for(lambda: len(placed()) >= 2 and placed(), 120, 0.2, "two runs to share the GPU")
            time.sleep(2.0)
            assert len(placed()) == 2, "a third run was placed on a GPU already holding gpu_run_limit runs"
            for run in two:
                assert run["placement"]["node_id"] == node3.node_id and run["placement"]["gpu_ids"] == ["0"]
                assert run["placement"]["resources"] == {"CPU": 1.0, "GPU": 0.5}
            third = next(r for r in runs if r not in {p["id"] for p in two})
            waiting = http.get(f"/api/runs/{third}").json()
            assert waiting["status"] == "queued"
            assert waiting["placement"]["waiting_for"] == "1 CPU, 0.5 GPU"
            assert http.post(f"/api/runs/{two[0]['id']}/stop").status_code == 202
            wait_for(lambda: http.get(f"/api/runs/{third}").json()["status"] == "running", 120,
                     what="the third run to get the freed half of the GPU")
            for run_id in runs:
                http.post(f"/api/runs/{run_id}/stop")
            for run_id in runs:
                assert wait_status(http, run_id, TERMINAL, timeout=120)["status"] == "stopped"
    finally:
        server.stop()
        ray_cluster.cluster.remove_node(node3)


def test_a_worker_killed_on_its_node_fails_its_run_naming_the_node(
        ray_cluster: RayCluster, ray_server: LiveServer) -> None:
    with ray_server.client() as http:
        run = _long_run(http, "killed", "head_node=1")
        (worker,) = _worker_processes(run["id"])
        worker.kill()
        failed = wait_status(http, run["id"], TERMINAL, timeout=60)
    assert failed["status"] == "failed"
    assert failed["error"].startswith("worker killed by SIGKILL on Ray node 127.0.0.1"), failed["error"]
    assert ray_cluster.head_id[:12] in failed["error"].splitlines()[0]
    # The end of the worker's log on its node, brought to the server, and where the node keeps its scratch folder.
    assert "--- the worker's log on 127.0.0.1" in failed["error"]
    assert "(its scratch folder is kept there: /tmp/gradwatch-run-" in failed["error"]


def test_a_run_launched_from_the_browser_trains_on_the_second_node_streams_live_stops_and_downloads(
        ray_cluster: RayCluster, ray_server: LiveServer) -> None:
    """The issue's "done when", as a user does it: the launch form, with the run pinned to the node that is not the
    server's; the run page's step counter moving; Stop; the checkpoint downloaded from the page."""
    with chromium() as browser, new_page(browser, ray_server.url, accept_downloads=True) as page:
        seen = watch(page)
        page.goto("/?preset=ring8-non-saturating")
        form = page.locator("#launch-form")
        form.locator('input[name="name"]').fill("from-the-browser")
        form.locator('input[name="train.steps"]').fill("1000000")
        form.locator('input[name="train.device"]').fill("cpu")
        resources = form.locator('input[name="train.resources"]')
        page.locator('details.more:has(input[name="train.resources"]) > summary').click()
        resources.fill("node2=1")
        page.click("#launch-button")
        page.wait_for_url("**/runs/*")
        run_id = page.url.rstrip("/").rsplit("/", 1)[1]
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=60_000)
        page.wait_for_function("document.getElementById('run-status').textContent === 'running'", timeout=120_000)
        first = int(page.inner_text("#run-step").replace(",", ""))
        page.wait_for_function(f"parseInt(document.getElementById('run-step').textContent.replace(/,/g, '')) > "
                               f"{first + 50}", timeout=120_000)  # live: frames from node2 reach the page
        page.reload()
        where = page.inner_text("#run-where")
        assert where.startswith("Ray node 127.0.0.1") and ray_cluster.node2_id[:12] in where, where
        screenshot(page, "ray-run-on-node2")
        page.goto("/")  # the runs table says where each run is too
        row = page.locator(f'tr[data-run="{run_id}"]')
        assert "Ray node 127.0.0.1" in row.inner_text() and ray_cluster.node2_id[:12] in row.inner_text()
        screenshot(page, "ray-runs-table")
        page.goto(f"/runs/{run_id}")
        page.wait_for_selector('body[data-ready="true"]', state="attached", timeout=60_000)
        page.click("#stop-button")
        page.wait_for_function("document.getElementById('run-status').textContent === 'stopped'", timeout=120_000)
        page.reload()
        checkpoint = page.locator('#downloads a[data-kind="checkpoint"]').first
        with page.expect_download() as got:
            checkpoint.click()
        state = torch.load(got.value.path(), weights_only=True)
        assert state["config"]["name"] == "from-the-browser" and state["step"] > first + 50
        seen.assert_clean(ray_server.url)
    with ray_server.client() as http:
        run = http.get(f"/api/runs/{run_id}").json()
    assert run["status"] == "stopped" and run["placement"]["node_id"] == ray_cluster.node2_id
    assert run["config"]["train"]["resources"] == "node2=1"


def test_killing_the_second_node_fails_its_run_naming_the_node_while_a_run_on_the_head_completes(
        ray_cluster: RayCluster, ray_server: LiveServer) -> None:
    with ray_server.client() as http:
        doomed = _long_run(http, "doomed", "node2=1")
        survivor = _submit(http, config(TINY_GAN, name="survivor", train__steps=400, train__resources="head_node=1"))
        placed = _placed(http, survivor["id"])
        assert placed["placement"]["node_id"] == ray_cluster.head_id
        killed_at = time.monotonic()
        ray_cluster.kill_node2()
        failed = wait_status(http, doomed["id"], TERMINAL, timeout=60)
        noticed = time.monotonic() - killed_at
        assert failed["status"] == "failed"
        assert failed["error"].startswith("the Ray node running this run died (127.0.0.1"), failed["error"]
        assert ray_cluster.node2_id[:12] in failed["error"] and "resume from step_" in failed["error"]
        assert noticed < 30, f"the node's death took {noticed:.0f} s to reach the run"
        done = wait_status(http, survivor["id"], TERMINAL)
        assert done["status"] == "completed", done["error"]
    frames = _frames(ray_server, doomed["id"])
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert frames[-1]["status"] == "failed"


def test_a_run_on_ray_outlives_a_graceful_server_restart_and_carries_on(ray_server: LiveServer) -> None:
    """As a script's run does: stopping its worker at the server's shutdown would lose its final checkpoint (the
    server takes no uploads by then), so it trains on, keeps its frames, and reconnects to the next server."""
    with ray_server.client() as http:
        run = _long_run(http, "restarted", "head_node=1")

    ray_server.stop()
    assert not any("SIGTERM received" in line for line in ray_server.log), "Ray's handler cut the shutdown short"
    time.sleep(2.0)
    assert _worker_processes(run["id"]), "the worker on Ray was ended by the server's shutdown"
    ray_server.start(timeout=120)
    _carries_on_and_stops(ray_server, run["id"])
    wait_for(lambda: not _worker_processes(run["id"]), 30, what="the worker to exit once stopped")


def test_runs_waiting_for_ray_count_against_the_queue_cap_and_get_fresh_actors_after_a_crash(
        ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    """max_queued_runs counts the runs Ray has no room for. A server killed while they wait leaves their actors in
    Ray's queue holding tokens nobody knows: the restarted server ends those and hands the runs over afresh."""
    import ray

    server = LiveServer(tmp_path_factory.mktemp("ray-cap") / "data", "--backend", "ray", "--ray-address",
                        ray_cluster.address, env={"GRADWATCH_MAX_QUEUED_RUNS": "2"})
    ray.init(address=ray_cluster.address, namespace="gradwatch", log_to_driver=False)
    try:
        server.start(timeout=120)
        with server.client() as http:
            cfg = config(TINY_GAN, train__resources="nowhere=1")
            waiting = [_submit(http, {**cfg, "name": f"waits-{i}"}) for i in range(2)]
            refused = http.post("/api/runs", json=cfg)
            assert refused.status_code == 429 and "max_queued_runs" in refused.text, refused.text
            old = {r["id"]: http.get(f"/api/runs/{r['id']}").json()["placement"]["actor"] for r in waiting}
        assert set(old.values()) <= set(ray.util.list_named_actors())
        server.kill()
        server.start(timeout=120)
        with server.client() as http:
            new = {}
            for run_id, actor in old.items():
                again = http.get(f"/api/runs/{run_id}").json()
                assert again["status"] == "queued"
                new[run_id] = again["placement"]["actor"]
                assert new[run_id] != actor and new[run_id].startswith(f"gradwatch-run-{run_id}-")
            wait_for(lambda: not set(old.values()) & set(ray.util.list_named_actors()), 30,
                     what="the actors from before the crash to be ended")
            assert set(new.values()) <= set(ray.util.list_named_actors())
            for run_id in old:
                assert http.post(f"/api/runs/{run_id}/stop").status_code == 202
                assert wait_status(http, run_id, TERMINAL, timeout=30)["status"] == "stopped"
        wait_for(lambda: not set(new.values()) & set(ray.util.list_named_actors()), 30,
                 what="a stopped run's actor to leave Ray's queue")
    finally:
        ray.shutdown()
        server.stop()
