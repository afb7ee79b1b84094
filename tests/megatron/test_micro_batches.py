"""Token-budget micro-batches (rows grouped by length, each micro-batch cut to its longest row) give the
loss, metrics and gradients of fixed micro-batches, with fewer padded tokens: at TP=1 (in this process,
two loss aggregations) and at PP=2 (two gloo processes; micro-batches of different shapes through the
1F1B schedule)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import launch_ranks, token_budget_step

BUDGET = 48  # rows of 15, 15, 14 | 14, 11, 9 | 7, 5 tokens: 45 + 42 + 14 = 101 padded tokens in 3 micro-batches
FIXED_PADDED = 8 * 15  # 4 micro-batches of 2 rows at the batch's full width
REPORTED = ("loss", "pg_loss", "kl", "entropy", "clip_frac_low", "clip_frac_high", "ppo_kl", "approx_kl")


@pytest.fixture(scope="module")
def fixed_step(qwen2_dirs, world1) -> dict:
    return token_budget_step(qwen2_dirs[True], world1, max_tokens_per_micro_batch=0)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_token_budget_equals_fixed_micro_batches(loss_agg, qwen2_dirs, world1, fixed_step) -> None:
    fixed = fixed_step if loss_agg == "token-mean" else token_budget_step(
        qwen2_dirs[True], world1, max_tokens_per_micro_batch=0, loss_agg=loss_agg)
    budget = token_budget_step(qwen2_dirs[True], world1, max_tokens_per_micro_batch=BUDGET, loss_agg=loss_agg)
    assert fixed["shapes"] == [(2, 15)] * 4
    assert budget["shapes"] == [(3, 15), (3, 14), (2, 7)]  # 3 micro-batches of different sizes: the
    assert budget["padded_tokens"] == 45 + 42 + 14 == 101 < fixed["padded_tokens"] == FIXED_PADDED  # multiplier
    # The reference logprobs came from forward_logprobs with the same grouping: original row order.
    torch.testing.assert_close(budget["ref_logprobs"], fixed["ref_logprobs"], atol=1e-5, rtol=0)
    # Sums of the same per-token terms over other groupings: fp32 rounding only.
    for name in REPORTED:
        assert budget["metrics"][name] == pytest.approx(fixed["metrics"][name], abs=1e-6), name
    assert fixed["metrics"]["clip_frac_low"] + fixed["metrics"]["clip_frac_high"] > 0  # the clip is active
    assert budget["metrics"]["grad_norm"] == pytest.approx(fixed["metrics"]["grad_norm"], rel=1e-6)
    # Per element, through the whole model: |diff| <= 1e-5 of the tensor's largest gradient. Measured 2.6e-6
    # (the word embedding, which sums every token's gradient); regrouping FIXED micro-batches (2 vs 8 rows)
    # moves it by 3.0e-6 as well: the fp32 floor of summing in another order. A micro-batch weighed wrongly
    # (the loss multiplier with 3 micro-batches instead of 4) would be off by 25% or more.
    for name, grad in budget["grads"].items():
        want = fixed["grads"][name]
        torch.testing.assert_close(grad, want, atol=1e-5 * want.abs().max().item(), rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_token_budget_at_pp2_equals_fixed_at_tp1(qwen2_dirs, fixed_step, tmp_path) -> None:
    """PP=2 with token-budget micro-batches of three shapes (megatron-core's variable_seq_lengths): the
    loss, metrics and grad norm of TP=1 with fixed micro-batches; logprobs broadcast to both stages."""
    worker = Path(__file__).resolve().parent / "_budget_worker.py"
    ranks = launch_ranks(worker, [str(qwen2_dirs[True]), str(BUDGET)], tmp_path, world_size=2, timeout_s=120)
    assert [(r["info"].pp_rank, r["info"].pp_size) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["shapes"] == [(3, 15), (3, 14), (2, 7)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert torch.equal(ranks[0]["ref_logprobs"], ranks[1]["ref_logprobs"])
    torch.testing.assert_close(ranks[0]["ref_logprobs"], fixed_step["ref_logprobs"], atol=1e-5, rtol=0)
    for name in REPORTED:
        assert ranks[0]["metrics"][name] == pytest.approx(fixed_step["metrics"][name], abs=1e-6), name
    assert ranks[0]["metrics"]["grad_norm"] == pytest.approx(fixed_step["metrics"]["grad_norm"], rel=1e-6)
