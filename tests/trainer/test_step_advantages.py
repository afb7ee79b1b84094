"""A step's advantages (megatron_rl.trainer.advantage): outcome estimators, KL in the reward with its
controller, GAE with the critic's values, and the data-parallel reductions (two gloo processes give what
one process gives on the whole batch)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_rl import algorithms
from megatron_rl.trainer.advantage import step_advantages
from megatron_rl.trainer.batch import RolloutBatch
from megatron_rl.trainer.config import AlgorithmConfig

WORKER = Path(__file__).resolve().parent / "_advantage_worker.py"


def small_batch() -> RolloutBatch:
    """Two prompts x two responses; response tokens at target positions 1..2 or 1..3 (T-1 = 4)."""
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    return RolloutBatch(input_ids=torch.zeros(4, 5, dtype=torch.int64), response_mask=mask,
                        rollout_logprobs=torch.zeros(4, 4), rewards=torch.tensor([1.0, 0.0, 0.5, -0.5]),
                        group_index=torch.tensor([0, 0, 1, 1]), truncated=torch.zeros(4, dtype=torch.bool))


def test_outcome_estimator_without_kl_is_the_estimator_broadcast() -> None:
    batch = small_batch()
    result = step_advantages(AlgorithmConfig(advantage="rloo"), batch)
    expected = algorithms.broadcast_to_tokens(algorithms.rloo_advantages(batch.rewards, batch.group_index),
                                              batch.response_mask)
    assert torch.equal(result.token_advantages, expected) and result.returns is None and result.metrics == {}


def test_kl_in_the_reward_lowers_each_outcome_reward_by_its_summed_penalty() -> None:
    """k1 KL per token = old - ref: row 0 pays 0.1 * (0.5 + 0.5) = 0.1, row 1 pays 0.1 * (0 + 1 + 2) = 0.3,
    rows 2 and 3 pay nothing (ref == old). GRPO on rewards (0.9, -0.3) then (0.5, -0.5): with two responses
    per group the advantages are +-1/sqrt(2) (mean 0, unbiased std of a pair = |diff| / sqrt 2)."""
    batch = small_batch()
    old = torch.zeros(4, 4)
    ref = -torch.tensor([[9, 0.5, 0.5, 9], [9, 0, 1, 2], [9, 0, 9, 9], [9, 0, 0, 0]]) * batch.response_mask
    controller = algorithms.make_kl_controller("fixed", coef=0.1)
    alg = AlgorithmConfig(kl_in_reward=True, kl_reward_coef=0.1)
    result = step_advantages(alg, batch, old_logprobs=old, ref_logprobs=ref, kl_controller=controller)
    half = 2 ** -0.5
    per_row = torch.tensor([half, -half, half, -half])
    torch.testing.assert_close(result.token_advantages, per_row[:, None] * batch.response_mask, atol=1e-5, rtol=0)
    # mean KL: row means 0.5, 1.0, 0, 0 -> 0.375
    assert result.metrics == pytest.approx({"kl_reward/kl": 0.375, "kl_reward/coef": 0.1})


def test_adaptive_controller_moves_once_per_step_with_the_batch_kl() -> None:
    batch = small_batch()
    old = torch.zeros(4, 4)
    ref = torch.full((4, 4), -0.5) * batch.response_mask  # KL 0.5 per token, above the target 0.1
    alg = AlgorithmConfig(kl_in_reward=True, kl_controller="adaptive", kl_reward_coef=0.2, kl_target=0.1,
                          kl_horizon=100.0)
    controller = alg.make_kl_controller()
    result = step_advantages(alg, batch, old_logprobs=old, ref_logprobs=ref, kl_controller=controller)
    assert result.metrics["kl_reward/coef"] == 0.2  # the value used this step
    # error clip(0.5 / 0.1 - 1, -0.2, 0.2) = 0.2; value = 0.2 * (1 + 0.2 * 4 sequences / 100)
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 4 / 100))


def test_gae_returns_are_the_outcome_reward_at_gamma_and_lambda_one() -> None:
    """gamma = lam = 1: A_t = R - V_t and returns_t = A_t + V_t = R at every response token; the advantages
    are then whitened over the batch's valid tokens."""
    batch = small_batch()
    values = torch.tensor([[0.0, 0.5, -0.5, 0], [0, 0.1, 0.2, 0.3], [0, 1.0, 0, 0], [0, 0, 0, 0.25]])
    result = step_advantages(AlgorithmConfig(advantage="gae", gamma=1.0, lam=1.0), batch, values=values)
    mask = batch.response_mask
    expected_returns = batch.rewards[:, None] * mask
    torch.testing.assert_close(result.returns, expected_returns)
    raw = (expected_returns - values) * mask
    torch.testing.assert_close(result.token_advantages, algorithms.masked_whiten(raw, mask))
    assert result.metrics["critic/returns_mean"] == pytest.approx(float(expected_returns[mask].mean()))
    assert result.metrics["critic/values_mean"] == pytest.approx(float(values[mask].mean()))


def test_gae_equals_the_algorithm_with_kl_token_rewards() -> None:
    batch = small_batch()
    values = torch.linspace(-1, 1, 16).reshape(4, 4) * batch.response_mask
    old, ref = torch.zeros(4, 4), torch.full((4, 4), -0.3) * batch.response_mask
    alg = AlgorithmConfig(advantage="gae", gamma=0.9, lam=0.8, kl_in_reward=True, kl_reward_coef=0.05)
    result = step_advantages(alg, batch, values=values, old_logprobs=old, ref_logprobs=ref,
                             kl_controller=alg.make_kl_controller())
    scores = algorithms.outcome_token_rewards(batch.rewards, batch.response_mask)
    token_rewards, _ = algorithms.kl_penalised_rewards(scores, old, ref, batch.response_mask, coef=0.05, kind="k1")
    advantages, returns = algorithms.gae(token_rewards, values, batch.response_mask, gamma=0.9, lam=0.8)
    assert torch.equal(result.token_advantages, advantages) and torch.equal(result.returns, returns)


def test_missing_inputs_are_named() -> None:
    batch = small_batch()
    with pytest.raises(ValueError, match="needs the critic's values"):
        step_advantages(AlgorithmConfig(advantage="gae"), batch)
    with pytest.raises(ValueError, match="kl_in_reward needs"):
        step_advantages(AlgorithmConfig(kl_in_reward=True), batch)


def test_two_data_parallel_ranks_whiten_and_steer_like_one(tmp_path) -> None:
    """Rows 0-1 on rank 0, 2-3 on rank 1: GAE's whitened advantages and the adaptive controller's new value
    equal the one-process result on all four rows (float64 sums in another order: within 1e-6)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "megatron"))
    from _advantage_worker import one_process

    from _helpers import launch_ranks

    ranks = launch_ranks(WORKER, [], tmp_path, world_size=2, timeout_s=60)
    whole = one_process(None)
    got = torch.cat([ranks[0]["advantages"], ranks[1]["advantages"]])
    torch.testing.assert_close(got, whole["advantages"], atol=1e-6, rtol=0)
    assert ranks[0]["coef"] == ranks[1]["coef"] == pytest.approx(whole["coef"], rel=1e-12)
    assert ranks[0]["metrics"] == pytest.approx(whole["metrics"], rel=1e-12)
