"""Megatron distributed checkpoints of the policy, its optimizer and the RNG state (``megatron.core.dist_checkpointing``).

Every rank saves its own shards into one directory (synchronously: the asynchronous writer spawns a
process, so scripts that save need an ``if __name__ == "__main__":`` guard either way); a checkpoint
can be loaded at another TP/PP/DP layout, because each tensor is stored with its global shape and
offsets. The optimizer state is stored per parameter (``fully_reshardable`` for the distributed
optimizer). ``optimizer=None`` saves or loads the model alone (the converter's checkpoints are
model-only: see :mod:`megatron_rl.checkpoint.convert` for the directory format).

The RNG state (Python, NumPy, torch CPU and CUDA generators, and Megatron's RNG tracker, whose states
differ per TP rank) is stored per (PP rank, TP rank), shared by the data-parallel replicas as in
Megatron-LM. It is restored only at the layout it was saved at: at another TP/PP the ranks' random
streams have no counterpart, so :func:`load_checkpoint` leaves them as they are and says so.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_rl.megatron.optim import unwrap_ddp

__all__ = ["get_rng_state", "load_checkpoint", "save_checkpoint", "set_rng_state"]

log = logging.getLogger(__name__)

_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
RNG_KEY = "rng_state"
FORMAT_KEY = "megatron_rl"  # the same entry of common.pt as megatron_rl.checkpoint.convert.FORMAT_KEY
FORMAT_VERSION = 1

# The megatron code that _load_distributed_optimizer_state works around (checked by a test).
DISTRIB_OPTIMIZER_RELOAD_TARGET = ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
                                   "dst_tensors[key].copy_(tensors[key])")


def _layout() -> dict[str, int]:
    """This rank's TP/PP/DP sizes and ranks (from the groups of megatron_rl.megatron.parallel)."""
    import torch.distributed as dist

    from megatron_rl.megatron.parallel import data_parallel_group, pipeline_parallel_group, tensor_parallel_group

    groups = {"tp": tensor_parallel_group(), "pp": pipeline_parallel_group(), "dp": data_parallel_group()}
    out = {}
    for name, group in groups.items():
        out[name], out[f"{name}_rank"] = dist.get_world_size(group), dist.get_rank(group)
    return out


def _rng_object(layout: dict[str, int], data: Any):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(RNG_KEY, data, (layout["pp"], layout["tp"]), (layout["pp_rank"], layout["tp_rank"]),
                         replica_id=layout["dp_rank"])


def _sharded_state(model: torch.nn.Module, optimizer: Any, *, is_loading: bool, rng: Any = None) -> dict:
    model_state = unwrap_ddp(model).sharded_state_dict()
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                          metadata=_OPTIMIZER_METADATA)
    if rng is not None:
        state[RNG_KEY] = rng
    return state


def get_rng_state() -> dict[str, Any]:
    """This process's generator states as tensors and plain numbers (safe for ``weights_only`` loading)."""
    from megatron.core import tensor_parallel

    version, mt_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "tracker": {name: state.clone() for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    from megatron.core import tensor_parallel

    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: Any = None, *, iteration: int) -> None:
    """Save model (+ optimizer unless None) + RNG state + ``iteration`` to ``ckpt_dir`` (created; must be
    empty). Collective."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    layout = _layout()
    state = _sharded_state(model, optimizer, is_loading=False, rng=_rng_object(layout, get_rng_state()))
    state["iteration"] = iteration
    state[FORMAT_KEY] = {"version": FORMAT_VERSION, "has_optimizer": optimizer is not None, "has_rng_state": True,
                         "tp": layout["tp"], "pp": layout["pp"], "dp": layout["dp"]}
    dist_checkpointing.save(state, str(ckpt_dir), async_sharded_save=False)


def load_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: Any = None, *,
                    load_rng: bool = True) -> int:
    """Load a checkpoint directory (of :func:`save_checkpoint`, or converted from HF) into this rank's model
    and, unless None, optimizer (any layout); restore the RNG state when it was saved at this TP/PP layout
    and ``load_rng``. Return the saved iteration (0 for a converted checkpoint). Collective.

    Raises:
        FileNotFoundError: ``ckpt_dir`` does not exist.
        ValueError: an optimizer is given but the checkpoint holds none.
    """
    from megatron.core import dist_checkpointing

    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(ckpt_dir)!r} does not exist")
    content = dist_checkpointing.load_common_state_dict(str(ckpt_dir)).get(FORMAT_KEY, {})
    if optimizer is not None and not content.get("has_optimizer", True):
        raise ValueError(f"{ckpt_dir} holds no optimizer state (a model-only checkpoint); load it with optimizer=None")
    rng = _rng_to_load(ckpt_dir, content) if load_rng else None
    inner = _single(optimizer) if optimizer is not None else None
    distributed = hasattr(inner, "_init_optimizer_states_with_dummy_values")
    if distributed:
        # DESIGN.md item 9: with the torch-Adam fallback (no apex / TE) the state tensors only exist
        # after a step; create them so that the load can fill them in place.
        inner._init_optimizer_states_with_dummy_values()
    state = _sharded_state(model, optimizer, is_loading=True, rng=rng)
    _drop_absent_extra_states(state["model"], ckpt_dir)
    state["iteration"] = None
    loaded = dist_checkpointing.load(state, str(ckpt_dir))
    unwrap_ddp(model).load_state_dict(loaded["model"], strict=False)
    if distributed:
        _load_distributed_optimizer_state(inner, loaded["optimizer"])
    elif optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if rng is not None:
        set_rng_state(loaded[RNG_KEY])
    return int(loaded.get("iteration") or 0)


def _drop_absent_extra_states(model_state: dict, ckpt_dir: str | Path) -> list[str]:
    """Remove from the model's sharded state dict the extra-state objects (``..._extra_state``: no weights,
    Transformer Engine's FP8 metadata) that the checkpoint does not hold, and return their keys; those
    modules keep their defaults. A checkpoint converted from HF, or saved without Transformer Engine,
    lacks the objects that TE modules add (e.g. the final norm's when TE is installed); Megatron would
    otherwise refuse the load. Tensors are never dropped: a missing weight still fails the load."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_rl.checkpoint.megatron_io import CheckpointReader
    from megatron_rl.checkpoint.qwen2 import is_extra_state

    stored = set(CheckpointReader(ckpt_dir).object_keys())
    absent = [name for name, value in model_state.items() if isinstance(value, ShardedObject)
              and is_extra_state(value.key) and value.unique_key not in stored]
    for name in absent:
        del model_state[name]
    if absent:
        log.info("%s: %d extra-state objects not in the checkpoint (left at their defaults): %s", ckpt_dir,
                 len(absent), ", ".join(absent[:4]) + (", ..." if len(absent) > 4 else ""))
    return absent


def _rng_to_load(ckpt_dir: str | Path, content: dict) -> Any:
    """The RNG object to load at this layout, or None (with a log line) when the checkpoint has none for it."""
    from megatron_rl.checkpoint.megatron_io import CheckpointReader

    layout = _layout()
    wanted = _rng_object(layout, None)
    stored = [key for key in CheckpointReader(ckpt_dir).object_keys() if key.startswith(f"{RNG_KEY}/")]
    if wanted.unique_key in stored:
        return wanted
    if stored:
        log.warning("%s: RNG state saved at TP=%s/PP=%s, loading at TP=%s/PP=%s: not restored (per-rank streams)",
                    ckpt_dir, content.get("tp"), content.get("pp"), layout["tp"], layout["pp"])
    return None


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
