"""Loss aggregation modes, global normalisers and the end-to-end gradient path, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algorithms import (
    AGGREGATION_MODES,
    aggregate,
    broadcast_to_tokens,
    entropy_bonus,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    ppo_clip_loss,
)

F64 = torch.float64

# 2 x 3 example; valid tokens: row 0 -> [1, 2], row 1 -> [4]. The masked 3, 5, 6 never count.
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("token-mean", {}, 7 / 3),  # (1 + 2 + 4) / 3 tokens = 2.3333
        ("seq-mean-token-sum", {}, 3.5),  # sums [3, 4] / 2 seqs
        ("seq-mean-token-mean", {}, 2.75),  # means [3/2, 4/1] = [1.5, 4] / 2 seqs
        ("seq-mean-token-sum-norm", {}, 7 / 6),  # 7 / (2 seqs * T = 3)
        ("seq-mean-token-sum-norm", {"constant": 4}, 7 / 8),  # 7 / (2 * 4)
        ("token-mean", {"global_num_tokens": 14}, 0.5),  # 7 / 14
        ("seq-mean-token-sum", {"global_num_seqs": 4}, 1.75),  # 7 / 4
        ("seq-mean-token-mean", {"global_num_seqs": 5}, 1.1),  # 5.5 / 5
        ("seq-mean-token-sum-norm", {"global_num_seqs": 7, "constant": 2}, 0.5),  # 7 / (7 * 2)
    ],
)
def test_modes_by_hand(mode: str, kwargs: dict, expected: float) -> None:
    out = aggregate(LOSS, MASK, mode, **kwargs)
    assert out.dim() == 0
    assert float(out) == pytest.approx(expected, abs=1e-12)


def test_garbage_in_masked_positions_does_not_leak() -> None:
    loss = LOSS.clone()
    loss[0, 2], loss[1, 1] = math.nan, math.inf
    for mode in AGGREGATION_MODES:
        assert math.isfinite(float(aggregate(loss, MASK, mode)))


def test_fully_masked_rows_do_not_count_as_sequences() -> None:
    # a padding row (no valid token) is not a sequence: seq-mean-token-sum stays (3 + 4) / 2
    loss = torch.cat([LOSS, torch.ones(1, 3, dtype=F64)])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=torch.bool)])
    assert float(aggregate(loss, mask, "seq-mean-token-sum")) == pytest.approx(3.5)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_micro_batches_with_global_normalisers_sum_to_the_whole_batch(mode: str) -> None:
    # split rows {0}, {1}; each micro-batch divides by the global counts (3 tokens, 2 seqs, T = 3)
    whole = aggregate(LOSS, MASK, mode)
    glob = {"global_num_tokens": 3, "global_num_seqs": 2, "constant": 3}
    parts = [aggregate(LOSS[i : i + 1], MASK[i : i + 1], mode, **glob) for i in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=0, atol=1e-12)
    # ... which the per-micro-batch defaults would get wrong for token-mean: 3/2 + 4/1 = 5.5 != 7/3
    if mode == "token-mean":
        local = sum(float(aggregate(LOSS[i : i + 1], MASK[i : i + 1], mode)) for i in range(2))
        assert local == pytest.approx(5.5)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_empty_mask_gives_zero_and_zero_gradients(mode: str) -> None:
    loss = LOSS.clone().requires_grad_(True)
    out = aggregate(loss, torch.zeros(2, 3), mode)
    assert float(out.detach()) == 0.0
    out.backward()
    assert loss.grad.tolist() == [[0.0] * 3] * 2
    # a global normaliser of 0 (nothing valid on any rank) is 0 too
    assert float(aggregate(LOSS, torch.zeros(2, 3), mode, global_num_tokens=0, global_num_seqs=0)) == 0.0


def test_token_mean_gradient_by_hand() -> None:
    # d/dloss of sum(loss * mask) / 3 = mask / 3
    loss = LOSS.clone().requires_grad_(True)
    aggregate(loss, MASK, "token-mean").backward()
    torch.testing.assert_close(loss.grad, MASK.to(F64) / 3, rtol=0, atol=1e-15)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="'sum'.*token-mean, seq-mean-token-sum, seq-mean-token-mean"):
        aggregate(LOSS, MASK, "sum")
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\)"):
        aggregate(LOSS, MASK[:, :2], "token-mean")
    with pytest.raises(ValueError, match="-1"):
        aggregate(LOSS, MASK, "token-mean", global_num_tokens=-1)


def test_gradients_flow_through_the_whole_loss() -> None:
    # GRPO advantages -> PPO loss + KL + entropy bonus -> token-mean: finite, nonzero grads
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, dtype=F64, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 7, (4, 5), generator=gen)
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (4, 5)
    old = logprobs.detach() + 0.1 * torch.randn(4, 5, dtype=F64, generator=gen)
    ref = logprobs.detach() - 0.1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    adv = broadcast_to_tokens(grpo_advantages(torch.tensor([1.0, 0, 0, 1], dtype=F64), torch.zeros(4).long()), mask)
    pg, _ = ppo_clip_loss(logprobs, old, adv, mask)
    total = pg + 0.01 * kl_penalty(logprobs, ref, "k3") + entropy_bonus(entropy_from_logits(logits), 0.001)
    aggregate(total, mask, "token-mean", global_num_tokens=13).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert logits.grad[2, 1:].abs().sum() == 0  # invalid tokens get no gradient
