"""Llama <-> Megatron-Core weights: the Qwen2 map without q/k/v bias (same HF names and layouts).

:class:`megatron_rl.megatron.model.GPTShape` reads ``qkv_bias=False`` for ``model_type == "llama"``, and
the shared map then leaves ``linear_qkv.bias`` out.
"""

from megatron_rl.checkpoint.qwen2 import (
    hf_to_megatron_shard,
    load_hf_into_model,
    megatron_param_names,
    megatron_shards_to_hf,
)

__all__ = ["hf_to_megatron_shard", "load_hf_into_model", "megatron_param_names", "megatron_shards_to_hf"]
