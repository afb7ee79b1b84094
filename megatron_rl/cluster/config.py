"""Knobs of a Ray-orchestrated run: where the cluster is, how many trainer ranks, resources, timeouts.

Used by ``python -m megatron_rl.cluster.launch`` (trainer ranks as Ray actors) and by
:func:`megatron_rl.cluster.engine.connect_engine` (rollout engines in their own actors,
``rollout.mode=separate``). A plain ``megatron-rl train`` ignores this section.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.validation import check_choice, check_range

DEVICES = ("auto", "gpu", "cpu")
WEIGHT_TRANSPORTS = ("broadcast", "object_store")


@dataclass(frozen=True)
class ClusterConfig:
    """The Ray cluster and the actors placed on it."""

    address: str = ""
    """Ray cluster to join: '' starts a local Ray in the launching process; 'auto' joins the cluster
    started on this node (``ray start``, what slurm/train.sbatch does); 'HOST:PORT' joins that head."""

    local_num_cpus: int = 0
    """Logical CPUs of a local Ray started by the launch (address=''); 0 lets Ray count the cores."""

    num_trainers: int = 1
    """Trainer ranks, one Ray actor each: the torch.distributed world size (parallel.tp x parallel.pp
    x data-parallel size). On GPU clusters: nodes x GPUs per node, minus the engines' GPUs."""

    device: str = "auto"
    """'gpu': every trainer rank and engine gets one GPU; 'cpu': none (gloo); 'auto': 'gpu' when the
    Ray cluster has GPUs."""

    cpus_per_trainer: float = 1.0
    """Ray CPUs each trainer rank reserves (also its OMP thread count on CPU)."""

    engine_cpus: float = 1.0
    """Ray CPUs each separate rollout engine reserves (it also gets one GPU on GPU clusters)."""

    ranks_per_node: int = 0
    """Bundles (trainer ranks, then separate engines; one GPU each on GPU clusters) per node: the launch
    makes one STRICT_PACK placement group of this many bundles per node, so ranks are numbered node by
    node and every tensor-parallel group lies inside one node (the launch refuses a layout where one
    would not). 0: the GPUs of the smallest GPU node (GPU clusters); all bundles on one node (CPU)."""

    weight_transport: str = "broadcast"
    """How weights reach separate rollout engines (rollout.mode=separate): 'broadcast' over a
    torch.distributed group of the feeding rank and its engine actor (NCCL on GPU, gloo on CPU; only
    names, shapes and dtypes go through Ray); 'object_store': NumPy copies through Ray's object store."""

    setup_timeout_s: float = 600.0
    """Most seconds to get the placement group's resources and start the trainer actors."""

    step_timeout_s: float = 3600.0
    """Most seconds between two logged steps (and from the actors' start to the first step, which
    covers process-group set-up, model loading and the SFT warm-up); past it every actor is killed."""

    engine_start_timeout_s: float = 900.0
    """Most seconds for a separate rollout engine actor to load its model."""

    engine_call_timeout_s: float = 900.0
    """Most seconds for one call into a separate rollout engine (generate, a weight bucket, a check)."""

    def __post_init__(self) -> None:
        if not isinstance(self.address, str):
            raise TypeError(f"cluster.address={self.address!r} must be '', 'auto' or 'HOST:PORT'")
        check_range("cluster.local_num_cpus", self.local_num_cpus, low=0, integer=True)
        check_range("cluster.num_trainers", self.num_trainers, low=1, integer=True)
        check_choice("cluster.device", self.device, DEVICES)
        check_range("cluster.cpus_per_trainer", self.cpus_per_trainer, low=0.0, low_inclusive=False)
        check_range("cluster.engine_cpus", self.engine_cpus, low=0.0, low_inclusive=False)
        check_range("cluster.ranks_per_node", self.ranks_per_node, low=0, integer=True)
        check_choice("cluster.weight_transport", self.weight_transport, WEIGHT_TRANSPORTS)
        for name in ("setup_timeout_s", "step_timeout_s", "engine_start_timeout_s", "engine_call_timeout_s"):
            check_range(f"cluster.{name}", getattr(self, name), low=0.0, low_inclusive=False)
