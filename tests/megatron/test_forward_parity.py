"""Megatron (HF weights loaded through checkpoint/qwen2.py) equals HF, and TP=2 / PP=2 equal TP=1:
per-token logprobs and entropy, and the gradients of a logprob + entropy loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import TEMPERATURE, fixed_batch, launch_ranks, megatron_logprob_grads, megatron_logprobs
from transformers import AutoConfig

WORKER = Path(__file__).resolve().parent / "_tp_worker.py"


def hf_logprobs(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, entropy) of the next tokens of :func:`fixed_batch` from the HF model, fp32 eager."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    ids = fixed_batch(model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float() / TEMPERATURE
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.fixture(scope="module")
def checkpoints(qwen2_dirs, llama_dir) -> dict[str, Path]:
    return {"qwen2-tied": qwen2_dirs[True], "qwen2-untied": qwen2_dirs[False], "llama-untied": llama_dir}


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen2-untied", "llama-untied"])
def test_megatron_logprobs_equal_hf(name, checkpoints, world1) -> None:
    model_dir = checkpoints[name]
    logprobs, entropy = megatron_logprobs(model_dir, world1)
    ref_logprobs, ref_entropy = hf_logprobs(model_dir)
    # The weights are spread out so that this comparison means something (not near-uniform).
    assert ref_logprobs.std() > 0.5 and ref_entropy.mean() > 0.5
    # Same fp32 math in a different kernel order: measured max |diff| <= 8e-6 here.
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=0)


def hf_logprob_grads(model_dir: Path) -> dict[str, torch.Tensor]:
    """HF-named gradients of ``sum(logprobs) + 0.1 * sum(entropy)`` (the loss of megatron_logprob_grads)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    ids = fixed_batch(model.config.vocab_size)
    logp = torch.log_softmax(model(ids).logits[:, :-1].float() / TEMPERATURE, dim=-1)
    loss = logp.gather(-1, ids[:, 1:, None]).sum() + 0.1 * (-(logp.exp() * logp).sum(-1)).sum()
    loss.backward()
    return {name: param.grad for name, param in model.named_parameters()}


def assert_grads_close(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Per tensor, |diff| <= 1e-4 * max |expected| (fp32 sums in another order; layout errors give O(1))."""
    assert sorted(grads) == sorted(expected)
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grad, expected[name], atol=1e-4 * scale, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_megatron_grads_equal_hf(tied, qwen2_dirs, world1) -> None:
    from megatron_rl.checkpoint.qwen2 import megatron_shards_to_hf

    config = AutoConfig.from_pretrained(qwen2_dirs[tied])
    megatron_grads = megatron_logprob_grads(qwen2_dirs[tied], world1)
    # Padded vocabulary rows (1030..1151) are never looked up and their logits are dropped: no gradient.
    assert not megatron_grads["embedding.word_embeddings.weight"][config.vocab_size:].any()
    # Measured max |diff| / max |grad| <= 3.7e-6 here.
    assert_grads_close(megatron_shards_to_hf([[megatron_grads]], config), hf_logprob_grads(qwen2_dirs[tied]))


@pytest.fixture(scope="module")
def two_rank_results(qwen2_dirs, tmp_path_factory) -> list[dict]:
    """Both checkpoints at TP=2, at PP=2 and at TP=PP=1 (DP=2), from one launch of 2 processes."""
    out_dir = tmp_path_factory.mktemp("two_ranks")
    return launch_ranks(WORKER, ["2x1,1x2,1x1", str(qwen2_dirs[True]), str(qwen2_dirs[False])], out_dir,
                        world_size=2, timeout_s=90)


@pytest.fixture(scope="module")
def tp1_results(qwen2_dirs, world1) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
    """tied -> the TP=PP=1 (logprobs, entropy), computed once in this process."""
    return {tied: megatron_logprobs(qwen2_dirs[tied], world1) for tied in (True, False)}


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)], ids=["tp2", "pp2"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_two_ranks_equal_one(tied, tp, pp, qwen2_dirs, tp1_results, two_rank_results) -> None:
    tp1_logprobs, tp1_entropy = tp1_results[tied]
    results = [rank_results[(f"{tp}x{pp}", str(qwen2_dirs[tied]))] for rank_results in two_rank_results]
    infos = [r["info"] for r in results]
    assert [(i.tp_size, i.pp_size, i.dp_size) for i in infos] == [(tp, pp, 1)] * 2
    assert [(i.tp_rank, i.pp_rank) for i in infos] == ([(0, 0), (1, 0)] if tp == 2 else [(0, 0), (0, 1)])
    # Both ranks return the same values (TP: reduced; PP: broadcast from the last stage).
    assert torch.equal(results[0]["logprobs"], results[1]["logprobs"])
    assert torch.equal(results[0]["entropy"], results[1]["entropy"])
    if pp == 2:
        # PP only moves activations between processes: the same fp32 ops in the same order as TP=PP=1 in
        # the same kind of process (one thread: a GEMM's last bits can depend on the thread count when it
        # has few rows, as the output layer's at the 11 scored positions here).
        one_stage = [rank_results[("1x1", str(qwen2_dirs[tied]))] for rank_results in two_rank_results]
        assert torch.equal(results[0]["logprobs"], one_stage[0]["logprobs"])
        assert torch.equal(results[0]["entropy"], one_stage[0]["entropy"])
    # Against this process's TP=1 (both layouts). TP=2 sums the row-parallel matmuls (linear_proj,
    # linear_fc2) and the softmax statistics as two
    # fp32 partial sums plus an all-reduce instead of one sum: a different reduction order, so agreement
    # is to fp32 rounding (eps 1.2e-7) of logprobs up to ~30 nats, not bit-exact: a few ulps of the
    # largest value is ~1e-5. Measured here: max |diff| 1.1e-5 at a logprob of -21 (relative 5e-7).
    # Bound: |diff| <= 1e-5 + 1e-5 * |value| (a layout error gives differences of order 1).
    torch.testing.assert_close(results[0]["logprobs"], tp1_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0]["entropy"], tp1_entropy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tp2_grads_equal_tp1(tied, qwen2_dirs, world1, two_rank_results) -> None:
    """The differentiable all-reduces of vocab_parallel_logprobs give each TP rank its exact gradient
    slice: TP=2 shards gathered by the converter equal the TP=1 gradients (measured <= 2.2e-6 of max)."""
    from megatron_rl.checkpoint.qwen2 import megatron_shards_to_hf

    config = AutoConfig.from_pretrained(qwen2_dirs[tied])
    tp2 = [rank_results[("2x1", str(qwen2_dirs[tied]))]["grads"] for rank_results in two_rank_results]
    tp1 = megatron_logprob_grads(qwen2_dirs[tied], world1)
    gathered = megatron_shards_to_hf([tp2], config)
    assert_grads_close(gathered, megatron_shards_to_hf([[tp1]], config))
    assert_grads_close(gathered, hf_logprob_grads(qwen2_dirs[tied]))  # independent of our TP=1 code path
