"""A rollout engine in its own Ray actor (``rollout.mode=separate``), and the proxy the trainer uses.

In separate ("disaggregated") mode each model replica's feeding rank (tp_rank 0, pp_rank 0) talks to
one engine running in another process, on its own GPU (or CPU cores), possibly on another node::

    engine = connect_engine(cfg, model_dir)     # creates the actor (or finds it), waits for it, joins
                                                # a weight-transfer group with it
    engine.generate(prompt_token_ids, sampling) # same RolloutEngine interface as a local engine
    engine.load_weights(bucket)                 # tensors: torch.distributed broadcast (NCCL / gloo)

The actor is named :func:`engine_actor_name` (replica index + run directory), so a launcher or a
test can find it with ``ray.get_actor``. It is not detached: it belongs to the process that created
it and dies with it, so a crashed trainer never leaves an engine holding a GPU.

Every call has a timeout (``cluster.engine_call_timeout_s``); a dead actor or a call past its timeout
raises ``RuntimeError`` naming the actor, its node and what was being done, so the trainer stops
instead of hanging.

Weights travel on a process group of the feeding rank and the engine actor (``cluster.weight_transport
= "broadcast"``, the default; :mod:`megatron_rl.cluster.transfer`): NCCL from the trainer's GPU to the
engine's, gloo between CPU processes; only names, shapes and dtypes go through Ray. With
``cluster.weight_transport = "object_store"`` (the older path, kept as the benchmark's baseline) tensors
are sent as NumPy arrays (bf16 as its 16-bit pattern): Ray stores them in its shared-memory object store
once and the engine reads them there without a copy on the same node (across nodes Ray moves the bytes),
after a device-to-host copy on GPU.
"""

from __future__ import annotations

import dataclasses
import threading
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
from megatron_rl.cluster.transfer import ENGINE_RANK, TRAINER_RANK, Receiver, TensorMeta, TransferGroup, describe, \
    open_store
from megatron_rl.rollout.base import Rollout, SamplingConfig

__all__ = ["EngineActor", "RemoteEngine", "connect_engine", "engine_actor_name", "set_engine_bundles"]

Packed = list[tuple[str, str, np.ndarray]]
"""Tensors as they travel through the object store: (name, torch dtype name, array of the same bytes)."""

Metas = list[tuple[str, tuple[int, ...], str]]
"""Tensor metadata as it travels in a Ray call: (name, shape, torch dtype name) per tensor."""

HANDSHAKE = 20240917.0
"""The value the trainer broadcasts once when the transfer group is formed (the engine checks it)."""

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
        self.transfer: TransferGroup | None = None
        self.receiver: Receiver | None = None
        self._outgoing: list[torch.Tensor] = []

    def join_transfer(self, host: str, port: int, backend: str, timeout_s: float) -> str:
        """Join the feeding rank's transfer group as rank 1 (blocks until formed); return the device the
        engine receives on. The trainer broadcasts :data:`HANDSHAKE` once: the group is known to work."""
        self.transfer = TransferGroup.join(host=host, port=port, rank=ENGINE_RANK, backend=backend,
                                           timeout_s=timeout_s, node_ip=ray.util.get_node_ip_address())
        self.receiver = Receiver(self.transfer.device)
        handshake = [TensorMeta("handshake", (1,), "float64")]
        ((_, probe),) = self.receiver.receive(self.transfer, handshake, src=TRAINER_RANK)
        if probe.item() != HANDSHAKE:
            raise RuntimeError(f"weight-transfer group: handshake received {probe.item()!r}, expected {HANDSHAKE}")
        return str(self.transfer.device)

    def receive_weights(self, metas: Metas) -> int:
        """Receive one bucket from the feeding rank (one broadcast per tensor, into reused buffers) and
        load it into the engine in place; return the bytes received."""
        metas = [TensorMeta(name, tuple(shape), dtype) for name, shape, dtype in metas]
        tensors = self.receiver.receive(self.transfer, metas, src=TRAINER_RANK)
        self.engine.load_weights(tensors)
        return sum(t.numel() * t.element_size() for _, t in tensors)

    def describe_engine_weights(self) -> Metas:
        """Read the engine's weights (see ``VLLMEngine.engine_weights``) for :meth:`send_engine_weights`."""
        weights = self.engine.engine_weights()
        self._outgoing = [t.to(self.transfer.device).contiguous() for t in weights.values()]
        return [(m.name, m.shape, m.dtype) for m in describe(list(zip(weights, self._outgoing, strict=True)))]

    def send_engine_weights(self) -> None:
        """Broadcast the tensors :meth:`describe_engine_weights` read, in its order."""
        outgoing, self._outgoing = self._outgoing, []
        for work in self.transfer.send(outgoing):
            work.wait()

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
        if self.transfer is not None:
            self.transfer.close()


