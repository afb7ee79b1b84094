"""Per-token estimators of KL(policy || reference) from the sampled tokens' logprobs.

With samples from the policy, log-ratio ``d = logprobs - ref_logprobs``:

- k1: ``d`` -- unbiased, high variance, can be negative per token;
- k2: ``0.5 * d**2`` -- biased, low variance, >= 0;
- k3 (verl's "low_var_kl", Schulman's k3): ``exp(-d) - (-d) - 1`` -- unbiased, >= 0. Computed as
  verl does: ``-d`` clamped to [-20, 20] before ``exp``, the result clamped to [-10, 10] (so
  to [0, 10]; the gradient is 0 where the clamp is active).

All take logprobs (B, T) and ref_logprobs (B, T) and return (B, T); masking and aggregation are
the caller's (``aggregate``).
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
"""The ``kind`` values ``kl_penalty`` accepts; 'low_var_kl' is another name for 'k3'."""

K3_LOG_RATIO_LIMIT = 20.0
K3_LIMIT = 10.0


def _check(logprobs: Tensor, ref_logprobs: Tensor) -> None:
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs and ref_logprobs must have the same shape; got {tuple(logprobs.shape)} and "
            f"{tuple(ref_logprobs.shape)}"
        )


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``logprobs - ref_logprobs``: (B, T), (B, T) -> (B, T)."""
    _check(logprobs, ref_logprobs)
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``0.5 * (logprobs - ref_logprobs)**2``: (B, T), (B, T) -> (B, T)."""
    _check(logprobs, ref_logprobs)
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``exp(ref - logp) - (ref - logp) - 1``, clamped to [-10, 10]: (B, T), (B, T) -> (B, T).

    ``ref - logp`` is first clamped to [-20, 20] so ``exp`` stays finite (as verl)."""
    _check(logprobs, ref_logprobs)
    log_ratio = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_LIMIT, K3_LOG_RATIO_LIMIT)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-K3_LIMIT, K3_LIMIT)


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "low_var_kl": kl_k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """The per-token KL estimate named by ``kind`` (one of ``KL_KINDS``): (B, T), (B, T) -> (B, T).

    Raises ValueError naming an unknown ``kind`` and the allowed ones."""
    estimator = _ESTIMATORS.get(kind)
    if estimator is None:
        raise ValueError(f"unknown KL estimator kind {kind!r}; allowed: {', '.join(KL_KINDS)}")
    return estimator(logprobs, ref_logprobs)
