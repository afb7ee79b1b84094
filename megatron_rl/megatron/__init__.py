"""The Megatron-Core edge: process groups (``parallel``), CPU shims (``cpu``), ``GPTModel`` from an HF
config (``model``), vocab-parallel logprobs (``logprobs``), the forward-only schedule (``forward``),
DDP + AdamW (``optim``), one PPO policy update (``train_step``) and the frozen reference (``reference``).

Only :mod:`megatron_rl.megatron.parallel` touches ``megatron.core.parallel_state``. Submodules import
megatron-core lazily where they can, so importing this package stays cheap.
"""
