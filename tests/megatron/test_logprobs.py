"""vocab_parallel_logprobs: hand-checked numbers, padding ignored, temperature, gradients.
(The TP=2 path, vocab slices on two ranks, is checked against TP=1 in test_forward_parity.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.megatron.logprobs import vocab_parallel_logprobs


def test_hand_checked_logprobs_and_entropy() -> None:
    # logits log(1..4) -> probabilities 0.1, 0.2, 0.3, 0.4. Column 4 is vocabulary padding (vocab_size 4)
    # with a huge logit: it must not enter the softmax.
    logits = torch.tensor([[math.log(1), math.log(2), math.log(3), math.log(4), 100.0]])
    result = vocab_parallel_logprobs(logits, torch.tensor([3]), vocab_size=4, with_entropy=True)
    assert result.logprobs.item() == pytest.approx(math.log(0.4), abs=1e-6)
    # H = -(0.1 ln 0.1 + 0.2 ln 0.2 + 0.3 ln 0.3 + 0.4 ln 0.4) = 0.23026 + 0.32189 + 0.36119 + 0.36652 = 1.27985
    assert result.entropy.item() == pytest.approx(1.2798544, abs=1e-6)


def test_temperature_divides_the_logits() -> None:
    # At temperature 2 the logits become log(sqrt(k)): p = sqrt(k) / (1 + 1.41421 + 1.73205 + 2) = sqrt(k) / 6.14626.
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    result = vocab_parallel_logprobs(logits, torch.tensor([0]), vocab_size=4, temperature=2.0)
    assert result.logprobs.item() == pytest.approx(math.log(1 / 6.146264), abs=1e-6)
    assert result.entropy is None


def test_matches_log_softmax_and_its_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 12, generator=generator)).requires_grad_()
    targets = torch.randint(0, 10, (2, 5), generator=generator)
    result = vocab_parallel_logprobs(logits, targets, vocab_size=10, temperature=0.7, with_entropy=True)
    (result.logprobs.sum() + result.entropy.sum()).backward()
    grad = logits.grad.clone()

    reference_logits = logits.detach().clone().requires_grad_()
    logp = torch.log_softmax(reference_logits[..., :10] / 0.7, dim=-1)
    ref_logprobs = logp.gather(-1, targets[..., None]).squeeze(-1)
    ref_entropy = -(logp.exp() * logp).sum(-1)
    (ref_logprobs.sum() + ref_entropy.sum()).backward()
    torch.testing.assert_close(result.logprobs, ref_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.entropy, ref_entropy, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, reference_logits.grad, atol=1e-6, rtol=0)
    assert not grad[..., 10:].any()  # padded columns get no gradient


def test_one_rank_group_equals_no_group(world1) -> None:
    from megatron_rl.megatron.parallel import tensor_parallel_group

    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 3, 5])
    alone = vocab_parallel_logprobs(logits, targets, vocab_size=6, with_entropy=True)
    grouped = vocab_parallel_logprobs(logits, targets, vocab_size=6, with_entropy=True,
                                      tp_group=tensor_parallel_group())
    assert torch.equal(alone.logprobs, grouped.logprobs) and torch.equal(alone.entropy, grouped.entropy)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
    ({"vocab_size": 3}, r"target ids must lie in \[0, vocab_size=3\); got \[0, 3\]"),
])
def test_bad_arguments_raise(kwargs, message) -> None:
    args = {"vocab_size": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        vocab_parallel_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]), **args)


def test_forward_logprobs_rejects_a_micro_batch_that_does_not_divide_the_batch() -> None:
    from megatron_rl.megatron.forward import forward_logprobs

    with pytest.raises(ValueError, match="micro_batch_size=2 does not divide the batch size 3"):
        forward_logprobs(torch.nn.Identity(), torch.zeros(3, 4, dtype=torch.long), vocab_size=8, micro_batch_size=2)
