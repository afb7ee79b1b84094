"""Advantage estimators: outcome rewards grouped by prompt (GRPO, Dr.GRPO, RLOO,
REINFORCE++-baseline) and GAE for token-level rewards with a value model.

Outcome estimators take one scalar reward per response and the id of the prompt (group) each
response answers:

    rewards:     (N,)  float, one reward per response
    group_index: (N,)  integer, equal ids = same prompt; ids need not be contiguous or sorted.
                       For n consecutive responses per prompt: ``torch.arange(N) // n``.

and return per-response advantages (N,). ``broadcast_to_tokens`` spreads them over each
response's valid tokens for the policy loss.

Pure tensor math: no ``.item()``, no process groups. Group statistics use only the responses
passed in, so the caller passes whole groups (all n responses of a prompt) in one call.

A group of two or more responses whose rewards are all equal carries no signal and gets exactly
0.0 from every estimator here, whatever the rewards' values and dtype. Two things make it exact:

- Group statistics (sums, means, standard deviations, the batch whitening) are computed in float64
  and the result is cast back to the rewards' dtype. For float32, bfloat16 or float16 rewards
  (at most 24 significant bits) this alone suffices: n copies of a value v sum exactly in float64
  for n up to 2**29 (every partial sum k * v needs at most 24 + 29 = 53 bits), so the mean
  n * v / n is v exactly (IEEE division is correctly rounded) and r - mean is 0. In float32 it is
  not: 8 rewards of 0.7 would get 0.056 each from GRPO, 16 would get 0.106.
- float64 alone does not guarantee it for float64 rewards (no spare bits: 3 x 0.1 sums to
  0.30000000000000004, whose third is 0.10000000000000002), nor for REINFORCE++-baseline, whose
  batch whitening shifts every response by -mean(x) / std. So, in addition, every response of a
  group of two or more whose maximum equals its minimum is set to 0 explicitly.

A group of one response has no spread and no other response to compare with: every estimator
takes its baseline as 0 and passes the raw reward on (as verl does), see each docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_EPS = 1e-6
"""Added to standard deviations before dividing (verl's ``epsilon``)."""


def _check_outcome_args(rewards: Tensor, group_index: Tensor) -> None:
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_index must both be (N,); got rewards {tuple(rewards.shape)}, "
            f"group_index {tuple(group_index.shape)}"
        )
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor; got dtype {rewards.dtype}")
    if group_index.is_floating_point() or group_index.is_complex():
        raise ValueError(f"group_index must be an integer tensor; got dtype {group_index.dtype}")


class _Groups:
    """The grouping of N responses by ``group_index``, for per-response group statistics."""

    def __init__(self, group_index: Tensor) -> None:
        groups, self.inverse = torch.unique(group_index, return_inverse=True)  # inverse: (N,) ids 0..G-1
        self.num_groups = groups.shape[0]  # a shape (the length of torch.unique), never read from a value

    def total(self, values: Tensor) -> Tensor:
        """Per response, the sum of ``values`` over its group: (N,) -> (N,)."""
        return values.new_zeros(self.num_groups).index_add(0, self.inverse, values)[self.inverse]

    def flat(self, values: Tensor, size: Tensor) -> Tensor:
        """Per response, whether its group has two or more responses and max == min: (N,) -> (N,) bool."""
        def reduce(how: str) -> Tensor:
            start = values.new_zeros(self.num_groups)
            return start.scatter_reduce(0, self.inverse, values, how, include_self=False)[self.inverse]

        return (size > 1) & (reduce("amax") == reduce("amin"))


def _centred_rewards(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor, _Groups]:
    """float64 ``r - mean_group`` (a group of one: mean 0, so ``r``; a flat group: exactly 0), with the
    group sizes (N,) float64, the flat-group flags (N,) bool and the grouping."""
    _check_outcome_args(rewards, group_index)
    r = rewards.to(torch.float64)
    groups = _Groups(group_index)
    size = groups.total(torch.ones_like(r))
    mean = torch.where(size > 1, groups.total(r) / size, torch.zeros_like(r))
    flat = groups.flat(r, size)
    return torch.where(flat, torch.zeros_like(r), r - mean), size, flat, groups


