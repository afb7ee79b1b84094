"""vocab_parallel_logprobs: hand-checked numbers, padding ignored, temperature, gradients.
(The TP=2 path, vocab slices on two ranks, is checked against TP=1 in test_forward_parity.py.)

output_layer_logprobs (the output layer applied at the masked positions only, chunk by chunk, backward
recomputing each chunk): equal to the full logits' logprobs, entropy and gradients (w.r.t. the hidden
states and the output weight) within 1e-6 at TP=1 and TP=2 (two gloo ranks); inside a GPTModel (tied and
untied embeddings), forward_logprobs and train_step's gradients (Megatron DDP main_grad) equal the
model's own output layer's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _logprobs_worker import CHUNK_SIZES, DTYPES, PADDED_VOCAB, VOCAB_SIZES, case_loss, output_case

from megatron_rl.megatron.logprobs import chunked_linear_logprobs, output_layer_logprobs, vocab_parallel_logprobs


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


# ---------------------------------------------------------------- the output layer at response positions, chunked

TEMPERATURE = 0.7


def full_logits_reference(case: dict, vocab_size: int, with_entropy: bool = True) -> dict:
    """The unchunked computation at TP=1: logits of EVERY position from the whole weight, then
    vocab_parallel_logprobs; the loss of case_loss (which masks); gradients by autograd."""
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    logits = (hidden @ weight.t()).transpose(0, 1)  # (b, T, V)
    result = vocab_parallel_logprobs(logits[:, :-1], case["ids"][:, 1:], vocab_size=vocab_size,
                                     temperature=TEMPERATURE, with_entropy=with_entropy)
    case_loss(case, result.logprobs, result.entropy).backward()
    entropy = None if result.entropy is None else result.entropy.detach()
    return {"logprobs": result.logprobs.detach(), "entropy": entropy, "hidden_grad": hidden.grad,
            "weight_grad": weight.grad}


def assert_equals_full(got: dict, want: dict, mask: torch.Tensor) -> None:
    """Forward at the masked positions and both gradients: in fp32 within 1e-6 (relative above 1) -- the
    same sums in another order, the analytic softmax gradient instead of autograd's chain, one-row GEMMs
    at chunk 1; measured: logprobs <= 9.5e-7 at values up to 7.3 (2 ulps), gradients <= 1.3e-7 at values
    up to 0.5 --; in fp64 within 1e-12 (measured <= 9e-16), so the formulas are exact, not just close.
    Exactly 0 at the other positions (nothing is computed there)."""
    fp32 = got["logprobs"].dtype == torch.float32
    close = {"atol": 1e-6, "rtol": 1e-6} if fp32 else {"atol": 1e-12, "rtol": 0}
    torch.testing.assert_close(got["logprobs"][mask], want["logprobs"][mask], **close)
    assert not got["logprobs"][~mask].any()
    if want["entropy"] is not None:
        torch.testing.assert_close(got["entropy"][mask], want["entropy"][mask], **close)
        assert not got["entropy"][~mask].any()
    torch.testing.assert_close(got["hidden_grad"], want["hidden_grad"], **close)
    torch.testing.assert_close(got["weight_grad"], want["weight_grad"], **close)


def test_output_layer_hand_checked() -> None:
    # One position, hidden = e_0; weight rows (log 1, log 2, log 3, log 4, 100) in column 0, so the logits are
    # log(1..4) plus a padding row (vocab_size 4) with a huge logit that must not count: p = 0.1 .. 0.4.
    hidden = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (T=2, b=1, h=2)
    weight = torch.tensor([[math.log(k), 5.0] for k in (1, 2, 3, 4)] + [[100.0, 5.0]])
    result = output_layer_logprobs(hidden, weight, torch.tensor([[7, 3]]) % 4, vocab_size=4, with_entropy=True)
    assert result.logprobs.item() == pytest.approx(math.log(0.4), abs=1e-6)
    assert result.entropy.item() == pytest.approx(1.2798544, abs=1e-6)  # as test_hand_checked_logprobs_and_entropy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_entropy", [True, False], ids=["logprobs+entropy", "logprobs"])
@pytest.mark.parametrize("chunk_size", [0, 1, 4, 1000])
@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_chunked_response_only_equals_full_logits(vocab_size, chunk_size, with_entropy, dtype) -> None:
    case = output_case(vocab_size, dtype=DTYPES[dtype])
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    result = output_layer_logprobs(hidden, weight, case["ids"], vocab_size=vocab_size, temperature=TEMPERATURE,
                                   with_entropy=with_entropy, mask=case["mask"], chunk_size=chunk_size)
    case_loss(case, result.logprobs, result.entropy).backward()
    got = {"logprobs": result.logprobs.detach(), "entropy": result.entropy, "hidden_grad": hidden.grad,
           "weight_grad": weight.grad}
    assert (result.entropy is None) == (not with_entropy)
    assert_equals_full(got, full_logits_reference(case, vocab_size, with_entropy), case["mask"])
    assert not weight.grad[vocab_size:].any()  # padding rows: no logits, no gradient
    # Positions outside the mask (prompt, padding) are never read: their hidden states get no gradient.
    unmasked = ~torch.cat([case["mask"], torch.zeros(3, 1, dtype=torch.bool)], dim=1).t()  # (T, b)
    assert not hidden.grad[unmasked].any()


def test_bf16_gradients_keep_the_weight_dtype_and_are_rounded_once() -> None:
    """bf16 hidden states and weight (the GPU path): fp32 logprobs, bf16 gradients; with several chunks
    the weight gradient is summed in fp32 and rounded to bf16 once, so it matches the one-chunk GEMM to
    bf16 rounding (2^-8 relative), not to the error of bf16 sums over chunks."""
    case = output_case(37, dtype=torch.bfloat16)
    grads = {}
    for chunk_size in (0, 4):
        hidden = case["hidden"].clone().requires_grad_()
        weight = case["weight"].clone().requires_grad_()
        result = output_layer_logprobs(hidden, weight, case["ids"], vocab_size=37, temperature=TEMPERATURE,
                                       with_entropy=True, mask=case["mask"], chunk_size=chunk_size)
        assert result.logprobs.dtype == result.entropy.dtype == torch.float32
        case_loss(case, result.logprobs, result.entropy).backward()
        assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
        grads[chunk_size] = (hidden.grad.float(), weight.grad.float())
    for one, several in zip(grads[0], grads[4], strict=True):
        torch.testing.assert_close(several, one, atol=2**-8 * one.abs().max().item(), rtol=0)


def test_prompt_positions_are_never_computed() -> None:
    """NaN hidden states at every unmasked position (prompt and padding): an output layer applied there
    would put NaN in its logits; the masked results and gradients stay finite and unchanged."""
    case = output_case(37)
    poisoned = case["hidden"].clone()
    unmasked = ~torch.cat([case["mask"], torch.zeros(3, 1, dtype=torch.bool)], dim=1).t()
    poisoned[unmasked] = float("nan")
    clean = output_layer_logprobs(case["hidden"], case["weight"], case["ids"], vocab_size=37, mask=case["mask"],
                                  with_entropy=True, chunk_size=4)
    hidden = poisoned.requires_grad_()
    result = output_layer_logprobs(hidden, case["weight"], case["ids"], vocab_size=37, mask=case["mask"],
                                   with_entropy=True, chunk_size=4)
    assert torch.equal(result.logprobs, clean.logprobs) and torch.equal(result.entropy, clean.entropy)
    (result.logprobs.sum() + result.entropy.sum()).backward()
    assert torch.isfinite(hidden.grad).all()


def test_at_most_one_chunk_of_logits_exists() -> None:
    """Every tensor an op creates in forward and backward, recorded: those shaped like logits (rows, 37
    vocabulary columns: logits, their fp32 copies, probabilities, logit gradients) have at most chunk_size
    rows; unchunked, all 16 scored positions at once."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LogitRows(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:  # new buffers only (not the weight's transposed view, say)
                self.rows += [t.shape[0] for t in tree_leaves(out)
                              if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == 37]
            return out

    case = output_case(37)
    assert int(case["mask"].sum()) == 16
    for chunk_size, most_rows in ((4, 4), (0, 16)):
        hidden = case["hidden"].clone().requires_grad_()
        weight = case["weight"].clone().requires_grad_()
        with LogitRows() as recorded:
            result = output_layer_logprobs(hidden, weight, case["ids"], vocab_size=37, mask=case["mask"],
                                           with_entropy=True, chunk_size=chunk_size)
            case_loss(case, result.logprobs, result.entropy).backward()
        assert max(recorded.rows) == most_rows, (chunk_size, recorded.rows)


