"""A rollout engine in its own Ray actor (``rollout.mode=separate``), and the proxy the trainer uses.

In separate ("disaggregated") mode each model replica's feeding rank (tp_rank 0, pp_rank 0) talks to
one engine running in another process, on its own GPU (or CPU cores), possibly on another node::

    engine = connect_engine(cfg, model_dir)     # creates the actor (or finds it) and waits for it
    engine.generate(prompt_token_ids, sampling) # same RolloutEngine interface as a local engine
    engine.load_weights(bucket)                 # tensors travel through Ray's object store

The actor is named :func:`engine_actor_name` (replica index + run directory), so a launcher or a
test can find it with ``ray.get_actor``. It is not detached: it belongs to the process that created
it and dies with it, so a crashed trainer never leaves an engine holding a GPU.

Every call has a timeout (``cluster.engine_call_timeout_s``); a dead actor or a call past its timeout
raises ``RuntimeError`` naming the actor, its node and what was being done, so the trainer stops
instead of hanging.

Tensors are sent as NumPy arrays (bf16 as its 16-bit pattern): Ray stores them in its shared-memory
object store once and the engine reads them there without a copy when it sits on the same node
(across nodes Ray moves the bytes). Nothing is pickled but Ray's own framing of the call.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from megatron_rl.cluster.config import ClusterConfig
from megatron_rl.cluster.nodes import init_ray
from megatron_rl.rollout.base import Rollout, SamplingConfig

__all__ = ["EngineActor", "RemoteEngine", "connect_engine", "engine_actor_name"]

Packed = list[tuple[str, str, np.ndarray]]
"""Tensors as they travel: (name, torch dtype name, array of the same bytes)."""

_VIEW_AS = {torch.bfloat16: torch.int16}
"""Dtypes NumPy lacks, sent as an integer type of the same width."""


def pack_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Packed:
    """``(name, tensor)`` pairs -> ``(name, dtype name, ndarray)`` on the CPU, sharing memory where
    the tensor is already a contiguous CPU tensor."""
    packed = []
    for name, tensor in tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        view = _VIEW_AS.get(tensor.dtype)
        packed.append((name, dtype_name, (tensor.view(view) if view is not None else tensor).numpy()))
    return packed


def unpack_tensors(packed: Packed, *, copy: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`pack_tensors`. Arrays from Ray's object store are read-only: without
    ``copy`` the tensors share that memory and must only be read (as ``load_weights`` does)."""
    out = []
    for name, dtype_name, array in packed:
        dtype = getattr(torch, dtype_name)
        with warnings.catch_warnings():  # "non-writable array": the engine only reads it
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array.copy() if copy else array)
        out.append((name, tensor.view(dtype) if dtype in _VIEW_AS else tensor))
    return out


def engine_actor_name(cfg: Any, replica: int) -> str:
    """Ray name of replica ``replica``'s engine actor in the run writing to ``cfg.trainer.output_dir``."""
    return f"rollout-engine-{replica}:{Path(cfg.trainer.output_dir).resolve()}"


class EngineActor:
    """Hosts one rollout engine (:func:`megatron_rl.trainer.setup.build_engine` with the run's
    rollout settings, i.e. vLLM by default) in a Ray actor. Created through :func:`connect_engine`."""

    def __init__(self, cfg: Any, model_dir: str) -> None:
        from megatron_rl.trainer import setup

        # the engine has this process (and its GPU) to itself: built like a colocated one, no sleep mode
        rollout = dataclasses.replace(cfg.rollout, mode="colocated", enable_sleep_mode=False)
        self.engine = setup.build_engine(dataclasses.replace(cfg, rollout=rollout), Path(model_dir), None)

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        return self.engine.generate(prompt_token_ids, sampling)

    def load_weights(self, packed: Packed) -> None:
        self.engine.load_weights(unpack_tensors(packed))

    def engine_weights(self) -> Packed:
        return pack_tensors(self.engine.engine_weights().items())

    def close(self) -> None:
        self.engine.close()


