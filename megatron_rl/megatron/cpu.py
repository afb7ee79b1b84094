"""CPU compatibility shims for megatron-core (gloo, no CUDA): every patch in one place.

megatron-core assumes a GPU in a handful of spots. On a machine without CUDA,
:func:`apply_cpu_shims` patches exactly those spots (DESIGN.md, "Running on CPU"):

1. ``torch.cuda.current_device`` returns ``torch.device("cpu")``: megatron uses it as the
   device of every buffer it allocates.
2. The RNG tracker runs on the CPU generator: ``tensor_parallel.random`` sees a ``torch``
   whose ``cuda.get_rng_state`` / ``cuda.manual_seed`` are the CPU ones, and its
   ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read and write the CPU generator.
   Attention always runs under the tracker's ``fork()``, so seeding cannot be skipped. Random draws
   inside a fork (dropout) make megatron log "CPU RNG state changed within GPU RNG context": expected
   here, since the tracker's stream *is* the CPU generator while forked.
3. ``torch.cuda.synchronize`` is a no-op (p2p communication calls it).
4. ``pipeline_parallel.schedules`` hard-codes ``device="cuda"``: that module gets a torch
   proxy whose tensor factories map a cuda device to the cpu.
5. ``Tensor.cuda`` returns the tensor itself (PP with tied embeddings calls ``.cuda()``).
6. ``transformer.utils.get_default_causal_mask`` (used when a forward gets ``attention_mask=None``)
   allocates with ``device="cuda"``: that module gets the same torch proxy as in 4. So do the
   optimizer modules (``optimizer.optimizer``, ``optimizer.clip_grads``, ``optimizer.grad_scaler``,
   ``optimizer.distrib_optimizer``) and ``core.utils`` (found-inf flags, grad norms, loss scales).
7. The optimizers sort parameters by ``param.type()`` and accept only ``torch.cuda.*Tensor``:
   ``Tensor.type()`` (no argument) reports the cuda type name of a cpu tensor to callers in
   ``megatron.core.optimizer`` (only there; everyone else sees the true name).

Nothing is patched when CUDA is available. Applying twice is a no-op. The targets are
listed in :data:`SHIM_TARGETS` so that tests can check that the megatron source each shim
relies on is still there (a megatron upgrade that moves it fails the test, not a run).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import torch

__all__ = ["CUDA_TO_CPU_MODULES", "SHIM_TARGETS", "CudaToCpuTorch", "apply_cpu_shims", "cpu_shims_applied"]

# (module, attribute, source pattern the shim exists for); checked by tests/megatron/test_cpu_shims.py.
SHIM_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding", "torch.cuda.current_device()"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker", "torch.cuda.get_rng_state()"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker", "torch.cuda.manual_seed(seed)"),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker", "_set_cuda_rng_state("),
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker", "_get_cuda_rng_state("),
    ("megatron.core.tensor_parallel.random", "model_parallel_cuda_manual_seed", "torch.cuda.manual_seed("),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", "torch.cuda.random.get_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", "default_generator"),
    ("megatron.core.pipeline_parallel.p2p_communication", "P2PCommunicator", "torch.cuda.current_device()"),
    ("megatron.core.pipeline_parallel.p2p_communication", "P2PCommunicator", "torch.cuda.synchronize()"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining", 'device="cuda"'),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_without_interleaving",
     'device="cuda"'),
    ("megatron.core.models.common.language_module.language_module", "LanguageModule", "weight.data.cuda()"),
    ("megatron.core.transformer.utils", "get_default_causal_mask", 'device="cuda"'),
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer", "device='cuda'"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "'torch.cuda.FloatTensor'"),
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32", "device='cuda'"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", "device='cuda'"),
    ("megatron.core.optimizer.grad_scaler", "MegatronGradScaler", "device='cuda'"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer", "device='cuda'"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "'torch.cuda.FloatTensor'"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "torch.cuda.current_device()"),
)

# Modules whose ``torch`` becomes a :class:`CudaToCpuTorch` (shims 4 and 6).
CUDA_TO_CPU_MODULES: tuple[str, ...] = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",
)
_OPTIMIZER_PACKAGE = "megatron.core.optimizer"
_CPU_TO_CUDA_TYPE = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                     "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}

_APPLIED = False


def cpu_shims_applied() -> bool:
    """True once :func:`apply_cpu_shims` has patched megatron (never on a CUDA machine)."""
    return _APPLIED


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_op_synchronize(device: Any = None) -> None:
    return None


def _tensor_cuda_identity(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Stand-in for megatron's ``_get_cuda_rng_state``: the CPU generator's state."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """Stand-in for megatron's ``_set_cuda_rng_state``: set the CPU generator's state."""
    torch.set_rng_state(new_state)


def _cpu_rng_state_of_device(device: Any = "cuda") -> torch.Tensor:
    """Stand-in for ``torch.cuda.get_rng_state``."""
    return torch.get_rng_state()


def _cpu_manual_seed(seed: int) -> None:
    """Stand-in for ``torch.cuda.manual_seed``: seeds the CPU generator."""
    torch.manual_seed(seed)


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _tensor_type_cuda_names_for_optimizer(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``Tensor.type``, except that a no-argument call from ``megatron.core.optimizer`` reports a cpu
    float tensor under its cuda type name (shim 7)."""
    result = _ORIGINAL_TENSOR_TYPE(self, *args, **kwargs)
    if args or kwargs:
        return result
    caller = sys._getframe(1).f_globals.get("__name__", "")
    if caller == _OPTIMIZER_PACKAGE or caller.startswith(_OPTIMIZER_PACKAGE + "."):
        return _CPU_TO_CUDA_TYPE.get(result, result)
    return result


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaToCpuTorch(types.ModuleType):
    """A stand-in for the ``torch`` module inside one megatron module: tensor factories given
    ``device="cuda"`` allocate on the cpu; ``cuda.get_rng_state``/``cuda.manual_seed`` are the CPU
    generator's. Every other attribute is torch's own."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like", "ones_like")

    def __init__(self) -> None:
        super().__init__("torch")
        self._cuda = types.SimpleNamespace(get_rng_state=_cpu_rng_state_of_device, manual_seed=_cpu_manual_seed)

    def __getattr__(self, name: str) -> Any:
        if name == "cuda":
            return _CudaNamespace(self._cuda)
        value = getattr(torch, name)
        if name in CudaToCpuTorch._FACTORIES:
            return _cpu_factory(value)
        return value


class _CudaNamespace:
    """``torch.cuda`` with the RNG entry points overridden; the rest delegates to torch.cuda."""

    def __init__(self, overrides: types.SimpleNamespace) -> None:
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        if hasattr(self._overrides, name):
            return getattr(self._overrides, name)
        return getattr(torch.cuda, name)


def _cpu_factory(factory: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    wrapped.__name__ = getattr(factory, "__name__", "factory")
    return wrapped


def apply_cpu_shims() -> bool:
    """Patch megatron-core and ``torch.cuda`` for CPU-only runs; return whether shims are active.

    Does nothing (returns False) when CUDA is available. Idempotent: a second call changes nothing.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.current_device = _cpu_current_device  # 1
    tp_random.torch = CudaToCpuTorch()  # 2
    tp_random._get_cuda_rng_state = _cpu_get_rng_state
    tp_random._set_cuda_rng_state = _cpu_set_rng_state
    torch.cuda.synchronize = _no_op_synchronize  # 3
    for module_name in CUDA_TO_CPU_MODULES:  # 4 and 6
        importlib.import_module(module_name).torch = CudaToCpuTorch()
    torch.Tensor.cuda = _tensor_cuda_identity  # 5
    torch.Tensor.type = _tensor_type_cuda_names_for_optimizer  # 7
    _APPLIED = True
    return True
