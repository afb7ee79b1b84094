"""Run training with every trainer rank in its own Ray actor: ``python -m megatron_rl.cluster.launch CONFIG [overrides]``.

What happens (the driver is this process; slurm/train.sbatch runs it on the Ray head node)::

    join or start Ray (cluster.address)
    placement: one STRICT_PACK placement group per node (cluster.ranks_per_node bundles, default the
      node's GPUs), bundles numbered node by node: trainer ranks first, then one per separate engine;
      a tensor-parallel group never spans two nodes
    start cluster.num_trainers TrainerRank actors, one per bundle, in rank order
    rank 0 reports its node IP and a free port: MASTER_ADDR / MASTER_PORT of torch.distributed
    every actor calls megatron_rl.trainer.loop.train(cfg) with RANK / WORLD_SIZE set (NCCL or gloo)
    the driver watches: a failed actor, or no logged step for cluster.step_timeout_s, kills every
    actor (engines die with their owners) and raises naming the rank and node

Rank 0 drives the run: it writes metrics.jsonl, checkpoints and exports, and a thread in its actor
reports each logged step to a :class:`Heartbeat` actor the driver reads. The same code runs on one
CPU machine (gloo, CPU bundles) and on a GPU cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from megatron_rl.cluster.config import ClusterConfig
from megatron_rl.cluster.nodes import init_ray, use_gpus

__all__ = ["DistEnv", "Heartbeat", "LaunchResult", "Placement", "TrainerFailed", "TrainerGroup", "TrainerRank",
           "launch", "node_layout"]

POLL_S = 1.0
"""How often the driver checks the actors and the heartbeat."""

HEARTBEAT_POLL_S = 1.0
"""How often rank 0's watcher thread reads metrics.jsonl."""


class TrainerFailed(RuntimeError):
    """A trainer rank failed or stalled; every actor of the run has been killed."""


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """torch.distributed's env:// rendezvous of one rank."""

    master_addr: str
    master_port: int
    rank: int
    world_size: int

    def variables(self) -> dict[str, str]:
        # Ray gives each rank only its own GPU (CUDA_VISIBLE_DEVICES), so its local device is 0
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port), "RANK": str(self.rank),
                "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": "0"}


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    run_dir: Path
    startup_s: dict[str, float]
    """Seconds spent joining Ray ('ray_init'), getting the placement group ('placement'), starting the
    trainer actors ('actors') and from then to the end of training ('train')."""


class Heartbeat:
    """The last step rank 0 logged (-1 before the first). A tiny actor the driver reads."""

    def __init__(self) -> None:
        self.step = -1

    def beat(self, step: int) -> None:
        self.step = step

    def last_step(self) -> int:
        return self.step


Slot = tuple[PlacementGroup, int]
"""A placement-group bundle: (group, bundle index)."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where each trainer rank and each separate engine runs: bundles of per-node placement groups."""

    groups: list[PlacementGroup]
    trainers: list[Slot]
    """Rank r's bundle."""
    engines: list[Slot]
    """Replica k's engine bundle."""

    def remove(self) -> None:
        for group in self.groups:
            remove_placement_group(group)


def node_layout(num_trainers: int, num_engines: int, per_node: int, *, tp: int) -> list[list[str]]:
    """The bundles of each node-local placement group, in order: 'trainer' (rank = position overall) or
    'engine'. Node i takes bundles ``i * per_node ... (i + 1) * per_node - 1``.

    Raises:
        ValueError: a tensor-parallel group (``tp`` consecutive ranks, Megatron's innermost dimension) would
            span two nodes.
    """
    if per_node < 1:
        raise ValueError(f"cluster.ranks_per_node={per_node} must be >= 1 here")
    kinds = ["trainer"] * num_trainers + ["engine"] * num_engines
    for first in range(0, num_trainers, tp):
        last = min(first + tp, num_trainers) - 1
        if first // per_node != last // per_node:
            raise ValueError(
                f"parallel.tp={tp} with {per_node} ranks per node (cluster.ranks_per_node, default the GPUs per node) "
                f"puts trainer ranks {first}..{last} of one tensor-parallel group on two nodes; choose a "
                f"tensor-parallel size that divides the ranks per node")
    return [kinds[start : start + per_node] for start in range(0, len(kinds), per_node)]


