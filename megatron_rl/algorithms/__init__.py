"""RL math on tensors: advantages, policy loss, KL estimators, entropy, loss aggregation.

    from megatron_rl import algorithms as A
    adv = A.grpo_advantages(rewards, group_index)                       # (N,)
    token_adv = A.broadcast_to_tokens(adv, response_mask)               # (N, T)
    loss, metrics = A.ppo_clip_loss(logprobs, old_logprobs, token_adv, response_mask)
    loss = loss + kl_coef * A.kl_penalty(logprobs, ref_logprobs, "low_var_kl")
    scalar = A.aggregate(loss, response_mask, "token-mean", global_num_tokens=num_tokens)

Other policy losses share ``ppo_clip_loss``'s calling convention and are selected by name
(``A.policy_loss("gspo", ..., params=A.GSPOParams())``, ``A.POLICY_LOSSES``); the critic's side is
``A.value_loss`` with ``A.gae``, and KL can enter the reward instead of the loss
(``A.kl_penalised_rewards`` with a ``FixedKLController`` / ``AdaptiveKLController``).

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
from megatron_rl.algorithms.kl_reward import (
    KL_CONTROLLERS,
    AdaptiveKLController,
    FixedKLController,
    kl_penalised_rewards,
    make_kl_controller,
    outcome_token_rewards,
)
from megatron_rl.algorithms.policy_loss import (
    POLICY_LOSS_METRICS,
    POLICY_LOSS_PARAMS,
    POLICY_LOSSES,
    SEQUENCE_LEVEL_AGGREGATION,
    CISPOParams,
    ClipCovParams,
    GMPOParams,
    GSPOParams,
    KLCovParams,
    PPOClipParams,
    ReinforceParams,
    cispo_loss,
    clip_cov_loss,
    gmpo_loss,
    gspo_loss,
    kl_cov_loss,
    policy_loss,
    ppo_clip_loss,
    reinforce_loss,
)
from megatron_rl.algorithms.value import value_loss

__all__ = [
    "AGGREGATION_MODES",
    "AdaptiveKLController",
    "CISPOParams",
    "ClipCovParams",
    "FixedKLController",
    "GMPOParams",
    "GSPOParams",
    "KLCovParams",
    "KL_CONTROLLERS",
    "KL_KINDS",
    "POLICY_LOSSES",
    "POLICY_LOSS_METRICS",
    "POLICY_LOSS_PARAMS",
    "PPOClipParams",
    "ReinforceParams",
    "SEQUENCE_LEVEL_AGGREGATION",
    "aggregate",
    "broadcast_to_tokens",
    "cispo_loss",
    "clip_cov_loss",
    "dr_grpo_advantages",
    "entropy_bonus",
    "entropy_from_logits",
    "gae",
    "gmpo_loss",
    "grpo_advantages",
    "gspo_loss",
    "kl_cov_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalised_rewards",
    "kl_penalty",
    "make_kl_controller",
    "masked_whiten",
    "outcome_token_rewards",
    "policy_loss",
    "ppo_clip_loss",
    "reinforce_loss",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "value_loss",
]
