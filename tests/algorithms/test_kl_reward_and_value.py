"""KL in the reward (token rewards, fixed and adaptive controllers) and the critic's clipped value loss,
checked by hand."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.algorithms import (
    KL_CONTROLLERS,
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    gae,
    kl_penalised_rewards,
    make_kl_controller,
    outcome_token_rewards,
    value_loss,
)

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


MASK = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)


# --- token rewards ---------------------------------------------------------------------------


def test_outcome_reward_goes_on_the_last_valid_token() -> None:
    # row 0: last valid token 1; row 1 (a hole at 1): last valid token 2; row 2: no valid token, no reward
    out = outcome_token_rewards(t([1.0, 0.5, 2.0]), MASK)
    assert out.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    assert out.dtype == F64
    with pytest.raises(ValueError, match=r"\(B,\).*\(2,\)"):
        outcome_token_rewards(t([1.0, 2.0]), MASK)


def test_kl_penalised_rewards_by_hand() -> None:
    # k1: kl = logp - ref at valid tokens; coef 0.1
    #   row 0: kl [0.5, -0.5] -> rewards [0 - 0.05, 1 + 0.05] = [-0.05, 1.05]; row mean kl 0
    #   row 1: kl [1, -, 0.2] -> rewards [-0.1, 0, 0.5 - 0.02 = 0.48]; row mean 0.6
    #   row 2: no valid token -> zeros, not counted: mean_kl = (0 + 0.6) / 2 = 0.3
    scores = outcome_token_rewards(t([1.0, 0.5, 2.0]), MASK)
    logprobs = t([[-1.0, -1.0, 7.0], [-2.0, 9.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = t([[-1.5, -0.5, 0.0], [-3.0, 0.0, -1.2], [0.0, 0.0, 0.0]])
    rewards, mean_kl = kl_penalised_rewards(scores, logprobs, ref, MASK, coef=0.1, kind="k1")
    torch.testing.assert_close(rewards, t([[-0.05, 1.05, 0], [-0.1, 0, 0.48], [0, 0, 0]]), rtol=0, atol=1e-12)
    assert float(mean_kl) == pytest.approx(0.3, abs=1e-12)
    # coef 0 leaves the scores; k3 of kl = 0.5 (ref - logp = -0.5): e^-0.5 + 0.5 - 1 = 0.1065307
    same, _ = kl_penalised_rewards(scores, logprobs, ref, MASK, coef=0.0)
    torch.testing.assert_close(same, scores, rtol=0, atol=0)
    k3, _ = kl_penalised_rewards(scores, logprobs, ref, MASK, coef=1.0, kind="k3")
    assert float(k3[0, 0]) == pytest.approx(-0.1065307, abs=1e-7)


def test_kl_in_reward_feeds_gae() -> None:
    # gamma = lam = 1, values 0: the advantage at t is the sum of the rewards from t on:
    # row 0: [-0.05 + 1.05, 1.05] = [1.0, 1.05]
    scores = outcome_token_rewards(t([1.0]), MASK[:1])
    rewards, _ = kl_penalised_rewards(scores, t([[-1.0, -1.0, 0.0]]), t([[-1.5, -0.5, 0.0]]), MASK[:1], coef=0.1)
    adv, _ = gae(rewards, torch.zeros(1, 3, dtype=F64), MASK[:1], gamma=1.0, lam=1.0, whiten=False)
    torch.testing.assert_close(adv, t([[1.0, 1.05, 0.0]]), rtol=0, atol=1e-12)


# --- controllers -----------------------------------------------------------------------------


def test_adaptive_controller_by_hand() -> None:
    # init 0.1, target 0.1, horizon 100
    #   kl 0.2,  10 seqs: e = clip(2 - 1)     = 0.2  -> 0.1 * (1 + 0.2 * 10/100)   = 0.102
    #   kl 0.05, 10 seqs: e = clip(0.5 - 1)   = -0.2 -> 0.102 * (1 - 0.02)         = 0.09996
    #   kl 0.11, 50 seqs: e = 0.1                    -> 0.09996 * (1 + 0.1 * 0.5)  = 0.104958
    ctl = AdaptiveKLController(0.1, target_kl=0.1, horizon=100)
    values = []
    for kl, n in [(0.2, 10), (0.05, 10), (0.11, 50)]:
        ctl.update(kl, n)
        values.append(ctl.value)
    assert values == [pytest.approx(0.102, abs=1e-15), pytest.approx(0.09996, abs=1e-15), pytest.approx(0.104958)]


def test_fixed_controller_never_moves() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(10.0, 1000)
    assert ctl.value == 0.05


def test_controller_state_round_trips() -> None:
    ctl = AdaptiveKLController(0.1, target_kl=0.1, horizon=100)
    ctl.update(0.3, 40)
    state = ctl.state_dict()
    assert state == {"value": ctl.value} and all(isinstance(v, float) for v in state.values())
    resumed = AdaptiveKLController(0.1, target_kl=0.1, horizon=100)
    resumed.load_state_dict(state)
    for c in (ctl, resumed):
        c.update(0.02, 7)
    assert resumed.value == ctl.value  # bitwise: the state is the one float
    fixed = FixedKLController(0.2)
    fixed.load_state_dict({"value": 0.3})
    assert fixed.value == 0.3
    with pytest.raises(ValueError, match="'value'"):
        fixed.load_state_dict({"coef": 0.3})


def test_make_kl_controller_and_invalid_settings() -> None:
    assert KL_CONTROLLERS == ("fixed", "adaptive")
    assert isinstance(make_kl_controller("fixed", coef=0.01), FixedKLController)
    adaptive = make_kl_controller("adaptive", coef=0.01, target_kl=0.2, horizon=500)
    assert (adaptive.value, adaptive.target_kl, adaptive.horizon) == (0.01, 0.2, 500.0)
    with pytest.raises(ValueError, match="kl_controller='pid'.*'fixed', 'adaptive'"):
        make_kl_controller("pid", coef=0.01)
    with pytest.raises(ValueError, match="horizon=0"):
        AdaptiveKLController(0.1, target_kl=0.1, horizon=0)
    with pytest.raises(ValueError, match="coef=-1"):
        FixedKLController(-1)
    with pytest.raises(ValueError, match="current_kl=nan"):
        AdaptiveKLController(0.1, target_kl=0.1, horizon=10).update(float("nan"), 1)


# --- value loss ------------------------------------------------------------------------------

# clip_range 0.5: clipped = clamp(v, old - 0.5, old + 0.5); loss = 0.5 * max((v - R)^2, (clipped - R)^2)
#   (v,   old, R,    clipped, unclipped err, clipped err, loss,  d loss / d v)
VALUE_CASES = [
    (1.0, 0.8, 1.5, 1.0, 0.25, 0.25, 0.125, -0.5),  # inside the range: both equal, gradient v - R
    (2.0, 1.0, 0.0, 1.5, 4.0, 2.25, 2.0, 2.0),  # moved past the range, away from R: unclipped error larger, grad kept
    (2.0, 1.0, 3.0, 1.5, 1.0, 2.25, 1.125, 0.0),  # the clipped error is larger: no gradient
    (0.0, 1.0, -1.0, 0.5, 1.0, 2.25, 1.125, 0.0),  # the same below
]


def run_value_loss(**kwargs):
    values = t([[c[0] for c in VALUE_CASES] + [50.0]]).requires_grad_(True)  # + a masked token
    old = t([[c[1] for c in VALUE_CASES] + [0.0]])
    returns = t([[c[2] for c in VALUE_CASES] + [-50.0]])
    mask = torch.tensor([[1] * len(VALUE_CASES) + [0]], dtype=torch.bool)
    loss, metrics = value_loss(values, old, returns, mask, **kwargs)
    loss.sum().backward()
    return loss.detach(), values.grad, metrics


def test_value_loss_by_hand() -> None:
    loss, grad, metrics = run_value_loss(clip_range=0.5)
    assert loss.tolist() == [[c[6] for c in VALUE_CASES] + [0.0]]
    assert grad.tolist() == [[c[7] for c in VALUE_CASES] + [0.0]]
    # cases 2 and 3 clipped of 4; vf_error = mean unclipped (0.25 + 4 + 1 + 1) / 4 = 1.5625
    assert float(metrics["vf_clip_frac"]) == 0.5
    assert float(metrics["vf_error"]) == 1.5625
    _, _, halved = run_value_loss(clip_range=0.5, global_num_tokens=8)
    assert float(halved["vf_clip_frac"]) == 0.25
    # token-mean of the loss: (0.125 + 2 + 1.125 + 1.125) / 4 = 1.09375
    assert float(aggregate(loss, torch.tensor([[1, 1, 1, 1, 0]]), "token-mean")) == 1.09375


def test_value_loss_without_clipping_and_invalid_arguments() -> None:
    loss, grad, metrics = run_value_loss(clip_range=None)
    assert loss.tolist() == [[0.125, 2.0, 0.5, 0.5, 0.0]]  # 0.5 * (v - R)^2
    assert grad.tolist() == [[-0.5, 2.0, -1.0, 1.0, 0.0]]  # v - R
    assert float(metrics["vf_clip_frac"]) == 0.0
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip_range=-0.1"):
        value_loss(x, x, x, x, clip_range=-0.1)
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        value_loss(x, x, torch.zeros(1, 3), x)
    empty_loss, empty = value_loss(x, x, x, torch.zeros(1, 2))
    assert empty_loss.tolist() == [[0.0, 0.0]] and all(float(m) == 0.0 for m in empty.values())
