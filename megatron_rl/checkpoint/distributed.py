"""Megatron distributed checkpoints of the policy and its optimizer (``megatron.core.dist_checkpointing``).

Every rank saves its own shards into one directory (synchronously: the asynchronous writer spawns a
process, so scripts that save need an ``if __name__ == "__main__":`` guard either way); a checkpoint
can be loaded at another TP/PP/DP layout, because each tensor is stored with its global shape and
offsets. The optimizer state is stored per parameter (``fully_reshardable`` for the distributed
optimizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_rl.megatron.optim import unwrap_ddp

__all__ = ["load_checkpoint", "save_checkpoint"]

_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

# The megatron code that _load_distributed_optimizer_state works around (checked by a test).
DISTRIB_OPTIMIZER_RELOAD_TARGET = ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
                                   "dst_tensors[key].copy_(tensors[key])")


def _sharded_state(model: torch.nn.Module, optimizer: Any, *, is_loading: bool) -> dict:
    model_state = unwrap_ddp(model).sharded_state_dict()
    return {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=_OPTIMIZER_METADATA),
    }


def save_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: Any, *, iteration: int) -> None:
    """Save model + optimizer (+ ``iteration``) to ``ckpt_dir`` (created; must be empty). Collective."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = _sharded_state(model, optimizer, is_loading=False)
    state["iteration"] = iteration
    dist_checkpointing.save(state, str(ckpt_dir), async_sharded_save=False)


def load_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: Any) -> int:
    """Load a :func:`save_checkpoint` directory into this rank's model and optimizer (any layout);
    return the saved iteration. Collective.

    Raises:
        FileNotFoundError: ``ckpt_dir`` does not exist.
    """
    from megatron.core import dist_checkpointing

    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(ckpt_dir)!r} does not exist")
    inner = _single(optimizer)
    distributed = hasattr(inner, "_init_optimizer_states_with_dummy_values")
    if distributed:
        # DESIGN.md item 9: with the torch-Adam fallback (no apex / TE) the state tensors only exist
        # after a step; create them so that the load can fill them in place.
        inner._init_optimizer_states_with_dummy_values()
    state = _sharded_state(model, optimizer, is_loading=True)
    state["iteration"] = None
    loaded = dist_checkpointing.load(state, str(ckpt_dir))
    unwrap_ddp(model).load_state_dict(loaded["model"], strict=False)
    if distributed:
        _load_distributed_optimizer_state(inner, loaded["optimizer"])
    else:
        optimizer.load_state_dict(loaded["optimizer"])
    return int(loaded["iteration"])


def _load_distributed_optimizer_state(inner: Any, state_dict: dict) -> None:
    """DESIGN.md item 10, for the torch-Adam fallback: the checkpoint holds ``param``, ``exp_avg`` and
    ``exp_avg_sq`` per parameter while torch's Adam state also has ``step``, which megatron then tries
    to copy (KeyError): copy only the keys the checkpoint has. Megatron also sets one shared ``step``
    tensor on every parameter, which torch's Adam would increment once per parameter per step: give
    each parameter its own copy."""
    import types

    def set_present_keys(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        for key, tensor in tensors.items():
            if key != "step" and key in destination:
                destination[key].copy_(tensor)

    if inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        raise NotImplementedError("reloading the precision-aware distributed optimizer is not supported")
    inner._set_main_param_and_optimizer_states = types.MethodType(set_present_keys, inner)
    try:
        inner.load_state_dict(state_dict)
    finally:
        del inner._set_main_param_and_optimizer_states
    for param_state in inner.optimizer.state.values():
        if "step" in param_state:
            param_state["step"] = param_state["step"].detach().clone()


def _single(optimizer: Any) -> Any:
    """The one optimizer inside a ChainedOptimizer (dense models have one param group family)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    return chained[0] if chained and len(chained) == 1 else optimizer
