"""The optimizer state and the gradient buffers, out of device memory while the rollout engine
generates (colocated runs) and back before the update, as verl's and slime's colocated modes do.

What :class:`OptimizerOffload` moves, on every rank:

* the fp32 master weights of bf16 training (Megatron's ``Float16OptimizerWithFloat16Params`` and
  distributed optimizer keep them apart from the model's bf16 parameters). With fp32 training the
  optimizer steps the model's own parameters: those stay, since the weight sync and the logprob
  passes read them (a tensor sharing storage with a model parameter is never moved);
* the optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``), copied into pinned host
  buffers that are kept for the run (one host allocation per tensor, reused every step);
* the gradient buffers of Megatron's DDP (one contiguous fp32 buffer per dtype): released, not
  copied (every :func:`~megatron_rl.megatron.train_step.train_step` zeroes them before its first
  micro-batch), with Megatron's own ``offload_to_cpu`` / ``reload_from_cpu`` of the buffer (its
  storage shrinks to 0 bytes; the parameters' ``main_grad`` views stay valid and come back zeroed).

Without CUDA the state already lives in host memory: nothing is copied (``copied_bytes`` is 0), but
the gradient buffers are still released and re-allocated, so a CPU run goes through the same
bookkeeping (and frees that memory while the engine generates)::

    offload = OptimizerOffload(ddp_model, optimizer)
    offload.to_host()     # after the update
    ...                   # weight push, generation
    offload.to_device()   # before the next update
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["OffloadItem", "OptimizerOffload"]


@dataclasses.dataclass(frozen=True)
class OffloadItem:
    """One tensor that :meth:`OptimizerOffload.to_host` moves or releases."""

    kind: str
    """'master' (fp32 master weight), 'state' (an optimizer state tensor) or 'grad_buffer'."""
    name: str
    """The state key ('exp_avg', 'exp_avg_sq', 'step', ...), 'param' for a master weight, or the
    buffer's dtype for a gradient buffer."""
    num_bytes: int