class RemoteEngine:
    """The :class:`~megatron_rl.rollout.base.RolloutEngine` interface over an :class:`EngineActor`.

    Args:
        actor: handle of a started engine actor.
        name: the actor's Ray name (for messages).
        node_ip: the node it runs on (for messages).
        call_timeout_s: most seconds per call.
        transfer: this side (rank 0) of the weight-transfer group formed with the actor; None: weights go
            through Ray's object store.

    ``sleep`` / ``wake_up`` are no-ops: a separate engine does not share its GPU with the trainer.
    """

    def __init__(self, actor: Any, *, name: str, node_ip: str, call_timeout_s: float,
                 transfer: TransferGroup | None = None) -> None:
        self.actor, self.name, self.node_ip, self.call_timeout_s = actor, name, node_ip, call_timeout_s
        self.transfer = transfer
        self._closed = False

    @property
    def transport(self) -> str:
        """'broadcast' (a torch.distributed group with the actor) or 'object_store'."""
        return "object_store" if self.transfer is None else "broadcast"

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        return self._call("generating", self.actor.generate.remote(prompt_token_ids, sampling))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket into the engine. Broadcast: the metadata goes in a Ray call, each tensor in one
        broadcast from this rank (views of the trainer's parameters stay untouched until it returns)."""
        if self.transfer is None:
            packed = ray.put(pack_tensors(weights))
            self._call("loading weights", self.actor.load_weights.remote(packed))
            return
        bucket = list(weights)
        self._check_open()
        ref = self.actor.receive_weights.remote([(m.name, m.shape, m.dtype) for m in describe(bucket)])
        self._finish("loading weights", ref, self.transfer.send([t for _, t in bucket]))

    def engine_weights(self) -> dict[str, torch.Tensor]:
        """The engine's weights as it computes with them (see ``VLLMEngine.engine_weights``), copied here
        (broadcast from the engine over the transfer group, or through the object store)."""
        if self.transfer is None:
            return dict(unpack_tensors(self._call("reading its weights", self.actor.engine_weights.remote()),
                                       copy=True))
        metas = [TensorMeta(n, tuple(s), d) for n, s, d in
                 self._call("reading its weights", self.actor.describe_engine_weights.remote())]
        tensors = [torch.empty(m.shape, dtype=m.torch_dtype, device=self.transfer.device) for m in metas]
        ref = self.actor.send_engine_weights.remote()
        self._finish("sending its weights", ref, [self.transfer.broadcast(t, ENGINE_RANK) for t in tensors])
        return {m.name: t for m, t in zip(metas, tensors, strict=True)}

    def sleep(self, level: int = 1) -> None:
        """No-op (the engine has its own GPU)."""

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
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
        if self.transfer is not None:
            self.transfer.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"rollout engine actor {self.name!r} is closed")

    def _call(self, what: str, ref: ray.ObjectRef) -> Any:
        self._check_open()
        return wait_for(ref, actor=self.name, node_ip=self.node_ip, what=what, timeout_s=self.call_timeout_s,
                        timeout_field="cluster.engine_call_timeout_s")

    def _finish(self, what: str, ref: ray.ObjectRef, works: list[Any]) -> Any:
        """Wait for the actor's side of a transfer (``ref``) and this side's broadcasts (``works``), within
        ``call_timeout_s`` in all. The actor is polled while the broadcasts run, so a dead engine or one
        that raised stops this rank at once (a broadcast to a dead peer would otherwise wait for the
        group's timeout). On any failure the group is unusable: it is aborted (in the background) and later
        calls raise."""
        try:
            result = wait_for(ref, actor=self.name, node_ip=self.node_ip, what=what, timeout_s=self.call_timeout_s,
                              timeout_field="cluster.engine_call_timeout_s")
            for work in works:
                work.wait()
        except BaseException:
            self._closed = True
            # a broadcast the engine never took holds even an abort until the group's timeout: not this rank
            threading.Thread(target=self.transfer.close, kwargs={"abort": True}, name="weight-transfer-abort",
                             daemon=True).start()
            raise
        return result


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
    ``python -m megatron_rl.cluster.launch`` is). Inside the launch the engine takes the placement-group
    bundle reserved for it (:func:`set_engine_bundles`); elsewhere Ray places it anywhere with the
    resources: ``cluster.engine_cpus`` CPUs and, when this process sees a GPU, one GPU. With
    ``cluster.weight_transport="broadcast"`` this rank and the actor then form their weight-transfer group
    (NCCL when this process has CUDA, gloo otherwise).

    Args:
        cfg: the run's Config (sections rollout, trainer, cluster, ...).
        model_dir: the HF model directory the engine starts from (visible on the engine's node).
        replica: data-parallel index of the model replica; None reads it from Megatron's groups
            (0 without torch.distributed).

    Raises:
        RuntimeError: the actor died while starting or joining the transfer group (the message carries its
            error) or did not start within ``cluster.engine_start_timeout_s``.
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
    transfer = None
    if cluster.weight_transport == "broadcast":
        transfer = _join_transfer(actor, name=name, node_ip=node_ip, cluster=cluster)
    return RemoteEngine(actor, name=name, node_ip=node_ip, call_timeout_s=cluster.engine_call_timeout_s,
                        transfer=transfer)


def _join_transfer(actor: Any, *, name: str, node_ip: str, cluster: ClusterConfig) -> TransferGroup:
    """Form the weight-transfer group with ``actor`` (this process rank 0, hosting the store on its node IP).

    This side's join runs in a thread while the actor's call is awaited: an actor that dies before
    joining fails the call at once instead of leaving this side waiting for the rendezvous timeout."""
    host = ray.util.get_node_ip_address()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout_s = cluster.engine_call_timeout_s
    store = open_store(host, timeout_s)
    ref = actor.join_transfer.remote(host, store.port, backend, timeout_s)
    joined: list[TransferGroup | BaseException] = []

    def join() -> None:
        try:
            group = TransferGroup.join(host=host, port=store.port, rank=TRAINER_RANK, backend=backend,
                                       timeout_s=timeout_s, node_ip=host, store=store)
            group.send([torch.tensor([HANDSHAKE], dtype=torch.float64)])[0].wait()
            joined.append(group)
        except BaseException as err:  # handed to the caller below
            joined.append(err)

    thread = threading.Thread(target=join, name="weight-transfer-join", daemon=True)
    thread.start()
    wait_for(ref, actor=name, node_ip=node_ip, what="joining the weight-transfer group",
             timeout_s=cluster.engine_start_timeout_s, timeout_field="cluster.engine_start_timeout_s")
    thread.join(timeout_s)
    if not joined:
        raise RuntimeError(f"the weight-transfer group with rollout engine actor {name!r} on node {node_ip} did not "
                           f"form within cluster.engine_call_timeout_s={timeout_s:g}s")
    if isinstance(joined[0], BaseException):
        raise RuntimeError(f"the weight-transfer group with rollout engine actor {name!r} on node {node_ip} failed: "
                           f"{joined[0]}") from joined[0]
    return joined[0]


def _replica_index() -> int:
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0
    from megatron_rl.megatron.parallel import data_parallel_group

    return data_parallel_group().rank()


_ENGINE_BUNDLES: list[tuple[Any, int]] = []
"""(placement group, bundle index) of each replica's engine, set by the launch in every trainer actor."""


def set_engine_bundles(bundles: list[tuple[Any, int]]) -> None:
    """Record the placement-group bundles the launch reserved for the separate engines (replica k's at k)."""
    _ENGINE_BUNDLES[:] = bundles


def _engine_bundle(replica: int) -> tuple[Any, int] | None:
    """(placement group, bundle index) reserved for this replica's engine by the launch, if any."""
    return _ENGINE_BUNDLES[replica] if replica < len(_ENGINE_BUNDLES) else None
