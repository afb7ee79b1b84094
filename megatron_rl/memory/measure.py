"""Measured bytes to hold a memory plan against: parameters, gradient buffers, optimizer state and the
activations autograd saves for the backward.

    with SavedActivations(model) as saved:
        train_step(...)                      # or any forward + backward
    saved.peak_bytes                          # largest saved-activation set of one micro-batch forward

Every count de-duplicates by storage (a view keeps its whole storage alive, and two views of one
storage cost it once) and leaves out the storages of the model's own parameters (a linear layer saves
its weight for the backward; that weight is counted as a parameter, not an activation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["SavedActivations", "gradient_buffer_bytes", "optimizer_state_bytes", "parameter_bytes", "storage_bytes"]


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    return str(tensor.device), storage.data_ptr()


def storage_bytes(tensors: Iterable[torch.Tensor], *, exclude: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each storage counted once, whole)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor is None or tensor.device.type == "meta":
            continue
        key = _storage_key(tensor)
        if exclude is not None and key in exclude:
            continue
        seen[key] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (distinct storages: a contiguous parameter buffer counts once)."""
    return storage_bytes(model.parameters())


def gradient_buffer_bytes(ddp_model: torch.nn.Module) -> int:
    """Bytes of the gradient memory of a Megatron DDP model: its ``main_grad`` buffers (one contiguous
    fp32 buffer per dtype group), plus any plain ``.grad`` tensors."""
    grads = [getattr(p, "main_grad", None) for p in ddp_model.parameters()]
    grads += [p.grad for p in ddp_model.parameters()]
    return storage_bytes(g for g in grads if g is not None)


def optimizer_state_bytes(optimizer: Any, *models: torch.nn.Module) -> int:
    """Bytes held by a Megatron optimizer beyond the models it steps: its state tensors (Adam moments,
    step counters) and the parameters it steps that are not the models' own (the fp32 master weights of
    bf16 training and of the distributed optimizer). Storages of the models' parameters and gradient
    buffers are never counted, so a fp32 optimizer that steps the model's parameters in place counts
    its moments only."""
    exclude: set[tuple[str, int]] = set()
    for model in models:
        for param in model.parameters():
            exclude.add(_storage_key(param))
            if getattr(param, "main_grad", None) is not None:
                exclude.add(_storage_key(param.main_grad))
    tensors: list[torch.Tensor] = []
    for chained in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(chained, "optimizer", chained)
        tensors += [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]
        tensors += [p for group in inner.param_groups for p in group["params"]]
    return storage_bytes(tensors, exclude=exclude)


@dataclasses.dataclass
class _Tally:
    storages: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


class SavedActivations:
    """Count the bytes autograd saves for the backward, per micro-batch forward.

    A context manager around ``torch.autograd.graph.saved_tensors_hooks``. Each forward that follows a
    backward (Megatron's schedule runs forward, backward, forward, ...) starts a new tally; tensors saved
    while a backward runs (the forward that activation recompute repeats, one layer at a time) go to
    :attr:`recompute_bytes` instead. The storages of the given models' parameters are never counted.
    """

    def __init__(self, *models: torch.nn.Module) -> None:
        self._exclude: set[tuple[str, int]] = set()
        for model in models:  # parameters in a contiguous DDP buffer share its storage: one key
            self._exclude |= {_storage_key(p) for p in model.parameters()}
        self.tallies: list[_Tally] = []
        self._recompute = _Tally()
        self._backward_seen = True
        self._keep: list[torch.Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "meta":
            return tensor
        key = _storage_key(tensor)
        if key not in self._exclude:
            in_backward = torch._C._current_graph_task_id() != -1
            if in_backward:
                self._recompute.storages[key] = tensor.untyped_storage().nbytes()
            else:
                if self._backward_seen:
                    self.tallies.append(_Tally())
                    self._backward_seen = False
                self.tallies[-1].storages[key] = tensor.untyped_storage().nbytes()
        return tensor

    def _unpack(self, tensor: torch.Tensor) -> torch.Tensor:
        self._backward_seen = True
        return tensor

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def per_forward_bytes(self) -> list[int]:
        """Saved bytes of each forward (one per micro-batch under Megatron's schedule)."""
        return [tally.bytes for tally in self.tallies]

    @property
    def peak_bytes(self) -> int:
        """The largest saved set of one forward (what one micro-batch holds at the start of its backward)."""
        return max(self.per_forward_bytes, default=0)

    @property
    def recompute_bytes(self) -> int:
        """Distinct storages saved during backwards (recomputed forwards); each lives for one unit only."""
        return self._recompute.bytes
