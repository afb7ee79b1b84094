"""Outcome advantages (GRPO, Dr.GRPO, RLOO, REINFORCE++-baseline) and GAE, checked by hand."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.algorithms import (
    broadcast_to_tokens,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_whiten,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)

EPS = 1e-6
F64 = torch.float64


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def ids(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# Two groups with non-contiguous, unsorted ids and a group of one:
#   group 7: rewards [1, 0]  mean 0.5, unbiased std sqrt(0.5)  = 0.70710678
#   group 2: rewards [3, 5]  mean 4,   unbiased std sqrt(2)    = 1.41421356
#   group 9: reward  [2]     a group of one: mean 0, std 1
MIXED_REWARDS = [1.0, 0.0, 3.0, 5.0, 2.0]
MIXED_GROUPS = [7, 7, 2, 2, 9]


# --- GRPO ----------------------------------------------------------------------------------


def test_grpo_one_group_by_hand() -> None:
    # rewards [1, 0, 0, 1]: mean 0.5; deviations +-0.5, squared sum 1, unbiased var 1/3,
    # std sqrt(1/3) = 0.5773503; advantage +-0.5 / (0.5773503 + 1e-6) = +-0.8660239
    adv = grpo_advantages(t([1, 0, 0, 1]), ids([0, 0, 0, 0]))
    expected = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert expected == pytest.approx(0.8660239, abs=1e-7)
    torch.testing.assert_close(adv, t([expected, -expected, -expected, expected]), rtol=0, atol=1e-12)


def test_grpo_groups_and_group_of_one_by_hand() -> None:
    adv = grpo_advantages(t(MIXED_REWARDS), ids(MIXED_GROUPS))
    # group 7: +-0.5 / (0.70710678 + 1e-6) = +-0.7071058; group 2: -+1 / (1.41421356 + 1e-6) = -+0.7071063
    # group 9 (one response, verl: mean 0, std 1): (2 - 0) / (1 + 1e-6) = 1.999998
    a7 = 0.5 / (math.sqrt(0.5) + EPS)
    a2 = 1.0 / (math.sqrt(2.0) + EPS)
    assert (a7, a2) == (pytest.approx(0.7071058, abs=1e-7), pytest.approx(0.7071063, abs=1e-7))
    torch.testing.assert_close(adv, t([a7, -a7, -a2, a2, 2 / (1 + EPS)]), rtol=0, atol=1e-12)


def test_grpo_equal_rewards_give_zero() -> None:
    # std 0: (r - mean) / (0 + eps) = 0 / eps = 0, not NaN
    adv = grpo_advantages(t([1, 1, 1]), ids([3, 3, 3]))
    torch.testing.assert_close(adv, t([0, 0, 0]), rtol=0, atol=0)


def test_dr_grpo_drops_the_std_by_hand() -> None:
    # r - group mean: group 7 [0.5, -0.5], group 2 [-1, 1], group of one: 2 - 0 = 2
    expected = t([0.5, -0.5, -1, 1, 2])
    torch.testing.assert_close(dr_grpo_advantages(t(MIXED_REWARDS), ids(MIXED_GROUPS)), expected, rtol=0, atol=0)
    no_std = grpo_advantages(t(MIXED_REWARDS), ids(MIXED_GROUPS), norm_by_std=False)
    torch.testing.assert_close(no_std, expected, rtol=0, atol=0)


def _verl_grpo(rewards: list[float], index: list[int], norm_by_std: bool) -> list[float]:
    """verl's compute_grpo_outcome_advantage loop, written out as a reference."""
    by_group = defaultdict(list)
    for r, i in zip(rewards, index):
        by_group[i].append(r)
    out = []
    for r, i in zip(rewards, index):
        scores = torch.tensor(by_group[i], dtype=F64)
        mean, std = (scores.mean(), scores.std()) if len(scores) > 1 else (t(0.0), t(1.0))
        out.append(float((r - mean) / (std + EPS)) if norm_by_std else float(r - mean))
    return out


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-5, 5, allow_nan=False), st.integers(0, 4)),
        min_size=1,
        max_size=12,
    ),
    st.booleans(),
)
def test_grpo_matches_the_verl_loop(pairs: list[tuple[float, int]], norm_by_std: bool) -> None:
    rewards, index = [p[0] for p in pairs], [p[1] for p in pairs]
    adv = grpo_advantages(t(rewards), ids(index), norm_by_std=norm_by_std)
    torch.testing.assert_close(adv, t(_verl_grpo(rewards, index, norm_by_std)), rtol=1e-9, atol=1e-9)