class TrainerRank:
    """One torch.distributed rank of the run, alone in its Ray actor (and on its GPU)."""

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def train(self, cfg: Any, env: DistEnv, heartbeat: Any | None, engine_bundles: list[Slot] | None = None) -> str:
        """Set the rendezvous variables (and the bundles reserved for separate engines), then run this rank
        of ``cfg``; return the run directory."""
        from megatron_rl.cluster.engine import set_engine_bundles

        os.environ.update(env.variables())
        set_engine_bundles(engine_bundles or [])
        if heartbeat is not None:
            metrics_file = Path(cfg.trainer.output_dir) / "metrics.jsonl"
            threading.Thread(target=_report_steps, args=(metrics_file, heartbeat), daemon=True).start()
        from megatron_rl.trainer.loop import train

        return str(train(cfg))


def _report_steps(metrics_file: Path, heartbeat: Any) -> None:
    """Send the step of each new line of ``metrics_file`` to ``heartbeat`` (runs until the actor ends)."""
    seen = -1
    while True:
        step = _last_logged_step(metrics_file)
        if step != seen:
            heartbeat.beat.remote(step)
            seen = step
        time.sleep(HEARTBEAT_POLL_S)


def _last_logged_step(metrics_file: Path) -> int:
    try:
        lines = metrics_file.read_text().splitlines()
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line being written
    return -1


class TrainerGroup:
    """The trainer-rank actors of one run, one per trainer bundle of ``placement``.

    Args:
        placement: the ready bundles (rank r on ``placement.trainers[r]``).
        cluster: resources and timeouts.
        gpus: whether each rank reserves a GPU.
    """

    def __init__(self, placement: Placement, cluster: ClusterConfig, *, gpus: bool) -> None:
        self.cluster = cluster
        self.engine_bundles = placement.engines
        actor_cls = ray.remote(TrainerRank)
        self.actors = [actor_cls.options(
            num_cpus=cluster.cpus_per_trainer, num_gpus=1 if gpus else 0, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
        ).remote() for group, index in placement.trainers]
        self.heartbeat = ray.remote(Heartbeat).options(num_cpus=0).remote()
        self.node_ips: list[str] = []

    def wait_started(self) -> None:
        """Wait until every actor answers (its process is up); record their node IPs."""
        self.node_ips = self._gather([a.node_ip.remote() for a in self.actors], "starting",
                                     self.cluster.setup_timeout_s)

    def run(self, cfg: Any) -> Path:
        """Train ``cfg`` on every rank; return the run directory (raises :class:`TrainerFailed` at the
        first failed or stalled rank; :meth:`kill` then ends the others)."""
        world_size = len(self.actors)
        (port,) = self._gather([self.actors[0].free_port.remote()], "choosing a port", self.cluster.setup_timeout_s)
        refs = [actor.train.remote(cfg, DistEnv(self.node_ips[0], port, rank, world_size),
                                   self.heartbeat if rank == 0 else None, self.engine_bundles)
                for rank, actor in enumerate(self.actors)]
        return Path(self._supervise(refs))

    def kill(self) -> None:
        for actor in [*self.actors, self.heartbeat]:
            ray.kill(actor, no_restart=True)

    def _supervise(self, refs: list[ray.ObjectRef]) -> str:
        """Wait for every rank; raise :class:`TrainerFailed` at the first failure or stall."""
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, str] = {}
        last_step, last_change = -1, time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except Exception as err:  # any failure of a rank ends the run
                    raise TrainerFailed(f"trainer rank {rank} on node {self.node_ips[rank]} failed: "
                                        f"{_first_line(err)}") from err
            step = self._last_step()
            if step != last_step:
                last_step, last_change = step, time.monotonic()
            waited = time.monotonic() - last_change
            if pending and waited > self.cluster.step_timeout_s:
                where = ", ".join(f"rank {r} on {self.node_ips[r]}" for r in sorted(pending.values()))
                what = "the first step" if last_step < 0 else f"step {last_step + 1} (step {last_step} was logged)"
                raise TrainerFailed(f"no progress for {waited:.0f}s waiting for {what}; cluster.step_timeout_s="
                                    f"{self.cluster.step_timeout_s:g}. Still running: {where}")
        return results[0]

    def _last_step(self) -> int:
        try:
            return ray.get(self.heartbeat.last_step.remote(), timeout=30)
        except GetTimeoutError:
            return -1

    def _gather(self, refs: list[ray.ObjectRef], what: str, timeout_s: float) -> list[Any]:
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            raise TrainerFailed(f"trainer actors did not finish {what} within {timeout_s:g}s") from None


