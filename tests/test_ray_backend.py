"""The Ray backend's pieces that need no cluster: settings, the run's resource request, what a queued or placed
run says, the refusals at submit. The cluster itself: tests/test_ray.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.main import create_app
from app.ray_backend import RayBackend, WorkerEnd, actor_name, describe_node, describe_request
from app.security import host_allowed
from app.settings import Settings
from app.store import RunRecord
from app.web.pages import _where
from tests.live_server import TINY_GAN, config
from trainer.config import RunConfig, parse_resources

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "k3J9-vQ2_xR7mN4pL8sT1wY6zA0bC5dE"


def test_public_url_is_normalised_and_its_host_accepted_in_host_headers(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, host="0.0.0.0", token=TOKEN, allowed_hosts=["dash.example.org"],
                        public_url="http://Head-Node.cluster:8000/", backend="ray")
    assert settings.public_url == "http://Head-Node.cluster:8000"
    assert settings.public_host == "head-node.cluster"
    assert host_allowed("head-node.cluster:8000", settings)
    assert host_allowed("dash.example.org", settings)
    assert not host_allowed("evil.example", settings)


@pytest.mark.parametrize("url", ["ftp://h:1", "http://", "http://h:8000/sub", "http://u:p@h:8000", "h:8000",
                                 "http://h:8000/?q=1", "http://bad_host!:80"])
def test_a_public_url_that_is_not_the_server_s_origin_is_refused_naming_the_field(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(data_dir=tmp_path, public_url=url)
    assert err.value.errors()[0]["loc"] == ("public_url",)


def test_backend_is_local_or_ray(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).backend == "local"
    with pytest.raises(ValidationError) as err:
        Settings(data_dir=tmp_path, backend="kubernetes")
    assert err.value.errors()[0]["loc"] == ("backend",)


def test_resources_are_parsed_bounded_and_spelled_one_way() -> None:
    cfg = RunConfig.model_validate({"train": {"resources": " node2 = 1 ,ssd=0.50"}})
    assert cfg.train.resources == "node2=1, ssd=0.5"
    assert cfg.train.resource_request() == {"node2": 1.0, "ssd": 0.5}
    assert parse_resources("") == {}
    for bad, says in [("CPU=1", "set by train.device"), ("GPU=0.5", "set by train.device"), ("x", "name=amount"),
                      ("a=0", "more than 0"), ("a=1,a=2", "given twice"), ("a=-1", "name=amount"),
                      (",".join(f"r{i}=1" for i in range(9)), "at most 8")]:
        with pytest.raises(ValidationError) as err:
            RunConfig.model_validate({"train": {"resources": bad}})
        assert err.value.errors()[0]["loc"] == ("train", "resources") and says in str(err.value), bad


def test_what_a_run_asks_ray_for(tmp_path: Path) -> None:
    backend = RayBackend(Settings(data_dir=tmp_path, backend="ray", gpu_run_limit=4, ray_cpus_per_run=2))
    assert backend.request("cpu", {}) == {"CPU": 2.0}
    assert backend.request("cuda", {"big": 1.0}) == {"CPU": 2.0, "GPU": 0.25, "big": 1.0}  # 4 runs to a GPU
    assert describe_request({"CPU": 2.0, "GPU": 0.25, "big": 1.0}) == "2 CPU, 0.25 GPU, big=1"


def test_actor_names_are_fresh_for_each_launch_of_a_run() -> None:
    first, second = actor_name("abc123"), actor_name("abc123")
    assert first.startswith("gradwatch-run-abc123-") and second.startswith("gradwatch-run-abc123-")
    assert first != second


def _record(status: str, placement: dict[str, Any] | None) -> RunRecord:
    return RunRecord(id="r1", name="r", kind="gan", status=status, config={}, created_at=0.0, placement=placement)


def test_a_run_on_ray_says_what_it_waits_for_then_where_it_runs() -> None:
    waiting = {"backend": "ray", "actor": "a", "resources": {"CPU": 1.0}, "waiting_for": "1 CPU, big=1"}
    assert _where(_record("queued", waiting)) == {"state": "waiting", "text": "waiting for Ray: 1 CPU, big=1"}
    placed = {"backend": "ray", "actor": "a", "node_id": "0123456789abcdef", "node_ip": "10.0.0.7", "hostname": "gpu7"}
    assert _where(_record("running", placed)) == {"state": "placed",
                                                  "text": "Ray node 10.0.0.7 (gpu7), node 0123456789ab"}
    assert describe_node(placed) == "10.0.0.7 (gpu7), node 0123456789ab"
    assert _where(_record("running", None)) is None


def test_the_local_backend_refuses_custom_resources_naming_the_field(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path)), base_url="http://127.0.0.1:8000") as client:
        response = client.post("/api/runs", json=config(TINY_GAN, train__resources="node2=1"))
    assert response.status_code == 422
    assert "train.resources" in response.text and "--backend ray" in response.text


def test_why_a_run_on_ray_has_no_exit_code_names_the_node() -> None:
    placed = {"node_id": "0123456789abcdef", "node_ip": "10.0.0.7", "hostname": "gpu7"}
    assert WorkerEnd(0).lost_reason(placed) is None  # an exit code says it all
    assert WorkerEnd(None, lost="x", node_died=True).lost_reason(placed) == (
        "the Ray node running this run died (10.0.0.7 (gpu7), node 0123456789ab)")
    assert WorkerEnd(None, lost="The actor died unexpectedly").lost_reason(placed) == (
        "Ray lost this run's worker on 10.0.0.7 (gpu7), node 0123456789ab: The actor died unexpectedly")
    assert WorkerEnd(None, lost="scheduling failed").lost_reason({"actor": "a"}) == (
        "Ray could not start this run's worker: scheduling failed")


def test_serve_on_ray_refuses_in_one_line_when_the_cluster_does_not_answer(tmp_path: Path) -> None:
    """Ray alone retries an address where nothing answers for minutes; the server gives up after
    ray_join_timeout_s with one line (no traceback). (With no cluster at all, Ray's own "Could not find any running
    Ray instance" comes back at once, in the same one-line form; not tested here, as whether Ray finds a cluster
    on this machine depends on what else is running.)"""
    pytest.importorskip("ray")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("GRADWATCH_", "RAY_"))},
           "GRADWATCH_RAY_JOIN_TIMEOUT_S": "3"}
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--backend", "ray", "--ray-address",
                           "127.0.0.1:1", "--port", "0", "--data-dir", str(tmp_path / "data")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("cannot serve: no answer from the Ray cluster at '127.0.0.1:1' within 3 s (ray_join_timeout_s); "
                    "is its head running, and is this machine one of its nodes? (docs/deploy.md)")
    assert "Traceback" not in done.stderr