class OptimizerOffload:
    """Moves one rank's optimizer state and gradient buffers to host memory and back (see the module).

    Args:
        model: the :func:`~megatron_rl.megatron.optim.wrap_ddp` model (its parameters never move;
            its gradient buffers are released).
        optimizer: the Megatron optimizer of ``model`` (a ``ChainedOptimizer`` or one optimizer).
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any) -> None:
        self.model = model
        self.optimizer = optimizer
        self.on_host = False
        self._host: dict[tuple[int, str], torch.Tensor] = {}  # pinned copies, reused every cycle
        self._home: dict[tuple[int, str], torch.device] = {}  # where each tensor moved to the host came from

    def items(self) -> list[OffloadItem]:
        """What :meth:`to_host` moves (master weights and state) or releases (gradient buffers), in order."""
        out = [OffloadItem("master", "param", _nbytes(p)) for p in self._masters()]
        out += [OffloadItem("state", key, _nbytes(value)) for _, _, key, value in self._state_tensors()]
        out += [OffloadItem("grad_buffer", str(buffer.grad_dtype).removeprefix("torch."), _nbytes(buffer.grad_data))
                for buffer in self._grad_buffers()]
        return out

    @torch.no_grad()
    def to_host(self) -> dict[str, float]:
        """Master weights and optimizer state to pinned host memory, gradient buffers released.

        Returns ``{"optimizer_bytes": master weights + state, "grad_bytes": gradient buffers released,
        "copied_bytes": bytes copied from the device (0 without CUDA)}``. Already on the host: zeros."""
        if self.on_host:
            return _report(0, 0, 0)
        for param in self._masters():
            param.grad = None  # a view of the gradient buffer (released below); set again by the next step
        optimizer_bytes, copied = self._move_state(self._to_host)
        grad_bytes = 0
        for buffer in self._grad_buffers():
            if buffer.grad_data.untyped_storage().size():
                grad_bytes += _nbytes(buffer.grad_data)
                with warnings.catch_warnings():  # Megatron's call of the deprecated Tensor.storage()
                    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                    buffer.offload_to_cpu(move_params=False, move_grads=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        self.on_host = True
        return _report(optimizer_bytes, grad_bytes, copied)

    def _move_state(self, move) -> tuple[int, int]:
        """``move(key, tensor) -> (tensor, bytes copied)`` applied to every master weight and optimizer
        state tensor; returns (their bytes, bytes copied)."""
        optimizer_bytes = copied = 0
        for param in self._masters():
            optimizer_bytes += _nbytes(param)
            param.data, moved = move((id(param), "param"), param.data)
            copied += moved
        for param, state, key, value in self._state_tensors():
            optimizer_bytes += _nbytes(value)
            state[key], moved = move((id(param), key), value)
            copied += moved
        return optimizer_bytes, copied

    @torch.no_grad()
    def to_device(self) -> dict[str, float]:
        """Undo :meth:`to_host`: state back on the compute device, gradient buffers re-allocated (zeroed).
        Returns the same keys as :meth:`to_host` (bytes brought back). On the device already: zeros."""
        if not self.on_host:
            return _report(0, 0, 0)
        grad_bytes = 0
        for buffer in self._grad_buffers():
            if buffer.grad_data_size:
                grad_bytes += buffer.grad_data_size * buffer.grad_data.element_size()
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
                    buffer.reload_from_cpu(move_params=False, move_grads=True)
        optimizer_bytes, copied = self._move_state(self._to_device)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.on_host = False
        return _report(optimizer_bytes, grad_bytes, copied)

    # -- what moves --------------------------------------------------------------------------------

    def _inner_optimizers(self) -> Iterator[torch.optim.Optimizer]:
        """The torch optimizers inside the Megatron one (a stage without parameters may have none)."""
        for megatron_optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(megatron_optimizer, "optimizer", None)
            if inner is not None:
                yield inner

    def _masters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer steps that are not (views of) the model's own parameters."""
        model_storages = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        out = []
        for inner in self._inner_optimizers():
            for group in inner.param_groups:
                out += [p for p in group["params"] if p.untyped_storage().data_ptr() not in model_storages]
        return out

    def _state_tensors(self) -> list[tuple[torch.Tensor, dict, str, torch.Tensor]]:
        """(parameter, its state dict, key, tensor) of every tensor in the optimizer state."""
        out = []
        for inner in self._inner_optimizers():
            for param, state in inner.state.items():
                out += [(param, state, key, value) for key, value in state.items() if isinstance(value, torch.Tensor)]
        return out

    def _grad_buffers(self) -> list[Any]:
        """Megatron DDP's ``_ParamAndGradBuffer`` objects (dense and expert-parallel) whose gradients
        have storage of their own (not shared with the parameters, as Megatron's MXFP8 buffers are)."""
        buffers = [*getattr(self.model, "buffers", []), *getattr(self.model, "expert_parallel_buffers", [])]
        return [b for b in buffers if b.param_data is None or
                b.param_data.untyped_storage().data_ptr() != b.grad_data.untyped_storage().data_ptr()]

    # -- moving ------------------------------------------------------------------------------------

    def _to_host(self, key: tuple[int, str], tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``tensor`` in (pinned, reused) host memory, and the bytes copied (0: it was there already,
        as the CPU's and torch Adam's ``step`` tensors are)."""
        if tensor.device.type == "cpu":
            return tensor, 0
        host = self._host.get(key)
        if host is None or host.shape != tensor.shape or host.dtype != tensor.dtype:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
            self._host[key] = host
        host.copy_(tensor)
        self._home[key] = tensor.device
        return host, _nbytes(tensor)

    def _to_device(self, key: tuple[int, str], tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``tensor`` back where :meth:`_to_host` found it, and the bytes copied."""
        home = self._home.pop(key, None)
        if home is None:
            return tensor, 0
        return tensor.to(home, non_blocking=True), _nbytes(tensor)


def _report(optimizer_bytes: int, grad_bytes: int, copied_bytes: int) -> dict[str, float]:
    return {"optimizer_bytes": float(optimizer_bytes), "grad_bytes": float(grad_bytes),
            "copied_bytes": float(copied_bytes)}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
