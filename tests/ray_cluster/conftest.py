"""A real two-node Ray cluster on this machine, and a real ``gradwatch serve --backend ray`` joined to it.

Collected only inside the network namespace that ``tests/test_ray.py`` makes (``unshare -rn``, loopback up):
there Ray binds 127.0.0.1, the only address traffic may go to here. The head has 2 CPUs and the custom resource
``head_node``; the second node has 1 CPU and ``node2``, so a run asking for ``node2=1`` can only land there, one at
a time. Both nodes (and so every worker Ray starts) inherit the fault-injection hook of ``tests/faults``, which
makes a run named ``oom-victim`` raise a CUDA-style out-of-memory error at step 30.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.live_server import LiveServer

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "tests" / "faults"
OOM_STEP = 30


class RayCluster:
    def __init__(self, cluster: Any, node2: Any) -> None:
        self.cluster = cluster
        self.node2 = node2
        self.address: str = cluster.address
        self.head_id: str = cluster.head_node.node_id
        self.node2_id: str = node2.node_id

    def kill_node2(self) -> None:
        self.cluster.remove_node(self.node2, allow_graceful=False)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAULTS), str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["GRADWATCH_FAULT_OOM_RUN_NAME"] = "oom-victim"
    os.environ["GRADWATCH_FAULT_OOM_AT_STEP"] = str(OOM_STEP)
    os.environ["OMP_NUM_THREADS"] = "1"
    # Fast health checks: a dead node is noticed in about a second, not Ray's default of tens of seconds.
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"head_node": 1}, "include_dashboard": False, "_system_config": health})
    node2 = cluster.add_node(num_cpus=1, resources={"node2": 1})
    cluster.wait_for_nodes()
    scratch = Path(tempfile.gettempdir())
    before = set(scratch.glob("gradwatch-run-*"))
    try:
        yield RayCluster(cluster, node2)
    finally:
        cluster.shutdown()
        # The scratch folders the workers kept on purpose (a failed run's, a killed node's): not left in /tmp.
        for folder in set(scratch.glob("gradwatch-run-*")) - before:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_server(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("ray-server") / "data", "--backend", "ray",
                        "--ray-address", ray_cluster.address,
                        env={"GRADWATCH_REATTACH_GRACE_S": "60", "GRADWATCH_SHUTDOWN_GRACE_S": "20"})
    server.start(timeout=120)
    try:
        yield server
    finally:
        server.stop()
