"""HF <-> Megatron-Core checkpoints.

- ``qwen2`` / ``llama``: the declarative name map and fused layouts, in memory (one model family each).
- ``layout``: where each tensor lives in a Megatron distributed checkpoint, from the HF config alone.
- ``convert``: ``hf_to_megatron``, ``megatron_to_hf``, ``write_hf_checkpoint`` (streaming, atomic), and the
  definition of a *Megatron checkpoint directory*; ``hf_io`` / ``megatron_io`` read and write the two sides.
- ``distributed``: ``save_checkpoint`` / ``load_checkpoint`` of model (+ optimizer, + RNG state) from
  running ranks, at any TP/PP/DP layout.

See docs/convert.md.
"""
