"""torch.distributed + Megatron-Core model-parallel state: the only module that touches
``megatron.core.parallel_state``. The rest of the package gets plain values (:class:`ParallelInfo`)
and process groups from the accessors below."""

from __future__ import annotations

import dataclasses
import os
import socket

import torch
import torch.distributed as dist

from megatron_rl.megatron.cpu import apply_cpu_shims

__all__ = [
    "ParallelInfo",
    "barrier",
    "data_parallel_group",
    "destroy_parallel",
    "init_parallel",
    "local_world_env",
    "model_parallel_group",
    "pipeline_parallel_group",
    "tensor_parallel_group",
]


@dataclasses.dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the TP x PP x DP grid (plain values, no groups)."""

    rank: int  # global rank
    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str  # "gloo" or "nccl"


def init_parallel(
    tp: int = 1, pp: int = 1, dp: int | None = None, backend: str | None = None, seed: int = 0
) -> ParallelInfo:
    """Initialise torch.distributed (if needed), Megatron's TP/PP/DP groups and its RNG tracker.

    The default process group is created from the env:// variables (``MASTER_ADDR``, ``MASTER_PORT``,
    ``RANK``, ``WORLD_SIZE``) when it does not exist yet; an existing one is reused. On a machine without
    CUDA the backend is gloo and the CPU shims (:mod:`megatron_rl.megatron.cpu`) are applied first.

    Args:
        tp: tensor-parallel size.
        pp: pipeline-parallel size.
        dp: data-parallel size; None means ``world_size // (tp * pp)``. Given, it must equal that.
        backend: "gloo" or "nccl"; None picks nccl when CUDA is available, else gloo.
        seed: base seed of Megatron's RNG tracker (``model_parallel_cuda_manual_seed``). Without CUDA
            this also re-seeds the global CPU generator with ``seed`` (Megatron's default "cuda" stream
            is the CPU generator there).

    Raises:
        ValueError: a size is not positive, ``tp * pp`` does not divide the world size, ``dp`` disagrees
            with it, or an existing process group uses a different backend than ``backend``.
    """
    for name, value in (("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r} must be 'gloo' or 'nccl'")
    if not cuda:
        apply_cpu_shims()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # With nccl, CPU tensors (batch shapes, loss totals, agreement flags) travel on gloo: one group
        # serves both devices, and Megatron's subgroups inherit it.
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if backend == "nccl" else backend,
                                init_method="env://")
    elif backend not in str(dist.get_backend()):
        raise ValueError(f"backend={backend!r} but the existing process group uses {dist.get_backend()!r}")
    world_size = dist.get_world_size()
    if world_size % (tp * pp):
        raise ValueError(f"tp={tp} x pp={pp} does not divide world_size={world_size}")
    implied_dp = world_size // (tp * pp)
    if dp is not None and dp != implied_dp:
        raise ValueError(f"dp={dp} but world_size={world_size} / (tp={tp} x pp={pp}) = {implied_dp}")

    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return ParallelInfo(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        backend=backend,
    )


def tensor_parallel_group() -> dist.ProcessGroup:
    """The tensor-parallel process group of this rank (after :func:`init_parallel`)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def pipeline_parallel_group() -> dist.ProcessGroup:
    """The pipeline-parallel process group of this rank (after :func:`init_parallel`)."""
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def data_parallel_group() -> dist.ProcessGroup:
    """The data-parallel process group of this rank (after :func:`init_parallel`)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def model_parallel_group() -> dist.ProcessGroup:
    """The TP x PP group of this rank's model replica (after :func:`init_parallel`)."""
    from megatron.core import parallel_state

    return parallel_state.get_model_parallel_group()


def barrier() -> None:
    """Wait for every rank (a no-op without torch.distributed or with one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def local_world_env() -> dict[str, str]:
    """The env:// variables of a one-process world on a free local port (for runs started without
    torchrun, and in-process checks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (safe to call when not initialised)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