def grpo_advantages(
    rewards: Tensor, group_index: Tensor, *, norm_by_std: bool = True, eps: float = DEFAULT_EPS
) -> Tensor:
    """GRPO: ``(r - mean_group) / (std_group + eps)``; with ``norm_by_std=False``, Dr.GRPO's
    ``r - mean_group``.

    rewards (N,), group_index (N,) -> advantages (N,), in the rewards' dtype (statistics in float64).

    ``std_group`` is the unbiased standard deviation (``torch.std`` default, correction=1, i.e.
    divided by n - 1). A group of one response has no spread, so, as verl does, its mean is
    taken as 0 and its std as 1: the advantage is ``r / (1 + eps)`` (``r`` without std
    normalisation) -- the raw reward, not 0. A group of two or more whose rewards are all equal
    gets exactly 0.0 (float64 statistics and an explicit max == min check; module docstring).

    Dr.GRPO (Liu et al. 2025) also drops GRPO's per-response length normalisation; that is a
    choice of loss aggregation ('seq-mean-token-sum-norm' in ``aggregate``), not of advantages.
    """
    centred, size, _, groups = _centred_rewards(rewards, group_index)
    if not norm_by_std:
        return centred.to(rewards.dtype)
    std = (groups.total(centred.square()) / (size - 1).clamp_min(1)).sqrt()  # unbiased: / (n - 1)
    std = torch.where(size > 1, std, torch.ones_like(std))
    return (centred / (std + eps)).to(rewards.dtype)


def dr_grpo_advantages(rewards: Tensor, group_index: Tensor) -> Tensor:
    """Dr.GRPO: ``r - mean_group`` (no std normalisation); a group of one gets ``r``.

    rewards (N,), group_index (N,) -> advantages (N,), in the rewards' dtype. Same as
    ``grpo_advantages(..., norm_by_std=False)`` (float64 statistics; an all-equal group gets
    exactly 0.0); pair it with the constant-normaliser loss aggregation
    ``aggregate(..., mode='seq-mean-token-sum-norm', constant=max_response_length)``.
    """
    return grpo_advantages(rewards, group_index, norm_by_std=False)


def rloo_advantages(rewards: Tensor, group_index: Tensor) -> Tensor:
    """RLOO: ``r_i - mean(r_j for the other responses j != i of the group)``.

    rewards (N,), group_index (N,) -> advantages (N,), in the rewards' dtype (statistics in
    float64; an all-equal group gets exactly 0.0). For a group of n > 1 this equals
    ``n / (n - 1) * (r_i - mean_group)``. A group of one has no other response to compare with:
    like every other estimator here (and verl's RLOO), its baseline is 0 and it gets the raw
    reward ``r``.
    """
    centred, size, _, _ = _centred_rewards(rewards, group_index)
    # r - (total - r) / (n - 1) = n / (n - 1) * (r - total / n): the same float64 r - mean, rescaled
    scale = torch.where(size > 1, size / (size - 1).clamp_min(1), torch.ones_like(size))
    return (scale * centred).to(rewards.dtype)


