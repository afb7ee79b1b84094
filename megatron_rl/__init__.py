"""megatron-rl: reinforcement learning for medical reasoning on Megatron-Core and vLLM."""

__version__ = "0.1.0"
