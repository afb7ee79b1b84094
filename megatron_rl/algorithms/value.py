"""The critic's loss: PPO's clipped value loss, per token.

The critic's targets come from ``gae`` (returns = advantages + values, before whitening); aggregation
is separate (``aggregate``), with the same caller-given global normalisers as the policy loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_rl.validation import check_range

DEFAULT_VALUE_CLIP = 0.5
"""verl's default ``critic.cliprange_value``."""


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float | None = DEFAULT_VALUE_CLIP,
    global_num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped value loss (PPO; verl's ``compute_value_loss``).

    values (B, T) the critic being trained (carries grad), old_values (B, T) the critic's values when
    the advantages were computed (detached), returns (B, T) the targets (detached), mask (B, T) bool
    or 0/1 -> (loss (B, T), metrics: dict of 0-dim detached tensors).

        clipped = clamp(values, old_values - clip_range, old_values + clip_range)
        loss    = 0.5 * max((values - returns)**2, (clipped - returns)**2)

    The max keeps the larger error, so a value that moved more than ``clip_range`` from its old
    estimate, away from the return's side, gets no gradient. ``clip_range=None``: the plain
    ``0.5 * (values - returns)**2``. The loss is 0 at invalid tokens. verl applies the 0.5 after
    aggregating; aggregation is linear, so ``aggregate(loss, mask, mode)`` equals verl's ``vf_loss``
    for the same mode and normaliser.

    Metrics, each ``sum over valid tokens / global_num_tokens`` (default: this call's valid token
    count; an empty batch gives 0):

    - ``vf_clip_frac``: the clipped error is the larger one (verl's ``vf_clipfrac``)
    - ``vf_error``: mean of ``(values - returns)**2`` (unclipped)
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape) or values.dim() != 2:
        raise ValueError(
            "values, old_values, returns and mask must have one shape (B, T); got "
            f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(mask.shape)}"
        )
    if clip_range is not None:
        check_range("clip_range", clip_range, low=0.0)
    valid = mask.bool()
    unclipped_error = (values - returns).square()
    if clip_range is None:
        error, clipped_error = unclipped_error, unclipped_error
    else:
        # verl's clip_by_value: max(min(x, high), low)
        clipped = torch.maximum(torch.minimum(values, old_values + clip_range), old_values - clip_range)
        clipped_error = (clipped - returns).square()
        error = torch.maximum(unclipped_error, clipped_error)
    zeros = torch.zeros_like(error)
    loss = torch.where(valid, 0.5 * error, zeros)
    with torch.no_grad():
        if global_num_tokens is None:
            count = valid.sum().to(values.dtype)
        else:
            count = torch.as_tensor(global_num_tokens, dtype=values.dtype, device=values.device)
        denominator = torch.where(count > 0, count, torch.ones_like(count))
        metrics = {
            "vf_clip_frac": ((clipped_error > unclipped_error) & valid).to(values.dtype).sum() / denominator,
            "vf_error": torch.where(valid, unclipped_error.detach(), zeros.detach()).sum() / denominator,
        }
    return loss, metrics
