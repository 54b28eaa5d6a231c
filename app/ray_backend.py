"""Runs on a Ray cluster: each run one detached actor (:class:`app.ray_actor.RunSupervisor`) asking Ray for what
the run needs, and starting the run's worker on whichever node Ray gives it.

Ray does the scheduling: the server hands a run over as soon as it is submitted, and the actor waits in Ray's
queue until a node has the CPUs, the GPU share (``1 / gpu_run_limit`` of a GPU, so that a GPU holds as many runs
as locally) and the run's custom resources (``train.resources``). Meanwhile the run is ``queued`` and its
placement says what it waits for. The worker talks to the server over the same channel as a local one, at the
server's ``public_url``: frames, artifact uploads and the resume checkpoint all travel over it, so no disk is
shared.

The actor is *detached* and *named* after the run, so it outlives a server restart as a local worker process
does: the restarted server finds it by name, and its worker reconnects. A node that dies takes its actor and,
through the actor, the worker with it; the server learns it from the actor's ``wait`` and ends the run naming the
node.

Ray is an optional dependency (``pip install 'gradwatch[ray]'``): nothing imports it unless
``backend = "ray"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from dataclasses import dataclass
from typing import Any

from app.settings import Settings

log = logging.getLogger("gradwatch.ray")

#: Every gradwatch actor lives in this Ray namespace, named after its run.
NAMESPACE = "gradwatch"
ACTOR_PREFIX = "gradwatch-run-"
RAY_MISSING = "the Ray backend needs Ray on the server and on every node: pip install 'gradwatch[ray]'"


def actor_name(run_id: str) -> str:
    """A fresh name for a run's actor: the run's id, and a suffix so that a run launched again after a restart
    never meets the name of its old actor while Ray is still ending that one."""
    return f"{ACTOR_PREFIX}{run_id}-{secrets.token_hex(3)}"


def describe_request(resources: dict[str, float]) -> str:
    """``{"CPU": 1, "GPU": 0.5, "big": 1}`` as ``1 CPU, 0.5 GPU, big=1``: what a queued run shows it waits for."""
    parts = []
    for name, amount in resources.items():
        parts.append(f"{amount:g} {name}" if name in ("CPU", "GPU") else f"{name}={amount:g}")
    return ", ".join(parts)


def describe_node(placement: dict[str, Any]) -> str:
    """How a run's error and page name the node it ran on: its address and the start of Ray's node id."""
    where = placement.get("node_ip") or "?"
    host = placement.get("hostname")
    node = str(placement.get("node_id") or "")[:12]
    return f"{where}{f' ({host})' if host else ''}, node {node}"


def alive_nodes() -> list[dict[str, Any]]:
    """Ray's description of each live node of the cluster this process joined (blocking)."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def node_alive(node_id: str) -> bool:
    """Whether the node is still in the cluster (blocking)."""
    return any(node.get("NodeID") == node_id for node in alive_nodes())


@dataclass
class WorkerEnd:
    """How a run's worker on Ray ended: an exit code, or the reason Ray gives for losing it."""

    code: int | None
    log_tail: str = ""
    kept: str | None = None  # the scratch folder left on the node (it may hold an unsent final checkpoint)
    lost: str | None = None  # why there is no exit code: the node or the actor died
    node_died: bool = False

    def lost_reason(self, placement: dict[str, Any]) -> str | None:
        """Why the run has no exit code to report, naming the node; None when it has one."""
        if self.code is not None:
            return None
        if "node_id" not in placement:
            return f"Ray could not start this run's worker: {self.lost}"
        if self.node_died:
            return f"the Ray node running this run died ({describe_node(placement)})"
        return f"Ray lost this run's worker on {describe_node(placement)}: {self.lost}"


