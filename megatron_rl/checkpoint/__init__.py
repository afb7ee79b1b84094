"""HF <-> Megatron-Core weight conversion, one module per model family (``qwen2``, ``llama``)."""
