"""Weights to a separate rollout engine over torch.distributed, not through Ray's object store.

The feeding rank of a model replica (tp_rank 0, pp_rank 0) and its engine actor form a process group of
their own: rank 0 the trainer, rank 1 the engine (NCCL between their GPUs, gloo between CPU processes; the
group takes any size, e.g. one feeding rank and the workers of an engine that spans several GPUs).
It is built from its own ``TCPStore`` (hosted by the trainer on its node's IP and a free port), so it is
independent of the trainer's torch.distributed world and of the engine's own (vLLM sets one up inside the
actor); nothing is registered with ``torch.distributed``'s global state. vLLM's ``StatelessProcessGroup`` /
``stateless_init_torch_distributed_process_group`` and slime's / NeMo-RL's weight-update groups do the
same. Per weight-sync bucket::

    trainer (rank 0)                                engine actor (rank 1)
    ref = actor.receive_weights.remote(metas)  -->  Receiver.receive(group, metas): buffers reused across
    broadcast(tensor, src=0) for each tensor   ==>    syncs, one broadcast into each
    wait for ref (within the call timeout)     <--  engine.load_weights(tensors)  (in-place reload)

Only the metadata (names, shapes, dtypes: :class:`TensorMeta`) travels as a Ray call argument; the tensors
travel on the group, GPU to GPU with NCCL. :class:`RemoteEngine` (``megatron_rl.cluster.engine``) drives the
trainer side and turns a dead actor or a timeout into an error naming the actor.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ENGINE_RANK", "TRAINER_RANK", "Receiver", "TensorMeta", "TransferGroup", "describe", "open_store"]

TRAINER_RANK, ENGINE_RANK = 0, 1
"""Ranks in a transfer group: the feeding rank, its engine actor."""


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """What the receiver must know to receive one tensor: its name, shape and dtype (a torch dtype name)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{self.name}: dtype {self.dtype!r} is not a torch dtype")
        return dtype

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def describe(tensors: Sequence[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    """The metadata of ``(name, tensor)`` pairs, in order."""
    return [TensorMeta(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")) for name, tensor in tensors]


def open_store(host: str, timeout_s: float, *, size: int = 2) -> dist.TCPStore:
    """The rendezvous store of a transfer group of ``size`` processes, hosted here on a free port
    (``store.port``)."""
    return dist.TCPStore(host, 0, world_size=size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


class TransferGroup:
    """One member of a transfer group (trainer rank 0, engine rank 1, ...), independent of any other group.

    Args:
        backend: the torch.distributed backend object (``ProcessGroupGloo`` / ``ProcessGroupNCCL``).
        rank: this side's rank.
        device: where this side's tensors live (CPU for gloo, this process's GPU for NCCL).
        store: the rendezvous store (kept alive with the group).
    """

    def __init__(self, backend: Any, rank: int, device: torch.device, store: Any) -> None:
        self.backend, self.rank, self.device, self._store = backend, rank, device, store
        self._in_flight: list[torch.Tensor] = []  # copies made by :meth:`send`, alive until the next send

    @classmethod
    def join(cls, *, host: str, port: int, rank: int, backend: str, timeout_s: float, node_ip: str = "",
             store: dist.TCPStore | None = None, size: int = 2) -> TransferGroup:
        """Create this side's group (gloo: blocks until every member joins, at most ``timeout_s``; NCCL
        connects at the first broadcast).

        Args:
            host, port: the store; rank 0 passes the ``store`` it opened with :func:`open_store`.
            rank: 0 for the trainer, 1 for the engine.
            size: members of the group.
            backend: 'nccl' (CUDA tensors, this process's current GPU) or 'gloo' (CPU tensors).
            timeout_s: rendezvous and per-collective timeout.
            node_ip: gloo: the address this process is reached at (the Ray node IP), used unless
                ``GLOO_SOCKET_IFNAME`` names an interface; '' lets gloo resolve the hostname.
        """
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, world_size=size, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore("megatron_rl_weight_transfer", store)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            group = dist.ProcessGroupNCCL(prefixed, rank, size, options)
            device = torch.device("cuda", torch.cuda.current_device())
        elif backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            interface = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
            options._devices = [dist.ProcessGroupGloo.create_device(interface=interface) if interface
                                else dist.ProcessGroupGloo.create_device(hostname=node_ip)]
            group = dist.ProcessGroupGloo(prefixed, rank, size, options)
            device = torch.device("cpu")
        else:
            raise ValueError(f"backend={backend!r} is not allowed; choose one of 'nccl', 'gloo'")
        return cls(group, rank, device, store)

    def broadcast(self, tensor: torch.Tensor, src: int) -> Any:
        """Start broadcasting ``tensor`` (contiguous, on :attr:`device`) from rank ``src``; returns the
        work (``wait()`` / ``is_completed()``)."""
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = src, 0
        return self.backend.broadcast([tensor], options)

    def send(self, tensors: Sequence[torch.Tensor]) -> list[Any]:
        """Start broadcasting ``tensors`` from this side, in order (moved to :attr:`device` if needed)."""
        works, keep = [], []
        for tensor in tensors:
            tensor = tensor.detach()
            if tensor.device != self.device or not tensor.is_contiguous():
                tensor = tensor.to(self.device).contiguous()
                keep.append(tensor)  # alive until its work is done
            works.append(self.broadcast(tensor, self.rank))
        self._in_flight = keep
        return works

    def close(self, *, abort: bool = False) -> None:
        """Release the group (idempotent). ``abort`` (after a failure): give up broadcasts still in flight;
        either may wait for one the peer never takes up to the group's timeout (seen with gloo)."""
        backend, self.backend = self.backend, None
        if backend is not None:
            try:
                if abort:
                    backend.abort()
                else:
                    backend.shutdown()
            except (RuntimeError, AttributeError):  # already broken (a dead peer) or a torch without it
                pass
        self._store = None


class Receiver:
    """The engine side: receives buckets into flat buffers kept across syncs (one per dtype, grown to the
    largest bucket), so a sync after the first allocates nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def receive(self, group: TransferGroup, metas: Sequence[TensorMeta], *, src: int) -> list[tuple[str, torch.Tensor]]:
        """Receive one broadcast per ``metas`` entry from ``src``; the tensors are views of the buffers,
        valid until the next call."""
        needed: dict[torch.dtype, int] = {}
        for meta in metas:
            needed[meta.torch_dtype] = needed.get(meta.torch_dtype, 0) + meta.numel
        for dtype, numel in needed.items():
            buffer = self.buffers.get(dtype)
            if buffer is None or buffer.numel() < numel:
                self.buffers[dtype] = torch.empty(numel, dtype=dtype, device=self.device)
        offsets = dict.fromkeys(needed, 0)
        tensors, works = [], []
        for meta in metas:
            dtype = meta.torch_dtype
            view = self.buffers[dtype][offsets[dtype] : offsets[dtype] + meta.numel].view(meta.shape)
            offsets[dtype] += meta.numel
            tensors.append((meta.name, view))
            works.append(group.broadcast(view, src))
        for work in works:
            work.wait()
        return tensors

    @property
    def buffer_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
