"""Megatron shards -> full HF-named tensors in buckets of bounded bytes -> the rollout engine.

:class:`WeightSync` (``sync.py``) runs collectively on every rank of a model replica: PP send to the
first stage, TP gather, QKV / gate-up un-fusing and vocabulary cut through the checkpoint map
(:mod:`megatron_rl.checkpoint.qwen2`), cast, buckets that keep fused groups whole; rank 0 of each
replica feeds the engine. ``plan.py`` holds the once-per-model plan (names, owners, shapes, buckets).
"""

from megatron_rl.weight_sync.plan import DEFAULT_BUCKET_BYTES, Plan, build_plan, fused_key, pack_buckets
from megatron_rl.weight_sync.sync import WeightSync

__all__ = ["DEFAULT_BUCKET_BYTES", "Plan", "WeightSync", "build_plan", "fused_key", "pack_buckets"]
