"""Entropy from full logits and the entropy bonus, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algorithms import entropy_bonus, entropy_from_logits

F64 = torch.float64


def test_entropy_by_hand() -> None:
    # uniform over 2: ln 2 = 0.6931472; uniform over 4: ln 4 = 1.3862944
    # logits [0, ln 3] -> p = [0.25, 0.75]: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351
    logits = torch.tensor(
        [[[0.0, 0.0, -math.inf, -math.inf], [0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -math.inf, -math.inf]]],
        dtype=F64,
    )
    h = entropy_from_logits(logits)
    assert h.shape == (1, 3)
    torch.testing.assert_close(
        h, torch.tensor([[math.log(2), math.log(4), 0.5623351446]], dtype=F64), rtol=0, atol=1e-10
    )


def test_entropy_is_stable_and_masked_vocab_has_finite_gradients() -> None:
    # huge equal logits are still uniform: ln 2; -inf entries (padded vocab) contribute 0
    logits = torch.tensor([[[1000.0, 1000.0, -math.inf]]], dtype=F64, requires_grad=True)
    h = entropy_from_logits(logits)
    assert float(h.detach()) == pytest.approx(math.log(2))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # dH/dz_i = -p_i (log p_i + H): at the uniform point over the two live entries, 0
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), rtol=0, atol=1e-12)


def test_entropy_matches_categorical_and_bf16_is_upcast() -> None:
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    reference = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), reference, rtol=1e-6, atol=1e-6)
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


def test_entropy_bonus_by_hand() -> None:
    # -coef * H: coef 0.01, H [ln 2, 0] -> [-0.0069315, 0]
    bonus = entropy_bonus(torch.tensor([[math.log(2), 0.0]], dtype=F64), 0.01)
    torch.testing.assert_close(bonus, torch.tensor([[-0.01 * math.log(2), 0.0]], dtype=F64), rtol=0, atol=0)
