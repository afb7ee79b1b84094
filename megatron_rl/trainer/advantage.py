"""A step's advantages from its rewards: an outcome estimator (GRPO, Dr.GRPO, RLOO, REINFORCE++) or GAE
with the critic's values, with the KL to the reference optionally taken out of the reward first.

    adv = step_advantages(cfg.algorithm, batch, values=values, old_logprobs=old, ref_logprobs=ref,
                          kl_controller=controller, dp_group=group)
    adv.token_advantages  # (N, T-1), what the policy loss weighs each token by
    adv.returns           # (N, T-1), the critic's targets (GAE only)

KL in the reward (``algorithm.kl_in_reward``; verl's ``use_kl_in_reward`` / ``apply_kl_penalty``): each
response's outcome reward sits on its last token, and every response token pays ``coef * kl_t`` with
``kl_t`` the ``kl_reward_kind`` estimate between the policy that sampled (its logprobs before the update)
and the reference; ``coef`` is the controller's value, and the controller then moves it with the batch's
mean KL (:mod:`megatron_rl.algorithms.kl_reward`). GAE runs over those token rewards; an outcome
estimator gets each response's total, ``R - coef * sum_t kl_t`` (as verl, whose outcome estimators sum
the token rewards).

Data parallelism. Outcome estimators work within prompt groups, which never straddle ranks. What spans
the batch is reduced over the data-parallel ranks so that every rank sees the whole batch, as verl's
driver does: the KL mean the controller follows (and its number of sequences), and GAE's whitening of
the advantages (mean and standard deviation over every valid token of every rank, in float64).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megatron_rl import algorithms
from megatron_rl.algorithms.advantages import DEFAULT_EPS
from megatron_rl.trainer.batch import RolloutBatch

__all__ = ["OUTCOME_ADVANTAGES", "StepAdvantages", "step_advantages"]

OUTCOME_ADVANTAGES = {
    "grpo": algorithms.grpo_advantages,
    "dr_grpo": algorithms.dr_grpo_advantages,
    "rloo": algorithms.rloo_advantages,
    "reinforce_pp": algorithms.reinforce_pp_baseline_advantages,
}
"""``algorithm.advantage`` -> the estimator of one advantage per response from its reward and group."""


@dataclasses.dataclass(frozen=True)
class StepAdvantages:
    token_advantages: torch.Tensor  # (N, T-1), 0 outside the responses
    returns: torch.Tensor | None  # (N, T-1) GAE's returns (the critic's targets); None for outcome estimators
    metrics: dict[str, float]  # kl_reward/* (with kl_in_reward), critic/returns_mean, critic/values_mean (GAE)


def step_advantages(
    alg,
    batch: RolloutBatch,
    *,
    values: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_controller=None,
    dp_group: dist.ProcessGroup | None = None,
) -> StepAdvantages:
    """The advantages of this rank's ``batch`` under ``alg`` (an ``AlgorithmConfig``).

    ``values`` (N, T-1): the critic's, needed by GAE. ``old_logprobs`` / ``ref_logprobs`` (N, T-1): the
    sampling policy's and the reference's, needed with ``alg.kl_in_reward``, as is ``kl_controller``
    (whose ``update`` is called once here, with the global mean KL and number of sequences). ``dp_group``:
    the data-parallel group (None or a group of one: no reduction). Collective over ``dp_group`` when it
    has several ranks and a global statistic is needed.
    """
    mask = batch.response_mask
    metrics: dict[str, float] = {}
    scores = algorithms.outcome_token_rewards(batch.rewards, mask)  # (N, T-1): R on each last response token
    token_rewards = scores
    if alg.kl_in_reward:
        if old_logprobs is None or ref_logprobs is None or kl_controller is None:
            raise ValueError("algorithm.kl_in_reward needs the sampling policy's and the reference's logprobs "
                             "and a KL controller")
        coef = kl_controller.value
        token_rewards, local_kl = algorithms.kl_penalised_rewards(scores, old_logprobs, ref_logprobs, mask, coef=coef,
                                                                  kind=alg.kl_reward_kind)
        rows_with_tokens = mask.any(dim=-1).sum()
        kl_sum, num_rows, num_seqs = _dp_sum([float(local_kl) * float(rows_with_tokens), float(rows_with_tokens),
                                              float(len(batch))], dp_group)
        mean_kl = kl_sum / max(num_rows, 1.0)
        kl_controller.update(mean_kl, n_steps=int(num_seqs))
        metrics.update({"kl_reward/kl": mean_kl, "kl_reward/coef": coef})
    if alg.advantage == "gae":
        if values is None:
            raise ValueError("algorithm.advantage='gae' needs the critic's values")
        advantages, returns = algorithms.gae(token_rewards, values, mask, gamma=alg.gamma, lam=alg.lam, whiten=False)
        advantages = _whiten(advantages, mask, dp_group)
        num_tokens = max(_dp_sum([float(mask.sum())], dp_group)[0], 1.0)
        returns_sum, values_sum = _dp_sum([float(returns[mask].double().sum()), float(values[mask].double().sum())],
                                          dp_group)
        metrics.update({"critic/returns_mean": returns_sum / num_tokens, "critic/values_mean": values_sum / num_tokens})
        return StepAdvantages(advantages, returns, metrics)
    # outcome estimators: one reward per response, the KL penalty (if any) summed over its tokens
    rewards = batch.rewards - (scores - token_rewards).sum(dim=-1) if alg.kl_in_reward else batch.rewards
    per_response = OUTCOME_ADVANTAGES[alg.advantage](rewards, batch.group_index)
    return StepAdvantages(algorithms.broadcast_to_tokens(per_response, mask), None, metrics)


def _dp_sum(values: list[float], group: dist.ProcessGroup | None) -> list[float]:
    """Sums over the data-parallel ranks (float64), or the values themselves without a group of several."""
    if group is None or dist.get_world_size(group) == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.tolist()


def _whiten(advantages: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``algorithms.masked_whiten`` over the valid tokens of every data-parallel rank: the same two passes
    (mean, then the centred sum of squares) with each sum all-reduced; one rank: ``masked_whiten`` itself."""
    if group is None or dist.get_world_size(group) == 1:
        return algorithms.masked_whiten(advantages, mask)
    valid = mask.bool()
    work = torch.where(valid, advantages.to(torch.float64), torch.zeros((), dtype=torch.float64))
    total, count = _dp_sum([float(work.sum()), float(valid.sum())], group)
    mean = total / max(count, 1.0)
    centred = torch.where(valid, work - mean, torch.zeros_like(work))
    (squares,) = _dp_sum([float(centred.square().sum())], group)
    std = (squares / max(count - 1, 1.0)) ** 0.5
    return torch.where(valid, centred / (std + DEFAULT_EPS), torch.zeros_like(work)).to(advantages.dtype)
