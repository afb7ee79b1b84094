"""PPO clipped surrogate with clip-higher (DAPO) and dual clip, per token.

Aggregation over tokens and sequences is separate (``aggregate``); this module returns the
per-token loss and metric tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_LIMIT = 20.0
"""``logprobs - old_logprobs`` is clamped to [-20, 20] before ``exp`` (as verl), so a far
off-policy token gives a large finite ratio instead of inf."""


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float | None = 3.0,
    global_num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO loss with asymmetric clipping and dual clip.

    logprobs (B, T) the policy being trained (carries grad), old_logprobs (B, T) the policy that
    sampled (detached), advantages (B, T), mask (B, T) bool or 0/1
    -> (loss (B, T), metrics: dict of 0-dim detached tensors).

        ratio = exp(clamp(logprobs - old_logprobs, -20, 20))
        loss  = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        loss  = min(loss, -A * clip_c)    only where A < 0 (dual clip; clip_c=None turns it off)

    ``clip_high > clip_low`` is DAPO's clip-higher: a token with A > 0 may raise its
    probability further before its gradient stops. The dual clip bounds the loss of a token with
    A < 0 whose ratio has grown past ``clip_c``. Clipped tokens get zero gradient. The loss is 0
    at invalid tokens (whatever the inputs hold there).

    Metrics, each ``sum over valid tokens / global_num_tokens`` (default: this batch's valid
    token count; an empty batch gives 0), so summing them over micro-batches and DP ranks with
    the global count gives the global mean:

    - ``clip_frac_low``:  A < 0 and ratio < 1 - clip_low (the lower bound is active)
    - ``clip_frac_high``: A > 0 and ratio > 1 + clip_high (the upper bound is active)
    - ``clip_frac_dual``: A < 0 and ratio > clip_c (the dual clip is active)
    - ``ppo_kl``:   mean of old_logprobs - logprobs, the k1 estimate of KL(old || new) (verl's)
    - ``approx_kl``: mean of ratio - 1 - log(ratio), the k3 estimate of the same KL (>= 0)
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape):
        raise ValueError(
            "logprobs, old_logprobs, advantages and mask must have one shape (B, T); got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(advantages.shape)}, {tuple(mask.shape)}"
        )
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0; got clip_low={clip_low}, clip_high={clip_high}")
    if clip_low >= 1:
        raise ValueError(f"clip_low must be < 1 so that 1 - clip_low > 0; got {clip_low}")
    if clip_c is not None and clip_c <= 1:
        raise ValueError(f"clip_c must be > 1 (or None to turn the dual clip off); got {clip_c}")

    valid = mask.bool()
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    if clip_c is not None:
        loss = torch.where(negative, torch.minimum(loss, -advantages * clip_c), loss)
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    with torch.no_grad():
        ratio_d, log_ratio_d = ratio.detach(), log_ratio.detach()
        denominator = _token_count(valid, ratio_d, global_num_tokens)

        def fraction(flags: Tensor) -> Tensor:
            return (flags & valid).to(ratio_d.dtype).sum() / denominator

        def mean(values: Tensor) -> Tensor:
            return torch.where(valid, values, torch.zeros_like(values)).sum() / denominator

        metrics = {
            "clip_frac_low": fraction(negative & (ratio_d < 1 - clip_low)),
            "clip_frac_high": fraction((advantages > 0) & (ratio_d > 1 + clip_high)),
            "clip_frac_dual": fraction(negative & (ratio_d > clip_c)) if clip_c is not None else ratio_d.new_zeros(()),
            "ppo_kl": mean(-log_ratio_d),
            "approx_kl": mean(ratio_d - 1 - log_ratio_d),
        }
    return loss, metrics


def _token_count(valid: Tensor, like: Tensor, global_num_tokens: Tensor | float | None) -> Tensor:
    """The metrics' denominator as a 0-dim tensor; 0 becomes 1 so an empty batch gives 0."""
    if global_num_tokens is None:
        count = valid.sum().to(like.dtype)
    else:
        count = torch.as_tensor(global_num_tokens, dtype=like.dtype, device=like.device)
    return torch.where(count > 0, count, torch.ones_like(count))
