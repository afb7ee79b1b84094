"""Each policy loss, the value loss, KL in the reward, the KL controllers and GAE against verl's formulas
on seeded random inputs.

The references below are verl's ``verl/trainer/ppo/core_algos.py`` (and ``ray_trainer.apply_kl_penalty``,
``utils/torch_functional.masked_whiten``) as of commit b178a3cd (2026-01), re-written here with the
config lookups replaced by arguments and ``.item()`` dropped; verl is not imported. Where our functions
follow a documented convention that differs (an epsilon, a clamp, a count), the test states it.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algorithms import (
    AdaptiveKLController,
    aggregate,
    cispo_loss,
    clip_cov_loss,
    gae,
    gmpo_loss,
    gspo_loss,
    kl_cov_loss,
    kl_penalised_rewards,
    kl_penalty,
    ppo_clip_loss,
    reinforce_loss,
    value_loss,
)

F64 = torch.float64
SEEDS = [0, 1, 2, 3, 4]


# --- verl, re-written ------------------------------------------------------------------------


def verl_masked_mean(values, mask, axis=None):
    return (values * mask).sum(axis) / (mask.sum(axis) + 1e-8)


def verl_masked_whiten(values, mask):
    mean = verl_masked_mean(values, mask)
    var = verl_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    var = var * mask_sum / (mask_sum - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def verl_agg_loss(loss_mat, loss_mask, mode, loss_scale_factor=None):
    if mode == "token-mean":
        return verl_masked_mean(loss_mat, loss_mask)
    if mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    if mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    if mode == "seq-mean-token-sum-norm":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        return torch.sum(seq_losses) / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    raise ValueError(mode)


def verl_vanilla(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c, mode):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return verl_agg_loss(pg_losses, response_mask, mode), pg_clipfrac


def verl_gspo(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high):
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    pg_loss = verl_agg_loss(pg_losses, response_mask, "seq-mean-token-mean")
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    return pg_loss, pg_clipfrac, ppo_kl.detach()


def verl_cispo(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high, mode):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    clipped_ratio = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = -clipped_ratio.detach() * advantages * log_prob
    pg_clipfrac = verl_masked_mean((ratio != clipped_ratio).float(), response_mask)
    return verl_agg_loss(pg_losses, response_mask, mode), pg_clipfrac, ppo_kl.detach()


def verl_geo_mean(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high):
    negative_approx_kl = log_prob - old_log_prob
    sgn_advantage = torch.sign(advantages)
    negative_approx_kl_clamp = torch.clamp(negative_approx_kl, -cliprange_low, cliprange_high)
    negative_approx_kl_min = torch.min(sgn_advantage * negative_approx_kl, sgn_advantage * negative_approx_kl_clamp)
    negative_approx_kl_min = sgn_advantage * negative_approx_kl_min
    response_mask_sum = response_mask.sum(dim=-1)
    ratio = torch.exp((negative_approx_kl_min * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8))
    advantage = (advantages * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8)
    pg_losses = -advantage * ratio
    return torch.mean(pg_losses)


def verl_clip_cov_all_candidates(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high,
                                 clip_cov_lb, clip_cov_ub):
    """verl's compute_policy_loss_clip_cov with clip_num >= the number of candidates, where its randperm
    selection takes every candidate (so the result is deterministic)."""
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    corr = torch.ones_like(advantages)
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_by_origin = (pg_losses2 > pg_losses1) & (response_mask > 0)
    cov_all = (advantages - verl_masked_mean(advantages, response_mask)) * (
        log_prob - verl_masked_mean(log_prob.detach(), response_mask)
    )
    cov_all[response_mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    top_k_idx = (cov_all < clip_cov_ub) & (cov_all > clip_cov_lb) & (response_mask > 0)
    corr[top_k_idx] = 0
    pg_clipfrac = verl_masked_mean((corr == 0).float(), response_mask)
    pg_losses = torch.maximum(pg_losses1, pg_losses2) * corr
    return verl_agg_loss(pg_losses, response_mask, "token-mean"), pg_clipfrac, int(top_k_idx.sum())


def verl_kl_cov(old_log_prob, log_prob, advantages, response_mask, kl_cov_ratio, ppo_kl_coef, mode):
    negative_approx_kl = log_prob - old_log_prob
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses_kl = -advantages * ratio + ppo_kl_coef * abs_kl
    pg_losses = pg_losses1.clone()
    all_valid = response_mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = advantages[all_valid].detach().reshape(-1)
    all_valid_logp = log_prob[all_valid].detach().reshape(-1)
    cov_lst_all = (all_valid_adv - all_valid_adv.mean()) * (all_valid_logp - all_valid_logp.mean())
    k_percent_nums = max(1, int(len(cov_lst_all) * kl_cov_ratio))
    large_cov_idxs = all_valid_idx[torch.topk(cov_lst_all, k_percent_nums, largest=True).indices]
    rows, cols = large_cov_idxs // advantages.shape[1], large_cov_idxs % advantages.shape[1]
    pg_losses[rows, cols] = pg_losses_kl[rows, cols]
    return verl_agg_loss(pg_losses, response_mask, mode)


def verl_reinforce(log_prob, advantages, response_mask, mode):
    return verl_agg_loss(-advantages * log_prob, response_mask, mode)


def verl_value_loss(vpreds, returns, values, response_mask, cliprange_value, mode):
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    clipped_vf_losses = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * verl_agg_loss(clipped_vf_losses, response_mask, mode)
    vf_clipfrac = verl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask)
    return vf_loss, vf_clipfrac


def verl_apply_kl_penalty(token_level_scores, old_log_probs, ref_log_prob, response_mask, beta, kind):
    kld = kl_penalty(old_log_probs, ref_log_prob, kind)  # verl's kl_penalty_forward: our estimators agree
    kld = kld * response_mask
    token_level_rewards = token_level_scores - beta * kld
    current_kl = torch.mean(verl_masked_mean(kld, mask=response_mask, axis=-1), dim=0)
    return token_level_rewards, current_kl


class VerlAdaptiveKLController:
    def __init__(self, init_kl_coef, target_kl, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target_kl, horizon

    def update(self, current_kl, n_steps):
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)  # np.clip
        self.value *= 1 + proportional_error * n_steps / self.horizon


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    nextvalues, lastgaelam, advantages_reversed = 0, 0, []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, verl_masked_whiten(advantages, response_mask), returns


# --- inputs ----------------------------------------------------------------------------------


def inputs(seed: int, b: int = 8, length: int = 12, spread: float = 0.3):
    """Random logprobs near an old policy, per-token advantages (each row's own sign pattern) and a
    ragged float mask with every row holding at least one valid token."""
    gen = torch.Generator().manual_seed(seed)
    log_prob = (-torch.rand(b, length, generator=gen, dtype=F64) * 4).requires_grad_(True)
    old_log_prob = log_prob.detach() + spread * torch.randn(b, length, generator=gen, dtype=F64)
    advantages = torch.randn(b, 1, generator=gen, dtype=F64).expand(b, length).clone()
    advantages[:2] = torch.randn(2, length, generator=gen, dtype=F64)  # two rows of token-level advantages
    mask = (torch.arange(length) < torch.randint(1, length + 1, (b, 1), generator=gen)).to(F64)
    mask[0, 1] = 0.0  # a hole inside a response
    mask[0, 0] = 1.0
    return log_prob, old_log_prob, advantages, mask


def grad(scalar, log_prob):
    (g,) = torch.autograd.grad(scalar, log_prob)
    return g


# --- the policy losses -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_ppo_clip_matches_verl_vanilla(seed: int, mode: str) -> None:
    log_prob, old, adv, mask = inputs(seed)
    ours, m = ppo_clip_loss(log_prob, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=3.0)
    ours = aggregate(ours, mask, mode)
    theirs, clipfrac = verl_vanilla(old, log_prob, adv, mask, 0.2, 0.28, 3.0, mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)  # verl's masked means add 1e-8
    torch.testing.assert_close(grad(ours, log_prob), grad(theirs, log_prob), rtol=1e-7, atol=1e-9)
    # verl's pg_clipfrac counts both bounds: ours split by side
    assert float(m["clip_frac_low"] + m["clip_frac_high"]) == pytest.approx(float(clipfrac), abs=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_matches_verl(seed: int) -> None:
    log_prob, old, adv, mask = inputs(seed, spread=0.02)  # sequence ratios near 1: some in, some out of the clip
    ours, m = gspo_loss(log_prob, old, adv, mask, clip_low=3e-3, clip_high=4e-3)
    ours = aggregate(ours, mask, "seq-mean-token-mean")
    theirs, clipfrac, ppo_kl = verl_gspo(old, log_prob, adv, mask, 3e-3, 4e-3)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad(ours, log_prob), grad(theirs, log_prob), rtol=1e-7, atol=1e-9)
    assert 0 < float(clipfrac) < 1  # both branches exercised
    assert float(m["clip_frac_low"] + m["clip_frac_high"]) == pytest.approx(float(clipfrac), abs=1e-8)
    assert float(m["ppo_kl"]) == pytest.approx(float(ppo_kl), abs=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip_low", [0.2, None])
def test_cispo_matches_verl(seed: int, clip_low: float | None) -> None:
    log_prob, old, adv, mask = inputs(seed)
    ours, m = cispo_loss(log_prob, old, adv, mask, clip_low=clip_low, clip_high=0.28)
    ours = aggregate(ours, mask, "token-mean")
    # verl's example turns the lower bound off with clip_ratio_low=10 (1 - 10 = -9 < any ratio)
    theirs, clipfrac, ppo_kl = verl_cispo(old, log_prob, adv, mask, 10.0 if clip_low is None else clip_low, 0.28,
                                          "token-mean")
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad(ours, log_prob), grad(theirs, log_prob), rtol=1e-7, atol=1e-9)
    assert float(m["clip_frac_low"] + m["clip_frac_high"]) == pytest.approx(float(clipfrac), abs=1e-8)
    assert float(m["ppo_kl"]) == pytest.approx(float(ppo_kl), abs=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
def test_gmpo_matches_verl_geo_mean(seed: int) -> None:
    log_prob, old, adv, mask = inputs(seed, spread=0.5)
    mask[3] = 0.0  # a row without valid tokens: verl's torch.mean counts it, so pass B as global_num_seqs
    b = mask.shape[0]
    ours, _ = gmpo_loss(log_prob, old, adv, mask, clip_low=0.4, clip_high=0.4)
    ours = aggregate(ours, mask, "seq-mean-token-mean", global_num_seqs=b)
    theirs = verl_geo_mean(old, log_prob, adv, mask, 0.4, 0.4)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)  # verl divides by count + 1e-8
    torch.testing.assert_close(grad(ours, log_prob), grad(theirs, log_prob), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_clip_cov_matches_verl_when_every_candidate_is_cut(seed: int) -> None:
    log_prob, old, adv, mask = inputs(seed)
    adv = 3 * adv  # spread the covariances so that many fall in (0.5, 2)
    ours, m = clip_cov_loss(log_prob, old, adv, mask, clip_low=0.2, clip_high=0.2, clip_cov_ratio=1.0,
                            clip_cov_lb=0.5, clip_cov_ub=2.0)
    ours = aggregate(ours, mask, "token-mean")
    theirs, clipfrac, num_candidates = verl_clip_cov_all_candidates(old, log_prob, adv, mask, 0.2, 0.2, 0.5, 2.0)
    assert num_candidates >= 3
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad(ours, log_prob), grad(theirs, log_prob), rtol=1e-7, atol=1e-9)
    assert float(m["cov_frac"]) == pytest.approx(float(clipfrac), abs=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5])
def test_kl_cov_matches_verl(seed: int, ratio: float) -> None:
    log_prob, old, adv, mask = inputs(seed)
    ours, _ = kl_cov_loss(log_prob, old, adv, mask, kl_cov_ratio=ratio, ppo_kl_coef=1.0)
    ours = aggregate(ours, mask, "token-mean")
    theirs = verl_kl_cov(old, log_prob, adv, mask, ratio, 1.0, "token-mean")
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad(ours, log_prob), grad(theirs, log_prob), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_reinforce_matches_verl(seed: int, mode: str) -> None:
    log_prob, old, adv, mask = inputs(seed)
    ours = aggregate(reinforce_loss(log_prob, old, adv, mask)[0], mask, mode)
    theirs = verl_reinforce(log_prob, adv, mask, mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad(ours, log_prob), grad(theirs, log_prob), rtol=1e-7, atol=1e-9)


def test_seq_mean_token_sum_norm_is_verl_divided_by_the_number_of_sequences() -> None:
    # verl's mode of the same name does not divide by the number of sequences (aggregate's docstring)
    log_prob, _, adv, mask = inputs(0)
    loss = -adv * log_prob.detach()
    ours = aggregate(loss, mask, "seq-mean-token-sum-norm", constant=64)
    theirs = verl_agg_loss(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=64)
    torch.testing.assert_close(ours * mask.shape[0], theirs, rtol=1e-12, atol=0)


# --- the critic, KL in the reward, GAE -------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_matches_verl(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    _, _, _, mask = inputs(seed)
    values = torch.randn(mask.shape, generator=gen, dtype=F64).requires_grad_(True)
    old_values = values.detach() + torch.randn(mask.shape, generator=gen, dtype=F64)
    returns = torch.randn(mask.shape, generator=gen, dtype=F64)
    ours, m = value_loss(values, old_values, returns, mask, clip_range=0.5)
    ours = aggregate(ours, mask, "token-mean")
    theirs, clipfrac = verl_value_loss(values, returns, old_values, mask, 0.5, "token-mean")
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad(ours, values), grad(theirs, values), rtol=1e-7, atol=1e-9)
    assert 0 < float(clipfrac) < 1
    assert float(m["vf_clip_frac"]) == pytest.approx(float(clipfrac), abs=1e-8)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["k1", "low_var_kl"])
def test_kl_in_reward_matches_verl_apply_kl_penalty(seed: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    log_prob, old, _, mask = inputs(seed)
    scores = torch.randn(mask.shape, generator=gen, dtype=F64) * mask  # verl's scores are 0 at invalid tokens
    ours, mean_kl = kl_penalised_rewards(scores, log_prob.detach(), old, mask, coef=0.05, kind=kind)
    theirs, current_kl = verl_apply_kl_penalty(scores, log_prob.detach(), old, mask, 0.05, kind)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert float(mean_kl) == pytest.approx(float(current_kl), rel=1e-7)  # every row has a valid token


def test_adaptive_controller_matches_verl() -> None:
    gen = torch.Generator().manual_seed(0)
    ours, theirs = AdaptiveKLController(0.05, target_kl=0.1, horizon=1000), VerlAdaptiveKLController(0.05, 0.1, 1000)
    for kl in (torch.rand(50, generator=gen, dtype=F64) * 0.3).tolist():
        ours.update(kl, 64)
        theirs.update(kl, 64)
        assert ours.value == theirs.value


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95)])
def test_gae_matches_verl(seed: int, gamma: float, lam: float) -> None:
    # At valid tokens, the advantages before whitening and the returns are verl's exactly. The whitened
    # advantages differ by the epsilon convention, (x - mean) / (std + 1e-6) against verl's
    # (x - mean) * rsqrt(var + 1e-8): relative 1e-6 / std. At invalid tokens ours are 0; verl's hold the
    # carried-over advantage (and its whitened value) and values + advantages.
    gen = torch.Generator().manual_seed(seed)
    _, _, _, mask = inputs(seed)
    rewards = torch.randn(mask.shape, generator=gen, dtype=F64)
    values = torch.randn(mask.shape, generator=gen, dtype=F64)
    raw, returns = gae(rewards, values, mask, gamma=gamma, lam=lam, whiten=False)
    whitened, _ = gae(rewards, values, mask, gamma=gamma, lam=lam)
    verl_raw, verl_whitened, verl_returns = verl_gae(rewards, values, mask, gamma, lam)
    valid = mask.bool()
    torch.testing.assert_close(raw[valid], verl_raw[valid], rtol=0, atol=1e-12)
    torch.testing.assert_close(returns[valid], verl_returns[valid], rtol=0, atol=1e-12)
    torch.testing.assert_close(whitened[valid], verl_whitened[valid], rtol=1e-5, atol=1e-6)
    assert (raw[~valid] == 0).all() and (returns[~valid] == 0).all()
    assert math.isfinite(float(whitened.abs().max()))
