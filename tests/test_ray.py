"""The Ray backend on a real cluster: tests/ray_cluster, run inside a network namespace of their own.

Traffic may go to loopback only here, and Ray binds the machine's own address unless that is all there is: in a
new network namespace (``unshare -rn``: user and network namespaces, no root needed) with only ``lo`` up, Ray
binds 127.0.0.1, and the cluster, the server, its workers and the test clients all live in there together.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _why_not() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install -e '.[ray]'; make install does it)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare and ip (util-linux, iproute2) are needed to make the test's network namespace"
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"this machine refuses a user network namespace: {probe.stderr.strip()}"
    return None


@pytest.mark.xdist_group("ray")
def test_runs_on_a_real_two_node_ray_cluster() -> None:
    reason = _why_not()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    inner = (f"ip link set lo up && exec {sys.executable} -m pytest tests/ray_cluster -q -p no:cacheprovider "
             "-o addopts='' -rA --timeout 600")
    env = {**os.environ, "GRADWATCH_RAY_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(["unshare", "-rn", "sh", "-c", inner], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    lines = [line for line in done.stdout.splitlines() if "network_util.cc" not in line]
    summary = "\n".join(lines[-60:])
    assert done.returncode == 0, f"tests/ray_cluster failed in the network namespace:\n{summary}\n{done.stderr[-3000:]}"
    last = lines[-1] if lines else ""
    assert " passed" in last and not any(word in last for word in ("failed", "error", "skipped")), summary