def test_chunked_arguments_are_checked() -> None:
    hidden, weight = torch.zeros(3, 4), torch.zeros(8, 4)
    with pytest.raises(ValueError, match="chunk_size=-1 must be an integer >= 0"):
        chunked_linear_logprobs(hidden, weight, torch.zeros(3, dtype=torch.long), vocab_size=8, chunk_size=-1)
    with pytest.raises(ValueError, match=r"must share h; got \(3, 4\) and \(8, 5\)"):
        chunked_linear_logprobs(hidden, torch.zeros(8, 5), torch.zeros(3, dtype=torch.long), vocab_size=8)
    with pytest.raises(ValueError, match=r"mask shape \(2, 3\) != \(b, T-1\) = \(3, 1\)"):
        output_layer_logprobs(torch.zeros(2, 3, 4), weight, torch.zeros(3, 2, dtype=torch.long), vocab_size=8,
                              mask=torch.ones(2, 3, dtype=torch.bool))


@pytest.fixture(scope="module")
def tp2_chunked(tmp_path_factory) -> list[dict]:
    """Every case of _logprobs_worker.py on two gloo ranks (TP=2: half the weight's rows each)."""
    from _helpers import launch_ranks

    out_dir = tmp_path_factory.mktemp("chunked_tp2")
    worker = Path(__file__).resolve().parent / "_logprobs_worker.py"
    return launch_ranks(worker, [], out_dir, world_size=2, timeout_s=60)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_entropy", [True, False], ids=["logprobs+entropy", "logprobs"])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