class RemoteEngine:
    """The :class:`~megatron_rl.rollout.base.RolloutEngine` interface over an :class:`EngineActor`.

    Args:
        actor: handle of a started engine actor.
        name: the actor's Ray name (for messages).
        node_ip: the node it runs on (for messages).
        call_timeout_s: most seconds per call.

    ``sleep`` / ``wake_up`` are no-ops: a separate engine does not share its GPU with the trainer.
    """

    def __init__(self, actor: Any, *, name: str, node_ip: str, call_timeout_s: float) -> None:
        self.actor, self.name, self.node_ip, self.call_timeout_s = actor, name, node_ip, call_timeout_s
        self._closed = False

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        return self._call("generating", self.actor.generate.remote(prompt_token_ids, sampling))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        packed = ray.put(pack_tensors(weights))
        self._call("loading weights", self.actor.load_weights.remote(packed))

    def engine_weights(self) -> dict[str, torch.Tensor]:
        """The engine's weights as it computes with them (see ``VLLMEngine.engine_weights``), copied here."""
        return dict(unpack_tensors(self._call("reading its weights", self.actor.engine_weights.remote()), copy=True))

    def sleep(self) -> None:
        """No-op (the engine has its own GPU)."""

    def wake_up(self) -> None:
        """No-op (the engine has its own GPU)."""

    def close(self) -> None:
        """Shut the engine down and end its actor (idempotent; an actor that already died is fine)."""
        if self._closed:
            return
        self._closed = True
        try:
            ray.get(self.actor.close.remote(), timeout=min(self.call_timeout_s, 60.0))
        except (RayActorError, GetTimeoutError):
            pass
        ray.kill(self.actor, no_restart=True)

    def _call(self, what: str, ref: ray.ObjectRef) -> Any:
        if self._closed:
            raise RuntimeError(f"rollout engine actor {self.name!r} is closed")
        return wait_for(ref, actor=self.name, node_ip=self.node_ip, what=what, timeout_s=self.call_timeout_s,
                        timeout_field="cluster.engine_call_timeout_s")


def wait_for(ref: ray.ObjectRef, *, actor: str, node_ip: str, what: str, timeout_s: float,
             timeout_field: str) -> Any:
    """``ray.get(ref)`` within ``timeout_s``; a dead actor or the timeout raise ``RuntimeError``
    naming the actor, its node and ``what`` it was doing. An error raised inside the actor's method
    propagates unchanged (Ray re-raises it with the actor's traceback)."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        raise RuntimeError(f"rollout engine actor {actor!r} on node {node_ip} did not finish {what} within "
                           f"{timeout_field}={timeout_s:g}s") from None
    except RayActorError as err:
        raise RuntimeError(f"rollout engine actor {actor!r} on node {node_ip} died while {what}: "
                           f"{str(err).splitlines()[0]}") from err


def connect_engine(cfg: Any, model_dir: str | Path, *, replica: int | None = None) -> RemoteEngine:
    """The rollout engine of this model replica, in its own Ray actor; created if it does not exist.

    Called by the replica's feeding rank when ``rollout.mode == "separate"``. Joins Ray per
    ``cfg.cluster.address`` when this process is not already part of it (a rank of
    ``python -m megatron_rl.cluster.launch`` is). Inside the launch's placement group the engine takes
    bundle ``WORLD_SIZE + replica`` (reserved for it); elsewhere Ray places it anywhere with the
    resources: ``cluster.engine_cpus`` CPUs and, when this process sees a GPU, one GPU.

    Args:
        cfg: the run's Config (sections rollout, trainer, cluster, ...).
        model_dir: the HF model directory the engine starts from (visible on the engine's node).
        replica: data-parallel index of the model replica; None reads it from Megatron's groups
            (0 without torch.distributed).

    Raises:
        RuntimeError: the actor died while starting (the message carries its error) or did not start
            within ``cluster.engine_start_timeout_s``.
    """
    cluster: ClusterConfig = cfg.cluster
    init_ray(cluster)
    replica = _replica_index() if replica is None else replica
    name = engine_actor_name(cfg, replica)
    options: dict[str, Any] = {"name": name, "get_if_exists": True, "max_restarts": 0,
                               "num_cpus": cluster.engine_cpus, "num_gpus": 1 if torch.cuda.is_available() else 0}
    bundle = _engine_bundle(replica)
    if bundle is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(*bundle)
    actor = ray.remote(EngineActor).options(**options).remote(cfg, str(model_dir))
    node_ip = wait_for(actor.node_ip.remote(), actor=name, node_ip="(not started)", what="starting",
                       timeout_s=cluster.engine_start_timeout_s, timeout_field="cluster.engine_start_timeout_s")
    return RemoteEngine(actor, name=name, node_ip=node_ip, call_timeout_s=cluster.engine_call_timeout_s)


def _replica_index() -> int:
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0
    from megatron_rl.megatron.parallel import data_parallel_group

    return data_parallel_group().rank()


def _engine_bundle(replica: int) -> tuple[Any, int] | None:
    """(placement group, bundle index) reserved for this replica's engine by the launch, if any."""
    group = ray.util.get_current_placement_group()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if group is None or group.bundle_count <= world_size + replica:
        return None
    return group, world_size + replica
