"""Reference-model CPU offload: the weights leave the GPU between forwards and come back unchanged.

On a CPU-only machine the compute device is the CPU, so offload and onload move nothing: the CPU test
checks exactly that (no tensor moved, no copy made, the logprobs bit-identical); the GPU test checks
the real transfer."""

from __future__ import annotations

import pytest
import torch
from _helpers import fixed_batch, load_hf_state
from transformers import AutoConfig

from megatron_rl.checkpoint.qwen2 import load_hf_into_model
from megatron_rl.megatron.forward import forward_logprobs
from megatron_rl.megatron.model import build_gpt_model
from megatron_rl.megatron.reference import (
    freeze_reference,
    offload_reference,
    onload_reference,
    reference_on_device,
)


def _reference(model_dir):
    hf = AutoConfig.from_pretrained(model_dir)
    model = build_gpt_model(hf, layer_spec="local")
    load_hf_into_model(model, load_hf_state(model_dir), hf, tp_rank=0, tp_size=1)
    return freeze_reference(model), hf.vocab_size


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour; the GPU path has its own test")
def test_offload_is_identity_on_cpu(qwen2_dirs, world1) -> None:
    reference, vocab = _reference(qwen2_dirs[True])
    ids = fixed_batch(vocab)
    before = forward_logprobs(reference, ids, vocab_size=vocab).logprobs
    pointers = [p.data_ptr() for p in reference.parameters()]
    assert offload_reference(reference) == 0 and onload_reference(reference) == 0
    with reference_on_device(reference) as ref:
        assert ref is reference
        during = forward_logprobs(ref, ids, vocab_size=vocab).logprobs
    assert [p.data_ptr() for p in reference.parameters()] == pointers  # nothing copied
    assert torch.equal(during, before)


def test_offload_happens_even_when_the_body_raises(qwen2_dirs, world1) -> None:
    reference, _ = _reference(qwen2_dirs[True])
    with pytest.raises(RuntimeError, match="boom"), reference_on_device(reference):
        raise RuntimeError("boom")
    assert {p.device.type for p in reference.parameters()} == {"cpu"}


@pytest.mark.gpu
def test_offload_frees_gpu_memory_and_round_trips(qwen2_dirs, world1) -> None:
    reference, vocab = _reference(qwen2_dirs[True])
    ids = fixed_batch(vocab)
    before = forward_logprobs(reference, ids, vocab_size=vocab).logprobs
    param_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    allocated = torch.cuda.memory_allocated()
    assert offload_reference(reference) > 0
    assert {p.device.type for p in reference.parameters()} == {"cpu"}
    assert all(p.is_pinned() for p in reference.parameters())
    assert allocated - torch.cuda.memory_allocated() >= param_bytes
    host = [p.data_ptr() for p in reference.parameters()]
    with reference_on_device(reference) as ref:
        assert {p.device.type for p in ref.parameters()} == {"cuda"}
        during = forward_logprobs(ref, ids, vocab_size=vocab).logprobs
    assert {p.device.type for p in reference.parameters()} == {"cpu"}
    assert [p.data_ptr() for p in reference.parameters()] == host  # the kept host copies: nothing copied back
    assert torch.equal(during, before)
