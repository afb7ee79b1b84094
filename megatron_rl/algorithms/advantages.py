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


def _group_total(values: Tensor, group_index: Tensor) -> Tensor:
    """Per response, the sum of ``values`` over its group: (N,) -> (N,)."""
    groups, inverse = torch.unique(group_index, return_inverse=True)  # inverse: (N,) ids 0..G-1
    # G is a shape (the length of torch.unique), never read from a tensor value.
    return values.new_zeros(groups.shape[0]).index_add(0, inverse, values)[inverse]


def _group_size_and_mean(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor]:
    """Per response, its group's size (>= 1, in the rewards' dtype) and reward mean, each (N,)."""
    size = _group_total(torch.ones_like(rewards), group_index)
    return size, _group_total(rewards, group_index) / size


def grpo_advantages(
    rewards: Tensor, group_index: Tensor, *, norm_by_std: bool = True, eps: float = DEFAULT_EPS
) -> Tensor:
    """GRPO: ``(r - mean_group) / (std_group + eps)``; with ``norm_by_std=False``, Dr.GRPO's
    ``r - mean_group``.

    rewards (N,), group_index (N,) -> advantages (N,), in the rewards' dtype.

    ``std_group`` is the unbiased standard deviation (``torch.std`` default, correction=1, i.e.
    divided by n - 1). A group of one response has no spread, so, as verl does, its mean is
    taken as 0 and its std as 1: the advantage is ``r / (1 + eps)`` (``r`` without std
    normalisation) -- the raw reward, not 0. A group whose rewards are all equal gets 0.

    Dr.GRPO (Liu et al. 2025) also drops GRPO's per-response length normalisation; that is a
    choice of loss aggregation ('seq-mean-token-sum-norm' in ``aggregate``), not of advantages.
    """
    _check_outcome_args(rewards, group_index)
    size, mean = _group_size_and_mean(rewards, group_index)
    several = size > 1
    mean = torch.where(several, mean, torch.zeros_like(mean))
    if not norm_by_std:
        return rewards - mean
    squared_deviation = _group_total((rewards - mean).square(), group_index)  # (N,)
    std = (squared_deviation / (size - 1).clamp_min(1)).sqrt()  # unbiased: / (n - 1)
    std = torch.where(several, std, torch.ones_like(std))
    return (rewards - mean) / (std + eps)


def dr_grpo_advantages(rewards: Tensor, group_index: Tensor) -> Tensor:
    """Dr.GRPO: ``r - mean_group`` (no std normalisation); a group of one gets ``r``.

    rewards (N,), group_index (N,) -> advantages (N,). Same as
    ``grpo_advantages(..., norm_by_std=False)``; pair it with the constant-normaliser loss
    aggregation ``aggregate(..., mode='seq-mean-token-sum-norm', constant=max_response_length)``.
    """
    return grpo_advantages(rewards, group_index, norm_by_std=False)


def rloo_advantages(rewards: Tensor, group_index: Tensor) -> Tensor:
    """RLOO: ``r_i - mean(r_j for the other responses j != i of the group)``.

    rewards (N,), group_index (N,) -> advantages (N,). For a group of n > 1 this equals
    ``n / (n - 1) * (r_i - mean_group)``. A group of one has no other response to compare with
    and gets advantage 0 (verl instead leaves the raw reward ``r`` there).
    """
    _check_outcome_args(rewards, group_index)
    size = _group_total(torch.ones_like(rewards), group_index)
    total = _group_total(rewards, group_index)
    leave_one_out_mean = (total - rewards) / (size - 1).clamp_min(1)
    return torch.where(size > 1, rewards - leave_one_out_mean, torch.zeros_like(rewards))


def reinforce_pp_baseline_advantages(rewards: Tensor, group_index: Tensor, *, eps: float = DEFAULT_EPS) -> Tensor:
    """REINFORCE++-baseline: subtract the group mean, then whiten over the whole batch.

    rewards (N,), group_index (N,) -> advantages (N,):

        x = r - mean_group            (a group of one: mean 0, so x = r, as verl)
        a = (x - mean(x)) / (std(x) + eps)

    where mean and std are over all N responses of this call and std is unbiased (n - 1).
    N = 1 gives 0. verl whitens the same x after broadcasting it to tokens, i.e. each response
    weighted by its token count, with ``rsqrt(var + 1e-8)``; here every response counts once,
    independent of its length.
    """
    _check_outcome_args(rewards, group_index)
    size, mean = _group_size_and_mean(rewards, group_index)
    centred = rewards - torch.where(size > 1, mean, torch.zeros_like(mean))
    return masked_whiten(centred, torch.ones_like(centred, dtype=torch.bool), eps=eps)


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
    entries only (denominators: their count, and count - 1 for the unbiased std). With fewer than
    two valid entries the std is taken as 0, so one valid entry gives 0 and none gives all zeros.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values and mask must have the same shape; got {tuple(values.shape)} and {tuple(mask.shape)}")
    valid = mask.bool()
    zeros = torch.zeros_like(values)
    kept = torch.where(valid, values, zeros)
    count = valid.sum().to(values.dtype)
    mean = kept.sum() / count.clamp_min(1)
    centred = torch.where(valid, values - mean, zeros)
    std = (centred.square().sum() / (count - 1).clamp_min(1)).sqrt()
    return torch.where(valid, centred / (std + eps), zeros)


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
    tokens of the batch (``masked_whiten``: mean and unbiased std over valid tokens); returns
    are never whitened. The caller passes detached values; nothing here detaches.
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