def reinforce_pp_baseline_advantages(rewards: Tensor, group_index: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    """REINFORCE++-baseline: subtract the group mean, then whiten over the whole batch.

    rewards (N,), group_index (N,) -> advantages (N,), in the rewards' dtype (statistics in float64):

        x = r - mean_group            (a group of one: mean 0, so x = r, as verl)
        a = (x - mean(x)) / (std(x) + eps)

    where mean and std are over all N responses of this call and std is unbiased (n - 1).
    N = 1 gives 0. A group of two or more whose rewards are all equal gets exactly 0.0, not the
    whitening's shift ``-mean(x) / std(x)`` (verl leaves that shift; it is non-zero whenever the
    batch holds a group of one, and a rounding residue otherwise). verl whitens the same x after
    broadcasting it to tokens, i.e. each response weighted by its token count, with
    ``rsqrt(var + 1e-8)``; here every response counts once, independent of its length.
    """
    centred, _, flat, _ = _centred_rewards(rewards, group_index)
    whitened = masked_whiten(centred, torch.ones_like(centred, dtype=torch.bool), eps=eps)
    return torch.where(flat, torch.zeros_like(whitened), whitened).to(rewards.dtype)


def broadcast_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Spread one advantage per response over its valid tokens.

    advantages (B,), response_mask (B, T) bool or 0/1 -> (B, T) in the advantages' dtype,
    ``advantages[b]`` where the mask is set and 0 elsewhere.
    """
    if advantages.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"advantages must be (B,) and response_mask (B, T); got {tuple(advantages.shape)} "
            f"and {tuple(response_mask.shape)}"
        )
    expanded = advantages.unsqueeze(-1).expand(response_mask.shape)
    return torch.where(response_mask.bool(), expanded, torch.zeros_like(expanded))


def masked_whiten(values: Tensor, mask: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    """``(x - mean) / (std + eps)`` over the valid entries; invalid entries become 0.

    values (...), mask (...) same shape, bool or 0/1 -> (...). mean and std are over the valid
    entries only (denominators: their count, and count - 1 for the unbiased std), computed in
    float64; the result has the values' dtype. With fewer than two valid entries the std is taken
    as 0, so one valid entry gives 0 and none gives all zeros. verl's ``masked_whiten`` divides by
    ``sqrt(var + 1e-8)`` instead of ``std + eps`` and leaves invalid entries non-zero.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values and mask must have the same shape; got {tuple(values.shape)} and {tuple(mask.shape)}")
    valid = mask.bool()
    work = values.to(torch.float64)
    zeros = torch.zeros_like(work)
    kept = torch.where(valid, work, zeros)
    count = valid.sum().to(work.dtype)
    mean = kept.sum() / count.clamp_min(1)
    centred = torch.where(valid, work - mean, zeros)
    std = (centred.square().sum() / (count - 1).clamp_min(1)).sqrt()
    return torch.where(valid, centred / (std + eps), zeros).to(values.dtype)


def gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    lam: float,
    whiten: bool = True,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each response's valid tokens.

    token_rewards (B, T), values (B, T), mask (B, T) bool or 0/1 -> (advantages (B, T), returns (B, T)).

    Backward over t, with V = 0 after the last valid token:

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
        returns_t = A_t + V_t   (before whitening)

    where "next" is the next *valid* token: invalid tokens (padding, or tool-output tokens in
    the middle of a response) are skipped, their reward ignored, and V_next / A_next carried
    across them (as verl). Advantages and returns are 0 at invalid tokens. With ``whiten``
    (PPO's usual choice, verl always does it) the advantages are then whitened over all valid
    tokens of the batch (``masked_whiten``: mean and unbiased std over valid tokens, in float64);
    returns are never whitened. The caller passes detached values; nothing here detaches.

    Against verl's ``compute_gae_advantage_return`` (same recursion, same skipping of invalid
    tokens): at valid tokens the advantages before whitening and the returns are equal; the
    whitened advantages differ by the epsilon convention, ``/ (std + 1e-6)`` here against verl's
    ``* rsqrt(var + 1e-8)`` (relative 1e-6 / std); at invalid tokens verl leaves the carried-over
    advantage (whitened) and ``values + advantages`` where these are 0. With ``token_rewards`` from
    ``kl_penalised_rewards`` (outcome reward on the last valid token) this is verl's PPO.
    """
    if not (token_rewards.shape == values.shape == mask.shape) or values.dim() != 2:
        raise ValueError(
            f"token_rewards, values and mask must all be (B, T); got {tuple(token_rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    valid = mask.bool()
    next_value = values.new_zeros(values.shape[0])  # (B,)
    next_advantage = values.new_zeros(values.shape[0])  # (B,)
    reversed_advantages = []
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        reversed_advantages.append(next_advantage)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)  # (B, T)
    zeros = torch.zeros_like(advantages)
    advantages = torch.where(valid, advantages, zeros)
    returns = torch.where(valid, advantages + values, zeros)
    if whiten:
        advantages = masked_whiten(advantages, valid, eps=eps)
    return advantages, returns
