"""Token entropy of the policy from full logits, and the entropy bonus term.

This version needs the whole vocabulary on one rank: it is for tests and single-rank use. The
vocab-parallel entropy (logits split over tensor-parallel ranks) lives in ``megatron_rl.megatron``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_from_logits(logits: Tensor) -> Tensor:
    """``H = -sum_v p_v log p_v`` with ``p = softmax(logits)``: (B, T, V) -> (B, T).

    Stable for large logits (``log_softmax``, i.e. logits - logsumexp); entries of -inf (masked
    or padded vocabulary) contribute 0 with finite gradients. Half-precision logits are computed
    in float32; the result has that working dtype.
    """
    if logits.dim() < 1:
        raise ValueError(f"logits must have a vocabulary dimension; got shape {tuple(logits.shape)}")
    work = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_p = torch.log_softmax(work, dim=-1)
    p = log_p.exp()
    safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))  # 0 * -inf would be NaN
    return -(p * safe_log_p).sum(dim=-1)


def entropy_bonus(entropy: Tensor, coef: float) -> Tensor:
    """The per-token loss term ``-coef * entropy`` that rewards entropy: (B, T) -> (B, T).

    Add it to the per-token policy loss before ``aggregate`` so it shares the same normaliser;
    ``entropy`` may come from ``entropy_from_logits`` or the vocab-parallel version.
    """
    return -coef * entropy