def test_outcome_estimators_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(N,\).*\(3,\).*\(2,\)"):
        grpo_advantages(t([1, 2, 3]), ids([0, 0]))
    with pytest.raises(ValueError, match="integer"):
        rloo_advantages(t([1, 2]), t([0, 0]))
    with pytest.raises(ValueError, match="float"):
        reinforce_pp_baseline_advantages(ids([1, 2]), ids([0, 0]))


# --- RLOO ----------------------------------------------------------------------------------


def test_rloo_leave_one_out_by_hand() -> None:
    # [3, 6, 9]: 3 - mean(6, 9) = -4.5; 6 - mean(3, 9) = 0; 9 - mean(3, 6) = 4.5
    torch.testing.assert_close(rloo_advantages(t([3, 6, 9]), ids([0, 0, 0])), t([-4.5, 0, 4.5]), rtol=0, atol=0)
    # [1, 0, 0, 1]: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3
    two_thirds = 2 / 3
    expected = t([two_thirds, -two_thirds, -two_thirds, two_thirds])
    torch.testing.assert_close(rloo_advantages(t([1, 0, 0, 1]), ids([5, 5, 5, 5])), expected, rtol=0, atol=1e-15)


def test_rloo_groups_and_group_of_one() -> None:
    # group 7: 1 - 0 = 1, 0 - 1 = -1; group 2: 3 - 5 = -2, 5 - 3 = 2;
    # group of one: no other response, baseline 0 -> the raw reward 2, as Dr.GRPO (and verl's RLOO)
    adv = rloo_advantages(t(MIXED_REWARDS), ids(MIXED_GROUPS))
    torch.testing.assert_close(adv, t([1, -1, -2, 2, 2]), rtol=0, atol=0)


def test_group_of_one_is_handled_alike_by_every_estimator() -> None:
    # one response of reward 0.25 next to a group [1, 0]: baseline 0, so each passes 0.25 on
    # (GRPO divides by std 1 + eps); REINFORCE++-baseline then whitens x = [0.5, -0.5, 0.25]
    rewards, groups = t([1.0, 0.0, 0.25]), ids([0, 0, 1])
    assert float(grpo_advantages(rewards, groups)[2]) == pytest.approx(0.25 / (1 + EPS), abs=1e-15)
    assert float(dr_grpo_advantages(rewards, groups)[2]) == 0.25
    assert float(rloo_advantages(rewards, groups)[2]) == 0.25
    # x mean 0.25/3, x - mean = [0.41667, -0.58333, 0.16667]; var (0.173611 + 0.340278 + 0.027778) / 2
    x = [0.5, -0.5, 0.25]
    mean = sum(x) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / 2)
    rpp = reinforce_pp_baseline_advantages(rewards, groups)
    assert float(rpp[2]) == pytest.approx((0.25 - mean) / (std + EPS), abs=1e-12)


# --- REINFORCE++-baseline -------------------------------------------------------------------


def test_reinforce_pp_baseline_by_hand() -> None:
    # x = r - group mean = [0.5, -0.5, -1, 1, 2] (group of one: mean 0, x = r = 2)
    # batch mean of x = 2 / 5 = 0.4; x - 0.4 = [0.1, -0.9, -1.4, 0.6, 1.6]
    # squares 0.01 + 0.81 + 1.96 + 0.36 + 2.56 = 5.7; unbiased var 5.7 / 4 = 1.425, std 1.1937336
    # advantages = (x - 0.4) / (1.1937336 + 1e-6): first two 0.0837707, -0.7539364
    std = math.sqrt(1.425)
    expected = t([0.1, -0.9, -1.4, 0.6, 1.6]) / (std + EPS)
    adv = reinforce_pp_baseline_advantages(t(MIXED_REWARDS), ids(MIXED_GROUPS))
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert adv[:2].tolist() == [pytest.approx(0.0837707, abs=1e-7), pytest.approx(-0.7539364, abs=1e-7)]


def test_reinforce_pp_baseline_single_response_is_zero() -> None:
    # x = 3 (group of one); the batch of one has x - mean(x) = 0
    torch.testing.assert_close(reinforce_pp_baseline_advantages(t([3]), ids([0])), t([0]), rtol=0, atol=0)


