"""KL estimators k1, k2, k3 / low_var_kl, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algorithms import KL_KINDS, kl_k1, kl_k2, kl_k3, kl_penalty

F64 = torch.float64

# logprobs and ref_logprobs; d = logp - ref:   d = 1,  d = -1,  d = 0
LOGP = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
REF = torch.tensor([[-2.0, -1.0, -0.5]], dtype=F64)


def test_k1_by_hand() -> None:
    torch.testing.assert_close(kl_k1(LOGP, REF), torch.tensor([[1.0, -1.0, 0.0]], dtype=F64), rtol=0, atol=0)


def test_k2_by_hand() -> None:
    # 0.5 * d^2 = [0.5, 0.5, 0]
    torch.testing.assert_close(kl_k2(LOGP, REF), torch.tensor([[0.5, 0.5, 0.0]], dtype=F64), rtol=0, atol=0)


def test_k3_by_hand() -> None:
    # x = ref - logp = [-1, 1, 0]; exp(x) - x - 1:
    #   x = -1: e^-1 + 1 - 1 = 0.3678794;  x = 1: e - 1 - 1 = 0.7182818;  x = 0: 1 - 0 - 1 = 0
    expected = torch.tensor([[math.exp(-1), math.e - 2, 0.0]], dtype=F64)
    assert expected[0, :2].tolist() == [pytest.approx(0.3678794, abs=1e-7), pytest.approx(0.7182818, abs=1e-7)]
    torch.testing.assert_close(kl_k3(LOGP, REF), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(kl_penalty(LOGP, REF, "low_var_kl"), expected, rtol=0, atol=1e-15)


def test_k3_clamp() -> None:
    # x = ref - logp = 5: e^5 - 6 = 142.41 -> clamped to 10; x = -15: e^-15 + 14 = 14.0000003 -> 10
    # x = 1000: clamped to 20 before exp (no inf), result 10; the clamp stops the gradient
    logp = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[5.0, -15.0, 1000.0]], dtype=F64)
    kl = kl_k3(logp, ref)
    torch.testing.assert_close(kl, torch.tensor([[10.0, 10.0, 10.0]], dtype=F64), rtol=0, atol=0)
    kl.sum().backward()
    assert logp.grad.tolist() == [[0.0, 0.0, 0.0]]


def test_gradients_by_hand() -> None:
    # d/dlogp: k1 -> 1; k2 -> d = [1, -1, 0]; k3 -> 1 - exp(ref - logp) = [1 - e^-1, 1 - e, 0]
    expected = {
        "k1": [1.0, 1.0, 1.0],
        "k2": [1.0, -1.0, 0.0],
        "k3": [1 - math.exp(-1), 1 - math.e, 0.0],
    }
    for kind, grad in expected.items():
        logp = LOGP.clone().requires_grad_(True)
        kl_penalty(logp, REF, kind).sum().backward()
        torch.testing.assert_close(logp.grad, torch.tensor([grad], dtype=F64), rtol=0, atol=1e-12)


def test_kl_penalty_dispatch_and_unknown_kind() -> None:
    assert KL_KINDS == ("k1", "k2", "k3", "low_var_kl")
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        torch.testing.assert_close(kl_penalty(LOGP, REF, kind), fn(LOGP, REF), rtol=0, atol=0)
    with pytest.raises(ValueError, match="'mse'.*k1, k2, k3, low_var_kl"):
        kl_penalty(LOGP, REF, "mse")
    with pytest.raises(ValueError, match="same shape"):
        kl_k1(LOGP, REF[:, :2])
