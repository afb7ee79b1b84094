"""PPO clipped surrogate: clip-higher, dual clip, metrics and gradients, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algorithms import ppo_clip_loss

F64 = torch.float64

# One token per case, old_logprobs = 0 so ratio = exp(logprobs). clip_low 0.2, clip_high 0.28,
# clip_c 3: the clip range is [0.8, 1.28].
#   (A,  ratio, loss,  d loss / d logprobs, clip active)
CASES = [
    (+1, 1.10, -1.10, -1.10, None),  # inside: -A * r; gradient -A * r
    (+1, 1.25, -1.25, -1.25, None),  # inside only thanks to clip-higher (0.28 > 0.2)
    (+1, 1.50, -1.28, 0.0, "high"),  # max(-1.5, -1.28) = -1.28, clipped: no gradient
    (+1, 0.50, -0.50, -0.50, None),  # max(-0.5, -0.8) = -0.5: the unclipped term, gradient flows
    (-1, 0.50, 0.80, 0.0, "low"),  # max(0.5, 0.8) = 0.8, clipped
    (-1, 0.90, 0.90, 0.90, None),  # inside
    (-1, 1.50, 1.50, 1.50, None),  # max(1.5, 1.28) = 1.5; dual clip min(1.5, 3) keeps 1.5
    (-1, 4.00, 3.00, 0.0, "dual"),  # max(4, 1.28) = 4; dual clip min(4, -A * 3 = 3) = 3
    (+1, 4.00, -1.28, 0.0, "high"),  # positive advantage: no dual clip, upper clip only
    (-2, 0.85, 1.70, 1.70, None),  # inside: -A * r = 1.7
]


def run_cases(**kwargs):
    advantages = torch.tensor([[float(c[0]) for c in CASES] + [1.0]], dtype=F64)
    # an 11th, invalid token with an absurd ratio: must give loss 0 and count nowhere
    logprobs = torch.tensor([[math.log(c[1]) for c in CASES] + [50.0]], dtype=F64, requires_grad=True)
    old_logprobs = torch.zeros_like(logprobs)
    mask = torch.tensor([[1] * len(CASES) + [0]], dtype=torch.bool)
    loss, metrics = ppo_clip_loss(logprobs, old_logprobs, advantages, mask, **kwargs)
    loss.sum().backward()
    return loss.detach(), logprobs.grad, metrics


def test_loss_and_gradients_by_hand() -> None:
    loss, grad, _ = run_cases(clip_low=0.2, clip_high=0.28, clip_c=3.0)
    torch.testing.assert_close(loss, torch.tensor([[c[2] for c in CASES] + [0.0]], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[c[3] for c in CASES] + [0.0]], dtype=F64), rtol=0, atol=1e-12)


def test_clip_fractions_by_hand() -> None:
    # 10 valid tokens: high at cases 3 and 9 -> 0.2; low at case 5 -> 0.1; dual at case 8 -> 0.1
    _, _, metrics = run_cases(clip_low=0.2, clip_high=0.28, clip_c=3.0)
    assert float(metrics["clip_frac_high"]) == pytest.approx(0.2)
    assert float(metrics["clip_frac_low"]) == pytest.approx(0.1)
    assert float(metrics["clip_frac_dual"]) == pytest.approx(0.1)
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())


def test_kl_metrics_by_hand() -> None:
    # ppo_kl = mean(old - new) = mean(-log r); approx_kl = mean(r - 1 - log r), over the 10 valid tokens
    ratios = [c[1] for c in CASES]
    _, _, metrics = run_cases()
    assert float(metrics["ppo_kl"]) == pytest.approx(sum(-math.log(r) for r in ratios) / 10, abs=1e-12)
    assert float(metrics["approx_kl"]) == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 10, abs=1e-12)
    # a single token: r = 2 -> ppo_kl = -ln 2 = -0.693147, approx_kl = 2 - 1 - ln 2 = 0.306853
    one = torch.tensor([[math.log(2.0)]], dtype=F64)
    _, m = ppo_clip_loss(one, torch.zeros_like(one), torch.ones_like(one), torch.ones_like(one))
    assert (float(m["ppo_kl"]), float(m["approx_kl"])) == (
        pytest.approx(-0.693147, abs=1e-6),
        pytest.approx(0.306853, abs=1e-6),
    )


def test_clip_higher_asymmetry() -> None:
    # ratio 1.25 with A = +1: clip_high 0.28 leaves it inside (loss -1.25, gradient -1.25);
    # a symmetric 0.2 clips it to 1.2 (loss -1.2, no gradient). On the low side both use 0.2.
    loss, grad, metrics = run_cases(clip_low=0.2, clip_high=0.2, clip_c=3.0)
    assert float(loss[0, 1]) == pytest.approx(-1.2) and float(grad[0, 1]) == 0.0
    assert float(metrics["clip_frac_high"]) == pytest.approx(0.3)  # cases 2, 3, 9
    assert float(loss[0, 4]) == pytest.approx(0.8)  # the low side is unchanged


def test_dual_clip_off_and_only_for_negative_advantages() -> None:
    loss, grad, metrics = run_cases(clip_c=None)
    assert float(loss[0, 7]) == pytest.approx(4.0)  # A = -1, r = 4: no dual clip -> -A * r = 4
    assert float(grad[0, 7]) == pytest.approx(4.0)
    assert float(metrics["clip_frac_dual"]) == 0.0
    # A = +1, r = 4 is -1.28 with and without the dual clip
    assert float(loss[0, 8]) == pytest.approx(-1.28)
    # a lower clip_c bounds A < 0 tokens sooner: r = 1.5 with clip_c 1.2 -> min(1.5, 1.2) = 1.2
    loss, _, metrics = run_cases(clip_c=1.2)
    assert float(loss[0, 6]) == pytest.approx(1.2)
    assert float(metrics["clip_frac_dual"]) == pytest.approx(0.2)  # cases 7 and 8


def test_global_num_tokens_normalises_metrics() -> None:
    # the same counts over a global 20 tokens (e.g. two micro-batches): fractions halve
    _, _, metrics = run_cases(global_num_tokens=20)
    assert float(metrics["clip_frac_high"]) == pytest.approx(0.1)
    assert float(metrics["clip_frac_low"]) == pytest.approx(0.05)


def test_empty_mask_and_extreme_ratios_stay_finite() -> None:
    logprobs = torch.tensor([[100.0, -100.0]], dtype=F64, requires_grad=True)
    zeros = torch.zeros_like(logprobs)
    adv = torch.tensor([[1.0, -1.0]], dtype=F64)
    loss, metrics = ppo_clip_loss(logprobs, zeros, adv, torch.zeros(1, 2, dtype=torch.bool))
    assert loss.tolist() == [[0.0, 0.0]] and all(float(m) == 0.0 for m in metrics.values())
    # log-ratio clamped to +-20 before exp: finite loss and gradients even with a valid mask
    loss, metrics = ppo_clip_loss(logprobs, zeros, adv, torch.ones(1, 2), clip_c=None)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(m) for m in metrics.values())


def test_invalid_arguments_raise() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="clip_c must be > 1.*1.0"):
        ppo_clip_loss(x, x, x, x, clip_c=1.0)
    with pytest.raises(ValueError, match="clip_low"):
        ppo_clip_loss(x, x, x, x, clip_low=-0.1)
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        ppo_clip_loss(x, x, torch.zeros(1, 3), x)