# --- all-equal groups: exactly 0.0 ----------------------------------------------------------

ESTIMATORS = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_baseline_advantages,
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [8, 16])
def test_all_equal_non_representable_rewards_give_exactly_zero(name: str, dtype: torch.dtype, n: int) -> None:
    # 0.7 is not a binary fraction: float32 sums of 8 or 16 copies round, and the float32 group mean
    # then differs from 0.7, so GRPO gave every response 0.056 (n = 8) or 0.106 (n = 16), all of one sign
    adv = ESTIMATORS[name](torch.full((n,), 0.7, dtype=dtype), torch.zeros(n, dtype=torch.long))
    assert adv.dtype == dtype
    assert adv.tolist() == [0.0] * n


def test_all_equal_float64_rewards_give_exactly_zero() -> None:
    # float64 has no spare bits: 3 x 0.1 sums to 0.30000000000000004, mean 0.10000000000000002;
    # only the explicit max == min check makes this 0
    assert sum([0.1, 0.1, 0.1]) / 3 != 0.1
    for name, estimator in ESTIMATORS.items():
        assert estimator(t([0.1, 0.1, 0.1]), ids([0, 0, 0])).tolist() == [0.0] * 3, name


def _random_batch(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """400 groups of sizes 2..64 with one random non-representable reward each (all equal within
    the group), shuffled, plus 40 mixed groups and 10 groups of one that must not disturb them."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 65, (400,), generator=gen)
    values = torch.rand(400, generator=gen, dtype=torch.float64) * 3 - 1  # random float64, rounded to dtype below
    flat_rewards = torch.repeat_interleave(values, sizes)
    flat_groups = torch.repeat_interleave(torch.arange(400), sizes)
    mixed_rewards = torch.rand(40 * 8 + 10, generator=gen, dtype=torch.float64)
    mixed_groups = torch.cat([400 + torch.arange(40 * 8) // 8, 440 + torch.arange(10)])
    rewards = torch.cat([flat_rewards, mixed_rewards]).to(dtype)
    groups = torch.cat([flat_groups, mixed_groups]) * 7 % 1009  # non-contiguous ids
    is_flat = torch.arange(len(rewards)) < len(flat_groups)
    order = torch.randperm(len(rewards), generator=gen)
    return rewards[order], groups[order], is_flat[order]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_all_equal_groups_of_2_to_64_give_exactly_zero(name: str, dtype: torch.dtype) -> None:
    rewards, groups, is_flat = _random_batch(seed=18, dtype=dtype)
    adv = ESTIMATORS[name](rewards, groups)
    assert adv.dtype == dtype
    assert (adv[is_flat] == 0).all(), f"{int((adv[is_flat] != 0).sum())} non-zero advantages in all-equal groups"
    assert (adv[~is_flat] != 0).sum() > 300  # the mixed groups and groups of one still get a signal


# --- group identities that hold for any rewards --------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=8), st.integers(1, 3))
def test_group_identities(rewards: list[float], num_groups: int) -> None:
    r = t(rewards)
    index = torch.arange(len(rewards)) % num_groups
    for group in range(num_groups):
        in_group = index == group
        if in_group.sum() < 2:
            continue
        # Dr.GRPO and RLOO advantages sum to zero within a group; RLOO = n/(n-1) * Dr.GRPO
        n = float(in_group.sum())
        dr = dr_grpo_advantages(r, index)[in_group]
        rloo = rloo_advantages(r, index)[in_group]
        assert float(dr.sum()) == pytest.approx(0, abs=1e-9)
        torch.testing.assert_close(rloo, n / (n - 1) * dr, rtol=1e-9, atol=1e-9)


# --- broadcasting and whitening ------------------------------------------------------------


def test_broadcast_to_tokens_by_hand() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(broadcast_to_tokens(t([2, -3]), mask), t([[2, 2, 0], [-3, 0, 0]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        broadcast_to_tokens(t([1, 2, 3]), mask)


def test_masked_whiten_by_hand() -> None:
    # valid [1, 2, 3]: mean 2, unbiased std 1 -> [-1, 0, 1] / (1 + eps); the invalid 100 -> 0
    out = masked_whiten(t([1, 2, 3, 100]), torch.tensor([1, 1, 1, 0]))
    torch.testing.assert_close(out, t([-1 / (1 + EPS), 0, 1 / (1 + EPS), 0]), rtol=0, atol=1e-15)
    # empty mask: zeros, not NaN; one valid entry: 0
    torch.testing.assert_close(masked_whiten(t([1, 2]), torch.tensor([0, 0])), t([0, 0]), rtol=0, atol=0)
    torch.testing.assert_close(masked_whiten(t([5, 2]), torch.tensor([1, 0])), t([0, 0]), rtol=0, atol=0)


# --- GAE -----------------------------------------------------------------------------------

REWARDS_3 = [[0.0, 0.0, 1.0]]
VALUES_3 = [[0.5, 0.6, 0.7]]


def test_gae_gamma_1_lam_1_by_hand() -> None:
    # gamma = lam = 1: A_t = (sum of rewards from t) - V_t
    # t=2: delta = 1 + 0 - 0.7 = 0.3,   A = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1, A = 0.1 + 0.3 = 0.4
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1, A = 0.1 + 0.4 = 0.5;  returns = A + V = [1, 1, 1]
    adv, ret = gae(t(REWARDS_3), t(VALUES_3), torch.ones(1, 3), gamma=1.0, lam=1.0, whiten=False)
    torch.testing.assert_close(adv, t([[0.5, 0.4, 0.3]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, t([[1.0, 1.0, 1.0]]), rtol=0, atol=1e-12)


def test_gae_gamma_09_lam_095_by_hand() -> None:
    # gamma * lam = 0.855
    # t=2: delta = 1 - 0.7 = 0.3,                A = 0.3
    # t=1: delta = 0.9 * 0.7 - 0.6 = 0.03,       A = 0.03 + 0.855 * 0.3    = 0.2865
    # t=0: delta = 0.9 * 0.6 - 0.5 = 0.04,       A = 0.04 + 0.855 * 0.2865 = 0.2849575
    # returns = A + V = [0.7849575, 0.8865, 1.0]
    adv, ret = gae(t(REWARDS_3), t(VALUES_3), torch.ones(1, 3), gamma=0.9, lam=0.95, whiten=False)
    torch.testing.assert_close(adv, t([[0.2849575, 0.2865, 0.3]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, t([[0.7849575, 0.8865, 1.0]]), rtol=0, atol=1e-12)


def test_gae_skips_invalid_tokens_by_hand() -> None:
    rewards = t([[0.0, 1.0, 5.0], [0.0, 9.0, 1.0]])
    values = t([[0.5, 0.6, 9.0], [0.5, 9.0, 0.7]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    # row 0, trailing padding (its reward 5 and value 9 are ignored; V after the end is 0):
    #   t=1: delta = 1 + 0 - 0.6 = 0.4, A = 0.4; t=0: delta = 0.6 - 0.5 = 0.1, A = 0.5
    # row 1, a masked middle token (reward 9, value 9 ignored; V_next and A_next carried over it):
    #   t=2: A = 1 - 0.7 = 0.3; t=0: delta = 0 + 0.7 - 0.5 = 0.2, A = 0.2 + 0.3 = 0.5
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    torch.testing.assert_close(adv, t([[0.5, 0.4, 0], [0.5, 0, 0.3]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, t([[1.0, 1.0, 0], [1.0, 0, 1.0]]), rtol=0, atol=1e-12)


def test_gae_whitening_uses_valid_tokens_only() -> None:
    rewards = t([[0.0, 1.0, 5.0], [0.0, 9.0, 1.0]])
    values = t([[0.5, 0.6, 9.0], [0.5, 9.0, 0.7]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    _, raw_ret = gae(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # valid raw advantages [0.5, 0.4, 0.5, 0.3]: mean 0.425, deviations [0.075, -0.025, 0.075, -0.125],
    # squares sum 0.0275, unbiased var 0.0275 / 3, std 0.0957427
    std = math.sqrt(0.0275 / 3)
    expected = t([[0.075, -0.025, 0], [0.075, 0, -0.125]]) / (std + EPS)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, raw_ret, rtol=0, atol=0)  # returns are never whitened


def test_gae_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae(t([[0.0, 1.0]]), t([[0.0, 1.0, 2.0]]), torch.ones(1, 2), gamma=1.0, lam=1.0)
