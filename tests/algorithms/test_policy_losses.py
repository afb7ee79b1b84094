"""GSPO, CISPO, GMPO, Clip-Cov, KL-Cov and REINFORCE losses, and selection by name, checked by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_rl.algorithms import (
    POLICY_LOSS_METRICS,
    POLICY_LOSS_PARAMS,
    POLICY_LOSSES,
    SEQUENCE_LEVEL_AGGREGATION,
    ClipCovParams,
    GSPOParams,
    aggregate,
    broadcast_to_tokens,
    cispo_loss,
    clip_cov_loss,
    gmpo_loss,
    grpo_advantages,
    gspo_loss,
    kl_cov_loss,
    policy_loss,
    ppo_clip_loss,
    reinforce_loss,
)

F64 = torch.float64
ln = math.log


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def mask_of(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def check_metrics(metrics: dict, **expected: float) -> None:
    assert set(metrics) == set(POLICY_LOSS_METRICS)
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    for name in POLICY_LOSS_METRICS:
        if name in expected:
            assert float(metrics[name]) == pytest.approx(expected[name], abs=1e-12), name
        elif name.endswith("frac") or name.startswith("clip_frac"):
            assert float(metrics[name]) == 0.0, name


# --- GSPO ------------------------------------------------------------------------------------

# old_logprobs = 0, so logprobs are the token log-ratios; clip 0.2 / 0.2 -> sequence ratio in [0.8, 1.2]
#   row 0: A = +1, token ratios [1, 1.21]: s = sqrt(1.21) = 1.1, inside -> loss -1.1 per token, gradient -A s = -1.1
#   row 1: A = +1, ratios [1.5, 1.5, 1.5] (+ a masked token with log-ratio 50): s = 1.5 > 1.2 -> -1.2, no gradient
#   row 2: A = -1, ratio [0.5]: s = 0.5 < 0.8 -> max(0.5, 0.8) = 0.8, no gradient
#   row 3: A = -1, ratios [2, 0.5]: s = sqrt(1) = 1 -> loss 1 per token, gradient -A s = 1
#   row 4: no valid token -> 0
GSPO_LOG_RATIOS = [[0, ln(1.21), 0, 0], [ln(1.5)] * 3 + [50.0], [ln(0.5), 0, 0, 0], [ln(2), ln(0.5), 0, 0], [7.0] * 4]
GSPO_ADVANTAGES = [[1.0] * 4, [1.0] * 4, [-1.0] * 4, [-1.0] * 4, [3.0] * 4]
GSPO_MASK = [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


def test_gspo_by_hand() -> None:
    logprobs = t(GSPO_LOG_RATIOS).requires_grad_(True)
    mask = mask_of(GSPO_MASK)
    loss, metrics = gspo_loss(logprobs, torch.zeros_like(logprobs), t(GSPO_ADVANTAGES), mask, clip_low=0.2,
                              clip_high=0.2)
    expected = [[-1.1, -1.1, 0, 0], [-1.2, -1.2, -1.2, 0], [0.8, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    torch.testing.assert_close(loss.detach(), t(expected), rtol=0, atol=1e-12)
    loss.sum().backward()
    expected_grad = [[-1.1, -1.1, 0, 0], [0] * 4, [0] * 4, [1, 1, 0, 0], [0] * 4]
    torch.testing.assert_close(logprobs.grad, t(expected_grad), rtol=0, atol=1e-12)
    # seq-mean-token-mean over the 4 rows with a valid token: (-1.1 - 1.2 + 0.8 + 1) / 4 = -0.125
    assert float(aggregate(loss.detach(), mask, "seq-mean-token-mean")) == pytest.approx(-0.125, abs=1e-12)
    # 8 valid tokens: row 1's three clipped high, row 2's one clipped low;
    # ppo_kl = -(0 + ln 1.21 + 3 ln 1.5 + ln 0.5 + ln 2 + ln 0.5) / 8 = -0.0892336
    check_metrics(metrics, clip_frac_high=3 / 8, clip_frac_low=1 / 8)
    assert float(metrics["ppo_kl"]) == pytest.approx(-0.0892336, abs=1e-7)


def test_gspo_sequence_ratio_is_independent_of_length() -> None:
    # the same per-token log-ratio 0.05 over 1, 3 and 8 tokens: s = exp(mean) = exp(0.05) = 1.0512711 for
    # all three (a product of token ratios would give exp(0.05), exp(0.15), exp(0.40)); with A = 1 and a
    # wide clip each token's loss is -s, and each sequence's total gradient under seq-mean-token-mean is
    # -A s / G whatever its length (G = 3 sequences)
    lengths = [1, 3, 8]
    mask = mask_of([[1] * n + [0] * (8 - n) for n in lengths])
    logprobs = torch.full((3, 8), 0.05, dtype=F64, requires_grad=True)
    loss, _ = gspo_loss(logprobs, torch.zeros_like(logprobs), torch.ones(3, 8, dtype=F64), mask, clip_low=0.5,
                        clip_high=0.5)
    s = math.exp(0.05)
    assert s == pytest.approx(1.0512711, abs=1e-7)
    torch.testing.assert_close(loss.detach(), -s * mask.to(F64), rtol=0, atol=1e-12)
    aggregate(loss, mask, "seq-mean-token-mean").backward()
    torch.testing.assert_close(logprobs.grad.sum(dim=-1), t([-s / 3] * 3), rtol=0, atol=1e-12)


def test_gspo_of_one_token_is_ppo_without_dual_clip() -> None:
    # a one-token response: s = the token ratio, so GSPO = PPO's clip (same bounds, dual clip off)
    gen = torch.Generator().manual_seed(1)
    logprobs = (0.3 * torch.randn(6, 1, generator=gen, dtype=F64)).requires_grad_(True)
    adv, mask = torch.randn(6, 1, generator=gen, dtype=F64), torch.ones(6, 1, dtype=torch.bool)
    gspo, _ = gspo_loss(logprobs, torch.zeros_like(logprobs), adv, mask, clip_low=0.2, clip_high=0.28)
    ppo, _ = ppo_clip_loss(logprobs, torch.zeros_like(logprobs), adv, mask, clip_low=0.2, clip_high=0.28, clip_c=None)
    torch.testing.assert_close(gspo, ppo, rtol=0, atol=1e-12)
    (g1,) = torch.autograd.grad(gspo.sum(), logprobs)
    (g2,) = torch.autograd.grad(ppo.sum(), logprobs)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


# --- CISPO -----------------------------------------------------------------------------------

# old_logprobs = -1, logprobs = ln r - 1; clip 0.2 / 0.2 -> weight w = clip(r, 0.8, 1.2), loss = -w A logp
#   (A,  r,   w,   logp,       loss = -w A logp,               d loss / d logp = -w A)
CISPO_CASES = [
    (+1, 1.1, 1.1, -0.9046898, 0.9951588, -1.1),  # inside
    (+1, 1.5, 1.2, -0.5945349, 0.7134419, -1.2),  # clipped high: weight 1.2, the gradient still flows
    (-1, 0.5, 0.8, -1.6931472, -1.3545177, 0.8),  # clipped low
    (-2, 1.0, 1.0, -1.0, -2.0, 2.0),  # on-policy token
]


def run_cispo(**kwargs):
    logprobs = t([[ln(c[1]) - 1 for c in CISPO_CASES] + [50.0]]).requires_grad_(True)  # + a masked token
    old = torch.full_like(logprobs, -1.0).requires_grad_(True)
    adv = t([[float(c[0]) for c in CISPO_CASES] + [1.0]])
    mask = mask_of([[1] * len(CISPO_CASES) + [0]])
    loss, metrics = cispo_loss(logprobs, old, adv, mask, **kwargs)
    loss.sum().backward()
    return loss.detach(), logprobs.grad, old.grad, metrics


def test_cispo_by_hand() -> None:
    loss, grad, _, metrics = run_cispo(clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(loss, t([[c[4] for c in CISPO_CASES] + [0.0]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(grad, t([[c[5] for c in CISPO_CASES] + [0.0]]), rtol=0, atol=1e-12)
    check_metrics(metrics, clip_frac_high=1 / 4, clip_frac_low=1 / 4)


def test_cispo_gradient_flows_through_the_logprob_only() -> None:
    # with the weight w(logp) = exp(logp - old) carrying grad, d(-w A logp)/d logp would be -A w (1 + logp)
    # at unclipped tokens: -1.1 * (1 - 0.9046898) = -0.1048 for case 0, not -1.1. The stop-gradient gives
    # exactly -w A, and old_logprobs (made to require grad here) receive no gradient at all.
    _, grad, old_grad, _ = run_cispo(clip_low=0.2, clip_high=0.2)
    assert float(grad[0, 0]) == pytest.approx(-1.1, abs=1e-12)
    assert old_grad is None or float(old_grad.abs().sum()) == 0.0


def test_cispo_without_lower_bound() -> None:
    # clip_low=None (the default): r = 0.5 keeps weight 0.5 -> loss 0.5 * -1.6931472 = -0.8465736, grad 0.5
    loss, grad, _, metrics = run_cispo(clip_low=None, clip_high=0.2)
    assert float(loss[0, 2]) == pytest.approx(-0.8465736, abs=1e-7)
    assert float(grad[0, 2]) == pytest.approx(0.5, abs=1e-12)
    check_metrics(metrics, clip_frac_high=1 / 4)


# --- GMPO ------------------------------------------------------------------------------------

# old_logprobs = 0, so logprobs are the log-ratios; clip 0.4 / 0.4 in log space
#   row 0: A = +1, log-ratios [0.2, 0.6]: A > 0 caps at 0.4 -> [0.2, 0.4], mean 0.3
#          L = -1 * exp(0.3) = -1.3498588; dL/dlogp = -A exp(0.3) / 2 = -0.6749294 (token 1 clipped: 0)
#   row 1: A = -1, log-ratios [-0.6, 0.1, 0.5]: A < 0 floors at -0.4 -> [-0.4, 0.1, 0.5], mean 0.0666667
#          L = exp(0.0666667) = 1.0689391; dL/dlogp = 1.0689391 / 3 = 0.3563130 (token 0 clipped: 0)
#   row 2: A = +2, log-ratio [-1.0]: A > 0 is only capped above -> L = -2 exp(-1) = -0.7357589, dL = -0.7357589
#   row 3: no valid token (garbage log-ratio 9) -> 0
GMPO_LOG_RATIOS = [[0.2, 0.6, 0], [-0.6, 0.1, 0.5], [-1.0, 0, 0], [9.0, 9.0, 9.0]]
GMPO_ADVANTAGES = [[1.0] * 3, [-1.0] * 3, [2.0] * 3, [1.0] * 3]
GMPO_MASK = [[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]]


def test_gmpo_by_hand() -> None:
    logprobs = t(GMPO_LOG_RATIOS).requires_grad_(True)
    mask = mask_of(GMPO_MASK)
    loss, metrics = gmpo_loss(logprobs, torch.zeros_like(logprobs), t(GMPO_ADVANTAGES), mask)
    a, b, c = -1.3498588, 1.0689391, -0.7357589
    torch.testing.assert_close(loss.detach(), t([[a, a, 0], [b, b, b], [c, 0, 0], [0, 0, 0]]), rtol=0, atol=1e-7)
    # seq-mean-token-mean over the 3 rows with a valid token: (a + b + c) / 3 = -0.3388929
    total = aggregate(loss, mask, "seq-mean-token-mean")
    assert float(total.detach()) == pytest.approx(-0.3388929, abs=1e-7)
    total.backward()
    expected_grad = t([[-0.6749294, 0, 0], [0, 0.3563130, 0.3563130], [-0.7357589, 0, 0], [0, 0, 0]]) / 3
    torch.testing.assert_close(logprobs.grad, expected_grad, rtol=0, atol=1e-7)
    # 6 valid tokens: row 0's 0.6 (A > 0, above 0.4) and row 1's -0.6 (A < 0, below -0.4) are clipped;
    # row 2's -1.0 has A > 0 and is not
    check_metrics(metrics, clip_frac_high=1 / 6, clip_frac_low=1 / 6)


def test_gmpo_is_the_geometric_mean_of_token_ratios() -> None:
    # inside the clip range the sequence ratio is (prod r_t)^(1/n): ratios [1.1, 0.9, 1.2] -> 1.0634857...
    ratios = [1.1, 0.9, 1.2]
    logprobs = t([[ln(r) for r in ratios]])
    loss, _ = gmpo_loss(logprobs, torch.zeros_like(logprobs), torch.ones(1, 3, dtype=F64), torch.ones(1, 3))
    assert float(-loss[0, 0]) == pytest.approx((1.1 * 0.9 * 1.2) ** (1 / 3), abs=1e-12)


# --- Clip-Cov --------------------------------------------------------------------------------

# one row of 6 valid tokens + a masked one. A = [3, -3, 3, -3, 3, -3] (mean 0);
# logp = [-0.5, -2.5, -1.5, -1.5, -0.5, -2.5] (mean -1.5): centred [1, -1, 0, 0, 1, -1]
# -> covariance [3, 3, 0, 0, 3, 3]. Tokens 4 and 5 are PPO-clipped (ratio 1.5 with A > 0, 0.5 with A < 0),
# the others on-policy (ratio 1). Candidates (1 < cov < 5, not PPO-clipped): tokens 0 and 1.
CC_ADV = [[3.0, -3.0, 3.0, -3.0, 3.0, -3.0, 1.0]]
CC_LOGP = [[-0.5, -2.5, -1.5, -1.5, -0.5, -2.5, 0.0]]
CC_OLD = [[-0.5, -2.5, -1.5, -1.5, -0.5 - ln(1.5), -2.5 - ln(0.5), 30.0]]
CC_MASK = [[1, 1, 1, 1, 1, 1, 0]]


def run_clip_cov(seed: int = 0, **kwargs):
    logprobs = t(CC_LOGP).requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    loss, metrics = clip_cov_loss(logprobs, t(CC_OLD), t(CC_ADV), mask_of(CC_MASK), generator=gen, **kwargs)
    loss.sum().backward()
    return loss.detach(), logprobs.grad, metrics


def test_clip_cov_by_hand() -> None:
    # clip_cov_ratio 0.5: floor(0.5 * 6) = 3 tokens wanted, only 2 candidates -> both cut (loss 0, no
    # gradient); the rest as PPO: -A r = [-3, 3] on-policy, max(-4.5, -3.6) = -3.6, max(1.5, 2.4) = 2.4
    loss, grad, metrics = run_clip_cov(clip_low=0.2, clip_high=0.2, clip_cov_ratio=0.5)
    torch.testing.assert_close(loss, t([[0, 0, -3, 3, -3.6, 2.4, 0]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, t([[0, 0, -3, 3, 0, 0, 0]]), rtol=0, atol=1e-12)
    check_metrics(metrics, cov_frac=2 / 6, clip_frac_high=1 / 6, clip_frac_low=1 / 6)


def test_clip_cov_bounds_are_strict() -> None:
    # clip_cov_lb = 3: covariance 3 is not > 3, so nothing is cut: tokens 0, 1 keep -A r = [-3, 3]
    loss, _, metrics = run_clip_cov(clip_low=0.2, clip_high=0.2, clip_cov_ratio=0.5, clip_cov_lb=3.0)
    assert loss[0, :2].tolist() == [-3.0, 3.0] and float(metrics["cov_frac"]) == 0.0


def test_clip_cov_draws_the_stated_number_at_random() -> None:
    # clip_cov_ratio 1/6: floor(1) = 1 of the 2 candidates, chosen by the generator
    chosen = []
    for seed in range(40):
        loss, _, metrics = run_clip_cov(seed, clip_low=0.2, clip_high=0.2, clip_cov_ratio=1 / 6 + 1e-12)
        cut = [i for i in range(2) if loss[0, i] == 0]
        assert len(cut) == 1 and float(metrics["cov_frac"]) == pytest.approx(1 / 6)
        chosen.append(cut[0])
    assert set(chosen) == {0, 1}  # both candidates get drawn (P(one never drawn in 40) = 2 ** -39)
    again = [run_clip_cov(seed, clip_low=0.2, clip_high=0.2, clip_cov_ratio=1 / 6 + 1e-12)[0] for seed in (3, 3)]
    torch.testing.assert_close(again[0], again[1], rtol=0, atol=0)  # a seeded generator repeats its choice


# --- KL-Cov ----------------------------------------------------------------------------------

# one row of 5 valid tokens + a masked one. A = [3, -2, 1, -1, -1] (mean 0); logp = [-1, -3, -2, -2, -2]
# (mean -2): centred [1, -1, 0, 0, 0] -> covariance [3, 2, 0, 0, 0]. Token 0 has log-ratio 0.1, the others 0.
KC_ADV = [[3.0, -2.0, 1.0, -1.0, -1.0, 5.0]]
KC_LOGP = [[-1.0, -3.0, -2.0, -2.0, -2.0, 0.0]]
KC_OLD = [[-1.1, -3.0, -2.0, -2.0, -2.0, -40.0]]
KC_MASK = [[1, 1, 1, 1, 1, 0]]


def run_kl_cov(**kwargs):
    logprobs = t(KC_LOGP).requires_grad_(True)
    loss, metrics = kl_cov_loss(logprobs, t(KC_OLD), t(KC_ADV), mask_of(KC_MASK), **kwargs)
    loss.sum().backward()
    return loss.detach(), logprobs.grad, metrics


def test_kl_cov_by_hand() -> None:
    # kl_cov_ratio 0.2: floor(0.2 * 5) = 1 token, the largest covariance: token 0.
    #   loss_0 = -3 e^0.1 + 1 * |0.1| = -3.3155128 + 0.1 = -3.2155128; d/dlogp = -3 e^0.1 + 1 = -2.3155128
    #   the others -A r = [2, -1, 1, 1], gradient the same (r = 1); no clipping anywhere
    loss, grad, metrics = run_kl_cov(kl_cov_ratio=0.2, ppo_kl_coef=1.0)
    torch.testing.assert_close(loss, t([[-3.2155128, 2, -1, 1, 1, 0]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(grad, t([[-2.3155128, 2, -1, 1, 1, 0]]), rtol=0, atol=1e-7)
    check_metrics(metrics, cov_frac=1 / 5)
    # kl_cov_ratio 0.4: 2 tokens, 0 and 1; token 1's |log-ratio| is 0, so its loss stays 2
    loss, _, metrics = run_kl_cov(kl_cov_ratio=0.4, ppo_kl_coef=1.0)
    assert loss[0, 1].item() == 2.0 and float(metrics["cov_frac"]) == pytest.approx(2 / 5)


@pytest.mark.parametrize("ratio", [1e-4, 0.05, 0.3, 1.0])
def test_cov_losses_select_the_stated_fraction(ratio: float) -> None:
    # on 7 x 50 random tokens with ragged masks: KL-Cov selects max(floor(ratio * N), 1) tokens, exactly the
    # ones of largest covariance; Clip-Cov selects min(that count, candidates) tokens, all candidates
    gen = torch.Generator().manual_seed(7)
    adv = 2 * torch.randn(7, 50, generator=gen, dtype=F64)
    logp = -torch.rand(7, 50, generator=gen, dtype=F64) * 4
    old = logp + 0.3 * torch.randn(7, 50, generator=gen, dtype=F64)
    mask = torch.arange(50) < torch.randint(1, 51, (7, 1), generator=gen)
    n = int(mask.sum())
    wanted = max(math.floor(ratio * n), 1)
    _, m = kl_cov_loss(logp, old, adv, mask, kl_cov_ratio=ratio)
    assert round(float(m["cov_frac"]) * n) == wanted
    valid_cov = ((adv - adv[mask].mean()) * (logp - logp[mask].mean()))[mask]
    selected = kl_cov_loss(logp, old, adv, mask, kl_cov_ratio=ratio, ppo_kl_coef=1e3)[0][mask] != (
        kl_cov_loss(logp, old, adv, mask, kl_cov_ratio=ratio, ppo_kl_coef=0.0)[0][mask])
    assert set(torch.nonzero(selected).flatten().tolist()) == set(torch.topk(valid_cov, wanted).indices.tolist())

    params = ClipCovParams(clip_low=0.2, clip_high=0.2, clip_cov_ratio=ratio, clip_cov_lb=0.5, clip_cov_ub=4.0)
    loss, m = policy_loss("clip_cov", logp, old, adv, mask, params=params, generator=torch.Generator().manual_seed(0))
    ratio_t = torch.exp(logp - old)
    ppo_clipped = (-adv * ratio_t.clamp(0.8, 1.2)) > (-adv * ratio_t)
    cov = (adv - adv[mask].mean()) * (logp - logp[mask].mean())
    candidates = mask & ~ppo_clipped & (cov > 0.5) & (cov < 4.0)
    cut = mask & (loss == 0) & (adv != 0)
    assert int(candidates.sum()) > 20
    assert int(cut.sum()) == min(wanted, int(candidates.sum())) == round(float(m["cov_frac"]) * n)
    assert not (cut & ~candidates).any()


# --- REINFORCE -------------------------------------------------------------------------------


def test_reinforce_by_hand() -> None:
    # A = [2, -1], logp = [-0.5, -2]: loss -A logp = [1, -2], gradient -A = [-2, 1]; a masked token -> 0;
    # old logprobs [-0.7, -2] give ppo_kl = mean(old - new) = (-0.2 + 0) / 2 = -0.1
    logprobs = t([[-0.5, -2.0, -9.0]]).requires_grad_(True)
    loss, metrics = reinforce_loss(logprobs, t([[-0.7, -2.0, 0.0]]), t([[2.0, -1.0, 4.0]]), mask_of([[1, 1, 0]]))
    loss.sum().backward()
    assert loss.detach().tolist() == [[1.0, -2.0, 0.0]] and logprobs.grad.tolist() == [[-2.0, 1.0, 0.0]]
    check_metrics(metrics, ppo_kl=-0.1)


# --- all losses: shared behaviour ------------------------------------------------------------


def random_batch(seed: int = 0, b: int = 6, length: int = 9):
    gen = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(b, length, generator=gen, dtype=F64) * 3).requires_grad_(True)
    old = logprobs.detach() + 0.2 * torch.randn(b, length, generator=gen, dtype=F64)
    rewards = torch.randint(0, 2, (b,), generator=gen).to(F64)
    mask = torch.arange(length) < torch.randint(1, length + 1, (b, 1), generator=gen)
    mask[-1] = False  # an all-masked row
    advantages = broadcast_to_tokens(grpo_advantages(rewards, torch.arange(b) // 3), mask)
    return logprobs, old, advantages, mask


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_masks_and_reports_the_same_metrics(name: str) -> None:
    logprobs, old, adv, mask = random_batch()
    garbage = torch.where(mask, adv, torch.full_like(adv, 1e3))  # whatever invalid tokens hold
    loss, metrics = policy_loss(name, logprobs, old, garbage, mask, generator=torch.Generator().manual_seed(0))
    assert loss.shape == mask.shape and torch.isfinite(loss).all()
    assert (loss[~mask] == 0).all()
    assert set(metrics) == set(POLICY_LOSS_METRICS)
    mode = SEQUENCE_LEVEL_AGGREGATION.get(name, "token-mean")
    aggregate(loss, mask, mode).backward()
    assert torch.isfinite(logprobs.grad).all() and (logprobs.grad[~mask] == 0).all()
    assert logprobs.grad.abs().sum() > 0
    # the global token count rescales every metric: twice the count, half the value
    _, halved = policy_loss(name, logprobs, old, garbage, mask, global_num_tokens=2 * int(mask.sum()),
                            generator=torch.Generator().manual_seed(0))
    for key in POLICY_LOSS_METRICS:
        assert float(halved[key]) == pytest.approx(float(metrics[key]) / 2, abs=1e-12)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_loss_of_an_empty_mask_is_zero(name: str) -> None:
    logprobs, old, adv, mask = random_batch()
    empty = torch.zeros_like(mask)
    loss, metrics = policy_loss(name, logprobs, old, adv, empty, generator=torch.Generator().manual_seed(0))
    assert (loss == 0).all() and all(float(m) == 0.0 for m in metrics.values())


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_policy_loss_passes_the_params_as_keywords(name: str) -> None:
    # policy_loss(name, params=P) == POLICY_LOSSES[name](..., **fields of P); every field is a keyword
    logprobs, old, adv, mask = random_batch(seed=3)
    params = POLICY_LOSS_PARAMS[name]()
    kwargs = dataclasses.asdict(params)
    if name == "clip_cov":
        kwargs["generator"] = torch.Generator().manual_seed(5)
    direct, _ = POLICY_LOSSES[name](logprobs, old, adv, mask, **kwargs)
    by_name, _ = policy_loss(name, logprobs, old, adv, mask, params=params, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(direct, by_name, rtol=0, atol=0)


def test_group_of_one_gives_a_finite_loss_for_every_loss() -> None:
    # a batch of one response (a group of one: GRPO passes its reward 1 on as the advantage) of one token
    adv = broadcast_to_tokens(grpo_advantages(t([1.0]), torch.zeros(1, dtype=torch.long)), mask_of([[1]]))
    for name in POLICY_LOSSES:
        logprobs = t([[-0.5]]).requires_grad_(True)
        loss, _ = policy_loss(name, logprobs, t([[-0.5]]), adv, mask_of([[1]]), generator=torch.Generator())
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(logprobs.grad).all(), name


def test_invalid_names_and_params_raise() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="'grpo'.*ppo_clip, gspo, cispo, gmpo, clip_cov, kl_cov, reinforce"):
        policy_loss("grpo", x, x, x, x)
    with pytest.raises(ValueError, match="GSPOParams.*PPOClipParams"):
        policy_loss("gspo", x, x, x, x, params=POLICY_LOSS_PARAMS["ppo_clip"]())
    with pytest.raises(ValueError, match=r"gspo.clip_low=1.5"):
        GSPOParams(clip_low=1.5)
    with pytest.raises(ValueError, match=r"gspo.clip_low=1.5"):
        gspo_loss(x, x, x, x, clip_low=1.5)
    with pytest.raises(ValueError, match=r"clip_cov.clip_cov_ub=1.0 must be > 1.0"):
        ClipCovParams(clip_cov_lb=1.0, clip_cov_ub=1.0)
    with pytest.raises(ValueError, match=r"kl_cov.kl_cov_ratio=0.0"):
        kl_cov_loss(x, x, x, x, kl_cov_ratio=0.0)
    with pytest.raises(ValueError, match=r"gmpo.clip_high=0.0"):
        gmpo_loss(x, x, x, x, clip_high=0.0)
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        cispo_loss(x, x, torch.zeros(1, 3), x)
