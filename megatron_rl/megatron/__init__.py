"""The Megatron-Core edge: process groups (``parallel``), CPU shims (``cpu``), ``GPTModel`` from an HF
config (``model``), vocab-parallel logprobs (``logprobs``) and the forward-only schedule (``forward``).

Only :mod:`megatron_rl.megatron.parallel` touches ``megatron.core.parallel_state``. Submodules import
megatron-core lazily where they can, so importing this package stays cheap.
"""
