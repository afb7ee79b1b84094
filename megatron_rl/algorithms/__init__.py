"""RL math on tensors: advantages, policy loss, KL estimators, entropy, loss aggregation.

    from megatron_rl import algorithms as A
    adv = A.grpo_advantages(rewards, group_index)                       # (N,)
    token_adv = A.broadcast_to_tokens(adv, response_mask)               # (N, T)
    loss, metrics = A.ppo_clip_loss(logprobs, old_logprobs, token_adv, response_mask)
    loss = loss + kl_coef * A.kl_penalty(logprobs, ref_logprobs, "low_var_kl")
    scalar = A.aggregate(loss, response_mask, "token-mean", global_num_tokens=num_tokens)

Pure: no megatron imports, no config objects, no process groups, no ``.item()``. The caller
computes global normalisers (valid tokens or sequences across micro-batches and DP ranks) and
passes them in.
"""

from megatron_rl.algorithms.advantages import (
    broadcast_to_tokens,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from megatron_rl.algorithms.aggregation import AGGREGATION_MODES, aggregate
from megatron_rl.algorithms.entropy import entropy_bonus, entropy_from_logits
from megatron_rl.algorithms.kl import KL_KINDS, kl_k1, kl_k2, kl_k3, kl_penalty
from megatron_rl.algorithms.policy_loss import ppo_clip_loss

__all__ = [
    "AGGREGATION_MODES",
    "KL_KINDS",
    "aggregate",
    "broadcast_to_tokens",
    "dr_grpo_advantages",
    "entropy_bonus",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "masked_whiten",
    "ppo_clip_loss",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
]
