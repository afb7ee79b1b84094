"""A CPU stand-in for a Transformer Engine GPTModel: a local-spec model presented under TE's names.

Transformer Engine needs CUDA, so on CPU no TE model can be built. What the name map, the converters and
the weight sync see of a model is its parameter names, shapes and state dict, so the stand-in gives a
local model exactly what TE's layers would show there, without taking the names from the product's map:

- every parameter whose key in the model's own ``sharded_state_dict()`` (where Megatron applies the local
  spec's ``sharded_state_dict_keys_map``) names another module moves there: ``input_layernorm.weight``
  becomes ``self_attention.linear_qkv.layer_norm_weight``, held by ``linear_qkv`` as TE's
  ``LayerNormLinear`` holds it, and the norm module is replaced by one that computes the same RMSNorm
  with that weight (so the forward is unchanged, bit for bit);
- the final norm gets an ``_extra_state`` tensor (empty uint8, like TE's RMSNorm op without FP8), so state
  dicts and distributed checkpoints carry a tensor-valued extra state as TE models do.

What it cannot show: TE's kernels (fused attention, TE GEMMs), TE's extra state on the linear layers, and any
name TE's spec would produce that Megatron's key map does not know; the GPU test in
tests/megatron/test_model.py checks those against a real TE model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAYER_PREFIX = "decoder.layers."


class NormWithWeightOfNextLinear(torch.nn.Module):
    """RMSNorm whose weight is held by the next linear module (TE's fused norm + linear), not by itself."""

    def __init__(self, norm: torch.nn.Module, owner: torch.nn.Module, attr: str) -> None:
        super().__init__()
        # Plain attributes, not submodules: registering them would list the weight under its old name.
        object.__setattr__(self, "_shape", tuple(norm.normalized_shape))
        object.__setattr__(self, "_eps", norm.eps)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_attr", attr)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden, self._shape, getattr(self._owner, self._attr), self._eps)


def _with_te_extra_state(module: torch.nn.Module) -> None:
    """Give ``module`` an ``_extra_state`` entry like TE's RMSNorm op: an empty uint8 tensor (no FP8 state)."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is not None and state.numel():
            raise ValueError("the stand-in carries no FP8 state")

    cls = type(module)
    module.__class__ = type(f"TEStandIn{cls.__name__}", (cls,), {"get_extra_state": get_extra_state,
                                                                  "set_extra_state": set_extra_state})


def present_under_te_names(model: torch.nn.Module) -> torch.nn.Module:
    """Rename ``model``'s parameters in place to the names Megatron stores them under in its sharded state
    dict (the TE names; needs Megatron's parallel state, e.g. a one-process world), as described in the
    module docstring; return the model (``layer_spec`` set to "te")."""
    sharded = model.sharded_state_dict()
    for name, param in list(model.named_parameters()):
        if not name.startswith(LAYER_PREFIX):
            continue
        index, _ = name[len(LAYER_PREFIX):].split(".", 1)
        te_name = f"{LAYER_PREFIX}{index}.{sharded[name].key[len(LAYER_PREFIX):]}"
        if te_name == name:
            continue
        old_path, _ = name.rsplit(".", 1)
        owner_path, attr = te_name.rsplit(".", 1)
        owner = model.get_submodule(owner_path)
        norm = model.get_submodule(old_path)
        parent_path, child = old_path.rsplit(".", 1)
        owner.register_parameter(attr, param)
        setattr(model.get_submodule(parent_path), child, NormWithWeightOfNextLinear(norm, owner, attr))
    if hasattr(model, "decoder") and getattr(model.decoder, "final_layernorm", None) is not None:
        _with_te_extra_state(model.decoder.final_layernorm)
    model.layer_spec = "te"
    return model