def launch(cfg: Any) -> LaunchResult:
    """Run ``cfg`` with ``cfg.cluster.num_trainers`` trainer-rank actors on the Ray cluster.

    Raises:
        ValueError: ``num_trainers`` is not a multiple of ``parallel.tp * parallel.pp``, or a tensor-parallel
            group would span two nodes (:func:`node_layout`).
        TrainerFailed: the cluster lacks the resources within ``cluster.setup_timeout_s``, a rank failed
            (message: rank, node, its error; the error is chained) or no step was logged for
            ``cluster.step_timeout_s``. Every actor of the run is killed first.
    """
    cluster: ClusterConfig = cfg.cluster
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    if cluster.num_trainers % model_parallel:
        raise ValueError(f"cluster.num_trainers={cluster.num_trainers} is not a multiple of parallel.tp x "
                         f"parallel.pp = {model_parallel}")
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(
        cfg.trainer, output_dir=str(Path(cfg.trainer.output_dir).resolve())))  # actors may start elsewhere
    timings: dict[str, float] = {}
    start = time.perf_counter()
    init_ray(cluster)
    timings["ray_init"] = time.perf_counter() - start
    gpus = use_gpus(cluster)
    num_engines = cluster.num_trainers // model_parallel if cfg.rollout.mode == "separate" else 0
    per_node = cluster.ranks_per_node or (_gpus_per_node() if gpus else cluster.num_trainers + num_engines)
    layout = node_layout(cluster.num_trainers, num_engines, per_node, tp=cfg.parallel.tp)
    placement = _place(cluster, layout, gpus=gpus)
    timings["placement"] = time.perf_counter() - start - timings["ray_init"]
    trainers = TrainerGroup(placement, cluster, gpus=gpus)
    try:
        trainers.wait_started()
        timings["actors"] = time.perf_counter() - start - timings["ray_init"] - timings["placement"]
        run_dir = trainers.run(cfg)
        timings["train"] = time.perf_counter() - start - sum(timings.values())
    finally:
        trainers.kill()
        placement.remove()
    return LaunchResult(run_dir, timings)


def _gpus_per_node() -> int:
    """GPUs of the smallest alive node that has any (the cluster's per-node group size)."""
    counts = [int(node["Resources"].get("GPU", 0)) for node in ray.nodes() if node.get("Alive")]
    counts = [count for count in counts if count > 0]
    if not counts:
        raise TrainerFailed("cluster.device asks for GPUs but no alive Ray node has any")
    return min(counts)


def _place(cluster: ClusterConfig, layout: list[list[str]], *, gpus: bool) -> Placement:
    """One STRICT_PACK placement group per entry of ``layout`` (one node each), ready; or
    :class:`TrainerFailed` naming what is missing."""
    resources = {"trainer": {"CPU": cluster.cpus_per_trainer}, "engine": {"CPU": cluster.engine_cpus}}
    if gpus:
        resources = {kind: bundle | {"GPU": 1} for kind, bundle in resources.items()}
    groups = [placement_group([resources[kind] for kind in kinds], strategy="STRICT_PACK") for kinds in layout]
    try:
        ray.get([group.ready() for group in groups], timeout=cluster.setup_timeout_s)
    except GetTimeoutError:
        for group in groups:
            remove_placement_group(group)
        shape = " + ".join(f"[{len(kinds)} bundles]" for kinds in layout)
        raise TrainerFailed(
            f"the Ray cluster could not place {len(layout)} node-local placement groups {shape} (trainer bundle "
            f"{resources['trainer']}, engine bundle {resources['engine']}; each group on one node, STRICT_PACK) "
            f"within cluster.setup_timeout_s={cluster.setup_timeout_s:g}s; available: {ray.available_resources()}"
        ) from None
    slots = {"trainer": [], "engine": []}
    for group, kinds in zip(groups, layout, strict=True):
        for index, kind in enumerate(kinds):
            slots[kind].append((group, index))
    return Placement(groups, slots["trainer"], slots["engine"])


def _first_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err  # RayTaskError keeps the rank's own exception as .cause
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def main(argv: list[str] | None = None) -> int:
    from megatron_rl.config import load_config

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cfg = load_config(argv[0], argv[1:])
    result = launch(cfg)
    print(f"run directory: {result.run_dir}\nstart-up (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in result.startup_s.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
