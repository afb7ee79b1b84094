"""Start or join the Ray cluster, and wait until its nodes have joined.

``python -m megatron_rl.cluster.nodes --address HOST:PORT --nodes N --gpus G --timeout S`` is the
wait that slurm/train.sbatch runs between ``ray start`` on every node and the launch: it returns
once N nodes with G GPUs in all are alive, and exits 1 naming what is missing after S seconds.
Connecting retries until the head answers, without a bound of its own: the script wraps the command
in ``timeout``.
"""

from __future__ import annotations

import argparse
import time
import uuid

import ray

from megatron_rl.cluster.config import ClusterConfig

__all__ = ["init_ray", "use_gpus", "wait_for_nodes"]


def init_ray(cluster: ClusterConfig, *, namespace: str | None = None) -> None:
    """Join ``cluster.address`` ('auto', 'HOST:PORT'), or start a local Ray when it is ''.

    A Ray already initialised in this process (a test's, or a Ray worker's own) is used as it is.
    Each launch gets its own namespace (``megatron-rl-<random>``) unless one is given, so the named
    engine actors of two runs never meet.
    """
    if ray.is_initialized():
        return
    namespace = namespace or f"megatron-rl-{uuid.uuid4().hex[:8]}"
    if cluster.address:
        ray.init(address=cluster.address, namespace=namespace)
    else:
        ray.init(num_cpus=cluster.local_num_cpus or None, namespace=namespace, include_dashboard=False)


def use_gpus(cluster: ClusterConfig) -> bool:
    """Whether actors reserve GPUs: ``cluster.device``, with 'auto' meaning "the cluster has some"."""
    if cluster.device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return cluster.device == "gpu"


def wait_for_nodes(num_nodes: int, num_gpus: int, timeout_s: float, *, poll_s: float = 2.0) -> dict[str, float]:
    """Block until ``num_nodes`` alive nodes holding ``num_gpus`` GPUs in all have joined; return the
    cluster's resources.

    Raises:
        TimeoutError: after ``timeout_s``, naming the nodes and GPUs seen and those expected.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [node for node in ray.nodes() if node.get("Alive")]
        gpus = sum(node.get("Resources", {}).get("GPU", 0) for node in alive)
        if len(alive) >= num_nodes and gpus >= num_gpus:
            return ray.cluster_resources()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"after {timeout_s:.0f}s the Ray cluster has {len(alive)} nodes and {gpus:g} GPUs "
                f"({sorted(n.get('NodeManagerAddress', '?') for n in alive)}); expected {num_nodes} nodes "
                f"and {num_gpus} GPUs. Check the `ray start` output of the missing nodes")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="Ray head, HOST:PORT")
    parser.add_argument("--nodes", type=int, required=True, help="nodes expected")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs expected across all nodes")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    args = parser.parse_args(argv)
    ray.init(address=args.address, namespace="megatron-rl-wait")  # Ray retries until the head answers
    try:
        resources = wait_for_nodes(args.nodes, args.gpus, args.timeout)
    except TimeoutError as err:
        print(f"error: {err}", flush=True)
        return 1
    finally:
        ray.shutdown()
    print(f"ray cluster ready: {args.nodes} nodes, {resources.get('GPU', 0):g} GPUs, "
          f"{resources.get('CPU', 0):g} CPUs", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
