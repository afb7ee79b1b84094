"""The frozen reference model (same TP/PP layout as the policy, no gradients) and the step-0 check."""

from __future__ import annotations

import torch

from megatron_rl.megatron.forward import forward_logprobs
from megatron_rl.megatron.optim import unwrap_ddp

__all__ = ["check_reference_matches_policy", "freeze_reference"]


def freeze_reference(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` (a GPTModel stage built like the policy's, with the same weights loaded) the
    reference: eval mode, never given to an optimizer, only run under ``torch.no_grad`` (as
    :func:`megatron_rl.megatron.forward.forward_logprobs` does), so it never holds gradients.

    Its parameters deliberately keep ``requires_grad=True``: Megatron's TP linear layers switch to
    another implementation (``linear_with_frozen_weight``) for frozen weights, whose fp32 results differ
    from the policy's by ~1e-5 at TP > 1 (measured), and the step-0 KL would then not be exactly 0.
    Returns the same object."""
    model.eval()
    return model


def check_reference_matches_policy(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    micro_batch_size: int | None = None,
) -> torch.Tensor:
    """Step-0 check: before any update the policy's logprobs must equal the reference's bit for bit
    (same weights, same layout, same kernels: KL(policy, reference) is exactly 0).

    Returns the reference logprobs (B, T-1). Raises ValueError with the largest difference otherwise
    (a weight that was not loaded into one of them, or a different layout). Collective: every rank calls it.
    """
    policy_logprobs = forward_logprobs(unwrap_ddp(policy), input_ids, vocab_size=vocab_size,
                                       temperature=temperature, micro_batch_size=micro_batch_size).logprobs
    ref_logprobs = forward_logprobs(reference, input_ids, vocab_size=vocab_size, temperature=temperature,
                                    micro_batch_size=micro_batch_size).logprobs
    if not torch.equal(policy_logprobs, ref_logprobs):
        diff = (policy_logprobs - ref_logprobs).abs().max().item()
        raise ValueError(f"policy and reference logprobs differ before the first update (max |diff| {diff:.3e}): "
                         "the two models do not hold the same weights in the same layout")
    return ref_logprobs