def test_tp2_chunked_equals_tp1_full_logits(vocab_size, chunk_size, with_entropy, dtype, tp2_chunked) -> None:
    """TP=2 (the max, the sums and the hidden-state gradient all-reduced over both ranks; rank 1 holds some
    or only padding rows): the same logprobs, entropy and gradients as the full logits at TP=1."""
    ranks = [results[(vocab_size, chunk_size, with_entropy, dtype)] for results in tp2_chunked]
    assert torch.equal(ranks[0]["logprobs"], ranks[1]["logprobs"])  # reduced: the same on both ranks
    assert torch.equal(ranks[0]["hidden_grad"], ranks[1]["hidden_grad"])
    got = dict(ranks[0], weight_grad=torch.cat([r["weight_grad"] for r in ranks]))  # rows 0-23, 24-47
    assert got["weight_grad"].shape == (PADDED_VOCAB, 32)
    case = output_case(vocab_size, dtype=DTYPES[dtype])
    assert_equals_full(got, full_logits_reference(case, vocab_size, with_entropy), case["mask"])


# ---------------------------------------------------------------- inside a GPTModel (TP=1, one process)


def model_logits_logprobs(model, ids: torch.Tensor, vocab_size: int):
    """The model's own output layer at every position (logits (b, T, V)), then vocab_parallel_logprobs."""
    from _helpers import TEMPERATURE as MODEL_TEMPERATURE

    logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    return vocab_parallel_logprobs(logits[:, :-1], ids[:, 1:], vocab_size=vocab_size, temperature=MODEL_TEMPERATURE,
                                   with_entropy=True)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_forward_logprobs_at_response_positions_equal_the_model_output_layer(tied, qwen2_dirs, world1) -> None:
    from _helpers import TEMPERATURE as MODEL_TEMPERATURE
    from _helpers import build_policy_and_reference, mixed_length_batch

    from megatron_rl.megatron.forward import forward_logprobs

    _policy, _optimizer, model, config = build_policy_and_reference(qwen2_dirs[tied], world1)
    batch, _advantages = mixed_length_batch(config.vocab_size)
    ids, mask = batch.input_ids, batch.response_mask
    with torch.no_grad():
        full = model_logits_logprobs(model, ids, config.vocab_size)
    for passes in ({"micro_batch_size": 4, "chunk_size": 3}, {"max_tokens_per_micro_batch": 40, "chunk_size": 0}):
        got = forward_logprobs(model, ids, vocab_size=config.vocab_size, temperature=MODEL_TEMPERATURE, mask=mask,
                               with_entropy=True, **passes)
        # The same decoder; the output layer's GEMM on the gathered rows only (and, for the token budget,
        # micro-batches cut to their own lengths): fp32 rounding of logprobs up to ~25 nats.
        torch.testing.assert_close(got.logprobs[mask], full.logprobs[mask], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(got.entropy[mask], full.entropy[mask], atol=1e-5, rtol=1e-6)
        assert not got.logprobs[~mask].any() and not got.entropy[~mask].any()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_train_step_gradients_equal_the_model_output_layer(tied, qwen2_dirs, world1) -> None:
    """train_step (output layer at the response positions, chunks of 5 tokens) leaves in Megatron DDP's
    main_grad of EVERY parameter -- the output weight, or the word embedding when tied (lookup + output
    gradients summed) -- the gradient autograd gives through the model's own output layer at all positions."""
    from _helpers import TEMPERATURE as MODEL_TEMPERATURE
    from _helpers import build_policy_and_reference, mixed_length_batch

    from megatron_rl.megatron.optim import unwrap_ddp
    from megatron_rl.megatron.train_step import LossSettings, count_valid_tokens, train_step
    from megatron_rl.trainer.batch import make_micro_batches

    policy, optimizer, reference, config = build_policy_and_reference(qwen2_dirs[tied], world1, clip_grad=0.0)
    batch, advantages = mixed_length_batch(config.vocab_size)
    micro = make_micro_batches(batch, torch.arange(len(batch)), micro_batch_size=4, loss_mask=batch.response_mask,
                               old_logprobs=None, advantages=advantages, ref_logprobs=None)
    num_tokens = count_valid_tokens(micro)
    settings = LossSettings(kind="nll", kl_coef=0.0, entropy_coef=0.1, temperature=MODEL_TEMPERATURE,
                            logprob_chunk_size=5)
    train_step(policy, optimizer, micro, global_num_tokens=num_tokens, vocab_size=config.vocab_size, settings=settings)
    grads = {name: param.main_grad for name, param in unwrap_ddp(policy).named_parameters()}

    full = model_logits_logprobs(reference, batch.input_ids, config.vocab_size)  # same weights, own output layer
    mask = batch.response_mask
    ((-(full.logprobs * mask).sum() - 0.1 * (full.entropy * mask).sum()) / num_tokens).backward()
    expected = dict(reference.named_parameters())
    assert sorted(grads) == sorted(expected)
    output = "embedding.word_embeddings.weight" if tied else "output_layer.weight"
    assert output in grads and grads[output][: config.vocab_size].abs().max() > 1e-3
    for name, grad in grads.items():
        want = expected[name].grad
        # fp32 sums in another order, through the whole decoder: |diff| <= 1e-5 of the tensor's largest
        # gradient (measured <= 1.2e-6); a lost or doubled output-layer gradient differs by order 1.
        torch.testing.assert_close(grad, want, atol=1e-5 * want.abs().max().item(), rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
