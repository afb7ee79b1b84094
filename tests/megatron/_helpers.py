"""Shared by the Megatron tests and their worker processes: the fixed batch, HF/Megatron forwards."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

# A vocabulary larger than the tokenizer and not a multiple of 128, so Megatron pads it
# (1030 -> 1152 at TP=1, 1280 at TP=2) and the padded logits must be ignored.
VOCAB_SIZE = 1030
TEMPERATURE = 0.7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_batch(vocab_size: int = VOCAB_SIZE, batch: int = 2, seq: int = 12) -> torch.Tensor:
    """Token ids (B, T), the same in every process."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def load_hf_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def megatron_logprobs(model_dir: str | Path, info) -> tuple[torch.Tensor, torch.Tensor]:
    """Build this rank's Megatron stage (``info``: a ParallelInfo), load the HF weights through
    checkpoint/qwen2.py, run :func:`fixed_batch` through the forward-only schedule (two micro-batches);
    return (logprobs, entropy) of the next tokens, (B, T-1), at :data:`TEMPERATURE`, on every rank."""
    from transformers import AutoConfig

    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.forward import forward_logprobs
    from megatron_rl.megatron.model import build_gpt_model

    hf_config = AutoConfig.from_pretrained(model_dir)
    first, last = info.pp_rank == 0, info.pp_rank == info.pp_size - 1
    model = build_gpt_model(hf_config, tp_size=info.tp_size, pp_size=info.pp_size, pre_process=first,
                            post_process=last)
    load_hf_into_model(model, load_hf_state(model_dir), hf_config, tp_rank=info.tp_rank, tp_size=info.tp_size,
                       pp_rank=info.pp_rank, pp_size=info.pp_size)
    model.eval()
    ids = fixed_batch(hf_config.vocab_size)
    result = forward_logprobs(model, ids, vocab_size=hf_config.vocab_size, temperature=TEMPERATURE,
                              micro_batch_size=1, with_entropy=True)
    return result.logprobs, result.entropy


def set_dist_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))


def spread_weights(model_dir: str | Path, seed: int = 0) -> None:
    """Rewrite ``model.safetensors`` with larger random weights (HF's init gives near-uniform logits,
    which would hide layout errors): linear std 1/sqrt(fan_in), embedding std 0.3, norms 1 + 0.1 N(0,1),
    biases 0.1 N(0,1). The logits then have a standard deviation of a few nats."""
    from safetensors.torch import save_file

    state = load_hf_state(model_dir)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in sorted(state.items()):
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        if "norm" in name:
            value = 1 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif "embed_tokens" in name:
            value = 0.3 * noise
        else:
            value = noise / tensor.shape[1] ** 0.5
        out[name] = value.to(tensor.dtype).contiguous()
    save_file(out, str(Path(model_dir) / "model.safetensors"), metadata={"format": "pt"})


def megatron_logprob_grads(model_dir: str | Path, info) -> dict[str, torch.Tensor]:
    """Gradients of ``sum(logprobs) + 0.1 * sum(entropy)`` of :func:`fixed_batch` w.r.t. this rank's
    parameters (PP=1; a direct forward, not the schedule), keyed by Megatron name."""
    from transformers import AutoConfig

    from megatron_rl.checkpoint.qwen2 import load_hf_into_model
    from megatron_rl.megatron.logprobs import vocab_parallel_logprobs
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import tensor_parallel_group

    assert info.pp_size == 1, "PP=1 only"
    hf_config = AutoConfig.from_pretrained(model_dir)
    model = build_gpt_model(hf_config, tp_size=info.tp_size)
    load_hf_into_model(model, load_hf_state(model_dir), hf_config, tp_rank=info.tp_rank, tp_size=info.tp_size)
    ids = fixed_batch(hf_config.vocab_size)
    logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    result = vocab_parallel_logprobs(logits[:, :-1], ids[:, 1:], vocab_size=hf_config.vocab_size,
                                     temperature=TEMPERATURE, tp_group=tensor_parallel_group(), with_entropy=True)
    (result.logprobs.sum() + 0.1 * result.entropy.sum()).backward()
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()}