class RayWorker:
    """The server's handle on one run's actor."""

    def __init__(self, run_id: str, name: str, actor: Any) -> None:
        self.run_id = run_id
        self.name = name
        self.actor = actor
        self.placement: dict[str, Any] | None = None  # filled in once the actor has started the worker
        self._wait_ref: Any = None

    @property
    def placed(self) -> bool:
        return self.placement is not None

    async def start(self, args: list[str], token: str, config_json: str, env: dict[str, str]) -> dict[str, Any]:
        """Ask the actor to start the worker; returns once Ray has placed it and the worker runs (this is where a
        run waits for resources). Raises what Ray raises for an actor that could not start."""
        self.placement = await self.actor.start.remote(args, token, config_json, env)
        return self.placement

    async def wait(self) -> WorkerEnd:
        """Until the worker is gone; never raises for a lost node or actor, it says so in the result."""
        import ray

        if self._wait_ref is None:
            self._wait_ref = self.actor.wait.remote()
        try:
            result = await self._wait_ref
        except ray.exceptions.RayActorError as exc:
            message = str(exc)
            node_id = (self.placement or {}).get("node_id")
            node_died = ("node has died" in message or "node was terminated" in message
                         or (node_id is not None and not await asyncio.to_thread(node_alive, node_id)))
            first = next((line.strip() for line in message.splitlines() if "died because" in line), "")
            return WorkerEnd(None, lost=first or message.splitlines()[0], node_died=node_died)
        except ray.exceptions.RayError as exc:
            return WorkerEnd(None, lost=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        return WorkerEnd(result["code"], result.get("log_tail", ""), result.get("kept"))

    def signal(self, signum: signal.Signals) -> None:
        """Send the worker a signal through its actor (fire and forget: a dead actor has no worker either)."""
        with contextlib.suppress(Exception):
            self.actor.signal.remote(int(signum))

    def kill(self) -> None:
        """End the actor, and with it the worker (or the wait for resources, for a run Ray has not placed).
        Blocking (it waits for Ray's control store to answer): from the event loop, :meth:`end`."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)

    async def end(self) -> None:
        """:meth:`kill`, off the event loop."""
        await asyncio.to_thread(self.kill)


class RayBackend:
    """The server's connection to its Ray cluster."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def connect(self) -> None:
        """Join the cluster (blocking: call it in a thread): ``ray_address``, else ``$RAY_ADDRESS``, else the
        cluster this machine is a node of (Ray's ``auto``).

        Never a Ray of the server's own: runs on Ray outlive a server restart (docs/deploy.md), which a cluster
        that ends with the server would break, and the cluster is the user's to start and secure
        (``ray start --head``)."""
        try:
            import ray
        except ImportError as exc:
            raise RuntimeError(RAY_MISSING) from exc
        if ray.is_initialized():  # `gradwatch serve` joins before it serves, to refuse to start with a clear reason
            return
        address = self.settings.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
        except Exception as exc:  # Ray says "No node info found matching attributes" on a machine without a node
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise RuntimeError(
                f"cannot join the Ray cluster at {address!r}: {first}. Start one first (`ray start --head` on this "
                "machine), or name it with --ray-address; the server must run on one of its nodes: the head, or a "
                f"machine joined with `ray start --address HEAD:6379 --num-cpus 0 --num-gpus 0` (docs/deploy.md)"
            ) from exc
        resources = ray.cluster_resources()
        nodes = alive_nodes()
        log.info("joined the Ray cluster at %s: %g CPUs, %g GPUs, %d nodes", address, resources.get("CPU", 0),
                 resources.get("GPU", 0), len(nodes))
        here = ray.util.get_node_ip_address()
        others = sorted({str(n["NodeManagerAddress"]) for n in nodes if n.get("NodeManagerAddress")} - {here})
        if others and self.settings.public_url is None:
            log.warning("nodes at %s are other machines, and without --public-url their workers are told to reach "
                        "this server at a loopback address: runs placed there cannot connect", ", ".join(others))

    def disconnect(self) -> None:
        import ray

        ray.shutdown()

    def gpus(self) -> float:
        """GPUs in the cluster now (blocking)."""
        import ray

        return float(ray.cluster_resources().get("GPU", 0))

    def unavailable(self, request: dict[str, float]) -> list[str]:
        """The parts of a request no live node has at all (blocking): such a run waits until a node that has them
        joins the cluster, which is worth saying while it waits."""
        totals = [node.get("Resources", {}) for node in alive_nodes()]
        return [name for name, amount in request.items()
                if not any(resources.get(name, 0) >= amount for resources in totals)]

    def request(self, device: str, custom: dict[str, float]) -> dict[str, float]:
        """What a run asks Ray for: its CPUs, a GPU share for a CUDA run, and its custom resources."""
        wanted = {"CPU": self.settings.ray_cpus_per_run}
        if device.startswith("cuda"):
            wanted["GPU"] = round(1.0 / self.settings.gpu_run_limit, 4)
        return {**wanted, **custom}

    def launch(self, run_id: str, request: dict[str, float]) -> RayWorker:
        """Create the run's actor (not yet placed: Ray queues it until a node has room)."""
        import ray

        from app.ray_actor import RunSupervisor

        custom = {k: v for k, v in request.items() if k not in ("CPU", "GPU")}
        name = actor_name(run_id)
        actor = ray.remote(RunSupervisor).options(
            name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=0,
            num_cpus=request.get("CPU", 0), num_gpus=request.get("GPU", 0), resources=custom or None,
            max_concurrency=8,
        ).remote(run_id)
        return RayWorker(run_id, name, actor)

    def find(self, name: str, placement: dict[str, Any] | None) -> RayWorker | None:
        """A run's live actor from before a restart, by its name, or None (blocking)."""
        import ray

        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
        worker = RayWorker(name.removeprefix(ACTOR_PREFIX).rsplit("-", 1)[0], name, actor)
        worker.placement = placement
        return worker

    def kill_stale(self, name: str) -> bool:
        """End a run's actor left from before a restart, if there is one (blocking)."""
        worker = self.find(name, None)
        if worker is None:
            return False
        worker.kill()
        return True
