"""train_step with each policy loss (LossSettings.policy_loss): the loss it reports is the pure function's
(megatron_rl.algorithms.policy_loss) on the policy's own logprobs, aggregated as asked, and clip_cov's
random choice follows LossSettings.loss_seed."""

from __future__ import annotations

import pytest
import torch
from _helpers import TEMPERATURE, build_policy_and_reference, train_batch

from megatron_rl import algorithms

# Parameters that make every loss do something on this batch (old logprobs = the policy's + 0.3 N(0, 1):
# ratios of exp(+-0.3) and more): wide covariance windows and large selected shares for clip_cov / kl_cov.
PARAMS = {
    "clip_cov": algorithms.ClipCovParams(clip_cov_ratio=0.3, clip_cov_lb=-1e9, clip_cov_ub=1e9),
    "kl_cov": algorithms.KLCovParams(kl_cov_ratio=0.3),
}


def one_step(model_dir, info, name: str, *, seed: int = 0) -> tuple[dict, float, torch.Tensor, torch.Tensor]:
    """One train_step with policy loss ``name`` (micro-batches of 2 rows); returns (metrics, the expected
    pg_loss from the pure function, logprobs before, old logprobs)."""
    from megatron_rl.megatron.forward import forward_logprobs
    from megatron_rl.megatron.optim import unwrap_ddp
    from megatron_rl.megatron.train_step import LossSettings, MicroBatch, count_valid_tokens, train_step

    policy, optimizer, _reference, config = build_policy_and_reference(model_dir, info)
    ids, mask, advantages = train_batch(config.vocab_size)
    logprobs = forward_logprobs(unwrap_ddp(policy), ids, vocab_size=config.vocab_size, temperature=TEMPERATURE,
                                mask=mask).logprobs
    old = logprobs + 0.3 * torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(5)) * mask
    agg = algorithms.SEQUENCE_LEVEL_AGGREGATION.get(name, "token-mean")
    params = PARAMS.get(name, algorithms.POLICY_LOSS_PARAMS[name]())
    micro = [MicroBatch(ids[r:r + 2], mask[r:r + 2], old[r:r + 2], advantages[r:r + 2]) for r in (0, 2)]
    num_tokens, num_seqs = count_valid_tokens(micro), 4
    settings = LossSettings(temperature=TEMPERATURE, kl_coef=0.0, loss_agg=agg, policy_loss=name,
                            policy_loss_params=params, loss_seed=seed)
    metrics = train_step(policy, optimizer, micro, global_num_tokens=num_tokens, global_num_seqs=num_seqs,
                         vocab_size=config.vocab_size, settings=settings)
    expected = 0.0
    generator = torch.Generator().manual_seed(seed)
    for r in (0, 2):  # per micro-batch, as train_step calls it (clip_cov / kl_cov select within a call)
        rows = slice(r, r + 2)
        loss, _ = algorithms.policy_loss(name, logprobs[rows], old[rows], advantages[rows], mask[rows], params=params,
                                         global_num_tokens=num_tokens, generator=generator)
        expected += float(algorithms.aggregate(loss, mask[rows], agg, global_num_tokens=num_tokens,
                                               global_num_seqs=num_seqs))
    return metrics, expected, logprobs, old


@pytest.mark.parametrize("name", list(algorithms.POLICY_LOSSES))
def test_train_step_reports_the_pure_loss(name, qwen2_dirs, world1) -> None:
    metrics, expected, _logprobs, _old = one_step(qwen2_dirs[True], world1, name)
    # The same logprobs (same weights, same kernels) up to the chunked output layer's summation order.
    assert metrics["pg_loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), (metrics, expected)
    assert metrics["update_successful"] == 1.0 and metrics["grad_norm"] > 0
    assert set(algorithms.POLICY_LOSS_METRICS) <= set(metrics)
    if name in ("clip_cov", "kl_cov"):
        assert metrics["cov_frac"] > 0  # 30% of each micro-batch's tokens (at least one) were selected


def test_clip_cov_draws_follow_the_loss_seed(qwen2_dirs, world1) -> None:
    same = [one_step(qwen2_dirs[True], world1, "clip_cov", seed=11)[0] for _ in range(2)]
    assert same[0] == same[1]  # a resumed run passes the same seed and gets the same step
    other = one_step(qwen2_dirs[True], world1, "clip_cov", seed=12)[0]
    # another seed cuts other tokens (3 of each micro-batch's ~11; the same 3 twice: p ~ 1e-4)
    assert other["pg_loss"] != same[0]["pg_loss"] and other["cov_frac"] == same[0]["cov_frac"]
