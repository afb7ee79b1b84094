"""Reducing a per-token loss (B, T) to the scalar that is backpropagated.

The caller passes the global normaliser (valid tokens or sequences across all micro-batches and
DP ranks of the optimizer step): then every micro-batch's value is its share of the global mean,
and summing the values over micro-batches and ranks gives exactly the loss of the whole batch,
however it was split. If the data-parallel gradient reduction averages over ranks instead of
summing, multiply by the DP size. Without a normaliser, this batch's own count is used.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATION_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
"""The ``mode`` values ``aggregate`` accepts."""

Normaliser = Tensor | float | int | None


def aggregate(
    loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    global_num_tokens: Normaliser = None,
    global_num_seqs: Normaliser = None,
    constant: Normaliser = None,
) -> Tensor:
    """Reduce loss (B, T) over the valid tokens of mask (B, T, bool or 0/1) to a 0-dim tensor.

    Modes (sums are over valid tokens only; invalid tokens never contribute, even if NaN):

    - 'token-mean': ``sum(loss) / global_num_tokens``; default: this batch's valid tokens.
      Every token weighs the same (DAPO).
    - 'seq-mean-token-sum': ``sum_b(sum_t loss) / global_num_seqs``.
    - 'seq-mean-token-mean': ``sum_b(mean_t loss) / global_num_seqs``; each sequence's mean is
      over its own valid tokens (GRPO's original length normalisation).
    - 'seq-mean-token-sum-norm': ``sum(loss) / (global_num_seqs * constant)`` (Dr.GRPO); pass
      a constant that stays fixed over training, e.g. the maximum response length; default:
      this batch's T. This divides by the number of sequences, the Dr.GRPO paper's 1/G. verl's
      mode of the same name does not: its ``agg_loss`` returns ``sum(loss) / constant``, the
      number of sequences times ours. Gradients differ by that factor G (sequences per optimizer
      step): a verl config's gradient-clipping threshold corresponds here to that threshold / G,
      and for an optimizer that is not scale invariant (SGD) its learning rate to that rate * G.
      Adam's step is nearly scale invariant, but clipping at the same threshold then fires at a
      different point.

    Default ``global_num_seqs``: this batch's sequences with at least one valid token (fully
    masked padding rows do not count). An empty mask, or a normaliser of 0, gives 0 (still
    connected to ``loss`` so ``backward`` yields zero gradients), never NaN.

    Raises ValueError naming an unknown ``mode`` and the allowed ones.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; allowed: {', '.join(AGGREGATION_MODES)}")
    if loss.shape != mask.shape or loss.dim() != 2:
        raise ValueError(f"loss and mask must both be (B, T); got {tuple(loss.shape)} and {tuple(mask.shape)}")
    valid = mask.bool()
    masked_loss = torch.where(valid, loss, torch.zeros_like(loss))  # (B, T)
    seq_num_tokens = valid.sum(dim=-1).to(loss.dtype)  # (B,)

    if mode == "token-mean":
        return _divide(masked_loss.sum(), _normaliser(global_num_tokens, seq_num_tokens.sum(), loss))

    num_seqs = _normaliser(global_num_seqs, (seq_num_tokens > 0).sum(), loss)
    if mode == "seq-mean-token-sum":
        return _divide(masked_loss.sum(), num_seqs)
    if mode == "seq-mean-token-mean":
        seq_means = masked_loss.sum(dim=-1) / seq_num_tokens.clamp_min(1)  # (B,), 0 for empty rows
        return _divide(seq_means.sum(), num_seqs)
    norm = _normaliser(constant, loss.shape[-1], loss)
    return _divide(masked_loss.sum(), num_seqs * norm)


def _normaliser(given: Normaliser, default: Tensor | int, like: Tensor) -> Tensor:
    value = default if given is None else given
    if isinstance(value, (int, float)) and value < 0:
        raise ValueError(f"loss normalisers must be >= 0; got {value}")
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _divide(total: Tensor, denominator: Tensor) -> Tensor:
    """``total / denominator``, with a denominator of 0 read as 1 (the total is then 0)."""
    return total / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
